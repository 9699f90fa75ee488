//! /metrics, request ids and access logs, checked after known sequences of requests. The
//! exposition is parsed by the reference Python parser (prometheus_client), so it is valid.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use common::*;

struct Sample {
    name: String,
    labels: serde_json::Map<String, serde_json::Value>,
    value: f64,
}

fn scrape(gateway: &Proc) -> Vec<Sample> {
    let (status, body) = get(&gateway.url("/metrics")).expect("metrics");
    assert_eq!(status, 200);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/parse_metrics.py");
    let mut parser = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs (`make test` installs the test clients)");
    parser
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write exposition");
    let output = parser.wait_with_output().expect("parser output");
    assert!(
        output.status.success(),
        "invalid exposition ({}):\n{body}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).expect("JSON");
    samples
        .into_iter()
        .map(|sample| Sample {
            name: sample["name"].as_str().expect("name").to_string(),
            labels: sample["labels"].as_object().expect("labels").clone(),
            value: sample["value"].as_f64().expect("value"),
        })
        .collect()
}

/// The value of the one sample with this name and these labels (0 when absent).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|sample| {
            sample.name == name
                && labels.iter().all(|(key, value)| {
                    sample.labels.get(*key).and_then(|v| v.as_str()) == Some(*value)
                })
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "{name} {labels:?} matches {} samples",
        matching.len()
    );
    matching.first().map_or(0.0, |sample| sample.value)
}

fn label_values(samples: &[Sample], name: &str, label: &str) -> std::collections::BTreeSet<String> {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter_map(|sample| {
            sample
                .labels
                .get(label)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn request_metrics_count_exactly_what_happened() {
    // SIGKILLed below, which would leave engine processes orphaned, as vLLM's are.
    let mut mock = mock_vllm(&[
        ("MOCK_VLLM_STREAM_DELAY", "5ms"),
        ("MOCK_VLLM_ENGINE_PROCESSES", "0"),
    ]);
    let gateway = gateway(mock.port, &[], &[]);
    for _ in 0..2 {
        assert_eq!(
            post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "").status,
            200
        );
    }
    assert_eq!(
        post_json(gateway.port, "/v1/responses", RESPONSES_STREAM, "").status,
        200
    );
    // A stream the client abandons after its first event.
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    write!(stream, "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESPONSES_STREAM}", RESPONSES_STREAM.len()).expect("write");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !line.starts_with("event:") {
        line.clear();
        reader.read_line(&mut line).expect("read");
    }
    drop(reader);
    wait_until("the abandoned stream to be counted", DEADLINE, || {
        value(
            &scrape(&gateway),
            "gateway_upstream_errors_total",
            &[("kind", "client_disconnect")],
        ) == 1.0
    });
    // Then vLLM goes away: a 502.
    mock.signal(nix::sys::signal::Signal::SIGKILL);
    mock.wait_exit(DEADLINE);
    assert_eq!(
        post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "").status,
        502
    );

    let samples = scrape(&gateway);
    let requests = |status| {
        value(
            &samples,
            "gateway_requests_total",
            &[
                ("route", "/v1/responses"),
                ("method", "POST"),
                ("status", status),
            ],
        )
    };
    assert_eq!(requests("200"), 4.0);
    assert_eq!(requests("502"), 1.0);
    assert_eq!(
        value(
            &samples,
            "gateway_upstream_errors_total",
            &[("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "gateway_upstream_errors_total",
            &[("kind", "client_disconnect")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "gateway_request_duration_seconds_count",
            &[("route", "/v1/responses"), ("stream", "true")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "gateway_request_duration_seconds_count",
            &[("route", "/v1/responses"), ("stream", "false")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "gateway_time_to_first_byte_seconds_count",
            &[("route", "/v1/responses")]
        ),
        2.0
    );
    assert_eq!(value(&samples, "gateway_streams_active", &[]), 0.0);
    assert_eq!(value(&samples, "gateway_requests_in_flight", &[]), 0.0);
    assert_eq!(
        value(
            &samples,
            "gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
}

#[test]
fn distinct_paths_do_not_create_new_label_values() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &["--access-log", "false"], &[]);
    let before = scrape(&gateway);
    assert!(label_values(&before, "gateway_requests_total", "route").is_empty());
    for index in 0..1000 {
        let path = format!("/random/{index:x}{}", fastrand::u64(..));
        let response = raw_request(gateway.port, &format!("GET {path} HTTP/1.1"), b"");
        assert_eq!(response.status, 404);
    }
    let after = scrape(&gateway);
    let routes = label_values(&after, "gateway_requests_total", "route");
    assert_eq!(routes.into_iter().collect::<Vec<_>>(), ["other"]);
    assert_eq!(
        value(
            &after,
            "gateway_requests_total",
            &[("route", "other"), ("method", "GET"), ("status", "404")]
        ),
        1000.0
    );
}

#[test]
fn request_ids_round_trip_through_vllm_and_the_log() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let response = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nX-Request-Id: client-id-42",
    );
    assert_eq!(response.header("x-request-id"), Some("client-id-42"));
    let (_, seen) = get(&mock.url("/_mock/last-request")).expect("last request");
    let seen: serde_json::Value = serde_json::from_str(&seen).expect("JSON");
    assert_eq!(seen["headers"]["x-request-id"], "client-id-42");
    wait_until("the access log line", DEADLINE, || {
        gateway
            .log_text()
            .contains("\"request_id\":\"client-id-42\"")
    });
    let access = gateway
        .log_text()
        .lines()
        .find(|line| line.contains("client-id-42"))
        .expect("line")
        .to_string();
    let access: serde_json::Value = serde_json::from_str(&access).expect("JSON log line");
    assert_eq!(access["status"], 200);
    assert_eq!(access["route"], "/v1/responses");
    assert_eq!(access["stream"], false);

    // An insane id is replaced by a fresh one, which vLLM sees too.
    let response = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nX-Request-Id: has spaces and ; semicolons",
    );
    let generated = response.header("x-request-id").expect("an id").to_string();
    assert_eq!(generated.len(), 32);
    let (_, seen) = get(&mock.url("/_mock/last-request")).expect("last request");
    let seen: serde_json::Value = serde_json::from_str(&seen).expect("JSON");
    assert_eq!(seen["headers"]["x-request-id"], generated.as_str());
}

#[test]
fn child_metrics_follow_a_restart() {
    let (gateway, vllm_port) = gateway_serve(&["--restart", "always"], &[]);
    wait_until("ready", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(s, _)| s == 200)
    });
    let response = raw_request(vllm_port, "POST /_mock/exit?code=3 HTTP/1.1", b"");
    assert_eq!(response.status, 200);
    wait_until(
        "the restart to be counted and vLLM ready again",
        DEADLINE,
        || {
            let samples = scrape(&gateway);
            value(
                &samples,
                "gateway_child_restarts_total",
                &[("reason", "exit_code")],
            ) == 1.0
                && value(&samples, "gateway_child_up", &[]) == 1.0
        },
    );
    let samples = scrape(&gateway);
    assert_eq!(
        value(&samples, "gateway_child_state", &[("state", "ready")]),
        1.0
    );
    assert_eq!(
        value(&samples, "gateway_child_state", &[("state", "restarting")]),
        0.0
    );
    assert_eq!(value(&samples, "gateway_child_last_exit_code", &[]), 3.0);
    assert!(value(&samples, "gateway_child_start_seconds", &[]) > 0.0);
}

#[test]
fn vllms_own_metrics_are_appended_only_when_asked_and_the_result_still_parses() {
    let mock = mock_vllm(&[]);
    let merged = gateway(mock.port, &["--metrics-merge-upstream", "true"], &[]);
    let plain = gateway(mock.port, &[], &[]);
    assert_eq!(
        post_json(merged.port, "/v1/responses", RESPONSES_JSON, "").status,
        200
    );

    let samples = scrape(&merged);
    assert_eq!(
        value(
            &samples,
            "vllm:request_success_total",
            &[("model_name", "mock-model"), ("finished_reason", "stop")]
        ),
        1.0,
        "vLLM's counter, as vLLM reports it"
    );
    assert_eq!(
        value(
            &samples,
            "gateway_requests_total",
            &[("route", "/v1/responses"), ("status", "200")]
        ),
        1.0,
        "the gateway's own metrics are all there"
    );
    let plain_samples = scrape(&plain);
    assert!(plain_samples.iter().all(|s| !s.name.starts_with("vllm:")));
    assert!(plain_samples.iter().any(|s| s.name == "gateway_build_info"));

    // With vLLM gone, the gateway still answers with its own metrics.
    drop(mock);
    let samples = scrape(&merged);
    assert!(samples.iter().all(|s| !s.name.starts_with("vllm:")));
    assert!(samples.iter().any(|s| s.name == "gateway_build_info"));
}
