//! `gateway serve` when vLLM is not the one at fault: exits it did not ask for, the gateway's own
//! resource errors, a stranger on vLLM's port, processes that left vLLM's group, and secrets on
//! vLLM's command line. Real processes, real sockets, mock-vllm as the child.

mod common;

use std::time::Duration;

use common::*;

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

/// Under `restart = "no"` too, where an exit 0 alone makes the gateway exit 75 (regression: it
/// did even when 0 was listed).
#[test]
fn an_exit_0_listed_in_restart_prevent_exit_codes_stops_the_gateway_with_0() {
    for policy in ["on-failure", "no"] {
        let (_dir, pids, pids_text) = pid_file();
        let (mut gateway, vllm_port) = gateway_serve(
            &["--restart-prevent-exit-codes", "0", "--restart", policy],
            &[("MOCK_VLLM_PID_FILE", &pids_text)],
        );
        wait_ready(&gateway);
        exit_child(vllm_port, 0);
        assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0), "{policy}");
        assert_eq!(read_pid_file(&pids).len(), 1, "{policy}: not restarted");
    }
}

/// A death by signal N is reported as 128 + N, and so listed (regression: only plain exit codes
/// matched, so `137`, to stop an OOM-kill loop, never did).
#[test]
fn a_death_by_signal_listed_as_128_plus_n_stops_the_gateway_with_that_code() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve(
        &["--restart-prevent-exit-codes", "137"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    let (vllm, _) = read_pid_file(&pids)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vllm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill vLLM");
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(137));
    assert_eq!(read_pid_file(&pids).len(), 1, "not restarted");
}

/// Regression: under the open-files limit, a flood of idle connections made the `/health` probe
/// fail with EMFILE; the supervisor counted that against vLLM and killed a healthy model.
#[test]
fn a_probe_failing_for_lack_of_descriptors_does_not_kill_vllm() {
    let (_dir, pids, pids_text) = pid_file();
    let (mut gateway, _) = gateway_serve_wrapped(
        &["prlimit", "--nofile=128:128"],
        0,
        // A connection limit above the descriptors, so that the flood does exhaust them: the
        // default limit would keep the gateway clear of that (tests/hostile_clients.rs).
        &[
            "--health-interval",
            "100ms",
            "--health-failures",
            "2",
            "--max-connections",
            "1000",
        ],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    let vllm = wait_for_starts(&pids, 1)[0].0;
    // More idle connections than the gateway has descriptors: the kernel completes those the
    // gateway cannot accept in the listen backlog. Past a small backlog (net.core.somaxconn on
    // older kernels) a connect may fail; enough of them get through.
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], gateway.port));
    let flood: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok())
        .collect();
    assert!(flood.len() > 128, "only {} connections", flood.len());
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
        post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "").status == 200
    });
    assert!(alive(vllm));
    assert_eq!(read_pid_file(&pids).len(), 1, "the same vLLM serves");
}

/// A server that is not vLLM: answers every request 200 with `{}` and records its request lines.
struct Stranger {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Stranger {
    fn start() -> Stranger {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = requests.clone();
        // The thread lives as long as the test process; it only ever answers.
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut line = String::new();
                let _ = std::io::BufReader::new(&stream).read_line(&mut line);
                record.lock().expect("lock").push(line.trim().to_string());
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
            }
        });
        Stranger { port, requests }
    }

    fn proxied_requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|line| line.contains("/v1/"))
            .cloned()
            .collect()
    }
}

/// Waits until the gateway exits or reports ready; if it went ready, sends it a request, so that a
/// gateway that proxies to a stranger is seen doing it.
fn exit_or_ready_then_request(gateway: &mut Proc) -> bool {
    wait_until("the gateway to exit or become ready", DEADLINE, || {
        gateway.child.try_wait().ok().flatten().is_some()
            || get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
    let went_ready = accepts_connections(gateway.port);
    if went_ready {
        post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    }
    went_ready
}

/// A "vLLM" that imports its model for ever and never binds its port (real vLLM binds only once
/// the model is loaded, minutes later). It appends its pid to `$STARTS` at each start.
const IMPORTING_VLLM: &str = "#!/bin/sh\necho $$ >> \"$STARTS\"\nexec sleep 100000\n";

/// Regression: a foreign server on vLLM's port answered `/health` 200 while the child was still
/// loading; the gateway reported ready and proxied to the stranger.
#[test]
fn a_foreign_server_on_vllms_port_is_never_proxied_to_and_is_named() {
    let stranger = Stranger::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let vllm = script(dir.path(), "vllm", IMPORTING_VLLM);
    let starts = dir.path().join("starts");
    let (mut gateway, _) = gateway_serve_child(
        &[],
        0,
        &vllm,
        stranger.port,
        &["--max-restarts", "2", "--stop-timeout", "1s"],
        &[("STARTS", starts.to_str().expect("utf-8"))],
    );
    let went_ready = exit_or_ready_then_request(&mut gateway);
    assert_eq!(stranger.proxied_requests(), Vec::<String>::new());
    assert!(!went_ready, "the gateway went ready on a stranger");
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(1));
    assert!(!starts.exists(), "vLLM was never started");
    let taken = lines_with_message(
        &gateway,
        "vLLM's port is in use by another process; not starting vLLM",
    );
    assert_eq!(taken.len(), 2, "{}", gateway.log_text());
    assert_eq!(taken[0]["vllm_port"], stranger.port);
    let holder = taken[0]["holder"].as_str().expect("holder");
    assert!(
        holder.starts_with(&format!("pid {} (", std::process::id())),
        "{holder}"
    );
}

/// Kills the pids listed in a file (one a line) when the test ends, however it ends.
struct KillListed(std::path::PathBuf);

impl Drop for KillListed {
    fn drop(&mut self) {
        for pid in std::fs::read_to_string(&self.0).unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A "vLLM" whose port is taken after the gateway checked it and before vLLM binds it: a server
/// that left vLLM's process group (setsid) binds it first and answers `/health` 200, while vLLM
/// itself is still importing. The server appends its pid to `$STRANGERS` and its request lines to
/// `$REQUESTS`.
const VLLM_BEATEN_TO_ITS_PORT: &str = r#"#!/bin/sh
python3 - "$6" <<'PYTHON' >/dev/null 2>&1
import os, socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(16)
if os.fork():
    os._exit(0)
os.setsid()
with open(os.environ["STRANGERS"], "a") as pids:
    pids.write(f"{os.getpid()}\n")
while True:
    connection, _ = server.accept()
    line = connection.recv(65536).split(b"\r\n", 1)[0].decode()
    with open(os.environ["REQUESTS"], "a") as requests:
        requests.write(line + "\n")
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    connection.close()
PYTHON
exec sleep 100000
"#;

#[test]
fn a_port_taken_between_the_check_and_the_spawn_never_makes_the_gateway_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vllm = script(dir.path(), "vllm", VLLM_BEATEN_TO_ITS_PORT);
    let strangers = dir.path().join("strangers");
    let requests = dir.path().join("requests");
    let _cleanup = KillListed(strangers.clone());
    let (mut gateway, _) = gateway_serve_child(
        &[],
        0,
        &vllm,
        0,
        &[
            "--restart",
            "no",
            "--startup-timeout",
            "5s",
            "--stop-timeout",
            "1s",
        ],
        &[
            ("STRANGERS", strangers.to_str().expect("utf-8")),
            ("REQUESTS", requests.to_str().expect("utf-8")),
        ],
    );
    let went_ready = exit_or_ready_then_request(&mut gateway);
    let seen = std::fs::read_to_string(&requests).unwrap_or_default();
    assert!(
        seen.lines().any(|line| line.starts_with("GET /health")),
        "the stranger answered the probe: {seen:?}"
    );
    assert!(!seen.contains("/v1/"), "proxied to the stranger: {seen}");
    assert!(!went_ready, "the gateway went ready on a stranger");
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(1));
    let stranger = lines_with_message(
        &gateway,
        "something other than vLLM answers on vLLM's port; not ready",
    );
    assert_eq!(stranger.len(), 1, "{}", gateway.log_text());
    let reason = stranger[0]["reason"].as_str().expect("reason");
    assert!(reason.contains("not by vLLM's group"), "{reason}");
}

/// Regression: a process of vLLM's that left its process group (setsid, a daemonised helper)
/// survived every stop and restart of vLLM's group, and piled up.
#[test]
fn a_detached_descendant_is_gone_after_a_restart_and_after_a_stop() {
    let (_dir, pids, pids_text) = pid_file();
    // Kills whatever the gateway left, when the test ends however it ends.
    let _cleanup = KillGrandchildren(pids.clone());
    let (mut gateway, vllm_port) = gateway_serve(
        &["--stop-timeout", "2s"],
        &[
            ("MOCK_VLLM_SPAWN_GRANDCHILD", "1"),
            ("MOCK_VLLM_DETACH_GRANDCHILD", "1"),
            ("MOCK_VLLM_PID_FILE", &pids_text),
        ],
    );
    wait_ready(&gateway);
    let (first, first_grandchild) = wait_for_starts(&pids, 1)[0];
    assert!(first_grandchild > 0 && alive(first_grandchild));
    exit_child(vllm_port, 1);
    let (second, second_grandchild) = wait_for_starts(&pids, 2)[1];
    assert_ne!(second, first);
    assert!(
        !alive(first_grandchild),
        "the first vLLM's detached process was stopped before the second vLLM started"
    );
    wait_ready(&gateway);
    assert!(alive(second_grandchild));
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    assert!(
        !alive(second_grandchild),
        "the gateway stopped the detached process before it exited"
    );
}

/// Kills every grandchild named in the pid file when the test ends, however it ends.
struct KillGrandchildren(std::path::PathBuf);

impl Drop for KillGrandchildren {
    fn drop(&mut self) {
        for (_, grandchild) in read_pid_file(&self.0) {
            if grandchild > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(grandchild),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Zombie processes whose parent is `pid`.
fn zombie_children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|child| proc_stat(*child) == Some(('Z', pid)))
        .collect()
}

/// A vLLM (mock-vllm, from `$MOCK`) that first starts a helper which left its process group
/// (setsid) and ignores SIGTERM; the helper's pid is appended to `$HELPERS`.
const VLLM_WITH_A_STUBBORN_HELPER: &str = "#!/bin/sh
(trap '' TERM; exec setsid sleep 100000) </dev/null >/dev/null 2>&1 &
echo $! >> \"$HELPERS\"
exec \"$MOCK\" \"$@\"
";

#[test]
fn orphans_are_reparented_to_the_gateway_then_killed_after_stop_timeout_and_reaped() {
    // The gateway is a subreaper (or PID 1 in a container): a process whose parent died is
    // re-parented to the gateway, not to the machine's init. This one left vLLM's group and
    // ignores SIGTERM, so only the gateway's SIGKILL after stop_timeout ends it, and the gateway
    // reaps it: no zombie is left.
    let dir = tempfile::tempdir().expect("tempdir");
    let vllm = script(dir.path(), "vllm", VLLM_WITH_A_STUBBORN_HELPER);
    let helpers = dir.path().join("helpers");
    let _cleanup = KillListed(helpers.clone());
    let (_pids_dir, pids, pids_text) = pid_file();
    let (gateway, _) = gateway_serve_child(
        &[],
        0,
        &vllm,
        0,
        &["--restart", "always", "--stop-timeout", "2s"],
        &[
            ("MOCK", MOCK_VLLM),
            ("HELPERS", helpers.to_str().expect("utf-8")),
            ("MOCK_VLLM_PID_FILE", &pids_text),
        ],
    );
    wait_ready(&gateway);
    let child = wait_for_starts(&pids, 1)[0].0;
    let helper: i32 = std::fs::read_to_string(&helpers)
        .expect("helpers")
        .lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("a helper pid");
    assert!(alive(helper));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill child");
    wait_until(
        "the helper to be re-parented to the gateway",
        DEADLINE,
        || proc_stat(helper).map(|(_, parent)| parent) == Some(gateway.pid()),
    );
    wait_until("the gateway to kill and reap the helper", DEADLINE, || {
        !std::path::Path::new(&format!("/proc/{helper}")).exists()
    });
    assert!(
        gateway
            .log_text()
            .contains("processes left behind by vLLM did not stop in time; sending SIGKILL"),
        "{}",
        gateway.log_text()
    );
    wait_for_starts(&pids, 2);
    assert!(zombie_children(gateway.pid()).is_empty());
}

/// The soft and hard open-files limits of a process, as `/proc/<pid>/limits` shows them.
fn open_files_limits(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("the open-files line");
    let mut words = line.split_whitespace().skip(3);
    let soft = words.next().expect("soft").to_string();
    let hard = words.next().expect("hard").to_string();
    (soft, hard)
}

/// Sets the soft open-files limit of a running process (the hard limit stays, so it can be raised
/// again without privileges).
fn set_soft_open_files_limit(pid: i32, soft: &str) {
    let (_, hard) = open_files_limits(pid);
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
}

/// Regression: a spawn that failed for lack of descriptors counted as a failed start of vLLM, so
/// a gateway out of descriptors gave up on the model.
#[test]
fn a_spawn_failing_for_lack_of_descriptors_is_retried_without_counting() {
    let (_dir, pids, pids_text) = pid_file();
    // One failed start would be enough to give up.
    let (mut gateway, vllm_port) = gateway_serve(
        &["--max-restarts", "1"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_ready(&gateway);
    // Below the descriptors it holds, the gateway can open no new one.
    let (soft, _) = open_files_limits(gateway.pid());
    set_soft_open_files_limit(gateway.pid(), "3");
    exit_child(vllm_port, 1);
    let retries = |gateway: &Proc| {
        lines_with_message(
            gateway,
            "cannot start vLLM: the gateway's own problem, not vLLM's; retrying, not counted against max_restarts",
        )
    };
    wait_until(
        "two starts retried for lack of descriptors",
        DEADLINE,
        || retries(&gateway).len() >= 2 || gateway.child.try_wait().ok().flatten().is_some(),
    );
    assert!(
        gateway.child.try_wait().expect("try_wait").is_none(),
        "the gateway gave up:\n{}",
        gateway.log_text()
    );
    let limit = retries(&gateway)[0]["limit"]
        .as_str()
        .expect("limit field")
        .to_string();
    assert!(
        limit.contains("open-files limit (RLIMIT_NOFILE 3)"),
        "{limit}"
    );
    set_soft_open_files_limit(gateway.pid(), &soft);
    wait_for_starts(&pids, 2);
    wait_ready(&gateway);
}
