//! Waiting streams kept alive, with real processes: vLLM (mock-vllm) is killed under
//! `gateway serve` and loads again slowly (`MOCK_VLLM_STARTUP_DELAY`); a streaming request sent
//! meanwhile gets its stream at once, SSE comments while it waits, then vLLM's events, or the
//! final error event when the wait runs out.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const KEEPALIVE_AFTER: Duration = Duration::from_millis(500);

/// Kills the ready vLLM of `gateway`, and returns once the gateway no longer accepts requests
/// for it (the next vLLM is on its way).
fn kill_vllm(gateway: &Proc) {
    let (_, body) = get(&gateway.url("/readyz")).expect("readyz answers");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let pid = report["pid"].as_i64().expect("a ready vLLM has a pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill vLLM");
    wait_until("vLLM to be gone", DEADLINE, || !ready(gateway));
}

/// Sends a streaming request; returns the bytes that came within `first_within`, and then the
/// whole response.
fn stream_request(port: u16, first_within: Duration) -> (String, RawResponse) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{RESPONSES_STREAM}",
        RESPONSES_STREAM.len()
    )
    .expect("write");
    stream
        .set_read_timeout(Some(first_within))
        .expect("timeout");
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains(": waiting for the model server:") {
        match stream.read(&mut buffer) {
            Ok(0) => panic!("the stream ended: {}", String::from_utf8_lossy(&raw)),
            Ok(read) => raw.extend_from_slice(&buffer[..read]),
            Err(error) => panic!(
                "no keep-alive comment within {first_within:?} ({error}): {}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    let first = String::from_utf8_lossy(&raw).to_string();
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.read_to_end(&mut raw).expect("the stream ends");
    (first, parse_response(&raw))
}

fn waiting_streams(gateway: &Proc, outcome: &str) -> Option<f64> {
    let (_, body) = get(&gateway.url("/metrics"))?;
    let name = format!("gateway_waiting_streams_total{{outcome=\"{outcome}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&name)?.parse().ok())
}

fn slow_loading_gateway(startup_delay: &str) -> Proc {
    slow_loading_gateway_with(startup_delay, &[])
}

fn slow_loading_gateway_with(startup_delay: &str, env: &[(&str, &str)]) -> Proc {
    let mut env = env.to_vec();
    env.extend([
        ("MOCK_VLLM_STARTUP_DELAY", startup_delay),
        ("MOCK_VLLM_ENGINE_PROCESSES", "0"),
    ]);
    let (gateway, _) = gateway_serve(
        &[
            "--stream-keepalive-after",
            "500ms",
            "--stream-keepalive-interval",
            "200ms",
        ],
        &env,
    );
    wait_ready(&gateway);
    gateway
}

/// The JSON of the final `error` event of a stream's body.
fn error_event(body: &str) -> serde_json::Value {
    let error = body
        .split("event: error\ndata: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no error event: {body}"));
    assert!(
        body.trim_end().ends_with('}'),
        "the error event is last: {body}"
    );
    serde_json::from_str(error.lines().next().expect("a data line")).expect("JSON")
}

#[test]
fn a_stream_sent_while_vllm_loads_hears_comments_then_vllms_events_whole() {
    let gateway = slow_loading_gateway("2s");
    kill_vllm(&gateway);
    let (first, response) = stream_request(gateway.port, KEEPALIVE_AFTER + Duration::from_secs(1));
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let body = String::from_utf8_lossy(&response.body).to_string();
    // Comments first, then vLLM's stream as it sent it, nothing after.
    let events = body.as_str();
    let start = events.find("event: ").expect("vLLM's events follow");
    assert!(
        events[..start]
            .lines()
            .all(|line| line.is_empty() || line.starts_with(": waiting for the model server: ")),
        "{body}"
    );
    let vllm = &events[start..];
    assert!(vllm.starts_with("event: response.created\n"), "{body}");
    assert!(!vllm.contains("event: error"), "{body}");
    assert!(!vllm.contains(": waiting"), "{body}");
    let last = vllm.trim_end().rsplit("\n\n").next().expect("a last event");
    assert!(last.starts_with("event: response.completed\n"), "{body}");
    assert_eq!(waiting_streams(&gateway, "relayed"), Some(1.0));
}

#[test]
fn the_openai_python_sdk_reads_a_stream_kept_alive_while_vllm_loads() {
    let gateway = slow_loading_gateway("4s");
    kill_vllm(&gateway);
    let result = run_sdk_client("stream_client.py", &gateway.url("/v1"));
    assert_eq!(result["error"], serde_json::Value::Null);
    assert_eq!(result["first"], "response.created");
    assert_eq!(result["last"], "response.completed");
    assert_eq!(result["text"], "HELLO");
    // It went through the wait, not to a vLLM that was already back.
    assert_eq!(waiting_streams(&gateway, "relayed"), Some(1.0));
}

#[test]
fn a_start_that_fails_ends_the_waiting_stream_with_the_error_event() {
    // vLLM starts once; every later start exits at once, so the wait runs out.
    let dir = tempfile::tempdir().expect("tempdir");
    let vllm = script(
        dir.path(),
        "vllm",
        "#!/bin/sh\nif [ -e \"$MARKER\" ]; then exit 3; fi\ntouch \"$MARKER\"\nexec \"$MOCK\" \"$@\"\n",
    );
    let marker = dir.path().join("started");
    let (gateway, _) = gateway_serve_child(
        &[],
        0,
        &vllm,
        0,
        &[
            "--stream-keepalive-after",
            "500ms",
            "--stream-keepalive-interval",
            "200ms",
            "--ready-wait-timeout",
            "2s",
            "--max-restarts",
            "0",
        ],
        &[
            ("MARKER", marker.to_str().expect("utf-8 path")),
            ("MOCK", MOCK_VLLM),
            ("MOCK_VLLM_ENGINE_PROCESSES", "0"),
        ],
    );
    wait_ready(&gateway);
    kill_vllm(&gateway);
    let (first, response) = stream_request(gateway.port, KEEPALIVE_AFTER + Duration::from_secs(1));
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let body = String::from_utf8_lossy(&response.body).to_string();
    let data = error_event(&body);
    assert_eq!(data["status"], 503, "{data}");
    assert_eq!(data["code"], "upstream_not_ready", "{data}");
    assert_eq!(data["error"]["code"], "upstream_not_ready", "{data}");
    // Which state vLLM is in, as /readyz says it.
    let message = data["message"].as_str().expect("a message");
    assert!(
        message
            .strip_prefix("the model server is not ready: ")
            .is_some_and(|state| state.starts_with("restart ")),
        "{data}"
    );
    assert_eq!(waiting_streams(&gateway, "failed"), Some(1.0));
}

#[test]
fn an_error_status_from_vllm_ends_the_waiting_stream_with_its_status_and_code() {
    let gateway = slow_loading_gateway_with("2s", &[("MOCK_VLLM_FAIL_STATUS", "503")]);
    kill_vllm(&gateway);
    let (first, response) = stream_request(gateway.port, KEEPALIVE_AFTER + Duration::from_secs(1));
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let data = error_event(&String::from_utf8_lossy(&response.body));
    assert_eq!(data["status"], 503, "{data}");
    // vLLM's own error object, as vLLM sent it.
    assert!(data["error"]["message"].is_string(), "{data}");
    assert_ne!(data["code"], "upstream_not_ready", "{data}");
    assert_eq!(waiting_streams(&gateway, "upstream_error"), Some(1.0));
}

#[test]
fn a_relayed_stream_still_running_when_the_drain_times_out_ends_with_the_error_event() {
    // vLLM comes back slowly, then pauses after its first event for longer than the drain.
    let (mut gateway, _) = gateway_serve(
        &[
            "--stream-keepalive-after",
            "500ms",
            "--stream-keepalive-interval",
            "200ms",
            "--drain-timeout",
            "1s",
        ],
        &[
            ("MOCK_VLLM_STARTUP_DELAY", "2s"),
            ("MOCK_VLLM_ENGINE_PROCESSES", "0"),
            ("MOCK_VLLM_STREAM_DELAY", "30s"),
        ],
    );
    wait_ready(&gateway);
    kill_vllm(&gateway);
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    write!(
        stream,
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{RESPONSES_STREAM}",
        RESPONSES_STREAM.len()
    )
    .expect("write");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    // The wait is over and vLLM's events are being relayed when the stop begins.
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains("event: response.created") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => panic!("no event from vLLM: {}", String::from_utf8_lossy(&raw)),
            Ok(read) => raw.extend_from_slice(&buffer[..read]),
        }
    }
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    stream.read_to_end(&mut raw).expect("the stream ends");
    let body = String::from_utf8_lossy(&parse_response(&raw).body).to_string();
    assert!(
        !body.contains("event: response.completed"),
        "vLLM's stream was still running: {body}"
    );
    let data = error_event(&body);
    assert_eq!(data["code"], "drain_timeout", "{data}");
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
}
