//! systemd's notify protocol: a real datagram socket stands in for systemd (a path, and an
//! abstract name), and the gateway under `serve` must send the right messages in the right order.

mod common;

use std::time::Duration;

use common::systemd::Systemd;
use common::*;

fn notify_sequence(abstract_name: bool) {
    let systemd = Systemd::listen(abstract_name);
    let (mut gateway, _) = serve_with_child_env(
        &systemd,
        &[("MOCK_VLLM_STARTUP_DELAY", "1500ms")],
        &[
            ("NOTIFY_SOCKET", &systemd.socket_env),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    wait_until("READY=1", DEADLINE, || {
        systemd.position(|m| m.starts_with("READY=1")).is_some()
    });
    wait_until("three watchdog pings after READY", DEADLINE, || {
        let ready = systemd
            .position(|m| m.starts_with("READY=1"))
            .expect("ready");
        systemd.messages()[ready..]
            .iter()
            .filter(|m| *m == "WATCHDOG=1")
            .count()
            >= 3
    });
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    wait_until("STOPPING=1", DEADLINE, || systemd.count("STOPPING=1") == 1);

    let messages = systemd.messages();
    let ready = messages
        .iter()
        .position(|m| m.starts_with("READY=1"))
        .expect("ready");
    assert_eq!(
        messages[ready], "READY=1",
        "READY=1 came only after the proxy port accepted: {messages:?}"
    );
    let loading = messages
        .iter()
        .position(|m| m.starts_with("STATUS=loading model: waiting for vLLM /health"))
        .expect("a loading status");
    let extend = messages
        .iter()
        .position(|m| m.starts_with("EXTEND_TIMEOUT_USEC="))
        .expect("an extension");
    assert!(loading < ready && extend < ready, "{messages:?}");
    let stopping = messages
        .iter()
        .position(|m| m == "STOPPING=1")
        .expect("stopping");
    assert!(stopping > ready);
    assert_eq!(messages.iter().filter(|m| *m == "READY=1").count(), 1);
}

/// `gateway serve` notifying `systemd`, with extra environment for the child.
fn serve_with_child_env(
    systemd: &Systemd,
    child_env: &[(&str, &str)],
    env: &[(&str, &str)],
) -> (Proc, u16) {
    let mut extra = Vec::new();
    for (name, value) in child_env {
        extra.push("--child-env".to_string());
        extra.push(format!("{name}={value}"));
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (gateway, vllm_port) = gateway_serve(&extra, env);
    systemd.set_proxy_port(gateway.port);
    (gateway, vllm_port)
}

#[test]
fn notify_messages_arrive_in_order_on_a_path_socket() {
    notify_sequence(false);
}

#[test]
fn notify_messages_arrive_in_order_on_an_abstract_socket() {
    notify_sequence(true);
}

/// The pings come from the gateway process itself (neither vLLM nor a guard sends them for it): a
/// gateway that stops running misses the watchdog, and pings again once it runs.
#[test]
fn a_frozen_gateway_misses_the_watchdog_and_pings_again_once_it_runs() {
    let systemd = Systemd::listen(false);
    let (gateway, _) = serve_with_child_env(
        &systemd,
        &[],
        &[
            ("NOTIFY_SOCKET", &systemd.socket_env),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    wait_until("READY=1", DEADLINE, || systemd.count("READY=1") == 1);
    wait_until("a few pings before the freeze", DEADLINE, || {
        systemd.count("WATCHDOG=1") >= 2
    });
    gateway.signal(nix::sys::signal::Signal::SIGSTOP);
    // Once frozen, no ping may come for many watchdog periods.
    wait_until("the pings to stop", DEADLINE, || {
        let before = systemd.count("WATCHDOG=1");
        std::thread::sleep(Duration::from_millis(600));
        systemd.count("WATCHDOG=1") == before
    });
    let frozen_at = systemd.count("WATCHDOG=1");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        systemd.count("WATCHDOG=1"),
        frozen_at,
        "a frozen gateway must miss the watchdog"
    );
    gateway.signal(nix::sys::signal::Signal::SIGCONT);
    wait_until("the pings to resume", DEADLINE, || {
        systemd.count("WATCHDOG=1") > frozen_at
    });
}

#[test]
fn a_failed_first_start_keeps_extending_the_start_timeout_while_it_waits_to_retry() {
    let systemd = Systemd::listen(false);
    let (mut gateway, _) = serve_with_child_env(
        &systemd,
        &[("MOCK_VLLM_EXIT_AT_START", "1")],
        &[("NOTIFY_SOCKET", &systemd.socket_env)],
    );
    // Every start fails, so the gateway gives up after max_restarts and exits non-zero.
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(1));
    wait_until("STOPPING=1", DEADLINE, || systemd.count("STOPPING=1") == 1);

    let messages = systemd.messages();
    let waits: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.starts_with("STATUS=vLLM exited (exit code 1); restart "))
        .map(|(index, _)| index)
        .collect();
    assert!(!waits.is_empty(), "{messages:?}");
    for index in waits {
        let usec: u64 = messages[index + 1]
            .strip_prefix("EXTEND_TIMEOUT_USEC=")
            .unwrap_or_else(|| panic!("no extension after {}: {messages:?}", messages[index]))
            .parse()
            .expect("a number");
        assert!(usec >= 30_000_000, "{messages:?}");
    }
    assert_eq!(systemd.count("READY=1"), 0);
}

#[test]
fn a_stop_sends_stopping_first_then_counts_the_requests_being_drained() {
    let systemd = Systemd::listen(false);
    let (mut gateway, _) = serve_with_child_env(
        &systemd,
        &[("MOCK_VLLM_STREAM_DELAY", "20ms")],
        &[("NOTIFY_SOCKET", &systemd.socket_env)],
    );
    wait_until("READY=1", DEADLINE, || systemd.count("READY=1") == 1);
    let stream = start_stream(&gateway);
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(stream.join().expect("stream thread").status, 200);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    // Datagrams sent before the exit may still be on their way to the reader thread.
    wait_until("vLLM's final status", DEADLINE, || {
        systemd
            .messages()
            .iter()
            .any(|m| m.starts_with("STATUS=vLLM stopped"))
    });

    let messages = systemd.messages();
    let ready = messages.iter().position(|m| m == "READY=1").expect("ready");
    let after: Vec<&str> = messages[ready..]
        .iter()
        .map(String::as_str)
        .filter(|m| *m != "WATCHDOG=1")
        .collect();
    let stopping = after
        .iter()
        .position(|m| *m == "STOPPING=1")
        .unwrap_or_else(|| panic!("no STOPPING=1: {messages:?}"));
    assert_eq!(
        after[stopping + 1],
        "STATUS=draining 1 request",
        "{messages:?}"
    );
    assert_eq!(systemd.count("STOPPING=1"), 1, "{messages:?}");
    assert!(
        after
            .last()
            .is_some_and(|last| last.starts_with("STATUS=vLLM stopped")),
        "the last word is vLLM's stop, after the drain: {messages:?}"
    );
}
