//! The command line and configuration files as an operator meets them: help, version, and every
//! kind of mistake, which must exit 2 naming the key and the file before anything starts.

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::*;

fn gateway() -> Command {
    let mut command = Command::new(GATEWAY);
    command
        .env_remove("OPENAI_API_KEY")
        .env_remove("VLLM_API_KEY");
    command
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf-8").to_string()
}

/// Runs the gateway with a config file and expects exit 2 with every `needle` on stderr.
fn rejects(text: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), text);
    // A port named before the gateway runs, to show afterwards that it never listened there.
    let port = free_port();
    let output = gateway()
        .args(["--config", &path, "--port", &port.to_string()])
        .timeout(std::time::Duration::from_secs(10))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(&path), "names the file: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "mentions {needle:?}: {stderr}");
    }
    assert!(!accepts_connections(port), "nothing was started");
}

#[test]
fn help_lists_every_flag_and_version_prints_the_version() {
    let help = gateway().arg("--help").output().expect("run");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--llm-api-base",
        "--host",
        "--port",
        "--config",
        "--upstream-api-key",
        "--connect-timeout",
        "--request-timeout",
        "--first-byte-timeout",
        "--stream-idle-timeout",
        "--drain-timeout",
        "--max-body-bytes",
        "--cors-allowed-origins",
    ] {
        assert!(text.contains(flag), "--help lists {flag}");
    }
    let serve_help = gateway().args(["serve", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&serve_help.stdout);
    for flag in [
        "--vllm-bin",
        "--vllm-port",
        "--restart",
        "--restart-delay",
        "--max-restarts",
        "--startup-timeout",
        "--health-failures",
        "--stop-timeout",
        "--child-env",
    ] {
        assert!(text.contains(flag), "serve --help lists {flag}");
    }
    let version = gateway().arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_shows_every_key_of_the_table_with_its_variables_and_serve_keys_only_under_serve() {
    use gateway::config::{Flag, KEYS, Scope};
    let help = |args: &[&str]| {
        let output = gateway().args(args).output().expect("run");
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let (standalone, serve) = (help(&["--help"]), help(&["serve", "--help"]));
    for key in KEYS {
        let Flag::Long(long, _) = key.flag else {
            continue;
        };
        let flag = format!("--{long} <");
        assert!(serve.contains(&flag), "serve --help lists {flag}");
        assert_eq!(
            standalone.contains(&flag),
            key.scope == Scope::All,
            "--help lists {flag} exactly when the standalone proxy takes it"
        );
        for variable in key.env {
            assert!(serve.contains(variable), "serve --help names {variable}");
        }
    }
}

#[test]
fn durations_beyond_a_year_are_rejected_instead_of_overflowing_the_clock() {
    rejects(
        "llm_api_base = \"http://127.0.0.1:8000\"\nrequest_timeout = \"500000000000y\"\n",
        &["`request_timeout`", "at most 365d"],
    );
}

#[test]
fn a_bad_flag_is_not_blamed_on_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "llm_api_base = \"http://127.0.0.1:8000\"\n");
    let output = gateway()
        .args(["--config", &path, "--host", "not-an-ip"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`host`"), "{stderr}");
    assert!(!stderr.contains(&path), "the file has no `host`: {stderr}");
}

/// Regression (issue 13): values were merged before they were checked, so a bad flag for a key the
/// file also set was blamed on the file, whose value was fine.
#[test]
fn a_bad_flag_is_blamed_on_the_flag_even_when_the_file_sets_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        "llm_api_base = \"http://127.0.0.1:8000\"\nhost = \"127.0.0.1\"\n",
    );
    let output = gateway()
        .args(["--config", &path, "--host", "not-an-ip"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--host"), "names the flag: {stderr}");
    assert!(
        !stderr.contains(&path),
        "the file's `host` is fine: {stderr}"
    );
}

/// Regression (issue 13): clap parsed `GATEWAY_*` variables and blamed a bad one on its flag,
/// which the operator never passed.
#[test]
fn a_bad_variable_is_blamed_on_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "port = 9001\n");
    let output = gateway()
        .args(["--llm-api-base", "http://127.0.0.1:8000", "--config", &path])
        .env("GATEWAY_PORT", "nine-thousand")
        .env("GATEWAY_STREAM_IDLE_TIMEOUT", "soon")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for variable in ["GATEWAY_PORT", "GATEWAY_STREAM_IDLE_TIMEOUT"] {
        assert!(stderr.contains(variable), "names {variable}: {stderr}");
    }
    assert!(!stderr.contains("--port"), "no flag was passed: {stderr}");
    assert!(
        !stderr.contains(&path),
        "the file's `port` is fine: {stderr}"
    );
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    rejects(
        "llm_api_base = \"http://127.0.0.1:8000\"\nconect_timeout = \"1s\"\n",
        &["`conect_timeout`", "unknown key"],
    );
}

#[test]
fn bad_durations_are_rejected_with_what_was_expected() {
    rejects(
        "llm_api_base = \"http://127.0.0.1:8000\"\nstream_idle_timeout = \"forever\"\n",
        &["`stream_idle_timeout`", "duration"],
    );
}

#[test]
fn values_of_the_wrong_type_are_rejected() {
    rejects(
        "llm_api_base = \"http://127.0.0.1:8000\"\nmax_body_bytes = \"lots\"\n",
        &["`max_body_bytes`", "integer"],
    );
}

#[test]
fn bad_upstream_urls_are_rejected() {
    rejects(
        "llm_api_base = \"127.0.0.1:8000\"\n",
        &["`llm_api_base`", "http://"],
    );
}

#[test]
fn invalid_toml_is_rejected_with_where_it_went_wrong_but_not_what_the_line_holds() {
    rejects(
        "llm_api_base = \"http://127.0.0.1:8000\n",
        &["not valid TOML at line 1, column"],
    );
    rejects(
        "model = \"m\"\nport = 9100\nport = 9101\n",
        &["not valid TOML at line 3, column 1", "duplicate key"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        "model = \"m\"\napi_keys = [\"sk-SECRET\" \"b\"]\n",
    );
    let output = gateway()
        .args(["config", "check", &path])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.starts_with(&format!("{path}: not valid TOML at line 2, column")),
        "the file is blamed, not a key: {stderr}"
    );
    assert!(!stderr.contains("SECRET"), "{stderr}");
}

/// Values that parse but could never work are refused at start, each with its key: keys that no
/// client could ever present (not ASCII, a space), an empty log filter (which let through errors
/// alone), an empty vLLM executable, exit codes no process can have, and (next test) a standalone
/// proxy in front of its own address. A range in a message starts where the key's does.
#[test]
fn values_that_could_never_work_are_refused_before_anything_starts() {
    rejects(
        concat!(
            "llm_api_base = \"http://127.0.0.1:8000\"\n",
            "api_keys = [\"sk-ok\", \"sk-é\", \"sk-trail \"]\n",
            "upstream_api_key = \"sk-é\"\n",
            "log_level = \" \"\n",
            "vllm_bin = \"\"\n",
            "restart_prevent_exit_codes = [2, 256]\n",
            "max_connections = -1\n",
        ),
        &[
            "key `api_keys`: every key must be printable ASCII, without spaces",
            "key `upstream_api_key`: must be printable ASCII, without spaces",
            "key `log_level`",
            "key `vllm_bin`",
            "key `restart_prevent_exit_codes`: exit codes are 0 to 255, got 256",
            "key `max_connections`: expected an integer from 1 to",
        ],
    );
}

#[test]
fn a_standalone_proxy_in_front_of_its_own_address_is_refused() {
    let port = free_port();
    for upstream in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}/v1"),
    ] {
        let output = gateway()
            .args(["--llm-api-base", &upstream, "--port", &port.to_string()])
            .timeout(std::time::Duration::from_secs(10))
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{upstream}: {stderr}");
        assert!(
            stderr.contains("names the gateway's own address"),
            "{stderr}"
        );
        assert!(!accepts_connections(port), "nothing was started");
    }
}

/// An empty variable counts as unset, `GATEWAY_CONFIG` too (clap refused it as a missing value).
#[test]
fn an_empty_gateway_config_variable_counts_as_unset() {
    let output = gateway()
        .env("GATEWAY_CONFIG", "")
        .args([
            "--llm-api-base",
            "http://127.0.0.1:1",
            "--max-connections",
            "0",
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`--max-connections` (key `max_connections`): must be at least 1"),
        "reached the configuration's own checks: {stderr}"
    );
}

#[test]
fn every_mistake_in_a_file_is_reported_at_once() {
    rejects(
        "port = 70000\nrestart = \"sometimes\"\nhealth_failures = 0\n",
        &["`port`", "`restart`", "`health_failures`"],
    );
}

#[test]
fn a_missing_upstream_is_an_error_that_says_what_to_do() {
    let output = gateway().args(["--port", "0"]).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--llm-api-base"));
}

#[test]
fn bad_flags_exit_2() {
    let output = gateway()
        .args([
            "--llm-api-base",
            "http://127.0.0.1:1",
            "--stream-idle-timeout",
            "soon",
        ])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--stream-idle-timeout"));
}

#[test]
fn a_missing_config_file_is_an_error() {
    let output = gateway()
        .args(["--config", "/nonexistent/gateway.toml"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/gateway.toml"));
}

#[test]
fn config_check_accepts_the_example_and_rejects_mistakes() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    gateway()
        .args(["config", "check", example])
        .assert()
        .success();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "drain_timeout = 30\n");
    let output = gateway()
        .args(["config", "check", &path])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("`drain_timeout`"));
}

/// A file may be fine for one run and refused by the other: `config check` says which run it is
/// fit for, and with `--serve` judges it as the systemd unit's `gateway serve --config FILE` does.
#[test]
fn config_check_says_which_run_a_file_is_fit_for_and_serve_judges_it_as_the_unit_runs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, verdict, serve_refuses) in [
        ("model = \"m\"\n", "ok for `gateway serve --config", None),
        (
            "port = 9100\n",
            "it names no `model`, so `gateway serve --config",
            Some("`model`: is required"),
        ),
        (
            "llm_api_base = \"http://127.0.0.1:8000\"\n",
            "ok for the standalone proxy",
            Some("key `llm_api_base`: cannot be used with `serve`"),
        ),
    ] {
        let path = write_config(dir.path(), text);
        let check = gateway()
            .args(["config", "check", &path])
            .output()
            .expect("run");
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(0), "{text}: {stdout}");
        assert!(stdout.starts_with(&format!("{path}: ")), "{text}: {stdout}");
        assert!(stdout.contains(verdict), "{text}: {stdout}");

        let strict = gateway()
            .args(["config", "check", "--serve", &path])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&strict.stderr);
        match serve_refuses {
            None => assert_eq!(strict.status.code(), Some(0), "{text}: {stderr}"),
            Some(error) => {
                assert_eq!(strict.status.code(), Some(2), "{text}");
                assert!(stderr.contains(error), "{text}: {stderr}");
                assert!(
                    stderr.starts_with(&format!("{path}: key ")),
                    "names the file, even for a key it leaves out: {stderr}"
                );
                let run = gateway()
                    .args(["serve", "--config", &path])
                    .timeout(std::time::Duration::from_secs(10))
                    .output()
                    .expect("run");
                assert_eq!(run.status.code(), Some(2), "{text}: the run refuses it too");
                assert!(
                    String::from_utf8_lossy(&run.stderr).contains(error),
                    "{text}: {}",
                    String::from_utf8_lossy(&run.stderr)
                );
            }
        }
    }
}

/// Regression (issue 11): `config check` accepted `port = 8000`, which `serve` then refused (vLLM's
/// default port), and a port of 99999 in `llm_api_base`, which failed only at start-up with a bare
/// "invalid port number". Both are now refused by `config check` and by the run, with one text
/// that names the key and the file.
#[test]
fn config_check_refuses_what_the_run_refuses_with_the_same_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, key, run) in [
        ("port = 8000\n", "`port`", &["serve", "mock-model"][..]),
        (
            "llm_api_base = \"http://127.0.0.1:99999/v1\"\n",
            "`llm_api_base`",
            &[][..],
        ),
    ] {
        let path = write_config(dir.path(), text);
        let check = gateway()
            .args(["config", "check", &path])
            .output()
            .expect("run");
        let check_error = String::from_utf8_lossy(&check.stderr).trim().to_string();
        assert_eq!(check.status.code(), Some(2), "{text}: {check_error}");
        assert!(
            check_error.contains(&format!("{path}: key {key}")),
            "names the file and the key: {check_error}"
        );
        let output = gateway()
            .args(run)
            .args(["--config", &path])
            .timeout(std::time::Duration::from_secs(10))
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text}: {stderr}");
        assert!(
            stderr.contains(&check_error),
            "the run says what `config check` said ({check_error}): {stderr}"
        );
    }
}

#[test]
fn the_upstream_key_never_appears_in_errors() {
    let output = gateway()
        .args(["--llm-api-base", "not a url"])
        .env("OPENAI_API_KEY", "sk-very-secret")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all.contains("sk-very-secret"));
}

#[test]
fn secrets_in_mistyped_keys_and_bad_entries_are_never_echoed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        concat!(
            "model = \"m\"\n",
            "api_keys = \"sk-SECRET-1\"\n",
            "upstream_api_key = [\"sk-SECRET-2\"]\n",
            "vllm_args = \"--api-key sk-SECRET-3\"\n",
            "child_env = [\"HF_TOKEN=hf_SECRET-4\\u0000\", \"SECRET-5\"]\n",
            "\"sk-SECRET-6-abcdefghijklmnopqrstuvwxyz\" = \"a value pasted as a key\"\n",
            "efbdc6f8a5bc8ab35a1352705dc74d05 = \"a hex secret pasted as a key\"\n",
        ),
    );
    let output = gateway()
        .args(["config", "check", &path])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["api_keys", "upstream_api_key", "vllm_args", "child_env"] {
        assert!(
            stderr.contains(&format!("`{key}`")),
            "names {key}: {stderr}"
        );
    }
    assert!(!stderr.contains("SECRET"), "{stderr}");
    assert!(stderr.contains("found an array"), "{stderr}");
    assert_eq!(
        stderr.matches("unknown key, not shown").count(),
        2,
        "{stderr}"
    );
    assert!(!stderr.contains("efbdc6f8"), "{stderr}");

    let output = gateway()
        .args(["serve", "m", "--child-env", "=hf_SECRET-6"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("child_env") && !stderr.contains("SECRET"),
        "{stderr}"
    );
}

#[test]
fn healthcheck_exits_0_when_ready_and_1_otherwise() {
    let mock = mock_vllm(&[]);
    let proxy = common::gateway(mock.port, &["--health-interval", "100ms"], &[]);
    wait_until("readyz", std::time::Duration::from_secs(10), || {
        get(&proxy.url("/readyz")).is_some_and(|(s, _)| s == 200)
    });
    gateway()
        .args(["healthcheck", "--url", &proxy.url("/readyz")])
        .assert()
        .code(0);
    let nobody = ClosedPort::new();
    gateway()
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{}/readyz", nobody.port),
        ])
        .assert()
        .code(1);
}
