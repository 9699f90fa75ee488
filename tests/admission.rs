//! Admission control, with real processes: `--max-concurrent-requests` turns held by streams that
//! mock-vllm never ends (`MOCK_VLLM_STALL_MID_STREAM`), requests queued behind them first in,
//! first out, and 429s past the queue or its timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// Opens a streaming request and returns once its first bytes arrived (it holds a turn); the
/// stream stays open until the returned socket is dropped.
fn hold_stream(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(
        stream,
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESPONSES_STREAM}",
        RESPONSES_STREAM.len()
    )
    .expect("write");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("response.created") {
        let read = stream.read(&mut buffer).expect("the stream begins");
        assert!(read > 0, "the stream ended early: {received:?}");
        received.extend_from_slice(&buffer[..read]);
    }
    assert!(
        received.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&received)
    );
    stream
}

/// The value of an unlabelled metric, or of one with exactly these labels.
fn metric(gateway: &Proc, name: &str) -> Option<f64> {
    let (_, body) = get(&gateway.url("/metrics"))?;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Sends a plain request tagged `id` on another thread, and returns once it is queued: the queue
/// holds `depth` requests.
fn queued(gateway: &Proc, id: &str, depth: f64) -> std::thread::JoinHandle<RawResponse> {
    let port = gateway.port;
    let header = format!("\r\nx-request-id: {id}");
    let request =
        std::thread::spawn(move || post_json(port, "/v1/responses", RESPONSES_JSON, &header));
    wait_until(&format!("{id} to be queued"), DEADLINE, || {
        metric(gateway, "gateway_queue_depth") == Some(depth)
    });
    request
}

fn assert_too_many_requests(response: &RawResponse, reason: &str) {
    assert_eq!(
        response.status,
        429,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let retry_after = response.header("retry-after").expect("Retry-After");
    assert!(retry_after.parse::<u64>().is_ok(), "{retry_after}");
    let body = response.json();
    assert_eq!(body["error"]["code"], "too_many_requests");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains(reason)),
        "{body}"
    );
}

#[test]
fn past_the_limit_requests_queue_first_in_first_out_and_one_past_the_queue_gets_429() {
    let mock = mock_vllm(&[("MOCK_VLLM_STALL_MID_STREAM", "3")]);
    let gateway = gateway(
        mock.port,
        &[
            "--max-concurrent-requests",
            "2",
            "--max-queued-requests",
            "2",
        ],
        &[],
    );
    let first = hold_stream(gateway.port);
    let second = hold_stream(gateway.port);
    let third = queued(&gateway, "third", 1.0);
    let fourth = queued(&gateway, "fourth", 2.0);

    let fifth = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_too_many_requests(&fifth, "queue is full");
    // The gateway's own endpoints never wait.
    for path in ["/livez", "/readyz", "/health", "/metrics"] {
        let (status, _) = get(&gateway.url(path)).expect("the gateway answers");
        assert_eq!(status, 200, "{path}");
    }
    assert_eq!(metric(&gateway, "gateway_queue_depth"), Some(2.0));
    assert_eq!(
        metric(
            &gateway,
            "gateway_requests_rejected_total{reason=\"queue_full\"}"
        ),
        Some(1.0)
    );

    // One turn comes free: the third goes, and only once it is done does the fourth take the
    // same turn (the second still holds the other), so vLLM sees them in that order.
    drop(first);
    let third = third.join().expect("third");
    assert_eq!(
        third.status,
        200,
        "{}",
        String::from_utf8_lossy(&third.body)
    );
    let fourth = fourth.join().expect("fourth");
    assert_eq!(
        fourth.status,
        200,
        "{}",
        String::from_utf8_lossy(&fourth.body)
    );
    let (_, last) = get(&mock.url("/_mock/last-request")).expect("mock answers");
    let last: serde_json::Value = serde_json::from_str(&last).expect("JSON");
    assert_eq!(last["headers"]["x-request-id"], "fourth", "{last}");
    assert_eq!(metric(&gateway, "gateway_queue_depth"), Some(0.0));
    drop(second);
}

#[test]
fn a_request_queued_past_queue_timeout_gets_429() {
    let mock = mock_vllm(&[("MOCK_VLLM_STALL_MID_STREAM", "3")]);
    let gateway = gateway(
        mock.port,
        &[
            "--max-concurrent-requests",
            "2",
            "--max-queued-requests",
            "2",
            "--queue-timeout",
            "300ms",
        ],
        &[],
    );
    let first = hold_stream(gateway.port);
    let _second = hold_stream(gateway.port);
    let late = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_too_many_requests(&late, "queue_timeout");
    assert_eq!(
        metric(
            &gateway,
            "gateway_requests_rejected_total{reason=\"queue_timeout\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&gateway, "gateway_queue_depth"), Some(0.0));
    assert!(metric(&gateway, "gateway_queue_wait_seconds_count").is_some_and(|count| count >= 1.0));
    // The turns are still held, not leaked: a stream that ends gives its turn back.
    drop(first);
    let next = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(next.status, 200);
}

/// Waits until the gateway has logged `count` finished reloads.
fn wait_reloads(gateway: &Proc, count: usize) {
    wait_until(&format!("reload {count}"), DEADLINE, || {
        gateway.log_text().matches("configuration reloaded").count() >= count
    });
}

#[test]
fn a_reload_raises_and_lowers_the_concurrency_limit_without_disturbing_requests_in_flight() {
    let mock = mock_vllm(&[("MOCK_VLLM_STALL_MID_STREAM", "3")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("gateway.toml");
    let limit = |n: u32| {
        std::fs::write(
            &file,
            format!("max_concurrent_requests = {n}\nmax_queued_requests = 0\n"),
        )
        .expect("write the config file");
    };
    limit(1);
    let gateway = gateway(
        mock.port,
        &["--config", file.to_str().expect("utf-8 path")],
        &[],
    );
    let first = hold_stream(gateway.port);
    let refused = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_too_many_requests(&refused, "queue is full");

    limit(2);
    gateway.signal(nix::sys::signal::Signal::SIGHUP);
    wait_reloads(&gateway, 1);
    let second = hold_stream(gateway.port);
    let refused = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_too_many_requests(&refused, "queue is full");

    // Lowered while both turns are held: both streams go on, and once they are over one turn
    // is left.
    limit(1);
    gateway.signal(nix::sys::signal::Signal::SIGHUP);
    wait_reloads(&gateway, 2);
    let refused = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_too_many_requests(&refused, "queue is full");
    drop(first);
    drop(second);
    wait_until("the streams to end", DEADLINE, || {
        metric(&gateway, "gateway_streams_active") == Some(0.0)
    });
    let _only = hold_stream(gateway.port);
    let refused = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_too_many_requests(&refused, "queue is full");
}
