//! The command line: every flag, its environment variable and its help text.
//!
//! Flags are parsed into `Option`s and nothing here has a default: defaults live in `config`,
//! so that the precedence flags > environment > file > defaults is decided in one place.
//! Flag `--foo-bar` reads `GATEWAY_FOO_BAR` when absent (clap's `env`); the upstream key is read
//! from the environment by `config`, never by clap, so that `--help` cannot print it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A supervisor and reverse proxy for vLLM's OpenAI-compatible API.
///
/// Without a subcommand, `gateway` proxies to a vLLM that is already running
/// (`gateway --llm-api-base http://127.0.0.1:8000`). `gateway serve <model>` starts vLLM itself.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start `vllm serve <MODEL>` as a supervised child and proxy to it once it is ready.
    Serve(Box<ServeArgs>),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Exit 0 when a gateway's /readyz answers 200, 1 otherwise (for Docker HEALTHCHECK).
    Healthcheck(HealthcheckArgs),
    /// Internal: stops vLLM's process group if the gateway dies (see `supervisor::guard`).
    #[command(name = "__guard", hide = true)]
    Guard { pgid: i32, grace_ms: u64 },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and report every mistake in it.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The readiness URL to probe.
    #[arg(long, default_value = "http://127.0.0.1:9000/readyz")]
    pub url: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Options shared by the standalone proxy and `serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ProxyArgs {
    /// TOML configuration file; flags and environment variables override its keys.
    #[arg(long, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Base URL of the running vLLM server (a trailing /v1 is accepted) [standalone only].
    #[arg(long, env = "GATEWAY_LLM_API_BASE", value_name = "URL")]
    pub llm_api_base: Option<String>,

    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "GATEWAY_HOST", value_name = "ADDR")]
    pub host: Option<String>,

    /// Port to listen on [default: 9000].
    #[arg(long, env = "GATEWAY_PORT")]
    pub port: Option<u16>,

    /// Key sent upstream as `Authorization: Bearer` when the client sent none
    /// [env: GATEWAY_UPSTREAM_API_KEY, OPENAI_API_KEY, VLLM_API_KEY].
    #[arg(long, value_name = "KEY")]
    pub upstream_api_key: Option<String>,

    /// Require clients to present this key (repeatable; the env var takes a comma-separated list).
    #[arg(
        long = "api-key",
        env = "GATEWAY_API_KEY",
        value_name = "KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Time allowed to open a connection to the upstream [default: 10s].
    #[arg(long, env = "GATEWAY_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Time allowed for a whole non-streaming response [default: 600s].
    #[arg(long, env = "GATEWAY_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,

    /// Time allowed until the upstream's response headers arrive [default: 600s].
    #[arg(long, env = "GATEWAY_FIRST_BYTE_TIMEOUT", value_parser = parse_duration)]
    pub first_byte_timeout: Option<Duration>,

    /// Longest allowed gap between two chunks of a stream [default: 300s].
    #[arg(long, env = "GATEWAY_STREAM_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub stream_idle_timeout: Option<Duration>,

    /// Idle pooled upstream connections are closed after this; keep it under the upstream's
    /// keep-alive timeout (uvicorn: 5s) [default: 4s].
    #[arg(long, env = "GATEWAY_POOL_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub pool_idle_timeout: Option<Duration>,

    /// Largest request body accepted, in bytes [default: 33554432].
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,

    /// Time for a client to send a request's headers whole, counted from the connection's start or
    /// the request's first byte [default: 30s].
    #[arg(long, env = "GATEWAY_CLIENT_HEADER_TIMEOUT", value_parser = parse_duration)]
    pub client_header_timeout: Option<Duration>,

    /// How long a kept-alive client connection may wait for its next request [default: 75s].
    #[arg(long, env = "GATEWAY_CLIENT_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub client_idle_timeout: Option<Duration>,

    /// A client that takes no bytes of its response for this long is cut off, and its upstream
    /// request with it [default: 60s].
    #[arg(long, env = "GATEWAY_CLIENT_SEND_TIMEOUT", value_parser = parse_duration)]
    pub client_send_timeout: Option<Duration>,

    /// Most client connections open at once; past it new ones wait [default: derived from the
    /// open-files limit].
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,

    /// Origins allowed by CORS, comma-separated, or `*` [default: none, CORS off].
    #[arg(long, env = "GATEWAY_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,

    /// How long in-flight requests may take to finish at shutdown [default: 30s].
    #[arg(long, env = "GATEWAY_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Interval between two probes of the upstream's /health [default: 5s].
    #[arg(long, env = "GATEWAY_HEALTH_INTERVAL", value_parser = parse_duration)]
    pub health_interval: Option<Duration>,

    /// Time allowed for one /health probe [default: 5s].
    #[arg(long, env = "GATEWAY_HEALTH_TIMEOUT", value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,

    /// Log filter, e.g. `info` or `gateway=debug` [default: info; RUST_LOG also works].
    #[arg(long, env = "GATEWAY_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Log format [default: auto].
    #[arg(long, env = "GATEWAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// One log line per finished request [default: true].
    #[arg(long, env = "GATEWAY_ACCESS_LOG")]
    pub access_log: Option<bool>,

    /// Append the upstream's own /metrics to the gateway's [default: false].
    #[arg(long, env = "GATEWAY_METRICS_MERGE_UPSTREAM")]
    pub metrics_merge_upstream: Option<bool>,
}

/// Options of `gateway serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// The model vLLM serves (may also come from the config file's `model`).
    pub model: Option<String>,

    #[command(flatten)]
    pub proxy: ProxyArgs,

    /// The vLLM executable [default: vllm, looked up on PATH].
    #[arg(long, env = "GATEWAY_VLLM_BIN", value_name = "PATH")]
    pub vllm_bin: Option<String>,

    /// Port vLLM listens on, on 127.0.0.1; 0 picks a free one [default: 8000].
    #[arg(long, env = "GATEWAY_VLLM_PORT")]
    pub vllm_port: Option<u16>,

    /// Extra environment for the child, K=V (repeatable).
    #[arg(
        long = "child-env",
        env = "GATEWAY_CHILD_ENV",
        value_name = "K=V",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub child_env: Vec<String>,

    /// When to restart vLLM after it exits [default: on-failure].
    #[arg(long, env = "GATEWAY_RESTART")]
    pub restart: Option<RestartPolicy>,

    /// Delay before the first restart; it doubles on each failed start [default: 1s].
    #[arg(long, env = "GATEWAY_RESTART_DELAY", value_parser = parse_duration)]
    pub restart_delay: Option<Duration>,

    /// Upper bound of the restart delay [default: 60s].
    #[arg(long, env = "GATEWAY_RESTART_MAX_DELAY", value_parser = parse_duration)]
    pub restart_max_delay: Option<Duration>,

    /// A child ready this long resets the restart delay and count [default: 300s].
    #[arg(long, env = "GATEWAY_RESTART_RESET_AFTER", value_parser = parse_duration)]
    pub restart_reset_after: Option<Duration>,

    /// Consecutive starts that never became ready before giving up [default: 5].
    #[arg(long, env = "GATEWAY_MAX_RESTARTS")]
    pub max_restarts: Option<u32>,

    /// Child exit codes that are never restarted, comma-separated [default: none].
    #[arg(
        long,
        env = "GATEWAY_RESTART_PREVENT_EXIT_CODES",
        value_delimiter = ','
    )]
    pub restart_prevent_exit_codes: Vec<i32>,

    /// Interval between /health probes while vLLM starts [default: 500ms].
    #[arg(long, env = "GATEWAY_STARTUP_POLL_INTERVAL", value_parser = parse_duration)]
    pub startup_poll_interval: Option<Duration>,

    /// A start not ready after this has failed [default: 1800s].
    #[arg(long, env = "GATEWAY_STARTUP_TIMEOUT", value_parser = parse_duration)]
    pub startup_timeout: Option<Duration>,

    /// Consecutive failed /health probes after which a ready vLLM is declared hung [default: 3].
    #[arg(long, env = "GATEWAY_HEALTH_FAILURES")]
    pub health_failures: Option<u32>,

    /// How long a request waits for vLLM to become ready again; 0 disables [default: 30s].
    #[arg(long, env = "GATEWAY_READY_WAIT_TIMEOUT", value_parser = parse_duration)]
    pub ready_wait_timeout: Option<Duration>,

    /// Time between SIGTERM and SIGKILL when stopping vLLM [default: 30s].
    #[arg(long, env = "GATEWAY_STOP_TIMEOUT", value_parser = parse_duration)]
    pub stop_timeout: Option<Duration>,

    /// Extra arguments passed to `vllm serve` after `--`.
    #[arg(last = true, value_name = "VLLM_ARGS")]
    pub vllm_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
    Journald,
}

/// Parses `500ms`, `30s`, `10m`, `1h 30m` (and a bare `0`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|err| format!("expected a duration like \"500ms\", \"30s\" or \"10m\" ({err})"))
}
