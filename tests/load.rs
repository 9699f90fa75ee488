//! Holding load: 1,000 concurrent streams through one gateway that starts under systemd's default
//! soft open-files limit (1024), with memory that stays small per stream.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

const STREAMS: usize = 1000;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_thousand_streams_stay_open_under_the_default_soft_limit() {
    // This test process and mock-vllm need the sockets too; the gateway starts at soft 1024.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= 4096,
        "the hard open-files limit ({hard}) is too low for this test"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise our own limit");

    let mock = mock_vllm(&[("MOCK_VLLM_STALL_MID_STREAM", "1")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut command = Command::new(GATEWAY);
    command
        .args([
            "--llm-api-base",
            &format!("http://127.0.0.1:{}", mock.port),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(["--access-log", "false"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone"))
        .stderr(log);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            setrlimit(Resource::RLIMIT_NOFILE, 1024, hard)?;
            Ok(())
        });
    }
    let mut gateway = command.spawn().expect("start gateway");
    let mut port = 0;
    wait_until("the gateway to report its port", DEADLINE, || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        port = reported_listen_port(&log).unwrap_or(0);
        port != 0
    });
    let idle_rss = rss_kib(gateway.id() as i32);

    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(stream, "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESPONSES_STREAM}", RESPONSES_STREAM.len())
            .expect("write");
        streams.push(BufReader::new(stream));
    }
    for (index, reader) in streams.iter_mut().enumerate() {
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        assert!(line.starts_with("HTTP/1.1 200"), "stream {index}: {line}");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read");
            if line.starts_with("event: response.created") {
                break;
            }
            assert!(!line.is_empty(), "stream {index} ended early");
        }
    }
    let loaded_rss = rss_kib(gateway.id() as i32);
    let per_stream = loaded_rss.saturating_sub(idle_rss) / STREAMS as u64;
    assert!(
        per_stream < 64,
        "{per_stream} KiB per open stream (idle {idle_rss} KiB, loaded {loaded_rss} KiB)"
    );
    let (status, _) = get(&format!("http://127.0.0.1:{port}/livez")).expect("still answering");
    assert_eq!(status, 200);

    drop(streams);
    wait_until(
        "the upstream to see every disconnect",
        Duration::from_secs(30),
        || {
            let (_, body) = get(&mock.url("/_mock/stats")).expect("stats");
            let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            stats["disconnects"] == STREAMS
        },
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
}
