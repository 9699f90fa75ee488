//! The health port (`--health-port`): the gateway's own endpoints on a listener of their own,
//! answered when the main port's `max_connections` are all taken, while the model loads and
//! through a stop's drain; never a way to vLLM. Real processes: the gateway binary, with
//! mock-vllm as its upstream or its child.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

/// A connection that sends part of a request head and nothing more: on the main port it holds
/// one of `max_connections` until `client_header_timeout`.
fn hold_a_connection(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .expect("write half a head");
    stream
}

#[test]
fn probes_on_the_health_port_are_answered_while_every_client_connection_is_taken() {
    let upstream = mock_vllm(&[]);
    let mut gateway = gateway(
        upstream.port,
        &["--max-connections", "2", "--health-port", "0"],
        &[],
    );
    let health = gateway.expect_report("the health port", reported_health_port);
    let held = [
        hold_a_connection(gateway.port),
        hold_a_connection(gateway.port),
    ];
    // A probe on the main port waits in the listen backlog behind them: no answer.
    let mut waiting = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    waiting
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write the probe");
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    match waiting.read(&mut byte) {
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the main port answered past max_connections: {other:?}"),
    }

    let (status, body) = get(&url(health, "/livez")).expect("the health port answers");
    assert_eq!(status, 200, "{body}");
    let (status, _) = get(&url(health, "/readyz")).expect("the health port answers");
    assert_eq!(status, 200);
    let (status, metrics) = get(&url(health, "/metrics")).expect("the health port answers");
    assert_eq!(status, 200);
    assert!(metrics.contains("gateway_client_connections"), "{metrics}");

    // The waiting probe is served once a held connection goes.
    drop(held);
    waiting
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut raw = Vec::new();
    waiting
        .read_to_end(&mut raw)
        .expect("the waiting probe's answer");
    assert_eq!(parse_response(&raw).status, 200);
}

/// A connection held open on the health port (idle, or half a request) is closed for a newer
/// one once 16 are open: however many a client holds, a probe gets its answer.
#[test]
fn connections_held_open_on_the_health_port_cannot_keep_a_probe_waiting() {
    let upstream = mock_vllm(&[]);
    let mut gateway = gateway(upstream.port, &["--health-port", "0"], &[]);
    let health = gateway.expect_report("the health port", reported_health_port);
    let mut held: Vec<TcpStream> = (0..40).map(|_| hold_a_connection(health)).collect();

    let (status, body) = get(&url(health, "/livez")).expect("the health port answers");
    assert_eq!(status, 200, "{body}");
    // The oldest held connection was closed, without an answer.
    held[0]
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut rest = Vec::new();
    let closed = match held[0].read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(error) => error.kind() == ErrorKind::ConnectionReset,
    };
    assert!(closed, "{}", String::from_utf8_lossy(&rest));
}

#[test]
fn the_health_port_forwards_nothing_to_vllm() {
    let upstream = mock_vllm(&[]);
    let mut gateway = gateway(upstream.port, &["--health-port", "0"], &[]);
    let health = gateway.expect_report("the health port", reported_health_port);

    let response = post_json(health, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 404);
    assert_eq!(response.json()["error"]["code"], "not_found");
    let (status, _) = get(&url(health, "/v1/models")).expect("the health port answers");
    assert_eq!(status, 404);
    assert_eq!(
        mock_stats_on(upstream.port)["requests"],
        serde_json::json!(0),
        "nothing reached vLLM"
    );
    // The main port forwards as ever.
    assert_eq!(
        post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "").status,
        200
    );
}

#[test]
fn under_serve_the_health_port_answers_while_the_model_loads_and_through_the_drain() {
    let (mut gateway, _) = gateway_serve(
        &["--health-port", "0", "--drain-timeout", "20s"],
        &[
            ("MOCK_VLLM_STARTUP_DELAY", "2s"),
            // 141 events: about 7 s of stream, which the drain lets finish.
            ("MOCK_VLLM_STREAM_DELAY", "50ms"),
        ],
    );
    let health = gateway.expect_report("the health port", reported_health_port);
    // Loading: the main port is closed, the health port says alive and not ready.
    let (status, body) = get(&url(health, "/readyz")).expect("the health port answers");
    assert_eq!(status, 503, "{body}");
    assert!(!accepts_connections(gateway.port));
    let (status, body) = get(&url(health, "/livez")).expect("the health port answers");
    assert_eq!(status, 200, "{body}");
    wait_until("/readyz on the health port", DEADLINE, || {
        get(&url(health, "/readyz")).is_some_and(|(status, _)| status == 200)
    });

    let stream = start_stream(&gateway);
    gateway.signal(Signal::SIGTERM);
    wait_until("the main port to close for the drain", DEADLINE, || {
        !accepts_connections(gateway.port)
    });
    let (status, body) = get(&url(health, "/readyz")).expect("the health port answers");
    assert_eq!(status, 503, "draining: {body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(report["status"], "draining");
    assert_eq!(report["reason"], "the gateway is draining before it stops");
    let (status, body) = get(&url(health, "/livez")).expect("the health port answers");
    assert_eq!(status, 200, "{body}");

    let streamed = stream.join().expect("stream thread");
    assert_eq!(
        streamed.body,
        fixture("vllm-responses-stream-gpt-oss-20b.sse"),
        "the stream finished in the drain"
    );
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    assert!(
        !accepts_connections(health),
        "the health port closes at exit"
    );
}

/// A health port that would collide with the main port, or that the standalone proxy's upstream
/// names, is refused with exit 2 before anything starts.
#[test]
fn a_health_port_that_collides_is_refused_before_anything_starts() {
    for (upstream, health_port, expected) in [
        (
            "8000",
            "9100",
            "`--health-port` (key `health_port`): must differ from port (9100)",
        ),
        (
            "9101",
            "9101",
            "names the gateway's own health port (9101), which serves no model",
        ),
    ] {
        let output = std::process::Command::new(GATEWAY)
            .args(["--llm-api-base", &format!("http://127.0.0.1:{upstream}")])
            .args(["--port", "9100", "--health-port", health_port])
            .output()
            .expect("run the gateway");
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}
