//! Memory per open stream: a thousand event streams held open through the gateway at once cost it
//! a bounded amount of memory each. The bound is loose (several times what a stream costs today),
//! so that noise never fails it, but a stream that buffered its body, or a buffer sized for bulk
//! transfers per connection, would.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const STREAMS: usize = 1000;

/// Resident memory growth allowed per open stream (today a stream costs about 10 KB in a debug
/// build and in a release build).
const MAX_BYTES_PER_STREAM: u64 = 48 * 1024;

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Opens a stream: sends the request and reads until the first event of the body has arrived.
fn open_stream(port: u16) -> TcpStream {
    let body = r#"{"model":"mock-model","input":"hi","stream":true}"#;
    let mut socket = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        socket,
        "POST /v1/responses HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    socket
}

fn await_first_event(socket: &mut TcpStream) {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = socket.read(&mut buffer).expect("read the stream");
        assert!(read > 0, "the stream ended before its first event");
        seen.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&seen);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            if body.contains("data: ") {
                return;
            }
        }
    }
}

#[test]
fn a_thousand_open_streams_cost_the_gateway_a_bounded_amount_of_memory_each() {
    // Each stream is a socket here, one in mock-vllm and two in the gateway.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the open-files limit");
    }
    assert!(
        hard >= 2 * STREAMS as u64 + 200,
        "the open-files limit ({hard}) is too low for {STREAMS} streams"
    );
    // Events 1 s apart: every stream stays open for the whole test.
    let vllm = mock_vllm(&[("MOCK_VLLM_STREAM_DELAY", "1s")]);
    let gateway = gateway(vllm.port, &["--access-log", "false"], &[]);

    // Warm up: pools, worker threads and the allocator's arenas exist before the baseline.
    let mut warm: Vec<TcpStream> = (0..20).map(|_| open_stream(gateway.port)).collect();
    warm.iter_mut().for_each(await_first_event);
    drop(warm);
    let baseline = rss_bytes(gateway.pid());

    let started = Instant::now();
    let mut streams: Vec<TcpStream> = (0..STREAMS).map(|_| open_stream(gateway.port)).collect();
    streams.iter_mut().for_each(await_first_event);
    let loaded = rss_bytes(gateway.pid());
    let per_stream = loaded.saturating_sub(baseline) / STREAMS as u64;
    eprintln!(
        "{STREAMS} streams opened in {:?}: RSS {baseline} -> {loaded} bytes, {per_stream} a stream",
        started.elapsed()
    );
    assert!(
        per_stream < MAX_BYTES_PER_STREAM,
        "{per_stream} bytes a stream ({baseline} -> {loaded} bytes with {STREAMS} streams open)"
    );
    drop(streams);
}
