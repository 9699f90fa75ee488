//! `gateway serve`, end to end: real processes, real signals, mock-vllm as the child.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Asks mock-vllm to exit with `code`, as a crash would.
fn crash_child(vllm_port: u16, code: i32) {
    let response = raw_request(
        vllm_port,
        &format!("POST /_mock/exit?code={code} HTTP/1.1"),
        b"",
    );
    assert_eq!(response.status, 200);
}

fn child_signals(vllm_port: u16) -> Vec<String> {
    let (_, body) = get(&format!("http://127.0.0.1:{vllm_port}/_mock/stats")).expect("stats");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    stats["signals"]
        .as_array()
        .expect("signals")
        .iter()
        .map(|s| s.as_str().expect("name").to_string())
        .collect()
}

#[test]
fn the_listener_opens_only_once_vllm_answers_health() {
    let (gateway, vllm_port) = gateway_serve(&[], &[("MOCK_VLLM_STARTUP_DELAY", "1s")]);
    let mut refused_while_loading = false;
    wait_until("the gateway to accept connections", DEADLINE, || {
        // The gateway first: if it accepts, vLLM must accept by the time it is asked.
        let gateway_accepts = accepts_connections(gateway.port);
        let vllm_accepts = accepts_connections(vllm_port);
        assert!(
            vllm_accepts || !gateway_accepts,
            "the gateway accepted connections while vLLM was still loading"
        );
        refused_while_loading |= !gateway_accepts && !vllm_accepts;
        gateway_accepts
    });
    assert!(
        refused_while_loading,
        "the gateway was seen refusing connections while vLLM was loading"
    );
    assert_eq!(
        get(&format!("http://127.0.0.1:{vllm_port}/health")).map(|(s, _)| s),
        Some(200)
    );
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.body,
        fixture("vllm-responses-toolcall-gpt-oss-20b.json")
    );
}

#[test]
fn a_crashed_child_is_restarted_with_growing_delays_and_waiting_requests_succeed() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, vllm_port) = gateway_serve(
        &["--restart", "always"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    for crash in 1..=3 {
        let crashed = wait_for_starts(&pids, crash)[crash - 1].0;
        crash_child(vllm_port, 3);
        wait_until("the crashed child to be gone", DEADLINE, || !alive(crashed));
        // The supervisor counts a restart as soon as it has seen the exit and decided.
        wait_until("the supervisor to notice", DEADLINE, || {
            get(&gateway.url("/metrics")).is_some_and(|(_, body)| {
                body.contains(&format!(
                    "\ngateway_child_restarts_total{{reason=\"exit_code\"}} {crash}\n"
                ))
            })
        });
        // Sent while the child is down or restarting: it waits for readiness, then succeeds.
        let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
        assert_eq!(response.status, 200, "request after crash {crash}");
        wait_for_starts(&pids, crash + 1);
        wait_ready(&gateway);
    }
    let starts = read_pid_file(&pids);
    let distinct: std::collections::HashSet<_> = starts.iter().map(|(pid, _)| pid).collect();
    assert_eq!(distinct.len(), 4, "four different children: {starts:?}");
    let delays: Vec<f64> = lines_with_message(&gateway, "restarting vLLM after a delay")
        .iter()
        .map(|line| {
            humantime::parse_duration(line["delay"].as_str().expect("delay"))
                .expect("duration")
                .as_secs_f64()
        })
        .collect();
    assert_eq!(delays.len(), 3, "{delays:?}");
    assert!(
        delays.windows(2).all(|pair| pair[1] > pair[0]),
        "delays grow: {delays:?}"
    );
    let (_, readyz) = get(&gateway.url("/readyz")).expect("readyz");
    assert!(readyz.contains("\"restarts\":3"), "{readyz}");
}

/// Regression: a request sent after vLLM stopped listening, but before it exited and was reaped,
/// got 502 (connection refused) although a restart was seconds away.
#[test]
fn a_request_refused_by_a_dying_vllm_waits_for_its_replacement() {
    let (_dir, pids, pids_text) = pid_file();
    // The wait is longer than first_byte_timeout, which counts only from the send that vLLM got.
    let (gateway, vllm_port) = gateway_serve(
        &["--first-byte-timeout", "500ms"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    let first = wait_for_starts(&pids, 1)[0].0;
    // vLLM's API server after its engine died: the port is closed at once, the exit comes later.
    let response = raw_request(vllm_port, "POST /_mock/exit?code=1&linger=1s HTTP/1.1", b"");
    assert_eq!(response.status, 200);
    assert!(alive(first), "the child lingers with its port closed");
    // mock-vllm closes its listener after it answered: a request that reached the listening
    // socket before that would be reset from vLLM's backlog, not refused.
    wait_until("vLLM's port to refuse connections", DEADLINE, || {
        !accepts_connections(vllm_port)
    });

    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let starts = wait_for_starts(&pids, 2);
    assert!(!alive(first));
    let (_, readyz) = get(&gateway.url("/readyz")).expect("readyz");
    assert!(
        readyz.contains(&format!("\"pid\":{}", starts[1].0)),
        "answered by the replacement: {readyz}"
    );
}

/// Regression: `--child-env` split its value at commas, so `CUDA_VISIBLE_DEVICES=0,1` was refused
/// as an entry `1` without a name. vLLM gets the value whole.
#[test]
fn a_child_env_value_with_commas_reaches_vllm_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = dir.path().join("seen");
    let vllm = script(
        dir.path(),
        "vllm",
        &format!(
            "#!/bin/sh\nprintf %s \"$CUDA_VISIBLE_DEVICES\" > '{}'\nexec '{MOCK_VLLM}' \"$@\"\n",
            seen.display()
        ),
    );
    let (gateway, _) = gateway_serve_child(
        &[],
        0,
        &vllm,
        0,
        &["--child-env", "CUDA_VISIBLE_DEVICES=0,1"],
        &[],
    );
    wait_ready(&gateway);
    assert_eq!(
        std::fs::read_to_string(&seen).expect("the child's value"),
        "0,1"
    );
}

#[test]
fn a_listen_port_in_use_fails_the_start_before_vllm_is_spawned() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve_on(port, &[], &[("MOCK_VLLM_PID_FILE", &pids_text)]);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(1));
    let log = gateway.log_text();
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{log}"
    );
    assert!(read_pid_file(&pids).is_empty(), "no vLLM was started");
}

#[test]
fn restart_no_exits_with_the_childs_exit_code() {
    let (mut gateway, vllm_port) = gateway_serve(&["--restart", "no"], &[]);
    wait_ready(&gateway);
    crash_child(vllm_port, 3);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(3));
}

#[test]
fn restart_no_exits_with_128_plus_the_signal_that_killed_the_child() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) =
        gateway_serve(&["--restart", "no"], &[("MOCK_VLLM_PID_FILE", &pids_text)]);
    wait_ready(&gateway);
    let child = wait_for_starts(&pids, 1)[0].0;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL).expect("kill child");
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(137));
}

#[test]
fn max_restarts_gives_up_with_a_nonzero_exit_and_says_why() {
    let (mut gateway, _) = gateway_serve(
        &["--restart", "always", "--max-restarts", "3"],
        &[("MOCK_VLLM_EXIT_AT_START", "1")],
    );
    let status = gateway.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(1));
    assert!(
        gateway
            .log_text()
            .contains("failed to become ready 3 times in a row"),
        "{}",
        gateway.log_text()
    );
    assert!(
        !gateway.log_text().contains("gateway listening"),
        "the listener never opened"
    );
}

#[test]
fn a_hung_health_endpoint_gets_the_child_killed_and_restarted() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, vllm_port) = gateway_serve(
        &[
            "--health-interval",
            "100ms",
            "--health-timeout",
            "100ms",
            "--health-failures",
            "2",
            "--stop-timeout",
            "1s",
        ],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    let first = wait_for_starts(&pids, 1)[0].0;
    let response = raw_request(vllm_port, "POST /_mock/hang-health HTTP/1.1", b"");
    assert_eq!(response.status, 200);
    let starts = wait_for_starts(&pids, 2);
    assert_ne!(starts[1].0, first);
    wait_until("the hung child to be gone", DEADLINE, || !alive(first));
    wait_ready(&gateway);
    assert!(
        gateway.log_text().contains("vLLM is hung"),
        "the reason is logged"
    );
}

/// `gateway serve` with mock-vllm, whose `/health` is probed every 200 ms (for 200 ms) and which
/// is declared hung after two failures in a row, then stopped within `stop_timeout`.
fn serve_probed_every_200ms(stop_timeout: &str, env: &[(&str, &str)]) -> (Proc, u16) {
    gateway_serve(
        &[
            "--health-interval",
            "200ms",
            "--health-timeout",
            "200ms",
            "--health-failures",
            "2",
            "--stop-timeout",
            stop_timeout,
        ],
        env,
    )
}

/// Regression: a `/health` that failed while vLLM kept answering requests (its event loop busy
/// with a flood of them) got vLLM declared hung and restarted: the model reloaded and every
/// stream cut. A probe that times out while responses keep coming is not counted; once they stop,
/// the hang is a hang.
#[test]
fn a_failing_health_endpoint_while_vllm_answers_requests_is_not_a_hang() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, vllm_port) = serve_probed_every_200ms(
        "1s",
        &[
            ("MOCK_VLLM_PID_FILE", &pids_text),
            // 141 events, one every 20 ms: about 3 s of answering.
            ("MOCK_VLLM_STREAM_DELAY", "20ms"),
        ],
    );
    wait_ready(&gateway);
    let first = wait_for_starts(&pids, 1)[0].0;
    let stream = start_stream(&gateway);
    let response = raw_request(vllm_port, "POST /_mock/hang-health HTTP/1.1", b"");
    assert_eq!(response.status, 200);

    let streamed = stream.join().expect("stream thread");
    assert_eq!(streamed.status, 200);
    let body = String::from_utf8_lossy(&streamed.body);
    assert!(
        body.trim_end()
            .ends_with("\"sequence_number\":140,\"type\":\"response.completed\"}"),
        "the stream ran to its end: {}",
        &body[body.len().saturating_sub(300)..]
    );
    assert_eq!(
        read_pid_file(&pids).len(),
        1,
        "vLLM was not restarted while it answered: {}",
        gateway.log_text()
    );
    assert!(
        gateway
            .log_text()
            .contains("vLLM /health is slow, but vLLM is answering requests: not counted"),
        "{}",
        gateway.log_text()
    );

    // Nothing comes from vLLM any more: the hang is a hang.
    let starts = wait_for_starts(&pids, 2);
    assert_ne!(starts[1].0, first);
    assert!(gateway.log_text().contains("vLLM is hung"));
}

/// Only a probe that timed out is weighed against vLLM's answers: vLLM's own 503 (its engine
/// died, and the server lingers, answering every request with an error) counts however many
/// requests it answers meanwhile.
#[test]
fn a_health_endpoint_that_answers_503_counts_while_vllm_answers_requests() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, _) = serve_probed_every_200ms(
        "1s",
        &[
            ("MOCK_VLLM_PID_FILE", &pids_text),
            ("MOCK_VLLM_ENGINE_DIE_AFTER", "1s"),
            ("MOCK_VLLM_ENGINE_DEATH_LINGER", "1h"),
        ],
    );
    wait_ready(&gateway);
    let first = wait_for_starts(&pids, 1)[0].0;
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (stop, port) = (Arc::clone(&stop), gateway.port);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _ = raw_request(port, "GET /v1/models HTTP/1.1", b"");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let starts = wait_for_starts(&pids, 2);
    stop.store(true, Ordering::SeqCst);
    poller.join().expect("poller");
    assert_ne!(starts[1].0, first);
    assert!(gateway.log_text().contains("vLLM is hung"));
    assert!(!gateway.log_text().contains("not counted"));
}

/// Regression: a vLLM stopped by SIGSTOP (or left stopped by a debugger) was declared hung and
/// sent SIGTERM, which a stopped process takes only once it runs again: it went only at
/// `stop_timeout`'s SIGKILL. It is now sent SIGCONT with the SIGTERM, and stops gracefully.
#[test]
fn a_stopped_vllm_is_continued_so_that_the_sigterm_of_its_restart_stops_it() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, _) = serve_probed_every_200ms("1h", &[("MOCK_VLLM_PID_FILE", &pids_text)]);
    wait_ready(&gateway);
    let first = wait_for_starts(&pids, 1)[0].0;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGSTOP).expect("SIGSTOP");

    let starts = wait_for_starts(&pids, 2);
    assert_ne!(starts[1].0, first);
    wait_until("the stopped vLLM to be gone", DEADLINE, || !alive(first));
    assert!(gateway.log_text().contains("vLLM is hung"));
}

#[test]
fn a_start_that_exceeds_startup_timeout_is_stopped_and_counts_as_failed() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve(
        &["--startup-timeout", "500ms", "--restart", "no"],
        &[
            ("MOCK_VLLM_STARTUP_DELAY", "1h"),
            ("MOCK_VLLM_PID_FILE", &pids_text),
        ],
    );
    let status = gateway.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(1));
    let child = wait_for_starts(&pids, 1)[0].0;
    assert!(!alive(child), "the slow child was stopped");
    assert!(gateway.log_text().contains("startup_timeout"));
}

#[test]
fn sigterm_drains_a_stream_then_stops_the_child_then_exits_0() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve(
        &[],
        &[
            ("MOCK_VLLM_STREAM_DELAY", "20ms"),
            ("MOCK_VLLM_PID_FILE", &pids_text),
        ],
    );
    wait_ready(&gateway);
    let child = wait_for_starts(&pids, 1)[0].0;
    let stream = start_stream(&gateway);
    gateway.signal(Signal::SIGTERM);
    let response = stream.join().expect("stream thread");
    assert_eq!(
        response.body,
        fixture("vllm-responses-stream-gpt-oss-20b.sse"),
        "the stream completed"
    );
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    assert!(!alive(child), "the child is gone");
    // The access log is written through a queue, so its lines may come out after later ones:
    // the order is the timestamps' (RFC 3339, which sort as text).
    let timestamp_of = |predicate: &dyn Fn(&str) -> bool| {
        gateway
            .log_text()
            .lines()
            .filter(|line| predicate(line))
            .find_map(|line| {
                let line: serde_json::Value = serde_json::from_str(line).ok()?;
                Some(line["timestamp"].as_str()?.to_string())
            })
    };
    let stream_end = timestamp_of(&|line| line.contains("\"route\":\"/v1/responses\""))
        .expect("access log line of the stream");
    let child_term = timestamp_of(&|line| line.contains("sending SIGTERM to vLLM"))
        .expect("the child was stopped");
    assert!(
        stream_end < child_term,
        "the stream finished ({stream_end}) before the child got SIGTERM ({child_term})"
    );
}

/// Regression: a child that exited while the gateway drained was handled as a crash and
/// restarted, only to be stopped again a moment later.
#[test]
fn a_child_that_exits_during_the_drain_is_not_restarted() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, vllm_port) = gateway_serve(&[], &[("MOCK_VLLM_PID_FILE", &pids_text)]);
    wait_ready(&gateway);
    // A request whose body is still arriving holds the drain open, without involving vLLM.
    let mut upload = std::net::TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    write!(
        upload,
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    )
    .expect("write");
    // The connection must be accepted before the signal: one still in the kernel's backlog when
    // the listener closes is not in flight, so the drain would end at once and stop vLLM.
    wait_until("the upload to be in flight", DEADLINE, || {
        get(&gateway.url("/metrics"))
            .is_some_and(|(_, body)| body.contains("\ngateway_requests_in_flight 1\n"))
    });
    gateway.signal(Signal::SIGTERM);
    // The drain begins by closing the listener: new connections are refused from then on.
    wait_until("the drain to begin", DEADLINE, || {
        !accepts_connections(gateway.port)
    });
    crash_child(vllm_port, 3);
    wait_until("the supervisor to see the exit", DEADLINE, || {
        gateway.log_text().contains("exit_code\":3")
    });
    drop(upload);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    let log = gateway.log_text();
    assert!(!log.contains("restarting vLLM"), "{log}");
    assert_eq!(read_pid_file(&pids).len(), 1, "one vLLM, never restarted");
}

#[test]
fn a_child_ignoring_sigterm_gets_sigkill_after_stop_timeout() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve(
        &["--stop-timeout", "500ms"],
        &[
            ("MOCK_VLLM_IGNORE_SIGTERM", "1"),
            ("MOCK_VLLM_PID_FILE", &pids_text),
        ],
    );
    wait_ready(&gateway);
    let child = wait_for_starts(&pids, 1)[0].0;
    gateway.signal(Signal::SIGTERM);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    assert!(!alive(child));
    assert!(gateway.log_text().contains("sending SIGKILL"));
}

#[test]
fn grandchildren_are_gone_after_a_crash_and_after_stop() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, vllm_port) = gateway_serve(
        &["--restart", "always"],
        &[
            ("MOCK_VLLM_SPAWN_GRANDCHILD", "1"),
            ("MOCK_VLLM_PID_FILE", &pids_text),
        ],
    );
    wait_ready(&gateway);
    let (_, first_grandchild) = wait_for_starts(&pids, 1)[0];
    assert!(first_grandchild > 0 && alive(first_grandchild));
    crash_child(vllm_port, 1);
    wait_until("the first grandchild to be gone", DEADLINE, || {
        !alive(first_grandchild)
    });
    let (_, second_grandchild) = wait_for_starts(&pids, 2)[1];
    wait_ready(&gateway);
    gateway.signal(Signal::SIGTERM);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    wait_until("the second grandchild to be gone", DEADLINE, || {
        !alive(second_grandchild)
    });
}

#[test]
fn sigkill_of_the_gateway_takes_the_child_with_it() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve(&[], &[("MOCK_VLLM_PID_FILE", &pids_text)]);
    wait_ready(&gateway);
    let child = wait_for_starts(&pids, 1)[0].0;
    gateway.signal(Signal::SIGKILL);
    gateway.wait_exit(DEADLINE);
    wait_until("the child to die with its parent", DEADLINE, || {
        !alive(child)
    });
}

/// The guard takes vLLM's whole group: the server (SIGKILL once it ignored SIGTERM for
/// `stop_timeout`) and the rest of its group.
#[test]
fn sigkill_of_the_gateway_takes_vllms_whole_group_even_one_ignoring_sigterm() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve(
        &["--stop-timeout", "500ms"],
        &[
            ("MOCK_VLLM_IGNORE_SIGTERM", "1"),
            ("MOCK_VLLM_SPAWN_GRANDCHILD", "1"),
            ("MOCK_VLLM_PID_FILE", &pids_text),
        ],
    );
    wait_ready(&gateway);
    let (child, grandchild) = wait_for_starts(&pids, 1)[0];
    gateway.signal(Signal::SIGKILL);
    gateway.wait_exit(DEADLINE);
    wait_until("vLLM's whole group to be gone", DEADLINE, || {
        !alive(child) && !alive(grandchild)
    });
}

#[test]
fn sigusr1_is_forwarded_to_the_child() {
    // A child that handles it (vLLM itself dies of it: see the README's signal table).
    let (gateway, vllm_port) = gateway_serve(&[], &[("MOCK_VLLM_HANDLE_SIGUSR", "1")]);
    wait_ready(&gateway);
    gateway.signal(Signal::SIGUSR1);
    wait_until("the child to receive SIGUSR1", DEADLINE, || {
        child_signals(vllm_port).contains(&"SIGUSR1".to_string())
    });
    assert!(ready(&gateway), "SIGUSR1 does not stop anything");
}

/// vLLM installs no SIGUSR1 handler and dies of it (as the mock does by default): the log says
/// the gateway's forwarding did it, not a crash, and the restart policy brings vLLM back.
#[test]
fn a_vllm_killed_by_a_forwarded_sigusr1_is_named_as_such_and_restarted() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, _) = gateway_serve(&[], &[("MOCK_VLLM_PID_FILE", &pids_text)]);
    wait_ready(&gateway);
    let first = wait_for_starts(&pids, 1)[0].0;
    gateway.signal(Signal::SIGUSR1);
    wait_until("vLLM's death to be logged", DEADLINE, || {
        !lines_with_message(
            &gateway,
            "vLLM died of a signal the gateway forwarded to it",
        )
        .is_empty()
    });
    assert!(!alive(first));
    assert!(lines_with_message(&gateway, "vLLM exited on its own").is_empty());
    let restarted = wait_for_starts(&pids, 2)[1].0;
    assert_ne!(restarted, first);
    wait_ready(&gateway);
}

#[test]
fn a_child_flooding_its_output_does_not_stall_the_gateway() {
    let (gateway, _) = gateway_serve(&[], &[("MOCK_VLLM_FLOOD", "1")]);
    wait_ready(&gateway);
    for _ in 0..20 {
        let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
        assert_eq!(response.status, 200);
    }
    assert!(
        gateway.log_text().contains("[line truncated]"),
        "the 1 MiB line was cut, not kept whole"
    );
}
