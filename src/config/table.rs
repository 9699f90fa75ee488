//! The one table of configuration keys: per key its name, type, default, help text, flag,
//! environment variables, whether it belongs to `serve`, and whether a reload may change it.
//!
//! Everything else follows from it: the flags and `--help` (`cli`), merging and the per-value
//! checks (`load`), which keys a reload applies (`reconcile`), and the tests that
//! config.example.toml documents every key at its default. Adding a key is an entry here, the
//! field of [`Config`] that holds it (named in the entry, filled by `validate`), and its line in
//! the docs.

use super::Config;
use super::load::{FromValue, Value};

/// One configuration key.
#[derive(Clone, Copy)]
pub struct Key {
    /// The key's name in the file.
    pub name: &'static str,
    /// What values it takes; decides parsing and the checks on a single value.
    pub kind: Kind,
    /// The default, written as a flag would take it; `None`: unset unless given.
    pub default: Option<&'static str>,
    /// What `--help` says the default is, when that is not a plain value.
    pub default_doc: Option<&'static str>,
    /// The `--help` line.
    pub doc: &'static str,
    pub flag: Flag,
    /// The environment variables that set it, first set and non-empty wins.
    pub env: &'static [&'static str],
    /// Whether only `gateway serve` takes it as a flag or variable (the file may hold it always).
    pub scope: Scope,
    pub reload: Reload,
    /// Whether its value may be a credential: messages then describe it by its type only.
    pub secret: bool,
    /// Whether two configurations hold the same value for this key.
    pub(super) same: fn(&Config, &Config) -> bool,
    /// Copies this key's value from the second configuration into the first.
    pub(super) keep: fn(&mut Config, &Config),
    /// Fills the key's field from its value (`false`: the value is not of the field's type).
    /// `None` for keys `validate` combines by hand (the listening address, the upstream URL).
    pub(super) set: Option<fn(&mut Config, &Value) -> bool>,
}

/// The values a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Any string. `empty_is_unset`: an empty value at one source does not hide the next.
    Text {
        empty_is_unset: bool,
    },
    /// A duration such as `30s`, at most a year; `zero`: whether 0 means something.
    Duration {
        zero: bool,
    },
    /// An integer from `min` to `max`.
    Integer {
        min: u64,
        max: u64,
    },
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A list of strings (a repeatable flag, a comma-separated variable, a TOML array).
    Texts,
    /// A list of 32-bit integers.
    Integers,
}

/// How the command line gives a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `--name VALUE`, with its value name for `--help`.
    Long(&'static str, &'static str),
    /// A positional argument (`gateway serve <MODEL>`).
    Positional(&'static str),
    /// Everything after `--`.
    Trailing(&'static str),
}

/// Which commands take a key as a flag or a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The standalone proxy and `serve`.
    All,
    /// `gateway serve` only.
    Serve,
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

impl Key {
    /// The fields every entry overrides; the rest are the common case.
    const BASE: Key = Key {
        name: "",
        kind: Kind::Text {
            empty_is_unset: false,
        },
        default: None,
        default_doc: None,
        doc: "",
        flag: Flag::Positional(""),
        env: &[],
        scope: Scope::All,
        reload: Reload::Restart,
        secret: false,
        same: |_, _| true,
        keep: |_, _| {},
        set: None,
    };

    /// The flag's name as the command line shows it, e.g. `--port`, `<MODEL>`.
    pub fn flag_name(&self) -> String {
        match self.flag {
            Flag::Long(long, _) => format!("--{long}"),
            Flag::Positional(name) => format!("<{name}>"),
            Flag::Trailing(name) => format!("-- <{name}>..."),
        }
    }
}

impl Kind {
    const TEXT: Kind = Kind::Text {
        empty_is_unset: false,
    };
    const DURATION: Kind = Kind::Duration { zero: false };
    const DURATION_OR_ZERO: Kind = Kind::Duration { zero: true };
    const PORT: Kind = Kind::Integer {
        min: 0,
        max: u16::MAX as u64,
    };
    const COUNT: Kind = Kind::Integer {
        min: 0,
        max: u32::MAX as u64,
    };
    const POSITIVE_COUNT: Kind = Kind::Integer {
        min: 1,
        max: u32::MAX as u64,
    };
}

/// `same`, `keep` and `set` for a key that is one field of [`Config`] (or of its `serve` part,
/// which also makes it a `serve` flag).
macro_rules! field {
    (serve.$($field:ident).+) => {
        Key {
            scope: Scope::Serve,
            set: Some(|config, value| match (&mut config.serve, FromValue::from_value(value)) {
                (Some(serve), Some(value)) => {
                    serve.$($field).+ = value;
                    true
                }
                (None, _) => true,
                (Some(_), None) => false,
            }),
            same: |a, b| {
                a.serve.as_ref().map(|serve| &serve.$($field).+)
                    == b.serve.as_ref().map(|serve| &serve.$($field).+)
            },
            keep: |to, from| {
                if let (Some(to), Some(from)) = (&mut to.serve, &from.serve) {
                    to.$($field).+ = Clone::clone(&from.$($field).+);
                }
            },
            ..Key::BASE
        }
    };
    ($($field:ident).+) => {
        Key {
            set: Some(|config, value| match FromValue::from_value(value) {
                Some(value) => {
                    config.$($field).+ = value;
                    true
                }
                None => false,
            }),
            same: |a, b| a.$($field).+ == b.$($field).+,
            keep: |to, from| to.$($field).+ = Clone::clone(&from.$($field).+),
            ..Key::BASE
        }
    };
}

/// Every key of the configuration, in the order of config.example.toml. A key marked `Live`
/// must be read from the live configuration by whatever uses it.
pub const KEYS: &[Key] = &[
    // ------------------------------------------------------------ listener and upstream
    // The listening socket is bound once.
    Key {
        name: "host",
        kind: Kind::TEXT,
        default: Some("0.0.0.0"),
        doc: "Address to listen on",
        flag: Flag::Long("host", "ADDR"),
        env: &["GATEWAY_HOST"],
        same: |a, b| a.listen.ip() == b.listen.ip(),
        keep: |to, from| to.listen.set_ip(from.listen.ip()),
        ..Key::BASE
    },
    Key {
        name: "port",
        kind: Kind::PORT,
        default: Some("9000"),
        doc: "Port to listen on",
        flag: Flag::Long("port", "PORT"),
        env: &["GATEWAY_PORT"],
        same: |a, b| a.listen.port() == b.listen.port(),
        keep: |to, from| to.listen.set_port(from.listen.port()),
        ..Key::BASE
    },
    Key {
        name: "health_port",
        kind: Kind::PORT,
        doc: "Port of a second listener for probes and scrapers: /livez, /readyz, /health and /metrics only, answered even when max_connections are taken",
        flag: Flag::Long("health-port", "PORT"),
        env: &["GATEWAY_HEALTH_PORT"],
        ..field!(health_port)
    },
    Key {
        name: "llm_api_base",
        kind: Kind::TEXT,
        doc: "Base URL of the running vLLM server (a trailing /v1 is accepted) [standalone only]",
        flag: Flag::Long("llm-api-base", "URL"),
        env: &["GATEWAY_LLM_API_BASE"],
        // Under `serve` the base is vLLM's port, which `vllm_port` reports.
        same: |a, b| a.serve.is_some() || a.upstream.base == b.upstream.base,
        keep: |to, from| to.upstream.base.clone_from(&from.upstream.base),
        ..Key::BASE
    },
    // The upstream pools are built once.
    Key {
        name: "upstream_api_key",
        kind: Kind::Text {
            empty_is_unset: true,
        },
        doc: "Key sent upstream as `Authorization: Bearer` when the client sent none",
        flag: Flag::Long("upstream-api-key", "KEY"),
        env: &["GATEWAY_UPSTREAM_API_KEY", "OPENAI_API_KEY", "VLLM_API_KEY"],
        secret: true,
        ..field!(upstream.api_key)
    },
    // Read per request: a reload applies them.
    Key {
        name: "api_keys",
        kind: Kind::Texts,
        default_doc: Some("none, no check"),
        doc: "Require clients to present this key (repeatable; the variable takes a comma-separated list)",
        flag: Flag::Long("api-key", "KEY"),
        env: &["GATEWAY_API_KEY"],
        reload: Reload::Live,
        secret: true,
        ..field!(proxy.api_keys)
    },
    Key {
        name: "cors_allowed_origins",
        kind: Kind::Texts,
        default_doc: Some("none, CORS off"),
        doc: "Origins allowed by CORS, comma-separated, or `*`",
        flag: Flag::Long("cors-allowed-origins", "ORIGINS"),
        env: &["GATEWAY_CORS_ALLOWED_ORIGINS"],
        reload: Reload::Live,
        ..field!(proxy.cors)
    },
    // ------------------------------------------------------------ proxy limits and timeouts
    Key {
        name: "max_body_bytes",
        kind: Kind::Integer {
            min: 1,
            max: i64::MAX as u64,
        },
        default: Some("33554432"),
        doc: "Largest request body accepted, in bytes",
        flag: Flag::Long("max-body-bytes", "BYTES"),
        env: &["GATEWAY_MAX_BODY_BYTES"],
        reload: Reload::Live,
        ..field!(proxy.max_body_bytes)
    },
    Key {
        name: "connect_timeout",
        kind: Kind::DURATION,
        default: Some("10s"),
        doc: "Time allowed to open a connection to the upstream",
        flag: Flag::Long("connect-timeout", "DURATION"),
        env: &["GATEWAY_CONNECT_TIMEOUT"],
        ..field!(proxy.connect_timeout)
    },
    Key {
        name: "request_timeout",
        kind: Kind::DURATION,
        default: Some("600s"),
        doc: "Time allowed for a whole non-streaming response",
        flag: Flag::Long("request-timeout", "DURATION"),
        env: &["GATEWAY_REQUEST_TIMEOUT"],
        reload: Reload::Live,
        ..field!(proxy.request_timeout)
    },
    Key {
        name: "first_byte_timeout",
        kind: Kind::DURATION,
        default: Some("600s"),
        doc: "Time allowed until the upstream's response headers arrive",
        flag: Flag::Long("first-byte-timeout", "DURATION"),
        env: &["GATEWAY_FIRST_BYTE_TIMEOUT"],
        reload: Reload::Live,
        ..field!(proxy.first_byte_timeout)
    },
    Key {
        name: "stream_idle_timeout",
        kind: Kind::DURATION,
        default: Some("300s"),
        doc: "Longest allowed gap between two chunks of a stream",
        flag: Flag::Long("stream-idle-timeout", "DURATION"),
        env: &["GATEWAY_STREAM_IDLE_TIMEOUT"],
        reload: Reload::Live,
        ..field!(proxy.stream_idle_timeout)
    },
    Key {
        name: "pool_idle_timeout",
        kind: Kind::DURATION,
        default: Some("4s"),
        doc: "Idle pooled upstream connections are closed after this; keep it under the upstream's keep-alive timeout (uvicorn: 5s)",
        flag: Flag::Long("pool-idle-timeout", "DURATION"),
        env: &["GATEWAY_POOL_IDLE_TIMEOUT"],
        ..field!(proxy.pool_idle_timeout)
    },
    // Read when a drain begins.
    Key {
        name: "drain_timeout",
        kind: Kind::DURATION_OR_ZERO,
        default: Some("30s"),
        doc: "How long in-flight requests may take to finish at shutdown",
        flag: Flag::Long("drain-timeout", "DURATION"),
        env: &["GATEWAY_DRAIN_TIMEOUT"],
        reload: Reload::Live,
        ..field!(drain_timeout)
    },
    // ------------------------------------------------------------ clients
    // Read as each client connection is accepted.
    Key {
        name: "client_header_timeout",
        kind: Kind::DURATION,
        default: Some("30s"),
        doc: "Time for a client to send a request's headers whole, counted from the connection's start or the request's first byte",
        flag: Flag::Long("client-header-timeout", "DURATION"),
        env: &["GATEWAY_CLIENT_HEADER_TIMEOUT"],
        reload: Reload::Live,
        ..field!(proxy.client_header_timeout)
    },
    Key {
        name: "client_idle_timeout",
        kind: Kind::DURATION,
        default: Some("75s"),
        doc: "How long a kept-alive client connection may wait for its next request",
        flag: Flag::Long("client-idle-timeout", "DURATION"),
        env: &["GATEWAY_CLIENT_IDLE_TIMEOUT"],
        reload: Reload::Live,
        ..field!(proxy.client_idle_timeout)
    },
    Key {
        name: "client_send_timeout",
        kind: Kind::DURATION,
        default: Some("60s"),
        doc: "A client that takes no bytes of its response for this long is cut off, and its upstream request with it",
        flag: Flag::Long("client-send-timeout", "DURATION"),
        env: &["GATEWAY_CLIENT_SEND_TIMEOUT"],
        reload: Reload::Live,
        ..field!(proxy.client_send_timeout)
    },
    // Sizes the workers' shared connection semaphore and their pools.
    Key {
        name: "max_connections",
        kind: Kind::POSITIVE_COUNT,
        default_doc: Some("derived from the open-files limit"),
        doc: "Most client connections open at once; past it new ones wait",
        flag: Flag::Long("max-connections", "N"),
        env: &["GATEWAY_MAX_CONNECTIONS"],
        ..field!(proxy.max_connections)
    },
    // ------------------------------------------------------------ admission
    // Read per request: the next request resizes the shared semaphore to a reloaded limit.
    Key {
        name: "max_concurrent_requests",
        kind: Kind::COUNT,
        default: Some("0"),
        doc: "Most proxied requests served at once; past it they wait in a queue (0: no limit)",
        flag: Flag::Long("max-concurrent-requests", "N"),
        env: &["GATEWAY_MAX_CONCURRENT_REQUESTS"],
        reload: Reload::Live,
        ..field!(proxy.max_concurrent_requests)
    },
    Key {
        name: "max_queued_requests",
        kind: Kind::COUNT,
        default: Some("256"),
        doc: "Most requests waiting for a turn past max_concurrent_requests; past it they get 429",
        flag: Flag::Long("max-queued-requests", "N"),
        env: &["GATEWAY_MAX_QUEUED_REQUESTS"],
        reload: Reload::Live,
        ..field!(proxy.max_queued_requests)
    },
    Key {
        name: "queue_timeout",
        kind: Kind::DURATION,
        default: Some("30s"),
        doc: "How long a request may wait in the queue before it gets 429",
        flag: Flag::Long("queue-timeout", "DURATION"),
        env: &["GATEWAY_QUEUE_TIMEOUT"],
        reload: Reload::Live,
        ..field!(proxy.queue_timeout)
    },
    // ------------------------------------------------------------ health
    // The health poller is started once.
    Key {
        name: "health_interval",
        kind: Kind::DURATION,
        default: Some("5s"),
        doc: "Interval between two probes of the upstream's /health",
        flag: Flag::Long("health-interval", "DURATION"),
        env: &["GATEWAY_HEALTH_INTERVAL"],
        ..field!(health.interval)
    },
    Key {
        name: "health_timeout",
        kind: Kind::DURATION,
        default: Some("5s"),
        doc: "Time allowed for one /health probe",
        flag: Flag::Long("health-timeout", "DURATION"),
        env: &["GATEWAY_HEALTH_TIMEOUT"],
        ..field!(health.timeout)
    },
    // ------------------------------------------------------------ logs and metrics
    // Read per log event or per scrape: a reload applies them (except the format).
    Key {
        name: "log_level",
        kind: Kind::TEXT,
        default: Some("info"),
        default_doc: Some("info; RUST_LOG also works"),
        doc: "Log filter, e.g. `info` or `gateway=debug`",
        flag: Flag::Long("log-level", "FILTER"),
        env: &["GATEWAY_LOG_LEVEL"],
        reload: Reload::Live,
        ..field!(log.level)
    },
    Key {
        name: "log_format",
        kind: Kind::Choice(super::LogFormat::NAMES),
        default: Some("auto"),
        doc: "Log format: auto (journald under systemd, text on a terminal, else JSON), text, json or journald",
        flag: Flag::Long("log-format", "FORMAT"),
        env: &["GATEWAY_LOG_FORMAT"],
        ..field!(log.format)
    },
    Key {
        name: "access_log",
        kind: Kind::Bool,
        default: Some("true"),
        doc: "One log line per finished request",
        flag: Flag::Long("access-log", "BOOL"),
        env: &["GATEWAY_ACCESS_LOG"],
        reload: Reload::Live,
        ..field!(log.access_log)
    },
    Key {
        name: "metrics_merge_upstream",
        kind: Kind::Bool,
        default: Some("false"),
        doc: "Append the upstream's own /metrics to the gateway's",
        flag: Flag::Long("metrics-merge-upstream", "BOOL"),
        env: &["GATEWAY_METRICS_MERGE_UPSTREAM"],
        reload: Reload::Live,
        ..field!(metrics_merge_upstream)
    },
    // ------------------------------------------------------------ gateway serve
    // vLLM's command line and environment, and the supervisor that owns it: read once.
    Key {
        name: "model",
        kind: Kind::TEXT,
        doc: "The model vLLM serves (may also come from the config file's `model`)",
        flag: Flag::Positional("MODEL"),
        ..field!(serve.model)
    },
    Key {
        name: "vllm_args",
        kind: Kind::Texts,
        doc: "Extra arguments passed to `vllm serve` after `--`",
        flag: Flag::Trailing("VLLM_ARGS"),
        secret: true,
        ..field!(serve.vllm_args)
    },
    Key {
        name: "vllm_bin",
        kind: Kind::TEXT,
        default: Some("vllm"),
        default_doc: Some("vllm, looked up on PATH"),
        doc: "The vLLM executable",
        flag: Flag::Long("vllm-bin", "PATH"),
        env: &["GATEWAY_VLLM_BIN"],
        ..field!(serve.vllm_bin)
    },
    Key {
        name: "vllm_port",
        kind: Kind::PORT,
        default: Some("8000"),
        doc: "Port vLLM listens on, on 127.0.0.1; 0 picks a free one",
        flag: Flag::Long("vllm-port", "PORT"),
        env: &["GATEWAY_VLLM_PORT"],
        scope: Scope::Serve,
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
        set: field!(serve.vllm_port).set,
        ..Key::BASE
    },
    Key {
        name: "child_env",
        kind: Kind::Texts,
        doc: "Extra environment for the child, K=V (repeatable)",
        flag: Flag::Long("child-env", "K=V"),
        env: &["GATEWAY_CHILD_ENV"],
        secret: true,
        ..field!(serve.child_env)
    },
    Key {
        name: "restart",
        kind: Kind::Choice(super::RestartPolicy::NAMES),
        default: Some("on-failure"),
        doc: "When to restart vLLM after an exit the gateway did not ask for, exit 0 included: no, on-failure or always (alike: every such exit is a failure)",
        flag: Flag::Long("restart", "POLICY"),
        env: &["GATEWAY_RESTART"],
        ..field!(serve.restart)
    },
    Key {
        name: "restart_delay",
        kind: Kind::DURATION_OR_ZERO,
        default: Some("1s"),
        doc: "Delay before the first restart; it doubles on each failed start",
        flag: Flag::Long("restart-delay", "DURATION"),
        env: &["GATEWAY_RESTART_DELAY"],
        ..field!(serve.backoff.delay)
    },
    Key {
        name: "restart_max_delay",
        kind: Kind::DURATION,
        default: Some("60s"),
        doc: "Upper bound of the restart delay",
        flag: Flag::Long("restart-max-delay", "DURATION"),
        env: &["GATEWAY_RESTART_MAX_DELAY"],
        ..field!(serve.backoff.max_delay)
    },
    Key {
        name: "restart_reset_after",
        kind: Kind::DURATION_OR_ZERO,
        default: Some("300s"),
        doc: "A child ready this long resets the restart delay and count",
        flag: Flag::Long("restart-reset-after", "DURATION"),
        env: &["GATEWAY_RESTART_RESET_AFTER"],
        ..field!(serve.backoff.reset_after)
    },
    Key {
        name: "max_restarts",
        kind: Kind::COUNT,
        default: Some("5"),
        doc: "Consecutive starts that never became ready before giving up (0: never give up)",
        flag: Flag::Long("max-restarts", "N"),
        env: &["GATEWAY_MAX_RESTARTS"],
        ..field!(serve.backoff.max_restarts)
    },
    Key {
        name: "restart_prevent_exit_codes",
        kind: Kind::Integers,
        default_doc: Some("none"),
        doc: "Child exit codes that are never restarted, comma-separated",
        flag: Flag::Long("restart-prevent-exit-codes", "CODES"),
        env: &["GATEWAY_RESTART_PREVENT_EXIT_CODES"],
        ..field!(serve.restart_prevent_exit_codes)
    },
    Key {
        name: "startup_poll_interval",
        kind: Kind::DURATION,
        default: Some("500ms"),
        doc: "Interval between /health probes while vLLM starts",
        flag: Flag::Long("startup-poll-interval", "DURATION"),
        env: &["GATEWAY_STARTUP_POLL_INTERVAL"],
        ..field!(serve.startup_poll_interval)
    },
    Key {
        name: "startup_timeout",
        kind: Kind::DURATION,
        default: Some("1800s"),
        doc: "A start not ready after this has failed",
        flag: Flag::Long("startup-timeout", "DURATION"),
        env: &["GATEWAY_STARTUP_TIMEOUT"],
        ..field!(serve.startup_timeout)
    },
    Key {
        name: "health_failures",
        kind: Kind::POSITIVE_COUNT,
        default: Some("3"),
        doc: "Consecutive failed /health probes after which a ready vLLM is declared hung",
        flag: Flag::Long("health-failures", "N"),
        env: &["GATEWAY_HEALTH_FAILURES"],
        ..field!(serve.health_failures)
    },
    // Read per request: a reload applies it.
    Key {
        name: "ready_wait_timeout",
        kind: Kind::DURATION_OR_ZERO,
        default: Some("30s"),
        doc: "How long a request waits for vLLM to become ready again; 0 disables",
        flag: Flag::Long("ready-wait-timeout", "DURATION"),
        env: &["GATEWAY_READY_WAIT_TIMEOUT"],
        reload: Reload::Live,
        ..field!(serve.ready_wait_timeout)
    },
    Key {
        name: "stream_keepalive_after",
        kind: Kind::DURATION_OR_ZERO,
        default: Some("5s"),
        doc: "A streaming request still waiting for vLLM after this gets its stream at once, kept alive with comments (0: never)",
        flag: Flag::Long("stream-keepalive-after", "DURATION"),
        env: &["GATEWAY_STREAM_KEEPALIVE_AFTER"],
        reload: Reload::Live,
        ..field!(serve.stream_keepalive_after)
    },
    Key {
        name: "stream_keepalive_interval",
        kind: Kind::DURATION,
        default: Some("10s"),
        doc: "Interval between two keep-alive comments of a waiting stream",
        flag: Flag::Long("stream-keepalive-interval", "DURATION"),
        env: &["GATEWAY_STREAM_KEEPALIVE_INTERVAL"],
        reload: Reload::Live,
        ..field!(serve.stream_keepalive_interval)
    },
    Key {
        name: "stop_timeout",
        kind: Kind::DURATION_OR_ZERO,
        default: Some("30s"),
        doc: "Time between SIGTERM and SIGKILL when stopping vLLM",
        flag: Flag::Long("stop-timeout", "DURATION"),
        env: &["GATEWAY_STOP_TIMEOUT"],
        ..field!(serve.stop_timeout)
    },
];

/// The entry of a key by name.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.name == name)
}
