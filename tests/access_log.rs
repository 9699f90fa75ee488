//! The access log off the request path: requests go on while nobody reads the gateway's stderr,
//! and every line they logged is there once the gateway has exited cleanly.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const REQUESTS: usize = 2000;

#[test]
fn requests_go_on_while_stderr_is_not_read_and_every_access_line_is_written_by_a_clean_exit() {
    let vllm = mock_vllm(&[]);
    // Picked here, not read from the gateway's report: that is on stderr, which this test leaves
    // unread.
    let port = free_port();
    // stderr is a pipe nobody reads until the end: it fills after a few hundred lines (64 KB),
    // which would stall every request if the access log were written on the request path.
    let mut gateway = Command::new(GATEWAY)
        .args([
            "--llm-api-base",
            &format!("http://127.0.0.1:{}/v1", vllm.port),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .spawn()
        .expect("start the gateway");
    let pid = nix::unistd::Pid::from_raw(gateway.id() as i32);
    let mut stderr = gateway.stderr.take().expect("stderr");
    wait_until("the gateway to listen", Duration::from_secs(10), || {
        accepts_connections(port)
    });

    for n in 0..REQUESTS {
        let response = post_json(
            port,
            "/v1/responses",
            r#"{"model":"mock-model","input":"hi"}"#,
            &format!("\r\nx-request-id: access-{n}"),
        );
        assert_eq!(response.status, 200, "request {n}");
    }
    let (status, metrics) = get(&format!("http://127.0.0.1:{port}/metrics")).expect("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("gateway_log_lines_dropped_total 0"),
        "no line dropped with the queue far from full:\n{metrics}"
    );

    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).expect("read stderr");
        text
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = gateway.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = gateway.kill();
            panic!("the gateway did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "clean exit: {status:?}");
    let log = reader.join().expect("reader");

    let logged: std::collections::BTreeSet<usize> = log
        .lines()
        .filter(|line| line.contains(r#""target":"gateway::access""#))
        .filter_map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).ok()?;
            line["request_id"]
                .as_str()?
                .strip_prefix("access-")?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(
        logged.len(),
        REQUESTS,
        "one access line per request, none lost at exit (missing e.g. {:?})",
        (0..REQUESTS).find(|n| !logged.contains(n))
    );
}

/// The voluntary and involuntary context switches of the gateway's access log writer thread.
fn writer_switches(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the gateway's threads");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // Thread names are cut to 15 bytes: "gateway-access-log" reads "gateway-access-".
        if comm.trim_end() != "gateway-access-" {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        return status
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
            .sum();
    }
    panic!("the gateway has no access log writer thread");
}

#[test]
fn the_access_log_writer_sleeps_while_no_line_comes_and_wakes_for_the_next() {
    let vllm = mock_vllm(&[]);
    let gateway = gateway(vllm.port, &["--log-format", "json"], &[]);
    let logged = |id: &str| {
        gateway
            .log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .any(|line| line["target"] == "gateway::access" && line["request_id"] == id)
    };
    let request = |id: &str| {
        let response = post_json(
            gateway.port,
            "/v1/responses",
            r#"{"model":"mock-model","input":"hi"}"#,
            &format!("\r\nx-request-id: {id}"),
        );
        assert_eq!(response.status, 200, "request {id}");
    };

    request("before-idle");
    wait_until("the first access line", Duration::from_secs(10), || {
        logged("before-idle")
    });
    // What is asserted is that nothing happens for a while, so the test watches a while: a writer
    // that woke on a timer would be switched in some 50 times in that second.
    let before = writer_switches(gateway.pid());
    std::thread::sleep(Duration::from_secs(1));
    let woken = writer_switches(gateway.pid()) - before;
    assert!(
        woken <= 3,
        "the idle access log writer was switched in {woken} times in a second"
    );

    request("after-idle");
    wait_until(
        "the access line after the idle second",
        Duration::from_secs(10),
        || logged("after-idle"),
    );
}
