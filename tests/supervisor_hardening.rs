//! `gateway serve` when vLLM is not the one at fault: exits it did not ask for, the gateway's own
//! resource errors, a stranger on vLLM's port, processes that left vLLM's group, and secrets on
//! vLLM's command line. Real processes, real sockets, mock-vllm as the child.

mod common;

use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// A file mock-vllm appends `<pid> <grandchild pid>` to at each start: the directory guard, the
/// path, and the path as the text an environment variable takes.
fn pid_file() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pids");
    let text = path.to_str().expect("utf-8 path").to_string();
    (dir, path, text)
}

fn wait_for_starts(path: &std::path::Path, count: usize) -> Vec<(i32, i32)> {
    wait_until(&format!("{count} child start(s)"), DEADLINE, || {
        read_pid_file(path).len() >= count
    });
    read_pid_file(path)
}

fn wait_ready(gateway: &Proc) {
    wait_until("the gateway to be ready", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
}

/// The gateway's own JSON log lines (not vLLM's relayed output).
fn gateway_lines(gateway: &Proc) -> Vec<serde_json::Value> {
    gateway
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] != "vllm")
        .collect()
}

fn lines_with_message(gateway: &Proc, message: &str) -> Vec<serde_json::Value> {
    gateway_lines(gateway)
        .into_iter()
        .filter(|line| line["message"] == message)
        .collect()
}

/// Regression: vLLM's `--api-key` takes a list, and `-- --api-key sk-a sk-b` was logged as
/// `--api-key *** sk-b`.
#[test]
fn every_key_of_vllms_api_key_list_is_hidden_in_the_log() {
    let (gateway, _) = gateway_serve(
        &[
            "--",
            "--api-key",
            "sk-first-secret",
            "sk-second-secret",
            "--hf-token=hf_third_secret",
            "--enforce-eager",
        ],
        &[],
    );
    wait_ready(&gateway);
    let starting = lines_with_message(&gateway, "starting vLLM");
    let command = starting[0]["command"].as_str().expect("command field");
    assert!(
        command.ends_with("--api-key *** *** --hf-token=*** --enforce-eager"),
        "{command}"
    );
    for line in gateway_lines(&gateway) {
        let text = line.to_string();
        assert!(!text.contains("secret"), "a secret in the log: {text}");
    }
}

/// Asks mock-vllm to exit with `code` as if on its own; real vLLM exits 0 after its engine died.
fn exit_child(vllm_port: u16, code: i32) {
    let response = raw_request(
        vllm_port,
        &format!("POST /_mock/exit?code={code} HTTP/1.1"),
        b"",
    );
    assert_eq!(response.status, 200);
}

/// The value of a metric line such as `name{labels} value`, if the gateway exposes it.
fn metric(gateway: &Proc, line_start: &str) -> Option<f64> {
    let (_, body) = get(&gateway.url("/metrics"))?;
    body.lines()
        .find_map(|line| line.strip_prefix(line_start))
        .and_then(|value| value.trim().parse().ok())
}

/// Regression (failure mode 2 of real vLLM): vLLM exits 0 after its engine dies, and the gateway
/// took that for a clean stop: it exited 0 itself, so nothing ever restarted the model.
#[test]
fn vllm_exiting_0_on_its_own_is_restarted_under_on_failure_and_counted() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, vllm_port) = gateway_serve(
        &["--restart", "on-failure"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    let first = wait_for_starts(&pids, 1)[0].0;
    exit_child(vllm_port, 0);
    let starts = wait_for_starts(&pids, 2);
    assert_ne!(starts[1].0, first);
    wait_ready(&gateway);
    let exited = lines_with_message(&gateway, "vLLM exited on its own");
    assert_eq!(exited.len(), 1, "{}", gateway.log_text());
    assert_eq!(exited[0]["exit_code"], 0);
    assert_eq!(
        metric(
            &gateway,
            "gateway_child_restarts_total{reason=\"exit_code\"} "
        ),
        Some(1.0)
    );
    let (_, readyz) = get(&gateway.url("/readyz")).expect("readyz");
    assert!(readyz.contains("\"restarts\":1"), "{readyz}");
}

#[test]
fn under_restart_no_vllm_exiting_0_on_its_own_makes_the_gateway_exit_75() {
    let (mut gateway, vllm_port) = gateway_serve(&["--restart", "no"], &[]);
    wait_ready(&gateway);
    exit_child(vllm_port, 0);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(75));
    assert_eq!(
        lines_with_message(&gateway, "vLLM exited on its own").len(),
        1
    );
}

#[test]
fn an_exit_0_listed_in_restart_prevent_exit_codes_stops_the_gateway_with_0() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, vllm_port) = gateway_serve(
        &["--restart-prevent-exit-codes", "0"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    exit_child(vllm_port, 0);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    assert_eq!(read_pid_file(&pids).len(), 1, "not restarted");
}

/// Regression: under the open-files limit, a flood of idle connections made the `/health` probe
/// fail with EMFILE; the supervisor counted that against vLLM and killed a healthy model.
#[test]
fn a_probe_failing_for_lack_of_descriptors_does_not_kill_vllm() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve_wrapped(
        &["prlimit", "--nofile=128:128"],
        free_port(),
        &["--health-interval", "100ms", "--health-failures", "2"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    let vllm = wait_for_starts(&pids, 1)[0].0;
    // More idle connections than the gateway has descriptors: the kernel completes them all
    // (the listen backlog is larger), and the gateway accepts until it runs out.
    let flood: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect"))
        .collect();
    let local_failures = |gateway: &Proc| {
        lines_with_message(
            gateway,
            "the gateway could not send its /health probe: the gateway's own problem, not counted against vLLM",
        )
    };
    // Three probes in a row could not be sent (health_failures is 2), unless vLLM was killed first.
    wait_until("probes failing for lack of descriptors", DEADLINE, || {
        local_failures(&gateway).len() >= 3
            || read_pid_file(&pids).len() > 1
            || !alive(vllm)
            || gateway.child.try_wait().ok().flatten().is_some()
    });
    assert!(alive(vllm), "vLLM was killed:\n{}", gateway.log_text());
    assert_eq!(read_pid_file(&pids).len(), 1, "vLLM was restarted");
    let failures = local_failures(&gateway);
    let limit = failures[0]["limit"].as_str().expect("limit field");
    assert!(
        limit.contains("open-files limit (RLIMIT_NOFILE 128)"),
        "{limit}"
    );

    drop(flood);
    wait_until("the gateway to serve again", DEADLINE, || {
        post_json(
            gateway.port,
            "/v1/responses",
            r#"{"model":"mock-model","input":"hi"}"#,
            "",
        )
        .status
            == 200
    });
    assert!(alive(vllm));
    assert_eq!(read_pid_file(&pids).len(), 1, "the same vLLM serves");
}
