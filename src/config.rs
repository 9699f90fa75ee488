//! Configuration: the TOML file, the environment and the flags, merged and validated once.
//!
//! Two layers. The raw layer is the file as a TOML table read key by key by [`FileValues`], which
//! remembers which keys it was asked for so that every other key is reported as unknown. The
//! validated layer is [`Config`]: plain types that cannot hold an invalid value. [`load`] merges
//! flags (and clap's environment variables) over the file over the defaults and collects *every*
//! mistake into [`ConfigErrors`] before anything starts, each naming its key and where it came from.
//!
//! A hand-rolled table reader is used instead of `#[serde(deny_unknown_fields)]` structs because
//! serde stops at the first mistake; an operator fixing a unit file wants all of them at once.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{LogFormat, ProxyArgs, RestartPolicy, ServeArgs};

/// Everything the gateway needs to run, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file the settings were read from, if any (for messages).
    pub file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub proxy: ProxyConfig,
    pub health: HealthConfig,
    pub drain_timeout: Duration,
    pub log: LogConfig,
    pub metrics_merge_upstream: bool,
    /// Present only for `gateway serve`.
    pub serve: Option<ServeConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Scheme and authority (and any path prefix), without a trailing slash or `/v1`.
    pub base: String,
    pub api_key: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq)]
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    AnyOrigin,
    Origins(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq)]
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
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
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

/// What `load` is validating for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Standalone,
    Serve,
    /// `gateway config check`: the checks of the mode the file is for (the standalone proxy when it
    /// names `llm_api_base`, `serve` otherwise), except that the keys a command line supplies
    /// (`llm_api_base`, `model`) may be missing.
    Check,
}

/// One mistake in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `Some(file)` when the value came from the file; `None` for flags and the environment.
    pub file: Option<PathBuf>,
    pub key: String,
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
            match &error.file {
                Some(file) => write!(
                    f,
                    "{}: key `{}`: {}",
                    file.display(),
                    error.key,
                    error.message
                )?,
                None => write!(f, "`{}`: {}", error.key, error.message)?,
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
    proxy_args: &ProxyArgs,
    serve_args: Option<&ServeArgs>,
    mode: Mode,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut file = match &proxy_args.config {
        Some(path) => FileValues::read(path).map_err(|error| ConfigErrors(vec![error]))?,
        None => FileValues::empty(),
    };
    let default_serve = ServeArgs::default();
    let serve_args = serve_args.unwrap_or(&default_serve);
    let a = proxy_args;

    // Every file key is read before anything is decided, so that each one is validated even
    // when a flag overrides it.
    let llm_api_base = a.llm_api_base.clone().or(file.string("llm_api_base"));
    let host = a
        .host
        .clone()
        .or(file.string("host"))
        .unwrap_or_else(|| "0.0.0.0".into());
    let port = a.port.or(file.integer("port")).unwrap_or(DEFAULT_PORT);
    // An empty key (OPENAI_API_KEY="" in a unit's environment, say) counts as unset at each
    // source, so it does not hide the next one.
    let non_empty = |key: &String| !key.is_empty();
    let file_upstream_api_key = file.string("upstream_api_key");
    let upstream_api_key = a
        .upstream_api_key
        .clone()
        .filter(non_empty)
        .or_else(|| env("GATEWAY_UPSTREAM_API_KEY").filter(non_empty))
        .or_else(|| env("OPENAI_API_KEY").filter(non_empty))
        .or_else(|| env("VLLM_API_KEY").filter(non_empty))
        .or(file_upstream_api_key.filter(non_empty));
    let file_api_keys = file.string_list("api_keys");
    let api_keys = if a.api_keys.is_empty() {
        file_api_keys.unwrap_or_default()
    } else {
        a.api_keys.clone()
    };
    let file_origins = file.string_list("cors_allowed_origins");
    let origins = if a.cors_allowed_origins.is_empty() {
        file_origins.unwrap_or_default()
    } else {
        a.cors_allowed_origins.clone()
    };
    let connect_timeout = a
        .connect_timeout
        .or(file.duration("connect_timeout"))
        .unwrap_or(secs(10));
    let request_timeout = a
        .request_timeout
        .or(file.duration("request_timeout"))
        .unwrap_or(secs(600));
    let first_byte_timeout = a
        .first_byte_timeout
        .or(file.duration("first_byte_timeout"))
        .unwrap_or(secs(600));
    let stream_idle_timeout = a
        .stream_idle_timeout
        .or(file.duration("stream_idle_timeout"))
        .unwrap_or(secs(300));
    let pool_idle_timeout = a
        .pool_idle_timeout
        .or(file.duration("pool_idle_timeout"))
        .unwrap_or(secs(4));
    let max_body_bytes = a
        .max_body_bytes
        .or(file.integer("max_body_bytes"))
        .unwrap_or(DEFAULT_MAX_BODY_BYTES);
    let client_header_timeout = a
        .client_header_timeout
        .or(file.duration("client_header_timeout"))
        .unwrap_or(secs(30));
    let client_idle_timeout = a
        .client_idle_timeout
        .or(file.duration("client_idle_timeout"))
        .unwrap_or(secs(75));
    let client_send_timeout = a
        .client_send_timeout
        .or(file.duration("client_send_timeout"))
        .unwrap_or(secs(60));
    let max_connections = a.max_connections.or(file.integer("max_connections"));
    let drain_timeout = a
        .drain_timeout
        .or(file.duration("drain_timeout"))
        .unwrap_or(secs(30));
    let health_interval = a
        .health_interval
        .or(file.duration("health_interval"))
        .unwrap_or(secs(5));
    let health_timeout = a
        .health_timeout
        .or(file.duration("health_timeout"))
        .unwrap_or(secs(5));
    let log_level = a
        .log_level
        .clone()
        .or(file.string("log_level"))
        .unwrap_or_else(|| "info".into());
    let log_format = a.log_format.or(file.parsed(
        "log_format",
        "one of auto, text, json, journald",
        parse_log_format,
    ));
    let access_log = a.access_log.or(file.boolean("access_log")).unwrap_or(true);
    let metrics_merge_upstream = a
        .metrics_merge_upstream
        .or(file.boolean("metrics_merge_upstream"))
        .unwrap_or(false);

    let s = serve_args;
    let model = s.model.clone().or(file.string("model"));
    let vllm_bin = s
        .vllm_bin
        .clone()
        .or(file.string("vllm_bin"))
        .unwrap_or_else(|| "vllm".into());
    let vllm_port = s
        .vllm_port
        .or(file.integer("vllm_port"))
        .unwrap_or(DEFAULT_VLLM_PORT);
    let file_vllm_args = file.string_list("vllm_args");
    let vllm_args = if s.vllm_args.is_empty() {
        file_vllm_args.unwrap_or_default()
    } else {
        s.vllm_args.clone()
    };
    let file_child_env = file.string_list("child_env");
    let child_env = if s.child_env.is_empty() {
        file_child_env.unwrap_or_default()
    } else {
        s.child_env.clone()
    };
    let restart =
        s.restart
            .or(file.parsed("restart", "one of no, on-failure, always", parse_restart));
    let restart_delay = s
        .restart_delay
        .or(file.duration("restart_delay"))
        .unwrap_or(secs(1));
    let restart_max_delay = s
        .restart_max_delay
        .or(file.duration("restart_max_delay"))
        .unwrap_or(secs(60));
    let restart_reset_after = s
        .restart_reset_after
        .or(file.duration("restart_reset_after"))
        .unwrap_or(secs(300));
    let max_restarts = s.max_restarts.or(file.integer("max_restarts")).unwrap_or(5);
    let file_prevent = file.integer_list("restart_prevent_exit_codes");
    let restart_prevent_exit_codes = if s.restart_prevent_exit_codes.is_empty() {
        file_prevent.unwrap_or_default()
    } else {
        s.restart_prevent_exit_codes.clone()
    };
    let startup_poll_interval = s
        .startup_poll_interval
        .or(file.duration("startup_poll_interval"))
        .unwrap_or(Duration::from_millis(500));
    let startup_timeout = s
        .startup_timeout
        .or(file.duration("startup_timeout"))
        .unwrap_or(secs(1800));
    let health_failures = s
        .health_failures
        .or(file.integer("health_failures"))
        .unwrap_or(3);
    let ready_wait_timeout = s
        .ready_wait_timeout
        .or(file.duration("ready_wait_timeout"))
        .unwrap_or(secs(30));
    let stop_timeout = s
        .stop_timeout
        .or(file.duration("stop_timeout"))
        .unwrap_or(secs(30));

    errors.append(&mut file.finish());
    let file_path = file.path.clone();
    let file_keys: BTreeSet<String> = file.table.keys().cloned().collect();
    let mut error = |key: &str, message: String| {
        // The file is named only when it holds the key; a value from a flag or a variable is
        // reported by key alone. (A flag that overrides a key the file also holds is still
        // blamed on the file: the merged values no longer say where they came from.)
        let file = file_path.clone().filter(|_| file_keys.contains(key));
        errors.push(ConfigError {
            file,
            key: key.into(),
            message,
        });
    };

    let ip: Option<IpAddr> = match host.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            error(
                "host",
                format!("expected an IP address such as 0.0.0.0 or ::1, got {host:?}"),
            );
            None
        }
    };
    // Whether the gateway starts vLLM itself; `config check` judges a file by what it holds.
    let serves = match mode {
        Mode::Serve => true,
        Mode::Standalone => false,
        Mode::Check => llm_api_base.is_none(),
    };
    let base = match (mode, &llm_api_base) {
        (Mode::Serve, Some(_)) => {
            error(
                "llm_api_base",
                "cannot be used with `serve`: the gateway proxies to the vLLM it starts".into(),
            );
            None
        }
        (Mode::Serve | Mode::Check, None) => Some(format!("http://127.0.0.1:{vllm_port}")),
        (_, Some(url)) => match normalise_base_url(url) {
            Ok(base) => Some(base),
            Err(message) => {
                error("llm_api_base", message);
                None
            }
        },
        (Mode::Standalone, None) => {
            error(
                "llm_api_base",
                "is required: pass --llm-api-base http://127.0.0.1:8000, or use `gateway serve`"
                    .into(),
            );
            None
        }
    };
    if mode == Mode::Serve && model.as_deref().is_none_or(str::is_empty) {
        error(
            "model",
            "is required: `gateway serve <MODEL>` or `model = \"...\"` in the config file".into(),
        );
    }
    let cors = if origins.is_empty() {
        None
    } else if origins.iter().any(|origin| origin == "*") {
        Some(Cors::AnyOrigin)
    } else {
        for origin in &origins {
            // A browser's Origin is scheme://host[:port], never with a path or a trailing slash.
            let host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            if host.is_none_or(|host| host.is_empty() || host.contains('/'))
                || http::HeaderValue::from_str(origin).is_err()
            {
                error(
                    "cors_allowed_origins",
                    format!(
                        "expected origins like \"https://app.example\" or \"*\", got {origin:?}"
                    ),
                );
            }
        }
        Some(Cors::Origins(origins))
    };
    let mut api_key_secrets = Vec::with_capacity(api_keys.len());
    for key in api_keys {
        if key.is_empty() || http::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            error(
                "api_keys",
                "every key must be non-empty printable ASCII".into(),
            );
        } else {
            api_key_secrets.push(Secret(key));
        }
    }
    if let Some(key) = &upstream_api_key {
        if http::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            error("upstream_api_key", "must be printable ASCII".into());
        }
    }
    // Deadlines are added to the clock; beyond a year they could overflow it, and no real wait is
    // that long. Zero is meaningful only where a key says so (no drain, no restart delay, ...).
    const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
    for (key, value, zero_allowed) in [
        ("connect_timeout", connect_timeout, false),
        ("request_timeout", request_timeout, false),
        ("first_byte_timeout", first_byte_timeout, false),
        ("stream_idle_timeout", stream_idle_timeout, false),
        ("pool_idle_timeout", pool_idle_timeout, false),
        ("client_header_timeout", client_header_timeout, false),
        ("client_idle_timeout", client_idle_timeout, false),
        ("client_send_timeout", client_send_timeout, false),
        ("drain_timeout", drain_timeout, true),
        ("health_interval", health_interval, false),
        ("health_timeout", health_timeout, false),
        ("startup_poll_interval", startup_poll_interval, false),
        ("startup_timeout", startup_timeout, false),
        ("restart_delay", restart_delay, true),
        ("restart_max_delay", restart_max_delay, false),
        ("restart_reset_after", restart_reset_after, true),
        ("ready_wait_timeout", ready_wait_timeout, true),
        ("stop_timeout", stop_timeout, true),
    ] {
        if value.is_zero() && !zero_allowed {
            error(key, "must be greater than zero".into());
        }
        if value > MAX_DURATION {
            error(key, "must be at most 365d".into());
        }
    }
    if max_body_bytes == 0 {
        error("max_body_bytes", "must be greater than zero".into());
    }
    if max_connections == Some(0) {
        error("max_connections", "must be at least 1".into());
    }
    if serves && vllm_port != 0 && vllm_port == port {
        // Blamed on the key the file sets, so that `port = 8000` alone (vLLM's default port) names
        // the file's line rather than a key the file does not hold.
        if file_keys.contains("port") && !file_keys.contains("vllm_port") {
            error(
                "port",
                format!(
                    "must differ from vllm_port ({vllm_port}{}): vLLM listens there behind the gateway",
                    if s.vllm_port.is_none() {
                        ", its default"
                    } else {
                        ""
                    }
                ),
            );
        } else {
            error(
                "vllm_port",
                format!("must differ from port ({port}): vLLM listens there behind the gateway"),
            );
        }
    }
    if restart_delay > restart_max_delay {
        error(
            "restart_delay",
            format!(
                "must not exceed restart_max_delay ({})",
                humantime::format_duration(restart_max_delay)
            ),
        );
    }
    if health_failures == 0 {
        error("health_failures", "must be at least 1".into());
    }
    if log_level.parse::<tracing_subscriber::EnvFilter>().is_err() {
        error(
            "log_level",
            format!(
                "expected a level or filter such as \"info\" or \"gateway=debug\", got {log_level:?}"
            ),
        );
    }
    let mut child_env_pairs = Vec::with_capacity(child_env.len());
    for pair in &child_env {
        match pair.split_once('=') {
            Some((name, value))
                if !name.is_empty() && !name.contains('\0') && !value.contains('\0') =>
            {
                child_env_pairs.push((name.to_string(), value.to_string()));
            }
            // The value may be a secret (HF_TOKEN=...): only the name is repeated.
            Some((name, _)) if !name.is_empty() && !name.contains('\0') => error(
                "child_env",
                format!("expected NAME=VALUE, got a NUL byte in the value of {name:?}"),
            ),
            _ => error(
                "child_env",
                "expected NAME=VALUE, got an entry without a name (or without `=`)".to_string(),
            ),
        }
    }

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let (Some(ip), Some(base)) = (ip, base) else {
        unreachable!("every None above pushed an error")
    };
    let serve = (mode == Mode::Serve).then(|| ServeConfig {
        model: model.unwrap_or_default(),
        vllm_bin,
        vllm_port,
        vllm_args,
        child_env: child_env_pairs,
        restart: restart.unwrap_or(RestartPolicy::OnFailure),
        backoff: BackoffConfig {
            delay: restart_delay,
            max_delay: restart_max_delay,
            reset_after: restart_reset_after,
            max_restarts,
        },
        restart_prevent_exit_codes,
        startup_poll_interval,
        startup_timeout,
        health_failures,
        ready_wait_timeout,
        stop_timeout,
    });
    Ok(Config {
        file: file.path,
        listen: SocketAddr::new(ip, port),
        upstream: UpstreamConfig {
            base,
            api_key: upstream_api_key.map(Secret),
        },
        proxy: ProxyConfig {
            api_keys: api_key_secrets,
            max_body_bytes,
            connect_timeout,
            request_timeout,
            first_byte_timeout,
            stream_idle_timeout,
            pool_idle_timeout,
            cors,
            client_header_timeout,
            client_idle_timeout,
            client_send_timeout,
            max_connections,
        },
        health: HealthConfig {
            interval: health_interval,
            timeout: health_timeout,
        },
        drain_timeout,
        log: LogConfig {
            level: log_level,
            format: log_format.unwrap_or(LogFormat::Auto),
            access_log,
        },
        metrics_merge_upstream,
        serve,
    })
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
            self.upstream.base = format!("http://127.0.0.1:{}", serve.vllm_port);
        }
        Ok(())
    }
}

/// Where the configuration came from, kept so that a reload reads it again the same way: the
/// command line as parsed at start (flags, and the `GATEWAY_*` variables clap read), the file it
/// names, and the mode.
#[derive(Clone)]
pub struct Source {
    pub proxy_args: ProxyArgs,
    pub serve_args: Option<ServeArgs>,
    pub mode: Mode,
}

impl Source {
    /// [`load`] with this source's command line and mode: the file is read again.
    pub fn load(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        load(&self.proxy_args, self.serve_args.as_ref(), self.mode, env)
    }
}

/// Whether a reload (SIGHUP) may change a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied at once: whatever uses the key reads it from the live configuration
    /// (`proxy::Live`) each time, or is told (the log filter).
    Live,
    /// Read once, by vLLM's command line, the supervisor, the listener or a connection pool: a
    /// changed value is logged as needing a restart and the running one stays.
    Restart,
}

/// One configuration key as a reload sees it.
pub struct Key {
    /// The key's name in the file (and, with dashes, its flag).
    pub name: &'static str,
    pub reload: Reload,
    /// Whether two configurations hold the same value for this key.
    same: fn(&Config, &Config) -> bool,
    /// Copies this key's value from the second configuration into the first.
    keep: fn(&mut Config, &Config),
}

/// A key that is a field of [`Config`] (or of its `serve` part).
macro_rules! key {
    ($name:literal, $reload:ident, serve.$($field:ident).+) => {
        Key {
            name: $name,
            reload: Reload::$reload,
            same: |a, b| {
                a.serve.as_ref().map(|serve| &serve.$($field).+)
                    == b.serve.as_ref().map(|serve| &serve.$($field).+)
            },
            keep: |to, from| {
                if let (Some(to), Some(from)) = (&mut to.serve, &from.serve) {
                    to.$($field).+ = Clone::clone(&from.$($field).+);
                }
            },
        }
    };
    ($name:literal, $reload:ident, $($field:ident).+) => {
        Key {
            name: $name,
            reload: Reload::$reload,
            same: |a, b| a.$($field).+ == b.$($field).+,
            keep: |to, from| to.$($field).+ = Clone::clone(&from.$($field).+),
        }
    };
}

/// Every key of the configuration, and whether a reload may change it: the one place that says
/// so. A key marked `Live` must be read from the live configuration by whatever uses it.
pub const KEYS: &[Key] = &[
    // Read per request or per log event: a reload applies them.
    key!("api_keys", Live, proxy.api_keys),
    key!("cors_allowed_origins", Live, proxy.cors),
    key!("request_timeout", Live, proxy.request_timeout),
    key!("first_byte_timeout", Live, proxy.first_byte_timeout),
    key!("stream_idle_timeout", Live, proxy.stream_idle_timeout),
    key!("max_body_bytes", Live, proxy.max_body_bytes),
    key!("ready_wait_timeout", Live, serve.ready_wait_timeout),
    key!("log_level", Live, log.level),
    key!("access_log", Live, log.access_log),
    key!("metrics_merge_upstream", Live, metrics_merge_upstream),
    // Read as each client connection is accepted.
    key!("client_header_timeout", Live, proxy.client_header_timeout),
    key!("client_idle_timeout", Live, proxy.client_idle_timeout),
    key!("client_send_timeout", Live, proxy.client_send_timeout),
    // Read when a drain begins.
    key!("drain_timeout", Live, drain_timeout),
    // The listening socket, the upstream pools and the health poller are set up once.
    Key {
        name: "host",
        reload: Reload::Restart,
        same: |a, b| a.listen.ip() == b.listen.ip(),
        keep: |to, from| to.listen.set_ip(from.listen.ip()),
    },
    Key {
        name: "port",
        reload: Reload::Restart,
        same: |a, b| a.listen.port() == b.listen.port(),
        keep: |to, from| to.listen.set_port(from.listen.port()),
    },
    Key {
        name: "llm_api_base",
        reload: Reload::Restart,
        // Under `serve` the base is vLLM's port, which `vllm_port` reports.
        same: |a, b| a.serve.is_some() || a.upstream.base == b.upstream.base,
        keep: |to, from| to.upstream.base.clone_from(&from.upstream.base),
    },
    key!("upstream_api_key", Restart, upstream.api_key),
    key!("connect_timeout", Restart, proxy.connect_timeout),
    key!("pool_idle_timeout", Restart, proxy.pool_idle_timeout),
    // Sizes the workers' shared connection semaphore and their pools.
    key!("max_connections", Restart, proxy.max_connections),
    key!("health_interval", Restart, health.interval),
    key!("health_timeout", Restart, health.timeout),
    key!("log_format", Restart, log.format),
    // vLLM's command line and environment, and the supervisor that owns it.
    key!("model", Restart, serve.model),
    key!("vllm_bin", Restart, serve.vllm_bin),
    Key {
        name: "vllm_port",
        reload: Reload::Restart,
        same: |a, b| {
            a.serve.as_ref().map(|serve| serve.vllm_port)
                == b.serve.as_ref().map(|serve| serve.vllm_port)
        },
        keep: |to, from| {
            if let (Some(to_serve), Some(from_serve)) = (&mut to.serve, &from.serve) {
                to_serve.vllm_port = from_serve.vllm_port;
                to.upstream.base.clone_from(&from.upstream.base);
            }
        },
    },
    key!("vllm_args", Restart, serve.vllm_args),
    key!("child_env", Restart, serve.child_env),
    key!("restart", Restart, serve.restart),
    key!("restart_delay", Restart, serve.backoff.delay),
    key!("restart_max_delay", Restart, serve.backoff.max_delay),
    key!("restart_reset_after", Restart, serve.backoff.reset_after),
    key!("max_restarts", Restart, serve.backoff.max_restarts),
    key!(
        "restart_prevent_exit_codes",
        Restart,
        serve.restart_prevent_exit_codes
    ),
    key!(
        "startup_poll_interval",
        Restart,
        serve.startup_poll_interval
    ),
    key!("startup_timeout", Restart, serve.startup_timeout),
    key!("health_failures", Restart, serve.health_failures),
    key!("stop_timeout", Restart, serve.stop_timeout),
];

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

/// Accepts `http(s)://host[:port][/prefix][/v1][/]` and returns it without the `/v1` and slash.
fn normalise_base_url(url: &str) -> Result<String, String> {
    let expected = "expected an http:// URL such as http://127.0.0.1:8000";
    // Credentials in the URL would be logged with it (and are not how vLLM takes a key).
    if url.split_once("://").is_some_and(|(_, rest)| {
        rest.split('/')
            .next()
            .is_some_and(|authority| authority.contains('@'))
    }) {
        return Err(format!(
            "{expected}, without credentials (use upstream_api_key for vLLM's key)"
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{expected}, got {url:?}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // The gateway sits beside vLLM (same host or pod); it carries no TLS client.
        Some("https") => {
            return Err(format!(
                "https upstreams are not supported (the gateway runs beside vLLM and speaks plain HTTP to it), got {url:?}"
            ));
        }
        _ => return Err(format!("{expected}, got {url:?}")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{expected}, got {url:?}"));
    };
    if uri.query().is_some() {
        return Err(format!("{expected}, without a query (`?...`), got {url:?}"));
    }
    // The URI parser drops a fragment silently; the upstream client would keep it in every request.
    if url.contains('#') {
        return Err(format!(
            "{expected}, without a fragment (`#...`), got {url:?}"
        ));
    }
    // Checked here, naming the key, rather than failing at start-up with a bare "invalid port".
    // (`Authority::port` cannot tell a bad port from none, so the text after the last `:` is read,
    // unless that colon is inside an IPv6 address.)
    let port = authority
        .as_str()
        .rsplit_once(':')
        .map(|(_, port)| port)
        .filter(|port| !port.is_empty() && !port.contains(']'));
    if let Some(port) = port {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(format!(
                "the port must be a number from 1 to 65535, got {port:?} in {url:?}"
            ));
        }
    }
    let mut base = url.trim_end_matches('/');
    if let Some(stripped) = base.strip_suffix("/v1") {
        base = stripped;
    }
    let base = base.trim_end_matches('/').to_string();
    // The upstream client parses the base once more at start: whatever it would refuse is refused
    // now, with the key's name.
    if let Err(error) = reqwest::Url::parse(&base) {
        return Err(format!("{expected}, got {url:?} ({error})"));
    }
    Ok(base)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn parse_log_format(text: &str) -> Option<LogFormat> {
    clap::ValueEnum::from_str(text, false).ok()
}

fn parse_restart(text: &str) -> Option<RestartPolicy> {
    clap::ValueEnum::from_str(text, false).ok()
}

/// The raw layer: the config file's table, read one typed key at a time.
struct FileValues {
    path: Option<PathBuf>,
    table: toml::Table,
    /// Keys asked for so far; whatever else the table holds is unknown.
    known: BTreeSet<&'static str>,
    errors: Vec<ConfigError>,
}

impl FileValues {
    fn empty() -> Self {
        FileValues {
            path: None,
            table: toml::Table::new(),
            known: BTreeSet::new(),
            errors: Vec::new(),
        }
    }

    fn read(path: &Path) -> Result<Self, ConfigError> {
        let whole_file = |message: String| ConfigError {
            file: Some(path.to_path_buf()),
            key: "(file)".into(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|err| whole_file(format!("cannot read the file: {err}")))?;
        let table: toml::Table = text.parse().map_err(|err: toml::de::Error| {
            whole_file(format!("not valid TOML: {}", err.message()))
        })?;
        Ok(FileValues {
            path: Some(path.to_path_buf()),
            table,
            known: BTreeSet::new(),
            errors: Vec::new(),
        })
    }

    fn take(&mut self, key: &'static str) -> Option<toml::Value> {
        self.known.insert(key);
        self.table.get(key).cloned()
    }

    fn mistake(&mut self, key: &str, expected: &str, found: &toml::Value) {
        // Keys that may hold secrets (API keys, tokens in vLLM's arguments or environment) are
        // described by their type only.
        const SECRET_KEYS: [&str; 4] = ["api_keys", "upstream_api_key", "vllm_args", "child_env"];
        let found = match found {
            other if SECRET_KEYS.contains(&key) => format!("a {}", other.type_str()),
            toml::Value::String(text) => format!("{text:?}"),
            other => other.to_string(),
        };
        self.errors.push(ConfigError {
            file: self.path.clone(),
            key: key.into(),
            message: format!("expected {expected}, found {found}"),
        });
    }

    fn string(&mut self, key: &'static str) -> Option<String> {
        match self.take(key)? {
            toml::Value::String(text) => Some(text),
            other => {
                self.mistake(key, "a string", &other);
                None
            }
        }
    }

    fn boolean(&mut self, key: &'static str) -> Option<bool> {
        match self.take(key)? {
            toml::Value::Boolean(value) => Some(value),
            other => {
                self.mistake(key, "true or false", &other);
                None
            }
        }
    }

    fn integer<T: FileInteger>(&mut self, key: &'static str) -> Option<T> {
        let value = self.take(key)?;
        let expected = format!("an integer from 0 to {}", T::MAX);
        match value {
            toml::Value::Integer(number) => match T::try_from(number) {
                Ok(converted) if number >= 0 => Some(converted),
                _ => {
                    self.mistake(key, &expected, &value);
                    None
                }
            },
            other => {
                self.mistake(key, &expected, &other);
                None
            }
        }
    }

    fn duration(&mut self, key: &'static str) -> Option<Duration> {
        let value = self.take(key)?;
        let parsed = match &value {
            toml::Value::String(text) => crate::cli::parse_duration(text).ok(),
            _ => None,
        };
        if parsed.is_none() {
            self.mistake(
                key,
                "a duration string like \"500ms\", \"30s\" or \"10m\"",
                &value,
            );
        }
        parsed
    }

    fn parsed<T>(
        &mut self,
        key: &'static str,
        expected: &str,
        parse: fn(&str) -> Option<T>,
    ) -> Option<T> {
        let value = self.take(key)?;
        let parsed = value.as_str().and_then(parse);
        if parsed.is_none() {
            self.mistake(key, expected, &value);
        }
        parsed
    }

    fn string_list(&mut self, key: &'static str) -> Option<Vec<String>> {
        let value = self.take(key)?;
        let list = value.as_array().and_then(|items| {
            items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        });
        if list.is_none() {
            self.mistake(key, "an array of strings", &value);
        }
        list
    }

    fn integer_list(&mut self, key: &'static str) -> Option<Vec<i32>> {
        let value = self.take(key)?;
        let list = value.as_array().and_then(|items| {
            items
                .iter()
                .map(|item| {
                    item.as_integer()
                        .and_then(|number| i32::try_from(number).ok())
                })
                .collect::<Option<Vec<_>>>()
        });
        if list.is_none() {
            self.mistake(key, "an array of integers", &value);
        }
        list
    }

    /// Reports every key nobody asked for.
    fn finish(&mut self) -> Vec<ConfigError> {
        let mut errors = std::mem::take(&mut self.errors);
        for key in self.table.keys() {
            if !self.known.contains(key.as_str()) {
                errors.push(ConfigError {
                    file: self.path.clone(),
                    key: key.clone(),
                    message: "unknown key (see config.example.toml for the keys there are)".into(),
                });
            }
        }
        errors
    }
}

/// The unsigned integer types a file key can hold, with their bound for messages.
trait FileInteger: TryFrom<i64> {
    const MAX: u64;
}

impl FileInteger for u16 {
    const MAX: u64 = u16::MAX as u64;
}

impl FileInteger for u32 {
    const MAX: u64 = u32::MAX as u64;
}

impl FileInteger for u64 {
    const MAX: u64 = i64::MAX as u64;
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_file(text: &str, mode: Mode) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).expect("write");
        let args = ProxyArgs {
            config: Some(path),
            ..ProxyArgs::default()
        };
        load(&args, None, mode, &no_env)
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

    /// The example with every key uncommented.
    fn example_uncommented() -> String {
        include_str!("../config.example.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
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
        let text = include_str!("../config.example.toml");
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
        assert_eq!(err.0[0].key, "llm_api_base");
        assert!(err.0[0].file.is_some());
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
        let args = ProxyArgs {
            config: Some(path),
            port: Some(2222),
            ..ProxyArgs::default()
        };
        let env: HashMap<&str, &str> = HashMap::from([("VLLM_API_KEY", "env-key")]);
        let config = load(&args, None, Mode::Standalone, &|name| {
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
        let config = load(&args, None, Mode::Standalone, &|name| {
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
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["port"]);
        assert!(err.0[0].file.is_some(), "{err}");
        let err = load_file("vllm_port = 9000\n", Mode::Serve).expect_err("invalid");
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["model", "vllm_port"]);
    }

    #[test]
    fn config_check_refuses_what_serve_refuses_and_accepts_what_a_command_line_completes() {
        // `port = 8000` alone is a file for `serve`, where vLLM's default port is 8000.
        let err = load_file("port = 8000\n", Mode::Check).expect_err("serve refuses it");
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
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
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
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
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["llm_api_base", "model"]);
    }
}
