//! Configuration: the TOML file, the environment and the flags, merged and validated once.
//!
//! [`table::KEYS`] is the one table of keys (name, type, default, help, flag, variables, the
//! field it fills, whether a reload may change it); the command line, merging, the checks and
//! reloads all read it. [`load()`] is two steps. Module `load` reads each layer and keeps, per
//! key, the value of the first layer that has it (flags > `GATEWAY_*` environment > file >
//! defaults), parsed and checked on its own and remembering its [`Origin`]. Module `validate`
//! then makes the checks that span keys and builds [`Config`]: plain types that cannot hold an
//! invalid value. Every mistake is collected into [`ConfigErrors`] before anything starts, each
//! blamed on the flag, the variable or the file's key that gave the value. [`reconcile`] splits a
//! reloaded configuration by `Reload`.
//!
//! The layers are read by hand rather than through serde (or figment, which extracts through
//! serde) because deserializing stops at the first mistake; an operator fixing a unit file wants
//! all of them at once, each with its origin.

mod load;
pub mod table;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use load::Flags;
pub use table::{Flag, KEYS, Key, Kind, Reload, Scope};

/// Everything the gateway needs to run, validated. (The parts' `Default`s are only the blank that
/// `load` fills from the table: the defaults that count are `KEYS`'.)
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file the settings were read from, if any (for messages).
    pub file: Option<PathBuf>,
    /// How many keys the file set (a reload refuses a file emptied since).
    pub file_keys: usize,
    /// The keys the file sets to another value than a flag or an environment variable that wins
    /// (a reload names them: an edit of the file changes nothing there).
    pub overridden: Vec<(&'static str, Origin)>,
    pub listen: SocketAddr,
    /// The port of the listener that serves only the gateway's own endpoints (on the host of
    /// `listen`); `None`: there is none.
    pub health_port: Option<u16>,
    pub upstream: UpstreamConfig,
    pub proxy: ProxyConfig,
    pub health: HealthConfig,
    pub drain_timeout: Duration,
    pub log: LogConfig,
    pub metrics_merge_upstream: bool,
    /// Present only for `gateway serve`.
    pub serve: Option<ServeConfig>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamConfig {
    /// Scheme and authority (and any path prefix), without a trailing slash or `/v1`.
    pub base: String,
    pub api_key: Option<Secret>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyConfig {
    /// Keys clients must present; empty means the gateway does not check.
    pub api_keys: Vec<Secret>,
    pub max_body_bytes: u64,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// `None` leaves CORS off: no CORS headers are added and none are stripped.
    pub cors: Option<Cors>,
    /// A request head must be whole this long after the connection opened or its first byte came.
    pub client_header_timeout: Duration,
    /// A kept-alive connection waits this long for its next request.
    pub client_idle_timeout: Duration,
    /// A client that takes no bytes of its response for this long is cut off.
    pub client_send_timeout: Duration,
    /// Most client connections open at once; `None` derives it from the open-files limit at start.
    pub max_connections: Option<u32>,
    /// Proxied requests served at once, for the whole gateway; 0: no limit.
    pub max_concurrent_requests: u32,
    /// Requests that may wait for a turn past that limit; more get 429.
    pub max_queued_requests: u32,
    /// How long a request may wait for its turn.
    pub queue_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    AnyOrigin,
    Origins(Vec<String>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServeConfig {
    pub model: String,
    pub vllm_bin: String,
    /// Never 0 once [`Config::resolve_vllm_port`] ran.
    pub vllm_port: u16,
    pub vllm_args: Vec<String>,
    pub child_env: Vec<(String, String)>,
    pub restart: RestartPolicy,
    pub backoff: BackoffConfig,
    pub restart_prevent_exit_codes: Vec<i32>,
    pub startup_poll_interval: Duration,
    pub startup_timeout: Duration,
    pub health_failures: u32,
    pub ready_wait_timeout: Duration,
    /// A streaming request that waited this long for vLLM gets its stream at once; zero: never.
    pub stream_keepalive_after: Duration,
    /// Interval of the comments that keep such a stream alive.
    pub stream_keepalive_interval: Duration,
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BackoffConfig {
    pub delay: Duration,
    pub max_delay: Duration,
    pub reset_after: Duration,
    pub max_restarts: u32,
}

/// A credential. Its `Debug` never shows the value, so it cannot leak through a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// When to restart vLLM after it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    No,
    #[default]
    OnFailure,
    Always,
}

impl RestartPolicy {
    /// The names a flag, a variable or the file takes, in the order of the variants.
    pub const NAMES: &'static [&'static str] = &["no", "on-failure", "always"];
}

impl FromStr for RestartPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "no" => Ok(RestartPolicy::No),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            _ => Err(format!("expected one of {}", Self::NAMES.join(", "))),
        }
    }
}

/// Where log lines go, and in which shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// journald under systemd, text on a terminal, else JSON.
    #[default]
    Auto,
    Text,
    Json,
    Journald,
}

impl LogFormat {
    /// The names a flag, a variable or the file takes, in the order of the variants.
    pub const NAMES: &'static [&'static str] = &["auto", "text", "json", "journald"];
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(LogFormat::Auto),
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            "journald" => Ok(LogFormat::Journald),
            _ => Err(format!("expected one of {}", Self::NAMES.join(", "))),
        }
    }
}

/// What `load` is validating for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Standalone,
    Serve,
    /// `gateway config check`: the checks of the mode the file is for (the standalone proxy when it
    /// names `llm_api_base`, `serve` otherwise), except that the keys a command line supplies
    /// (`llm_api_base`, `model`) may be missing. Flags and the environment are not read.
    Check,
}

/// Where a value came from, so that a mistake is blamed on what the operator must fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, as it is written (`--port`, `<MODEL>`).
    Flag(String),
    /// An environment variable, by name.
    Env(String),
    /// The configuration file.
    File(PathBuf),
    /// Nobody set it: the default (or nothing, for a key without one).
    Default,
}

/// One mistake in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the offending value came from.
    pub origin: Origin,
    /// The key at fault; none when the file as a whole is (it cannot be read, or is not TOML).
    pub key: Option<String>,
    pub message: String,
}

/// Every mistake found, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            let message = &error.message;
            let Some(key) = &error.key else {
                match &error.origin {
                    Origin::File(file) => write!(f, "{}: {message}", file.display())?,
                    _ => f.write_str(message)?,
                }
                continue;
            };
            match &error.origin {
                Origin::File(file) => write!(f, "{}: key `{key}`: {message}", file.display())?,
                Origin::Flag(flag) => write!(f, "flag `{flag}` (key `{key}`): {message}")?,
                Origin::Env(name) => {
                    write!(f, "environment variable `{name}` (key `{key}`): {message}")?;
                }
                Origin::Default => write!(f, "`{key}`: {message}")?,
            }
        }
        Ok(())
    }
}

pub const DEFAULT_PORT: u16 = 9000;
pub const DEFAULT_VLLM_PORT: u16 = 8000;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

/// Merges flags over the environment over the file over the defaults and validates the result.
///
/// `env` looks up environment variables; main passes `std::env::var`, tests pass a map.
pub fn load(
    flags: &Flags,
    mode: Mode,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let values = load::merge(flags, mode, env).map_err(|error| ConfigErrors(vec![error]))?;
    validate::build(values, mode)
}

/// Parses `500ms`, `30s`, `10m`, `1h 30m` (and a bare `0`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|err| format!("expected a duration like \"500ms\", \"30s\" or \"10m\" ({err})"))
}

impl Config {
    /// How long a request waits for vLLM to be ready; `None` for the standalone proxy, which has
    /// no vLLM of its own to wait for.
    pub fn ready_wait_timeout(&self) -> Option<Duration> {
        self.serve.as_ref().map(|serve| serve.ready_wait_timeout)
    }

    /// For `--vllm-port 0`: asks the kernel for a free loopback port and points the upstream at it.
    pub fn resolve_vllm_port(&mut self) -> std::io::Result<()> {
        let Some(serve) = &mut self.serve else {
            return Ok(());
        };
        if serve.vllm_port == 0 {
            let probe = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            serve.vllm_port = probe.local_addr()?.port();
            // Never the gateway's own port (free until `run` binds it): the check `load` makes
            // for a fixed `vllm_port` holds for a picked one too. The first probe, still held,
            // makes the second pick another port.
            if serve.vllm_port == self.listen.port() {
                let again = std::net::TcpListener::bind(("127.0.0.1", 0))?;
                serve.vllm_port = again.local_addr()?.port();
            }
            let port = serve.vllm_port;
            self.set_vllm_port(port);
        }
        Ok(())
    }

    /// Under `serve`, vLLM's port (and the upstream URL that follows from it): after an in-place
    /// upgrade, the port the running vLLM was started on.
    pub fn set_vllm_port(&mut self, port: u16) {
        if let Some(serve) = &mut self.serve {
            serve.vllm_port = port;
            self.upstream.base = format!("http://127.0.0.1:{port}");
        }
    }
}

/// Where the configuration came from, kept so that a reload reads it again the same way: the
/// flags as given at start, the file they name, and the mode.
#[derive(Debug, Clone)]
pub struct Source {
    pub flags: Flags,
    pub mode: Mode,
}

impl Source {
    /// [`load`] with this source's flags and mode: the file is read again.
    pub fn load(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        load(&self.flags, self.mode, env)
    }
}

/// What a reload makes of a newly loaded configuration.
#[derive(Debug)]
pub struct Reconciled {
    /// The configuration to run with: the new values of `Live` keys, the running ones of the rest.
    pub running: Config,
    /// The same, as loaded (before `resolve_vllm_port`): what the next reload compares against.
    pub loaded: Config,
    /// `Live` keys whose value changed, now applied.
    pub applied: Vec<&'static str>,
    /// `Restart` keys whose value changed, left as they are.
    pub needs_restart: Vec<&'static str>,
}

/// Splits a newly loaded configuration into what a reload applies and what needs a restart.
/// `loaded` is the previous configuration as loaded, `running` the one in force (the same, with
/// `vllm_port = 0` resolved to the port vLLM got).
pub fn reconcile(loaded: &Config, running: &Config, new: Config) -> Reconciled {
    let changed = |reload: Reload| -> Vec<&'static str> {
        KEYS.iter()
            .filter(|key| key.reload == reload && !(key.same)(loaded, &new))
            .map(|key| key.name)
            .collect()
    };
    let applied = changed(Reload::Live);
    let needs_restart = changed(Reload::Restart);
    let mut new_loaded = new.clone();
    let mut new_running = new;
    for key in KEYS.iter().filter(|key| key.reload == Reload::Restart) {
        (key.keep)(&mut new_loaded, loaded);
        (key.keep)(&mut new_running, running);
    }
    Reconciled {
        running: new_running,
        loaded: new_loaded,
        applied,
        needs_restart,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::validate::normalise_base_url;
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The key an error blames, or "" when it blames the whole file.
    fn key(error: &ConfigError) -> &str {
        error.key.as_deref().unwrap_or_default()
    }

    fn load_file(text: &str, mode: Mode) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).expect("write");
        load(&Flags::file(&path), mode, &no_env)
    }

    #[test]
    fn config_example_parses_with_every_key_documented() {
        // The example keeps keys commented out at their defaults; uncommenting every one must
        // still be a valid file.
        let uncommented = example_uncommented();
        let config = load_file(&uncommented, Mode::Check).expect("the example is valid");
        assert_eq!(config.listen.port(), DEFAULT_PORT);
        assert_eq!(config.proxy.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    }

    #[test]
    fn every_key_of_the_example_reaches_its_field_in_each_mode() {
        // A key whose table entry names a field of another type trips `validate`'s assertion.
        let serve_file: String = example_uncommented()
            .lines()
            .filter(|line| !line.starts_with("llm_api_base"))
            .map(|line| format!("{line}\n"))
            .collect();
        let config = load_file(&serve_file, Mode::Serve).expect("valid for serve");
        let serve = config.serve.as_ref().expect("serve");
        assert_eq!(serve.model, "Qwen/Qwen3-8B");
        assert_eq!(serve.restart, RestartPolicy::OnFailure);
        assert_eq!(serve.startup_poll_interval, Duration::from_millis(500));
        assert_eq!(config.proxy.max_connections, Some(1000));
        assert_eq!(config.proxy.cors, None);
        assert_eq!(config.log.format, LogFormat::Auto);
        let config = load_file(&example_uncommented(), Mode::Standalone).expect("valid");
        assert_eq!(config.upstream.base, "http://127.0.0.1:8000");
        assert_eq!(config.serve, None);
    }

    /// The example with every key uncommented.
    fn example_uncommented() -> String {
        include_str!("../../config.example.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_example_shows_every_key_at_its_default() {
        let example: toml::Table = example_uncommented().parse().expect("TOML");
        for key in KEYS {
            let Some(default) = key.default else {
                continue;
            };
            let shown = example.get(key.name).expect("every key is in the example");
            let shown = match shown {
                toml::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            assert_eq!(shown, default, "config.example.toml shows {}", key.name);
        }
    }

    #[test]
    fn the_readme_flag_tables_list_every_flag() {
        let readme = include_str!("../../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter(|line| line.starts_with("| `--"))
            .collect();
        for key in KEYS {
            if let Flag::Long(long, _) = key.flag {
                let flag = format!("`--{long}");
                assert!(
                    rows.iter()
                        .any(|row| row.split('|').nth(1).is_some_and(|cell| cell
                            .split(", ")
                            .any(|name| name.trim() == format!("{flag}`")
                                || name.trim().starts_with(&format!("{flag} "))))),
                    "README's flag tables list {flag}`"
                );
            }
        }
    }

    #[test]
    fn flags_and_variables_are_named_after_their_keys() {
        // The exceptions the README names: `--api-key` (and its variable) for the list
        // `api_keys`, the positional model, the arguments after `--`, and the upstream key's
        // well-known variables.
        for key in KEYS {
            match key.flag {
                Flag::Long(long, _) if key.name != "api_keys" => {
                    assert_eq!(long, key.name.replace('_', "-"), "{}", key.name);
                }
                _ => {}
            }
            if let Some(first) = key.env.first().filter(|_| key.name != "api_keys") {
                assert_eq!(
                    *first,
                    format!("GATEWAY_{}", key.name.to_uppercase()),
                    "{}",
                    key.name
                );
            }
        }
        let names: BTreeSet<&str> = KEYS.iter().map(|key| key.name).collect();
        assert_eq!(names.len(), KEYS.len(), "a key is listed twice");
    }

    fn load_with(
        file: &str,
        flags: &[(&str, &str)],
        env: &[(&str, &str)],
        mode: Mode,
    ) -> (PathBuf, Result<Config, ConfigErrors>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, file).expect("write");
        let mut args = Flags::file(&path);
        for (name, value) in flags {
            args.set(name, value.split(','));
        }
        let env: HashMap<&str, &str> = env.iter().copied().collect();
        let result = load(&args, mode, &|name| env.get(name).map(|v| v.to_string()));
        (path, result)
    }

    #[test]
    fn file_keys_a_flag_or_variable_overrides_with_another_value_are_named() {
        let (_, result) = load_with(
            "llm_api_base = \"http://a:1\"\nhost = \"127.0.0.1\"\ndrain_timeout = \"5s\"\nport = 8080\n",
            &[("host", "127.0.0.1"), ("drain_timeout", "10s")],
            &[("GATEWAY_PORT", "9090"), ("GATEWAY_QUEUE_TIMEOUT", "1s")],
            Mode::Standalone,
        );
        let config = result.expect("valid");
        // The same value on both sides overrides nothing; a key the file leaves out neither.
        assert_eq!(
            config.overridden,
            [
                ("port", Origin::Env("GATEWAY_PORT".into())),
                ("drain_timeout", Origin::Flag("--drain-timeout".into())),
            ]
        );
    }

    #[test]
    fn a_bad_flag_is_blamed_on_the_flag_even_when_the_file_sets_the_key() {
        let (_, result) = load_with(
            "llm_api_base = \"http://a:1\"\nhost = \"127.0.0.1\"\n",
            &[("host", "not-an-ip"), ("drain_timeout", "soon")],
            &[],
            Mode::Standalone,
        );
        let err = result.expect_err("invalid");
        let origins: Vec<_> = err.0.iter().map(|e| (key(e), &e.origin)).collect();
        assert_eq!(
            origins,
            [
                ("drain_timeout", &Origin::Flag("--drain-timeout".into())),
                ("host", &Origin::Flag("--host".into())),
            ]
        );
        let text = err.to_string();
        assert!(!text.contains("gateway.toml"), "{text}");
        assert!(text.contains("flag `--host`"), "{text}");
    }

    #[test]
    fn a_file_value_that_a_flag_overrides_is_still_checked() {
        let (path, result) = load_with(
            "llm_api_base = \"http://a:1\"\nport = \"x\"\n",
            &[("port", "9001")],
            &[],
            Mode::Standalone,
        );
        let err = result.expect_err("the file is wrong");
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(
            (key(&err.0[0]), &err.0[0].origin),
            ("port", &Origin::File(path))
        );
    }

    #[test]
    fn a_bad_variable_is_blamed_on_the_variable_and_a_bad_file_key_on_the_file() {
        let (path, result) = load_with(
            "llm_api_base = \"http://a:1\"\nport = 9001\nhealth_interval = \"later\"\n",
            &[],
            &[
                ("GATEWAY_PORT", "abc"),
                ("OPENAI_API_KEY", "sk-\u{1}SECRET"),
            ],
            Mode::Standalone,
        );
        let err = result.expect_err("invalid");
        let origins: Vec<_> = err.0.iter().map(|e| (key(e), &e.origin)).collect();
        assert_eq!(
            origins,
            [
                ("port", &Origin::Env("GATEWAY_PORT".into())),
                ("health_interval", &Origin::File(path)),
                ("upstream_api_key", &Origin::Env("OPENAI_API_KEY".into())),
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("environment variable `GATEWAY_PORT`"),
            "{text}"
        );
        assert!(!text.contains("SECRET"), "{text}");
    }

    #[test]
    fn variables_of_serve_keys_are_read_only_by_serve_and_never_by_config_check() {
        let env = [("GATEWAY_RESTART", "sometimes"), ("GATEWAY_PORT", "x")];
        let (_, standalone) = load_with(
            "",
            &[("llm_api_base", "http://a:1")],
            &env,
            Mode::Standalone,
        );
        let keys: Vec<_> = standalone
            .expect_err("GATEWAY_PORT is read")
            .0
            .into_iter()
            .map(|e| key(&e).to_string())
            .collect();
        assert_eq!(keys, ["port"]);
        let (_, check) = load_with("", &[], &env, Mode::Check);
        check.expect("config check reads the file only");
        let (_, serve) = load_with("model = \"m\"\n", &[], &env, Mode::Serve);
        let keys: Vec<_> = serve
            .expect_err("invalid")
            .0
            .into_iter()
            .map(|e| key(&e).to_string())
            .collect();
        assert_eq!(keys, ["port", "restart"]);
    }

    #[test]
    fn every_key_says_whether_a_reload_may_change_it() {
        let example: toml::Table = example_uncommented().parse().expect("TOML");
        let documented: BTreeSet<&str> = example.keys().map(String::as_str).collect();
        let marked: BTreeSet<&str> = KEYS.iter().map(|key| key.name).collect();
        assert_eq!(marked.len(), KEYS.len(), "a key is listed twice");
        assert_eq!(documented, marked, "config.example.toml and KEYS disagree");
    }

    #[test]
    fn the_example_lists_exactly_the_keys_a_reload_applies() {
        let text = include_str!("../../config.example.toml");
        let start = text.find("It applies").expect("the reload paragraph");
        let end = start + text[start..].find("; any other key").expect("its end");
        let listed: BTreeSet<&str> = text[start..end]
            .split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .filter(|word| KEYS.iter().any(|key| key.name == *word))
            .collect();
        let live: BTreeSet<&str> = KEYS
            .iter()
            .filter(|key| key.reload == Reload::Live)
            .map(|key| key.name)
            .collect();
        assert_eq!(listed, live);
    }

    fn serve_config(text: &str) -> Config {
        load_file(&format!("model = \"m\"\n{text}"), Mode::Serve).expect("valid")
    }

    #[test]
    fn a_reload_applies_live_keys_and_keeps_the_running_value_of_the_others() {
        let loaded = serve_config("vllm_port = 0\napi_keys = [\"old\"]\n");
        let mut running = loaded.clone();
        running.resolve_vllm_port().expect("a free port");
        let new = serve_config(
            "vllm_port = 0\napi_keys = [\"new\"]\nvllm_args = [\"--x\"]\nlog_level = \"debug\"\n",
        );
        let reconciled = reconcile(&loaded, &running, new);
        assert_eq!(reconciled.applied, ["api_keys", "log_level"]);
        assert_eq!(reconciled.needs_restart, ["vllm_args"]);
        let applied = &reconciled.running;
        assert_eq!(applied.proxy.api_keys, [Secret("new".into())]);
        assert_eq!(applied.log.level, "debug");
        // The running vLLM's arguments and its resolved port stay; `vllm_port = 0` again is no change.
        assert_eq!(applied.serve, running.serve);
        assert_eq!(applied.upstream.base, running.upstream.base);
        assert!(
            reconciled
                .loaded
                .serve
                .as_ref()
                .is_some_and(|serve| serve.vllm_port == 0 && serve.vllm_args.is_empty())
        );
        // A file changed back to what runs reports nothing.
        let again = reconcile(
            &reconciled.loaded,
            applied,
            serve_config("vllm_port = 0\napi_keys = [\"new\"]\nlog_level = \"debug\"\n"),
        );
        assert!(
            again.applied.is_empty() && again.needs_restart.is_empty(),
            "{again:?}"
        );
    }

    #[test]
    fn every_mistake_is_reported_at_once_with_key_and_file() {
        let err = load_file(
            "port = \"x\"\nconnect_timeout = \"soon\"\nbogus = 1\n",
            Mode::Check,
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(
            text.contains("key `port`: expected an integer from 0 to 65535"),
            "{text}"
        );
        assert!(
            text.contains("key `connect_timeout`: expected a duration"),
            "{text}"
        );
        assert!(text.contains("key `bogus`: unknown key"), "{text}");
        assert!(text.contains("gateway.toml"), "{text}");
    }

    #[test]
    fn trailing_v1_on_the_base_url_is_normalised() {
        assert_eq!(
            normalise_base_url("http://127.0.0.1:8000/v1/").as_deref(),
            Ok("http://127.0.0.1:8000")
        );
        assert_eq!(
            normalise_base_url("http://h/prefix/v1").as_deref(),
            Ok("http://h/prefix")
        );
        assert!(normalise_base_url("127.0.0.1:8000").is_err());
        let credentials =
            normalise_base_url("http://user:sk-SECRET@h:8000/v1").expect_err("credentials");
        assert!(!credentials.contains("SECRET"), "{credentials}");
        let https = normalise_base_url("https://h").expect_err("no TLS client");
        assert!(
            https.contains("https upstreams are not supported"),
            "{https}"
        );
        assert!(normalise_base_url("ftp://h").is_err());
    }

    #[test]
    fn a_base_url_with_a_bad_port_a_fragment_or_a_query_is_refused_naming_the_problem() {
        for (url, needle) in [
            (
                "http://127.0.0.1:99999",
                "the port must be a number from 1 to 65535",
            ),
            (
                "http://127.0.0.1:0/v1",
                "the port must be a number from 1 to 65535",
            ),
            ("http://127.0.0.1:8000/v1#top", "without a fragment"),
            ("http://127.0.0.1:8000/v1?x=1", "without a query"),
            ("http://sk-SECRET@127.0.0.1:8000", "without credentials"),
        ] {
            let message = normalise_base_url(url).expect_err(url);
            assert!(message.contains(needle), "{url}: {message}");
            assert!(!message.contains("SECRET"), "{message}");
        }
        let err = load_file("llm_api_base = \"http://127.0.0.1:99999\"\n", Mode::Check)
            .expect_err("invalid");
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(key(&err.0[0]), "llm_api_base");
        assert!(matches!(err.0[0].origin, Origin::File(_)));
    }

    #[test]
    fn flags_win_over_environment_keys_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "llm_api_base = \"http://a:1\"\nport = 1111\nupstream_api_key = \"file-key\"\n",
        )
        .expect("write");
        let mut args = Flags::file(&path);
        args.set("port", ["2222"]);
        let env: HashMap<&str, &str> = HashMap::from([("VLLM_API_KEY", "env-key")]);
        let config = load(&args, Mode::Standalone, &|name| {
            env.get(name).map(|v| v.to_string())
        })
        .expect("valid");
        assert_eq!(config.listen.port(), 2222);
        assert_eq!(
            config.upstream.api_key.as_ref().map(Secret::expose),
            Some("env-key")
        );
        assert_eq!(config.upstream.base, "http://a:1");

        // An empty variable does not hide the file's key.
        let empty: HashMap<&str, &str> = HashMap::from([("OPENAI_API_KEY", "")]);
        let config = load(&args, Mode::Standalone, &|name| {
            empty.get(name).map(|v| v.to_string())
        })
        .expect("valid");
        assert_eq!(
            config.upstream.api_key.as_ref().map(Secret::expose),
            Some("file-key")
        );
    }

    #[test]
    fn vllm_cannot_listen_on_the_gateways_port() {
        // The file sets `port` only: the clash with vLLM's default port is blamed on it.
        let err = load_file("model = \"m\"\nport = 8000\n", Mode::Serve).expect_err("invalid");
        let keys: Vec<_> = err.0.iter().map(key).collect();
        assert_eq!(keys, ["port"]);
        assert!(matches!(err.0[0].origin, Origin::File(_)), "{err}");
        let err = load_file("vllm_port = 9000\n", Mode::Serve).expect_err("invalid");
        let keys: Vec<_> = err.0.iter().map(key).collect();
        assert_eq!(keys, ["model", "vllm_port"]);
    }

    #[test]
    fn config_check_refuses_what_serve_refuses_and_accepts_what_a_command_line_completes() {
        // `port = 8000` alone is a file for `serve`, where vLLM's default port is 8000.
        let err = load_file("port = 8000\n", Mode::Check).expect_err("serve refuses it");
        let keys: Vec<_> = err.0.iter().map(key).collect();
        assert_eq!(keys, ["port"]);
        // With `llm_api_base` it is a file for the standalone proxy, where 8000 is free.
        load_file(
            "llm_api_base = \"http://10.0.0.2:8000\"\nport = 8000\n",
            Mode::Check,
        )
        .expect("valid standalone");
        // `model` may come from `gateway serve <MODEL>`.
        load_file("port = 9000\n", Mode::Check).expect("valid");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = load_file(
            "llm_api_base = \"http://a:1\"\nupstream_api_key = \"sk-topsecret\"\n",
            Mode::Standalone,
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("topsecret"));
    }

    #[test]
    fn client_limits_default_and_refuse_zero() {
        let config = load_file("", Mode::Check).expect("valid");
        assert_eq!(config.proxy.client_header_timeout, secs(30));
        assert_eq!(config.proxy.client_idle_timeout, secs(75));
        assert_eq!(config.proxy.client_send_timeout, secs(60));
        assert_eq!(config.proxy.max_connections, None);
        let err = load_file(
            "client_header_timeout = \"0s\"\nclient_send_timeout = \"0s\"\nmax_connections = 0\n",
            Mode::Check,
        )
        .expect_err("invalid");
        let keys: Vec<_> = err.0.iter().map(key).collect();
        assert_eq!(
            keys,
            [
                "client_header_timeout",
                "client_send_timeout",
                "max_connections"
            ]
        );
    }

    #[test]
    fn serve_requires_a_model_and_rejects_a_base_url() {
        let err = load_file("llm_api_base = \"http://a:1\"\n", Mode::Serve).expect_err("invalid");
        let keys: Vec<_> = err.0.iter().map(key).collect();
        assert_eq!(keys, ["llm_api_base", "model"]);
    }
}
