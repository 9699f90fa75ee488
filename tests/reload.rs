//! SIGHUP (`systemctl reload`): the gateway reads its configuration file again and applies what can
//! change while vLLM keeps running. vLLM never gets the signal (a real vLLM dies of it), a file with
//! mistakes changes nothing, a key that needs a restart is reported and left as it is, and systemd
//! hears RELOADING=1 then READY=1. Real processes: `gateway serve` with mock-vllm as its child.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::systemd::Systemd;
use common::*;
use nix::sys::signal::Signal;

/// A config file the test rewrites between reloads.
struct ConfigFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        let file = ConfigFile { path, _dir: dir };
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        // Written aside and renamed over, as editors and config management do, so a reload never
        // reads half a file.
        let next = self.path.with_extension("next");
        std::fs::write(&next, text).expect("write config");
        std::fs::rename(&next, &self.path).expect("replace config");
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

/// `gateway serve` with mock-vllm, configured by `file`, ready to serve.
fn serve(file: &ConfigFile, env: &[(&str, &str)]) -> (Proc, u16) {
    let (gateway, vllm_port) = gateway_serve(&["--config", file.path()], env);
    wait_ready(&gateway);
    (gateway, vllm_port)
}

/// The status a `/v1/responses` request gets with this client key.
fn status_with_key(gateway: &Proc, key: &str) -> u16 {
    post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        &format!("\r\nAuthorization: Bearer {key}"),
    )
    .status
}

/// vLLM's pid and the signals it has received, from mock-vllm's own report.
fn vllm_stats(vllm_port: u16) -> (i64, Vec<String>) {
    let (_, body) = get(&format!("http://127.0.0.1:{vllm_port}/_mock/stats")).expect("stats");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let signals = stats["signals"]
        .as_array()
        .expect("signals")
        .iter()
        .map(|signal| signal.as_str().expect("name").to_string())
        .collect();
    (stats["pid"].as_i64().expect("pid"), signals)
}

/// The messages of the gateway's JSON log lines.
fn log_messages(gateway: &Proc) -> Vec<String> {
    gateway
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| line["message"].as_str().map(str::to_string))
        .collect()
}

/// What `gateway config check` says about a file, line by line.
fn config_check(path: &Path) -> Vec<String> {
    let output = Command::new(GATEWAY)
        .args(["config", "check"])
        .arg(path)
        .output()
        .expect("run config check");
    assert_eq!(output.status.code(), Some(2), "config check refuses it");
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Regression (issue 11): SIGHUP was forwarded to vLLM, which does not handle it and dies.
#[test]
fn sighup_applies_new_client_keys_while_vllm_keeps_running_untouched() {
    let file = ConfigFile::new("api_keys = [\"sk-old\"]\n");
    let (gateway, vllm_port) = serve(&file, &[]);
    let (vllm_pid, _) = vllm_stats(vllm_port);
    assert_eq!(status_with_key(&gateway, "sk-old"), 200);
    assert_eq!(status_with_key(&gateway, "sk-new"), 401);

    file.write("api_keys = [\"sk-new\"]\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("the new key to be accepted", DEADLINE, || {
        status_with_key(&gateway, "sk-new") == 200
    });
    assert_eq!(status_with_key(&gateway, "sk-old"), 401);

    let (pid_after, signals) = vllm_stats(vllm_port);
    assert_eq!(pid_after, vllm_pid, "the same vLLM serves");
    assert!(
        !signals.contains(&"SIGHUP".to_string()),
        "vLLM never saw the SIGHUP: {signals:?}"
    );
    assert!(alive(gateway.pid()));
}

#[test]
fn a_file_with_mistakes_on_sighup_changes_nothing_and_is_reported_as_config_check_reports_it() {
    let file = ConfigFile::new("api_keys = [\"sk-old\"]\n");
    let (gateway, vllm_port) = serve(&file, &[]);
    let (vllm_pid, _) = vllm_stats(vllm_port);

    // The new key is valid; the file as a whole is not, so none of it applies.
    file.write("api_keys = [\"sk-new\"]\nrequest_timeout = \"soon\"\n");
    let expected = config_check(&file.path);
    assert!(
        expected
            .iter()
            .any(|line| line.contains("`request_timeout`") && line.contains(file.path())),
        "{expected:?}"
    );
    gateway.signal(Signal::SIGHUP);
    wait_until("the refusal to be logged", DEADLINE, || {
        let messages = log_messages(&gateway);
        expected.iter().all(|line| {
            messages
                .iter()
                .any(|message| message.contains(line.as_str()))
        })
    });

    assert_eq!(
        status_with_key(&gateway, "sk-old"),
        200,
        "the old keys stay"
    );
    assert_eq!(status_with_key(&gateway, "sk-new"), 401);
    assert_eq!(vllm_stats(vllm_port).0, vllm_pid);

    // Once the file is fixed, the next reload applies it.
    file.write("api_keys = [\"sk-new\"]\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("the new key to be accepted", DEADLINE, || {
        status_with_key(&gateway, "sk-new") == 200
    });
    assert_eq!(vllm_stats(vllm_port).0, vllm_pid);
}

#[test]
fn a_changed_key_that_needs_a_restart_is_reported_and_left_as_it_is() {
    let (_dir, pids, pids_text) = pid_file();
    let file = ConfigFile::new("api_keys = [\"sk-old\"]\n");
    let (gateway, vllm_port) = serve(&file, &[("MOCK_VLLM_PID_FILE", &pids_text)]);
    let (vllm_pid, _) = vllm_stats(vllm_port);

    // vLLM's arguments need a new vLLM; the client keys in the same file do not.
    file.write("api_keys = [\"sk-new\"]\nvllm_args = [\"--max-model-len\", \"2048\"]\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("the new key to be accepted", DEADLINE, || {
        status_with_key(&gateway, "sk-new") == 200
    });
    wait_until("the restart-only key to be reported", DEADLINE, || {
        log_messages(&gateway)
            .iter()
            .any(|message| message.contains("`vllm_args`") && message.contains("needs a restart"))
    });
    assert!(
        !log_messages(&gateway)
            .iter()
            .any(|message| message.contains("`api_keys`") && message.contains("needs a restart")),
        "a key a reload applies is not reported as needing a restart"
    );
    assert_eq!(vllm_stats(vllm_port).0, vllm_pid, "vLLM was not restarted");
    assert_eq!(read_pid_file(&pids).len(), 1, "vLLM was started once");
}

#[test]
fn a_reload_is_told_to_systemd_as_reloading_then_ready() {
    let systemd = Systemd::listen(false);
    let file = ConfigFile::new("api_keys = [\"sk-old\"]\n");
    let (gateway, _) = gateway_serve(
        &["--config", file.path()],
        &[("NOTIFY_SOCKET", &systemd.socket_env)],
    );
    systemd.set_proxy_port(gateway.port);
    systemd.wait_count("READY=1", 1);

    file.write("api_keys = [\"sk-new\"]\n");
    gateway.signal(Signal::SIGHUP);
    systemd.wait_count("READY=1", 2);
    // A refused file is a reload too: systemd must not be left waiting in "reloading".
    file.write("api_keys = 1\n");
    gateway.signal(Signal::SIGHUP);
    systemd.wait_count("READY=1", 3);

    let messages = systemd.messages();
    let sequence: Vec<&str> = messages
        .iter()
        .map(String::as_str)
        .filter(|message| {
            *message == "READY=1"
                || *message == "RELOADING=1"
                || message.starts_with("MONOTONIC_USEC=")
        })
        .collect();
    assert_eq!(sequence.len(), 7, "{messages:?}");
    for (index, expected) in [
        "READY=1",
        "RELOADING=1",
        "MONOTONIC_USEC=",
        "READY=1",
        "RELOADING=1",
        "MONOTONIC_USEC=",
        "READY=1",
    ]
    .iter()
    .enumerate()
    {
        assert!(sequence[index].starts_with(expected), "{messages:?}");
    }
    // MONOTONIC_USEC= goes with RELOADING=1, as systemd requires, and is a number.
    let reloading = messages
        .iter()
        .position(|message| message == "RELOADING=1")
        .expect("RELOADING=1");
    assert!(
        messages[reloading + 1]
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|usec| usec.parse::<u64>().is_ok_and(|usec| usec > 0)),
        "{messages:?}"
    );
    assert_eq!(status_with_key(&gateway, "sk-new"), 200);
}

/// The origin a CORS preflight from `origin` is allowed, if any.
fn preflight_allows(gateway: &Proc, origin: &str) -> Option<String> {
    let response = raw_request(
        gateway.port,
        &format!(
            "OPTIONS /v1/responses HTTP/1.1\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST"
        ),
        b"",
    );
    response
        .header("access-control-allow-origin")
        .map(str::to_string)
}

#[test]
fn a_reload_turns_cors_on_for_the_requests_that_follow() {
    let file = ConfigFile::new("");
    let (gateway, _) = serve(&file, &[]);
    assert_eq!(preflight_allows(&gateway, "https://app.example"), None);

    file.write("cors_allowed_origins = [\"https://app.example\"]\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("CORS to answer the preflight", DEADLINE, || {
        preflight_allows(&gateway, "https://app.example").as_deref() == Some("https://app.example")
    });
    assert_eq!(preflight_allows(&gateway, "https://other.example"), None);
}

#[test]
fn the_standalone_proxy_reloads_its_client_keys_too() {
    let vllm = mock_vllm(&[]);
    let file = ConfigFile::new("api_keys = [\"sk-old\"]\n");
    let gateway = gateway(vllm.port, &["--config", file.path()], &[]);
    assert_eq!(status_with_key(&gateway, "sk-old"), 200);

    file.write("api_keys = [\"sk-new\"]\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("the new key to be accepted", DEADLINE, || {
        status_with_key(&gateway, "sk-new") == 200
    });
    assert_eq!(status_with_key(&gateway, "sk-old"), 401);
    assert!(alive(vllm.pid()));
}

/// A key the command line or the environment sets is not the file's to change: the reload says
/// which ones, and by what, where its list of applied keys would otherwise just leave them out.
#[test]
fn a_reload_names_the_file_keys_a_flag_or_a_variable_overrides() {
    let vllm = mock_vllm(&[]);
    let file = ConfigFile::new("stream_idle_timeout = \"1m\"\nqueue_timeout = \"10s\"\n");
    let gateway = gateway(
        vllm.port,
        &["--config", file.path(), "--stream-idle-timeout", "5m"],
        &[("GATEWAY_QUEUE_TIMEOUT", "20s")],
    );
    file.write(
        "stream_idle_timeout = \"2m\"\nqueue_timeout = \"15s\"\nclient_idle_timeout = \"1m\"\n",
    );
    gateway.signal(Signal::SIGHUP);
    let reloaded = || {
        gateway_lines(&gateway)
            .into_iter()
            .find(|line| line["message"] == "configuration reloaded")
    };
    wait_until("the reload", DEADLINE, || reloaded().is_some());
    let line = reloaded().expect("reloaded");
    assert_eq!(line["applied"], "[\"client_idle_timeout\"]", "{line}");
    assert_eq!(
        line["overridden"],
        "[\"stream_idle_timeout (--stream-idle-timeout)\", \"queue_timeout ($GATEWAY_QUEUE_TIMEOUT)\"]",
        "{line}"
    );
}

/// The status of a Responses request sent with `x-request-id: id`.
fn request_with_id(gateway: &Proc, id: &str) -> u16 {
    post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        &format!("\r\nx-request-id: {id}"),
    )
    .status
}

/// Whether the gateway's JSON log has a line for the request `id`.
fn access_logged(gateway: &Proc, id: &str) -> bool {
    gateway
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .any(|line| line["request_id"] == id)
}

#[test]
fn a_reload_changes_the_log_level_of_the_lines_that_follow() {
    // Access lines start at warn, hidden; the gateway's other info lines stay, among them the
    // ports it reports. RUST_LOG, which would win over `log_level`, is left empty.
    let file = ConfigFile::new("log_level = \"info,gateway::access=warn\"\n");
    let (gateway, _) = serve(&file, &[("RUST_LOG", "")]);
    let request = |id: &str| request_with_id(&gateway, id);
    let logged = |id: &str| access_logged(&gateway, id);
    assert_eq!(request("before-reload"), 200);

    file.write("log_level = \"info\"\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("an access log line at info", DEADLINE, || {
        request("after-reload") == 200 && logged("after-reload")
    });
    assert!(
        !logged("before-reload"),
        "at warn, the request before the reload was not logged"
    );
}

#[test]
fn a_reload_that_raises_the_access_logs_level_hides_its_lines() {
    let file = ConfigFile::new("log_level = \"info\"\n");
    let (gateway, _) = serve(&file, &[("RUST_LOG", "")]);
    let request = |id: &str| request_with_id(&gateway, id);
    let logged = |id: &str| access_logged(&gateway, id);
    let reloads = || gateway.log_text().matches("configuration reloaded").count();
    assert_eq!(request("at-info"), 200);
    wait_until("the first access line", DEADLINE, || logged("at-info"));

    // A line let through by the second reload shows that the queue was written out past the
    // request made at warn.
    for (round, level, id) in [
        (1, "info,gateway::access=warn", "at-warn"),
        (2, "info", "at-info-again"),
    ] {
        file.write(&format!("log_level = \"{level}\"\n"));
        gateway.signal(Signal::SIGHUP);
        wait_until("the reload in force", DEADLINE, || reloads() >= round);
        assert_eq!(request(id), 200);
    }
    wait_until("the access line after the second reload", DEADLINE, || {
        logged("at-info-again")
    });
    assert!(!logged("at-warn"), "a request at warn was logged");
}

/// Whether a connection that sends half a head is answered 408 within two seconds.
fn half_head_gets_408(port: u16) -> bool {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: gateway\r\n")
        .expect("write half a head");
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    received.starts_with(b"HTTP/1.1 408")
}

#[test]
fn a_reload_applies_a_new_client_header_timeout_to_the_connections_that_follow() {
    let vllm = mock_vllm(&[]);
    let file = ConfigFile::new("client_header_timeout = \"1h\"\n");
    let gateway = gateway(vllm.port, &["--config", file.path()], &[]);
    assert!(!half_head_gets_408(gateway.port), "an hour is not up yet");

    file.write("client_header_timeout = \"300ms\"\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("a half head to get 408", DEADLINE, || {
        half_head_gets_408(gateway.port)
    });
}

/// Regression: the reload read the file on the runtime the supervisor and the signal task share,
/// so a file that blocks (a FIFO nobody writes, a hung network mount) held up SIGTERM, vLLM's
/// restarts and the health probes until it returned; under the unit, the watchdog would have
/// killed the gateway, and vLLM with it. The read now waits aside, for 10 s at most.
#[test]
fn a_config_file_that_blocks_on_reload_holds_up_nothing() {
    let file = ConfigFile::new("api_keys = [\"sk-old\"]\n");
    let (mut gateway, vllm_port) = serve(&file, &[]);
    std::fs::remove_file(&file.path).expect("remove the config");
    nix::unistd::mkfifo(&file.path, nix::sys::stat::Mode::S_IRUSR).expect("mkfifo");

    gateway.signal(Signal::SIGHUP);
    wait_until("the read to be given up", DEADLINE, || {
        log_messages(&gateway)
            .iter()
            .any(|message| message.contains("took longer than 10s"))
    });
    gateway.signal(Signal::SIGHUP);
    wait_until("the next reload to be refused", DEADLINE, || {
        log_messages(&gateway)
            .iter()
            .any(|message| message.contains("has not returned yet"))
    });
    assert_eq!(status_with_key(&gateway, "sk-old"), 200, "the keys stay");

    gateway.signal(Signal::SIGTERM);
    let status = gateway.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", gateway.log_text());
    wait_until("vLLM to be stopped", DEADLINE, || {
        get(&format!("http://127.0.0.1:{vllm_port}/health")).is_none()
    });
}

/// Regression: a reload that read an emptied file (a write caught halfway, `--config <(...)`
/// read once) took every key back to its default, client keys off among them.
#[test]
fn a_reload_refuses_a_file_emptied_since_and_says_when_client_keys_go_off() {
    let file = ConfigFile::new("api_keys = [\"sk-old\"]\n");
    let (gateway, _) = serve(&file, &[]);

    file.write("# being rewritten\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("the empty file to be refused", DEADLINE, || {
        log_messages(&gateway)
            .iter()
            .any(|message| message.contains("sets no keys now"))
    });
    assert_eq!(
        status_with_key(&gateway, "sk-other"),
        401,
        "keys still asked"
    );
    let metrics = reload_metrics(&gateway);
    assert_eq!(metrics, [0.0, 0.0, 1.0], "a refused reload is counted");

    // A file that still sets something but no client keys turns them off, loudly.
    file.write("request_timeout = \"10m\"\n");
    gateway.signal(Signal::SIGHUP);
    wait_until("client keys to be off", DEADLINE, || {
        status_with_key(&gateway, "sk-other") == 200
    });
    assert!(
        log_messages(&gateway)
            .iter()
            .any(|message| message.contains("clients are no longer asked for a key")),
        "{}",
        gateway.log_text()
    );
    assert_eq!(reload_metrics(&gateway), [1.0, 1.0, 1.0]);
}

/// `gateway_config_last_reload_successful`, then `gateway_config_reloads_total` applied and
/// refused, from `/metrics`.
fn reload_metrics(gateway: &Proc) -> [f64; 3] {
    let (status, text) = get(&gateway.url("/metrics")).expect("metrics");
    assert_eq!(status, 200);
    let value = |series: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    [
        value("gateway_config_last_reload_successful"),
        value("gateway_config_reloads_total{result=\"applied\"}"),
        value("gateway_config_reloads_total{result=\"refused\"}"),
    ]
}
