//! `mock-vllm`: a stand-in for vLLM's OpenAI-compatible API server.
//!
//! It answers on vLLM's command line and HTTP surface so that the gateway can be tried without a GPU
//! and so that the gateway's integration tests have an upstream whose failures they can script, both
//! when they run it on its own and when `gateway serve` supervises it as its child.
//!
//! # Command line
//!
//! `mock-vllm serve <model> [--host H] [--port P] [--api-key K] [other vLLM options]`
//!
//! - `--host` defaults to `0.0.0.0` and `--port` to `8000`, as in vLLM; port 0 picks a free port,
//!   which the "Uvicorn running on" line then reports.
//! - `--api-key` falls back to the `VLLM_API_KEY` environment variable, as in vLLM.
//! - `--model M` is accepted in place of the positional model and `--served-model-name N` renames
//!   the model that `/v1/models` lists, as in vLLM.
//! - Every other option is accepted and ignored, with its value when the next argument does not
//!   start with `--` (or in the `--flag=value` form), so a supervisor can pass real vLLM arguments.
//! - `--help` lists the options and every knob below; `--version` prints the version.
//!
//! A missing or unknown subcommand, a missing model and a bad knob all exit with code 2.
//!
//! # Endpoints
//!
//! - `GET /health`, `GET /version`, `GET /v1/models`: as vLLM answers them.
//! - `POST /v1/responses`: replays a stream (`"stream": true`) or a response recorded from vLLM
//!   serving gpt-oss-20b, byte for byte, whatever the request asks for; a `model` other than the
//!   served one gets vLLM's 404 "The model `x` does not exist.", as on every generation endpoint.
//! - `GET /metrics`: a few of vLLM's Prometheus metrics (`vllm:num_requests_running`,
//!   `vllm:num_requests_waiting`, `vllm:request_success_total`), with vLLM's names and labels,
//!   counting this process's `/v1` requests.
//! - `POST /v1/chat/completions`: a synthetic completion saying "Hello from mock-vllm.", streamed
//!   as chunks ending in `data: [DONE]` when asked to.
//! - Unknown paths answer 404 and wrong methods 405 with FastAPI's bodies. With an API key set, every
//!   `/v1` path needs `Authorization: Bearer <key>` and otherwise answers vLLM's 401.
//! - Every response echoes the request's `x-request-id` header.
//!
//! Test-control endpoints, which vLLM does not have, live under `/_mock/` and need no key:
//!
//! - `GET /_mock/last-request`: method, path, query, headers and body length of the latest `/v1`
//!   request (recorded before the key is checked), or `null` before the first one.
//! - `GET /_mock/stats`: pid, counts of `/v1` requests, completed responses and client disconnects,
//!   the names of the signals received and whether `/health` hangs.
//! - `POST /_mock/hang-health` and `POST /_mock/unhang-health`: make `/health` hang or answer again.
//! - `POST /_mock/exit?code=N`: answer 200, then exit with code N (default 0).
//!   `&linger=DURATION` stops listening at once but exits only after the duration, like vLLM's
//!   API server shutting down after its engine died (connections are refused meanwhile).
//!
//! # Knobs
//!
//! Knobs are environment variables so that they pass through a supervisor to its child; durations
//! use humantime (`500ms`, `2s`), booleans accept `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`,
//! an empty value means unset, and a bad value or an unknown `MOCK_VLLM_*` name exits with code 2.
//!
//! - `MOCK_VLLM_STARTUP_DELAY`: hold the port but refuse connections this long, like vLLM loading
//!   its weights, before listening.
//! - `MOCK_VLLM_STREAM_DELAY`: pause between stream events.
//! - `MOCK_VLLM_HEADERS_DELAY`: wait this long before answering `/v1/responses` and
//!   `/v1/chat/completions`, so response headers come late.
//! - `MOCK_VLLM_FAIL_STATUS`: answer those two endpoints with this status (400-599) and an
//!   OpenAI-style error body.
//! - `MOCK_VLLM_DIE_MID_STREAM=N`: once a stream has sent N events, exit with code 1.
//! - `MOCK_VLLM_STALL_MID_STREAM=N`: once a stream has sent N events, send nothing more, forever.
//! - `MOCK_VLLM_CRASH_AFTER`: this long after listening, exit with `MOCK_VLLM_EXIT_CODE`.
//! - `MOCK_VLLM_EXIT_CODE`: the code for `MOCK_VLLM_CRASH_AFTER` (default 1).
//! - `MOCK_VLLM_EXIT_AT_START=N`: exit with code N before binding, like vLLM rejecting an argument.
//! - `MOCK_VLLM_HANG_HEALTH_AFTER`: this long after listening, `/health` stops answering.
//! - `MOCK_VLLM_IGNORE_SIGTERM`: log and ignore SIGTERM and SIGINT, so only SIGQUIT or SIGKILL end
//!   the process.
//! - `MOCK_VLLM_SPAWN_GRANDCHILD`: start `sleep 100000` in our own process group, standing in for
//!   vLLM's EngineCore process, and leave it running.
//! - `MOCK_VLLM_DETACH_GRANDCHILD`: start that grandchild in a process group of its own instead,
//!   like a worker that called setsid, so that stopping our group leaves it alive.
//! - `MOCK_VLLM_PID_FILE`: append `<pid> <grandchild pid or 0>` to this file at start, so that a
//!   test sees one line per (re)start.
//! - `MOCK_VLLM_FLOOD`: write one 1 MiB line to stderr, then log lines to stdout as fast as the pipe
//!   takes them, from a thread of their own so that a pipe nobody reads blocks only that thread.
//! - `MOCK_VLLM_SHUTDOWN_GRACE`: how long a graceful shutdown waits for open responses before
//!   exiting anyway (default 3s), so a stalled stream cannot keep the process alive.
//!
//! # Signals
//!
//! SIGTERM, SIGINT and SIGQUIT shut down gracefully and exit 0, as uvicorn does; a second one exits
//! at once. SIGHUP, SIGUSR1 and SIGUSR2 are only logged. Every signal is recorded in the stats.
//!
//! # Invariants
//!
//! - The recorded fixtures are embedded at build time and sent unchanged; the stream is split into
//!   events once, at start, on blank-line boundaries, and each event goes out as one body chunk.
//! - Every `/v1` request ends as exactly one of `completed` (its body reached its end) or
//!   `disconnects` (its handler or body was dropped first), so
//!   `requests == completed + disconnects + in flight`.
//! - This process never signals or waits for its grandchild: stopping the whole process group is
//!   the supervisor's job, which is what the grandchild is there to test.
//! - Once it runs, only the log writer thread (and the flood thread) writes to stdout and stderr:
//!   the server queues whole lines, in uvicorn's format so that tests and supervisors can wait on
//!   them, and drops them when the queue is full because nobody reads, so that unread output never
//!   stalls a request. Every exit first gives the queue a bounded moment to drain.
//! - JSON bodies keep vLLM's field order, so the wire formats are structs, not JSON maps.

#![warn(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, DefaultBodyLimit, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_util::{Stream, StreamExt, stream};
use serde::Serialize;
use serde_json::{Map, Value, json};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_tokio::Signals;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

/// What `/version` and `--version` report; the suffix keeps it from passing for a real vLLM.
const VERSION: &str = "0.0.0+mock";

/// The context length `/v1/models` advertises, a common vLLM setting.
const MAX_MODEL_LEN: u64 = 8192;

/// The stream recorded from vLLM answering `/v1/responses` with `"stream": true`.
static RESPONSES_STREAM: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vllm-responses-stream-gpt-oss-20b.sse"
));

/// The response recorded from vLLM answering `/v1/responses` with a tool call.
static RESPONSES_JSON: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vllm-responses-toolcall-gpt-oss-20b.json"
));

/// The pieces the synthetic chat completion streams; joined they make its whole content.
const CHAT_PIECES: &[&str] = &["Hello", " from", " mock", "-vllm", "."];

/// Request bodies are read whole to record their length; this bounds the memory one request takes.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

/// How long an exit waits after its last response chunk so that the kernel has it before we go.
const FLUSH_GRACE: Duration = Duration::from_millis(100);

/// How long the runtime may take to stop once the server is done, in case a task is stuck.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(500);

/// How many log lines may wait for a slow reader before new ones are dropped.
const LOG_QUEUE_LINES: usize = 4096;

/// How long an exit waits for queued log lines to be written.
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// uvicorn's listen backlog, which vLLM keeps.
const LISTEN_BACKLOG: u32 = 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const SHORT_USAGE: &str = "usage: mock-vllm serve <model> [--host HOST] [--port PORT] \
                           [--api-key KEY] [vLLM options...]";

/// Every knob with an example value and its help line; `--help` prints it and a unit test checks
/// that the parser accepts every name in it.
const KNOBS: &[(&str, &str, &str)] = &[
    (
        "MOCK_VLLM_STARTUP_DELAY",
        "2s",
        "duration: hold the port but refuse connections this long before listening (default 0)",
    ),
    (
        "MOCK_VLLM_STREAM_DELAY",
        "50ms",
        "duration: pause between stream events (default 0)",
    ),
    (
        "MOCK_VLLM_HEADERS_DELAY",
        "1s",
        "duration: wait before answering /v1/responses and /v1/chat/completions (default 0)",
    ),
    (
        "MOCK_VLLM_FAIL_STATUS",
        "503",
        "400-599: answer /v1/responses and /v1/chat/completions with this status and an error body",
    ),
    (
        "MOCK_VLLM_DIE_MID_STREAM",
        "3",
        "N: once a stream has sent N events, exit at once with code 1",
    ),
    (
        "MOCK_VLLM_STALL_MID_STREAM",
        "3",
        "N: once a stream has sent N events, send nothing more and never end it",
    ),
    (
        "MOCK_VLLM_CRASH_AFTER",
        "5s",
        "duration: this long after listening, exit with MOCK_VLLM_EXIT_CODE",
    ),
    (
        "MOCK_VLLM_EXIT_CODE",
        "3",
        "0-255: exit code for MOCK_VLLM_CRASH_AFTER (default 1)",
    ),
    (
        "MOCK_VLLM_EXIT_AT_START",
        "1",
        "0-255: exit with this code before binding, like vLLM rejecting an argument",
    ),
    (
        "MOCK_VLLM_HANG_HEALTH_AFTER",
        "5s",
        "duration: this long after listening, /health stops answering",
    ),
    (
        "MOCK_VLLM_IGNORE_SIGTERM",
        "1",
        "bool: log and ignore SIGTERM and SIGINT (SIGQUIT and SIGKILL still stop it)",
    ),
    (
        "MOCK_VLLM_SPAWN_GRANDCHILD",
        "1",
        "bool: start `sleep 100000` in this process group, standing in for vLLM's EngineCore",
    ),
    (
        "MOCK_VLLM_DETACH_GRANDCHILD",
        "1",
        "bool: start that grandchild in a process group of its own instead",
    ),
    (
        "MOCK_VLLM_PID_FILE",
        "/tmp/mock-vllm.pids",
        "path: append '<pid> <grandchild pid or 0>' to this file at start",
    ),
    (
        "MOCK_VLLM_FLOOD",
        "1",
        "bool: write a 1 MiB line to stderr, then log lines to stdout as fast as the pipe takes them",
    ),
    (
        "MOCK_VLLM_SHUTDOWN_GRACE",
        "1s",
        "duration: how long a graceful shutdown waits for open responses (default 3s)",
    ),
];

/// Log lines on their way to the log writer thread. The server never writes to stdout or stderr
/// itself, so that output nobody reads stalls that thread and not the server.
static LOG_QUEUE: OnceLock<SyncSender<LogItem>> = OnceLock::new();

#[derive(Debug, Clone, Copy)]
enum Output {
    Stdout,
    Stderr,
}

enum LogItem {
    Line(Output, String),
    /// Answered once every line queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// What the command line asked for.
#[derive(Debug, PartialEq, Eq)]
enum Invocation {
    Serve(Cli),
    Help,
    Version,
}

/// The options of `mock-vllm serve` that change what it does.
#[derive(Debug, PartialEq, Eq)]
struct Cli {
    /// The model name `/v1/models` lists and chat completions report by default.
    served_model: String,
    /// The host to bind, a name or an address, as vLLM's `--host`.
    host: String,
    port: u16,
    /// When set, every `/v1` request must carry it as a bearer token.
    api_key: Option<String>,
}

/// Behaviour knobs, read once from the environment at start.
#[derive(Debug, Clone)]
struct Knobs {
    /// Mirrors vLLM loading its weights: the port is taken but connects are refused meanwhile.
    startup_delay: Duration,
    stream_delay: Duration,
    /// Makes response headers late, to exercise the gateway's time-to-first-byte handling.
    headers_delay: Duration,
    fail_status: Option<StatusCode>,
    die_mid_stream: Option<usize>,
    stall_mid_stream: Option<usize>,
    crash_after: Option<Duration>,
    exit_code: u8,
    exit_at_start: Option<u8>,
    hang_health_after: Option<Duration>,
    ignore_sigterm: bool,
    spawn_grandchild: bool,
    detach_grandchild: bool,
    pid_file: Option<PathBuf>,
    flood: bool,
    /// Bounds a graceful shutdown, which would otherwise wait for a stalled stream forever.
    shutdown_grace: Duration,
}

/// State shared by every request handler.
struct AppState {
    served_model: String,
    api_key: Option<String>,
    knobs: Knobs,
    /// The recorded stream, split into events once so that each goes out as one body chunk.
    responses_events: Arc<[Bytes]>,
    stats: Stats,
    /// The latest `/v1` request, as `/_mock/last-request` reports it.
    last_request: Mutex<Option<RequestRecord>>,
    /// xorshift state for response ids; random enough to tell responses apart.
    id_state: AtomicU64,
    /// Cancelled to close the listener without ending the process (`/_mock/exit?linger=`).
    stop_listening: CancellationToken,
}

/// Counters and flags `/_mock/stats` reports.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    completed: AtomicU64,
    disconnects: AtomicU64,
    signals: Mutex<Vec<&'static str>>,
    /// When set, `/health` never answers, like a vLLM whose engine is wedged.
    health_hung: AtomicBool,
}

/// How a stream paces and ends its events.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    delay: Duration,
    die_after: Option<usize>,
    stall_after: Option<usize>,
}

/// Settles one `/v1` request as completed or disconnected, whichever comes first; dropping it
/// unsettled means the client left before the response was fully produced.
struct Outcome {
    state: Arc<AppState>,
    settled: bool,
}

/// A response body that settles its request's [`Outcome`] when the body ends or is dropped.
struct TrackedBody {
    inner: Body,
    outcome: Outcome,
}

// The wire formats below declare their fields in vLLM's order, which serde keeps and a JSON map
// would sort.

/// Serializes as `null`, for the fields vLLM always sends empty.
type Null = Option<()>;

/// vLLM's `ErrorResponse`.
#[derive(Serialize)]
struct ErrorBody {
    error: ErrorInfo,
}

#[derive(Serialize)]
struct ErrorInfo {
    message: String,
    #[serde(rename = "type")]
    kind: String,
    param: Null,
    code: u16,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelCard<'a>>,
}

#[derive(Serialize)]
struct ModelCard<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: &'a str,
    parent: Null,
    max_model_len: u64,
    permission: Vec<()>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    prompt_tokens_details: Null,
}

#[derive(Serialize)]
struct ChatCompletionBody<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChatChoice>,
    service_tier: Null,
    system_fingerprint: Null,
    usage: Usage,
    prompt_logprobs: Null,
    kv_transfer_params: Null,
}

#[derive(Serialize)]
struct ChatChoice {
    index: u32,
    message: ChatMessage,
    logprobs: Null,
    finish_reason: &'static str,
    stop_reason: Null,
}

#[derive(Serialize)]
struct ChatMessage {
    role: &'static str,
    content: String,
    refusal: Null,
    annotations: Null,
    audio: Null,
    function_call: Null,
    tool_calls: Vec<()>,
    reasoning_content: Null,
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice>,
    /// Only the extra last chunk that `stream_options.include_usage` asks for has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChunkChoice {
    index: u32,
    delta: Delta,
    logprobs: Null,
    finish_reason: Option<&'static str>,
    /// vLLM sends `"stop_reason": null` on the finish chunk only, hence the double option.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<Null>,
}

#[derive(Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'static str>,
}

/// What `/_mock/stats` answers.
#[derive(Serialize)]
struct StatsBody {
    pid: u32,
    requests: u64,
    completed: u64,
    disconnects: u64,
    signals: Vec<&'static str>,
    health_hung: bool,
}

/// What `/_mock/last-request` answers.
#[derive(Clone, Serialize)]
struct RequestRecord {
    method: String,
    path: String,
    query: Option<String>,
    /// Lowercase names; the values of a repeated header are joined with ", ".
    headers: BTreeMap<String, String>,
    body_len: usize,
}

fn main() -> ExitCode {
    let cli = match parse_command_line() {
        Ok(Invocation::Serve(cli)) => cli,
        Ok(Invocation::Help) => {
            say(format_args!("{}", help_text()));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            say(format_args!("{VERSION}"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            complain(format_args!("{SHORT_USAGE}\nmock-vllm: error: {message}"));
            return ExitCode::from(2);
        }
    };
    let knobs = match Knobs::from_vars(std::env::vars_os()) {
        Ok(knobs) => knobs,
        Err(errors) => {
            for error in errors {
                complain(format_args!("mock-vllm: error: {error}"));
            }
            return ExitCode::from(2);
        }
    };
    if let Some(code) = knobs.exit_at_start {
        complain(format_args!(
            "{SHORT_USAGE}\nmock-vllm serve: error: exiting with code {code} \
             because MOCK_VLLM_EXIT_AT_START is set"
        ));
        return ExitCode::from(code);
    }
    if let Err(message) = start_log_writer() {
        complain(format_args!("ERROR:    {message}"));
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            complain(format_args!(
                "ERROR:    cannot start the async runtime: {error}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(start(cli, knobs));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    if let Err(message) = &result {
        complain(format_args!("ERROR:    {message}"));
    }
    flush_log();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Installs the signal handlers, does the start-up chores the knobs ask for, then serves until a
/// stop signal.
async fn start(cli: Cli, knobs: Knobs) -> Result<(), String> {
    let signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGQUIT])
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    say(format_args!(
        "INFO:     Started server process [{}]",
        std::process::id()
    ));
    say(format_args!(
        "INFO:     mock-vllm {VERSION} serving model {:?}{}",
        cli.served_model,
        if cli.api_key.is_some() {
            " (API key required)"
        } else {
            ""
        }
    ));
    let grandchild = if knobs.spawn_grandchild {
        Some(spawn_grandchild(knobs.detach_grandchild)?)
    } else {
        None
    };
    if let Some(path) = &knobs.pid_file {
        append_pid_line(path, grandchild)?;
    }
    if knobs.flood {
        start_flood()?;
    }
    let state = Arc::new(AppState::new(&cli, knobs));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(handle_signals(signals, Arc::clone(&state), shutdown_tx));
    let result = run(&cli, state, shutdown_rx).await;
    say(format_args!(
        "INFO:     Finished server process [{}]",
        std::process::id()
    ));
    result
}

/// Binds, waits out the startup delay, listens and serves until `shutdown` turns true, then gives
/// open responses the shutdown grace to finish.
async fn run(
    cli: &Cli,
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let addr = resolve(&cli.host, cli.port).await?;
    let socket = bind(addr).map_err(|error| bind_error(addr, &error))?;
    tokio::select! {
        () = sleep(state.knobs.startup_delay) => {}
        () = stop_requested(shutdown.clone()) => return Ok(()),
    }
    let listener = socket
        .listen(LISTEN_BACKLOG)
        .map_err(|error| bind_error(addr, &error))?;
    let local_addr = listener
        .local_addr()
        .map_err(|error| format!("cannot read the listening address: {error}"))?;
    say(format_args!("INFO:     Waiting for application startup."));
    say(format_args!("INFO:     Application startup complete."));
    say(format_args!(
        "INFO:     Uvicorn running on http://{local_addr} (Press CTRL+C to quit)"
    ));
    start_timers(&state);

    let grace = state.knobs.shutdown_grace;
    let app = app(Arc::clone(&state)).into_make_service_with_connect_info::<SocketAddr>();
    let stop_listening = state.stop_listening.clone();
    let stop_serving = shutdown.clone();
    let server =
        axum::serve(listener.tap_io(set_nodelay), app).with_graceful_shutdown(async move {
            tokio::select! {
                () = stop_requested(stop_serving) => {}
                () = stop_listening.cancelled() => {}
            }
        });
    tokio::select! {
        result = server.into_future() => {
            result.map_err(|error| format!("the server failed: {error}"))?;
            if state.stop_listening.is_cancelled() {
                // `/_mock/exit?linger=` ends the process when the linger is over.
                std::future::pending::<()>().await;
            }
        }
        () = grace_expired(shutdown, grace) => {
            say(format_args!(
                "INFO:     Gave up waiting for open responses after {}",
                humantime::format_duration(grace)
            ));
        }
    }
    say(format_args!("INFO:     Waiting for application shutdown."));
    say(format_args!("INFO:     Application shutdown complete."));
    Ok(())
}

/// The whole HTTP surface, without sockets, so that it can be driven directly.
fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/v1/models", get(list_models))
        .route("/metrics", get(metrics))
        .route("/v1/responses", post(create_response))
        .route("/v1/chat/completions", post(create_chat_completion))
        .route("/_mock/last-request", get(last_request))
        .route("/_mock/stats", get(stats))
        .route("/_mock/hang-health", post(hang_health))
        .route("/_mock/unhang-health", post(unhang_health))
        .route("/_mock/exit", post(exit_on_request))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The tracking middleware has already bounded and buffered the body.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            track_api_request,
        ))
        .layer(middleware::from_fn(log_access))
        .layer(middleware::from_fn(echo_request_id))
        .with_state(state)
}

fn parse_command_line() -> Result<Invocation, String> {
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {arg:?} is not valid UTF-8"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let env_api_key = std::env::var("VLLM_API_KEY")
        .ok()
        .filter(|key| !key.is_empty());
    parse_args(&args, env_api_key)
}

/// Parses vLLM's `serve` command line by hand, because it must accept every vLLM option without
/// knowing them all.
fn parse_args(args: &[String], env_api_key: Option<String>) -> Result<Invocation, String> {
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        return Ok(Invocation::Help);
    }
    if args.iter().any(|arg| arg == "--version") {
        return Ok(Invocation::Version);
    }
    let mut args = args.iter().peekable();
    match args.next().map(String::as_str) {
        Some("serve") => {}
        Some(other) => return Err(format!("unknown command {other:?} (expected 'serve')")),
        None => return Err("missing command (expected 'serve')".to_owned()),
    }
    let mut positional_model = None;
    let mut flag_model = None;
    let mut served_model_name = None;
    let mut host = "0.0.0.0".to_owned();
    let mut port = 8000;
    let mut api_key = None;
    while let Some(arg) = args.next() {
        if !arg.starts_with('-') || arg == "-" {
            // Later positionals can only be extra values of a multi-value vLLM option.
            positional_model.get_or_insert_with(|| arg.clone());
            continue;
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        let value = match inline_value {
            Some(value) => Some(value),
            None => args.next_if(|next| !next.starts_with("--")).cloned(),
        };
        let slot = match name {
            "--host" => &mut host,
            "--port" => {
                let value = require_value(name, value)?;
                port = value
                    .parse()
                    .map_err(|_| format!("argument --port: invalid port: {value:?}"))?;
                continue;
            }
            "--api-key" => api_key.insert(String::new()),
            "--model" => flag_model.insert(String::new()),
            "--served-model-name" => served_model_name.insert(String::new()),
            _ => continue,
        };
        *slot = require_value(name, value)?;
    }
    let model = positional_model
        .or(flag_model)
        .ok_or_else(|| "the model is required: mock-vllm serve <model> [options]".to_owned())?;
    Ok(Invocation::Serve(Cli {
        served_model: served_model_name.unwrap_or(model),
        host,
        port,
        api_key: api_key.or(env_api_key),
    }))
}

fn require_value(name: &str, value: Option<String>) -> Result<String, String> {
    value.ok_or_else(|| format!("argument {name}: expected one argument"))
}

fn help_text() -> String {
    let mut text = format!(
        "mock-vllm {VERSION}: a stand-in for vLLM's OpenAI-compatible API server\n\n\
         {SHORT_USAGE}\n\n\
         Options:\n  \
           --host HOST                 address or name to bind (default 0.0.0.0)\n  \
           --port PORT                 port to bind, 0 for any free one (default 8000)\n  \
           --api-key KEY               require 'Authorization: Bearer KEY' on /v1 (env VLLM_API_KEY)\n  \
           --model MODEL               the model, when not given as the positional argument\n  \
           --served-model-name NAME    the model name /v1/models lists (default the model)\n  \
           -h, --help                  print this help\n  \
           --version                   print the version\n\n\
         Any other vLLM option is accepted and ignored.\n\n\
         Knobs (environment variables):\n"
    );
    for (name, _, help) in KNOBS {
        text.push_str(&format!("  {name:<29} {help}\n"));
    }
    text.push_str(
        "\nTest-control endpoints: GET /_mock/last-request, GET /_mock/stats, \
         POST /_mock/hang-health, POST /_mock/unhang-health, POST /_mock/exit?code=N",
    );
    text
}

impl Knobs {
    /// Reads every `MOCK_VLLM_*` variable, reporting every bad or unknown one at once.
    fn from_vars(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Self, Vec<String>> {
        let mut reader = KnobReader::default();
        for (name, value) in vars {
            let Some(name) = name.to_str().filter(|name| name.starts_with("MOCK_VLLM_")) else {
                continue;
            };
            match value.into_string() {
                Ok(value) if value.is_empty() => {}
                Ok(value) => {
                    reader.vars.insert(name.to_owned(), value);
                }
                Err(_) => reader
                    .errors
                    .push(format!("{name}: the value is not valid UTF-8")),
            }
        }
        let knobs = Knobs {
            startup_delay: reader
                .duration("MOCK_VLLM_STARTUP_DELAY")
                .unwrap_or_default(),
            stream_delay: reader
                .duration("MOCK_VLLM_STREAM_DELAY")
                .unwrap_or_default(),
            headers_delay: reader
                .duration("MOCK_VLLM_HEADERS_DELAY")
                .unwrap_or_default(),
            fail_status: reader.fail_status("MOCK_VLLM_FAIL_STATUS"),
            die_mid_stream: reader.count("MOCK_VLLM_DIE_MID_STREAM"),
            stall_mid_stream: reader.count("MOCK_VLLM_STALL_MID_STREAM"),
            crash_after: reader.duration("MOCK_VLLM_CRASH_AFTER"),
            exit_code: reader.exit_code("MOCK_VLLM_EXIT_CODE").unwrap_or(1),
            exit_at_start: reader.exit_code("MOCK_VLLM_EXIT_AT_START"),
            hang_health_after: reader.duration("MOCK_VLLM_HANG_HEALTH_AFTER"),
            ignore_sigterm: reader.flag("MOCK_VLLM_IGNORE_SIGTERM"),
            spawn_grandchild: reader.flag("MOCK_VLLM_SPAWN_GRANDCHILD"),
            detach_grandchild: reader.flag("MOCK_VLLM_DETACH_GRANDCHILD"),
            pid_file: reader.take("MOCK_VLLM_PID_FILE").map(PathBuf::from),
            flood: reader.flag("MOCK_VLLM_FLOOD"),
            shutdown_grace: reader
                .duration("MOCK_VLLM_SHUTDOWN_GRACE")
                .unwrap_or(Duration::from_secs(3)),
        };
        let KnobReader { vars, mut errors } = reader;
        for name in vars.keys() {
            errors.push(format!(
                "{name}: unknown variable (see mock-vllm --help for the knobs)"
            ));
        }
        if errors.is_empty() {
            Ok(knobs)
        } else {
            Err(errors)
        }
    }
}

/// Takes knob values out of the environment one by one, so that whatever is left is unknown, and
/// collects every error instead of stopping at the first.
#[derive(Default)]
struct KnobReader {
    vars: BTreeMap<String, String>,
    errors: Vec<String>,
}

impl KnobReader {
    fn take(&mut self, name: &str) -> Option<String> {
        self.vars.remove(name)
    }

    fn parse<T>(
        &mut self,
        name: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let value = self.take(name)?;
        let parsed = parse(value.trim());
        if parsed.is_none() {
            self.errors
                .push(format!("{name}={value:?}: expected {expected}"));
        }
        parsed
    }

    fn duration(&mut self, name: &str) -> Option<Duration> {
        self.parse(name, "a duration such as 500ms or 2s", |value| {
            humantime::parse_duration(value).ok()
        })
    }

    fn count(&mut self, name: &str) -> Option<usize> {
        self.parse(name, "a number of events", |value| value.parse().ok())
    }

    fn exit_code(&mut self, name: &str) -> Option<u8> {
        self.parse(name, "an exit code from 0 to 255", |value| {
            value.parse().ok()
        })
    }

    fn fail_status(&mut self, name: &str) -> Option<StatusCode> {
        self.parse(name, "an HTTP status from 400 to 599", |value| {
            let status = StatusCode::from_bytes(value.as_bytes()).ok()?;
            (status.is_client_error() || status.is_server_error()).then_some(status)
        })
    }

    fn flag(&mut self, name: &str) -> bool {
        self.parse(
            name,
            "1 or 0 (or true/false, yes/no, on/off)",
            |value| match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Some(true),
                "0" | "false" | "no" | "off" => Some(false),
                _ => None,
            },
        )
        .unwrap_or(false)
    }
}

fn spawn_grandchild(detach: bool) -> Result<u32, String> {
    // The grandchild stays in our process group and shares our stdout and stderr, as vLLM's
    // EngineCore does, so that a supervisor which stops only our pid leaves it behind.
    let mut command = Command::new("sleep");
    command.arg("100000").stdin(Stdio::null());
    if detach {
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
    }
    let child = command
        .spawn()
        .map_err(|error| format!("cannot start the grandchild `sleep 100000`: {error}"))?;
    let pid = child.id();
    say(format_args!(
        "INFO:     Started EngineCore stand-in process [{pid}]"
    ));
    // Dropping a std Child neither kills nor reaps it, which is the point.
    drop(child);
    Ok(pid)
}

fn append_pid_line(path: &std::path::Path, grandchild: Option<u32>) -> Result<(), String> {
    let line = format!("{} {}\n", std::process::id(), grandchild.unwrap_or(0));
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| format!("cannot open the pid file {}: {error}", path.display()))?;
    // One write of a short line to a file opened for append lands whole, even when several
    // restarts share the file.
    file.write_all(line.as_bytes())
        .map_err(|error| format!("cannot write the pid file {}: {error}", path.display()))
}

fn start_flood() -> Result<(), String> {
    std::thread::Builder::new()
        .name("flood".to_owned())
        .spawn(flood)
        .map(drop)
        .map_err(|error| format!("cannot start the flood thread: {error}"))
}

/// Writes as much as the pipes take; blocking here is fine because nothing else runs on this
/// thread, and it stops when a pipe is closed.
fn flood() {
    let mut long_line = vec![b'x'; 1024 * 1024];
    long_line.push(b'\n');
    if io::stderr().lock().write_all(&long_line).is_err() {
        return;
    }
    for number in 1u64.. {
        let line = format!("INFO:     mock-vllm flood line {number}\n");
        let mut stdout = io::stdout().lock();
        if stdout
            .write_all(line.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return;
        }
    }
}

/// Starts the timers that crash the process or hang `/health` some time after listening.
fn start_timers(state: &Arc<AppState>) {
    if let Some(after) = state.knobs.crash_after {
        let code = state.knobs.exit_code;
        tokio::spawn(async move {
            sleep(after).await;
            complain(format_args!(
                "ERROR:    crashing with exit code {code} as MOCK_VLLM_CRASH_AFTER asks"
            ));
            exit_now(code);
        });
    }
    if let Some(after) = state.knobs.hang_health_after {
        let state = Arc::clone(state);
        tokio::spawn(async move {
            sleep(after).await;
            state.stats.health_hung.store(true, Ordering::SeqCst);
            say(format_args!(
                "INFO:     /health now hangs as MOCK_VLLM_HANG_HEALTH_AFTER asks"
            ));
        });
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    // vLLM treats an empty host as every interface.
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| format!("cannot resolve host {host:?}: {error}"))?
        .next()
        .ok_or_else(|| format!("host {host:?} resolves to no address"))
}

/// Binds without listening, so that the port is ours but connects are refused until `listen`.
fn bind(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn bind_error(addr: SocketAddr, error: &io::Error) -> String {
    // uvicorn's wording, which supervisors and people already recognise; Rust's own message ends
    // in a redundant "(os error N)".
    let errno = error.raw_os_error().unwrap_or(0);
    let message = error.to_string();
    let message = message.split(" (os error").next().unwrap_or(&message);
    format!(
        "[Errno {errno}] error while attempting to bind on address {addr}: {}",
        message.to_lowercase()
    )
}

/// Small SSE events must not wait on Nagle's algorithm; uvicorn's sockets also disable it.
fn set_nodelay(stream: &mut tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        complain(format_args!("WARNING:  cannot set TCP_NODELAY: {error}"));
    }
}

async fn handle_signals(mut signals: Signals, state: Arc<AppState>, shutdown: watch::Sender<bool>) {
    while let Some(signal) = signals.next().await {
        let name = signal_name(signal);
        state
            .stats
            .signals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name);
        say(format_args!("INFO:     received {name}"));
        let stops = match signal {
            SIGTERM | SIGINT if state.knobs.ignore_sigterm => {
                say(format_args!(
                    "INFO:     ignoring {name} as MOCK_VLLM_IGNORE_SIGTERM asks"
                ));
                false
            }
            SIGTERM | SIGINT | SIGQUIT => true,
            _ => false,
        };
        if !stops {
            continue;
        }
        if *shutdown.borrow() {
            // Like uvicorn's force quit on a second Ctrl+C.
            say(format_args!(
                "INFO:     Forced exit on a second stop signal"
            ));
            exit_now(0);
        }
        say(format_args!("INFO:     Shutting down"));
        shutdown.send_replace(true);
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGHUP => "SIGHUP",
        SIGUSR1 => "SIGUSR1",
        SIGUSR2 => "SIGUSR2",
        SIGQUIT => "SIGQUIT",
        _ => "UNKNOWN",
    }
}

/// Resolves once a stop is requested; never, if the signal task is gone.
async fn stop_requested(mut shutdown: watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn grace_expired(shutdown: watch::Receiver<bool>, grace: Duration) {
    stop_requested(shutdown).await;
    sleep(grace).await;
}

/// Counts and records `/v1` requests, checks the API key as vLLM does, and settles each request's
/// outcome when its response body ends or is dropped.
async fn track_api_request(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    // vLLM guards every path that starts with /v1, not only /v1/.
    if !request.uri().path().starts_with("/v1") {
        return next.run(request).await;
    }
    state.stats.requests.fetch_add(1, Ordering::SeqCst);
    let outcome = Outcome {
        state: Arc::clone(&state),
        settled: false,
    };
    let (parts, body) = request.into_parts();
    let response = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
        Ok(body) => {
            state.record_last_request(&parts, body.len());
            if state.is_authorized(&parts) {
                next.run(Request::from_parts(parts, Body::from(body))).await
            } else {
                unauthorized()
            }
        }
        Err(error) => openai_error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {error}"),
        ),
    };
    response.map(|inner| Body::new(TrackedBody { inner, outcome }))
}

/// Logs each response as uvicorn's access log does, when its headers are ready.
async fn log_access(request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |info| info.0.to_string());
    let method = request.method().clone();
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |target| target.as_str().to_owned());
    let version = request.version();
    let response = next.run(request).await;
    let status = response.status();
    say(format_args!(
        "INFO:     {client} - \"{method} {target} {version:?}\" {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    ));
    response
}

/// Echoes `x-request-id`, as vLLM does with request-id headers enabled.
async fn echo_request_id(request: Request, next: Next) -> Response {
    let request_id = request.headers().get(&X_REQUEST_ID).cloned();
    let mut response = next.run(request).await;
    if let Some(request_id) = request_id {
        response.headers_mut().insert(X_REQUEST_ID, request_id);
    }
    response
}

async fn health(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.stats.health_hung.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    StatusCode::OK
}

async fn version() -> Json<Value> {
    Json(json!({ "version": VERSION }))
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let card = ModelCard {
        id: &state.served_model,
        object: "model",
        created: unix_now(),
        owned_by: "vllm",
        root: &state.served_model,
        parent: None,
        max_model_len: MAX_MODEL_LEN,
        permission: Vec::new(),
    };
    Json(ModelList {
        object: "list",
        data: vec![card],
    })
    .into_response()
}

async fn create_response(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    if let Some(response) = generation_preamble(&state).await {
        return response;
    }
    let request = match parse_json_object(&body) {
        Ok(request) => request,
        Err(message) => return openai_error(StatusCode::BAD_REQUEST, message),
    };
    if !request.contains_key("input") {
        return openai_error(StatusCode::BAD_REQUEST, "Field required: input");
    }
    if let Some(response) = unknown_model(&state, &request) {
        return response;
    }
    if wants_stream(&request) {
        event_stream(Arc::clone(&state.responses_events), state.pacing())
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Bytes::from_static(RESPONSES_JSON),
        )
            .into_response()
    }
}

async fn create_chat_completion(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    if let Some(response) = generation_preamble(&state).await {
        return response;
    }
    let request = match parse_json_object(&body) {
        Ok(request) => request,
        Err(message) => return openai_error(StatusCode::BAD_REQUEST, message),
    };
    if let Some(response) = unknown_model(&state, &request) {
        return response;
    }
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return openai_error(StatusCode::BAD_REQUEST, "Field required: messages");
    };
    let completion = ChatCompletion {
        id: format!("chatcmpl-{:016x}", state.next_id()),
        created: unix_now(),
        model: request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(&state.served_model)
            .to_owned(),
        prompt_tokens: count_words(messages),
    };
    if wants_stream(&request) {
        let include_usage = request
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            == Some(&Value::Bool(true));
        event_stream(completion.chunks(include_usage).into(), state.pacing())
    } else {
        Json(completion.whole()).into_response()
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "detail": "Not Found" })),
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "detail": "Method Not Allowed" })),
    )
        .into_response()
}

async fn last_request(State(state): State<Arc<AppState>>) -> Json<Option<RequestRecord>> {
    let last = state
        .last_request
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Json(last)
}

async fn stats(State(state): State<Arc<AppState>>) -> Json<StatsBody> {
    let stats = &state.stats;
    let signals = stats
        .signals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Json(StatsBody {
        pid: std::process::id(),
        requests: stats.requests.load(Ordering::SeqCst),
        completed: stats.completed.load(Ordering::SeqCst),
        disconnects: stats.disconnects.load(Ordering::SeqCst),
        signals,
        health_hung: stats.health_hung.load(Ordering::SeqCst),
    })
}

/// Prometheus text exposition with vLLM's metric names and labels.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = &state.stats;
    let requests = stats.requests.load(Ordering::SeqCst);
    let completed = stats.completed.load(Ordering::SeqCst);
    let disconnects = stats.disconnects.load(Ordering::SeqCst);
    let running = requests.saturating_sub(completed + disconnects);
    let labels = format!("engine=\"0\",model_name=\"{}\"", state.served_model);
    let body = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{{labels}}} {running}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{{labels}}} 0.0\n\
         # HELP vllm:request_success_total Count of successfully processed requests.\n\
         # TYPE vllm:request_success_total counter\n\
         vllm:request_success_total{{{labels},finished_reason=\"stop\"}} {completed}.0\n"
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn hang_health(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.stats.health_hung.store(true, Ordering::SeqCst);
    Json(json!({ "health_hung": true }))
}

async fn unhang_health(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.stats.health_hung.store(false, Ordering::SeqCst);
    Json(json!({ "health_hung": false }))
}

async fn exit_on_request(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let param = |wanted: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == wanted)
            .map(|(_, value)| value.to_string())
    };
    let code = match param("code").map(|value| value.parse::<u8>()) {
        None => 0,
        Some(Ok(code)) => code,
        Some(Err(_)) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "code must be an exit code from 0 to 255",
            );
        }
    };
    let linger = match param("linger").map(|value| humantime::parse_duration(&value)) {
        None => None,
        Some(Ok(linger)) => Some(linger),
        Some(Err(_)) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "linger must be a duration such as 500ms",
            );
        }
    };
    if linger.is_some() {
        say(format_args!("INFO:     Shutting down"));
        state.stop_listening.cancel();
    }
    tokio::spawn(async move {
        sleep(linger.unwrap_or(FLUSH_GRACE)).await;
        say(format_args!(
            "INFO:     exiting with code {code} as /_mock/exit asks"
        ));
        exit_now(code);
    });
    Json(json!({ "exiting": true, "code": code })).into_response()
}

/// Applies the headers delay and the forced failure, which both generation endpoints share.
async fn generation_preamble(state: &AppState) -> Option<Response> {
    if !state.knobs.headers_delay.is_zero() {
        sleep(state.knobs.headers_delay).await;
    }
    state
        .knobs
        .fail_status
        .map(|status| openai_error(status, "mock failure"))
}

fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(request)) => Ok(request),
        Ok(_) => Err("the request body must be a JSON object".to_owned()),
        Err(error) => Err(format!("JSON decode error: {error}")),
    }
}

fn wants_stream(request: &Map<String, Value>) -> bool {
    request.get("stream") == Some(&Value::Bool(true))
}

/// An error body in the shape vLLM's `ErrorResponse` has.
fn openai_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorInfo {
            message: message.into(),
            kind: error_type(status),
            param: None,
            code: status.as_u16(),
        },
    };
    (status, Json(body)).into_response()
}

/// vLLM's answer to a request for a model it does not serve (a `model` it does not list).
fn unknown_model(state: &AppState, request: &Map<String, Value>) -> Option<Response> {
    let model = request.get("model")?.as_str()?;
    if model == state.served_model {
        return None;
    }
    let body = json!({
        "error": {
            "message": format!("The model `{model}` does not exist."),
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    });
    Some((StatusCode::NOT_FOUND, Json(body)).into_response())
}

/// Turns a status into the error type name vLLM would use, e.g. 503 into
/// `ServiceUnavailableError`.
fn error_type(status: StatusCode) -> String {
    let mut name: String = status
        .canonical_reason()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    if !name.ends_with("Error") {
        name.push_str("Error");
    }
    name
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": "Unauthorized" })),
    )
        .into_response()
}

/// A server-sent-events response sending each event as one body chunk.
fn event_stream(events: Arc<[Bytes]>, pacing: Pacing) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        )],
        Body::from_stream(paced_events(events, pacing)),
    )
        .into_response()
}

/// Yields the events one by one, pausing between them and dying or stalling where the knobs say.
/// The die and stall checks run when the stream is polled for the event after the Nth, so that the
/// Nth has been handed to the connection by then.
fn paced_events(
    events: Arc<[Bytes]>,
    pacing: Pacing,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    stream::unfold(0, move |next: usize| {
        let events = Arc::clone(&events);
        async move {
            if pacing.die_after == Some(next) {
                die_mid_stream(next).await;
            }
            if pacing.stall_after == Some(next) {
                std::future::pending::<()>().await;
            }
            let event = events.get(next)?.clone();
            if next > 0 && !pacing.delay.is_zero() {
                sleep(pacing.delay).await;
            }
            Some((Ok(event), next + 1))
        }
    })
}

async fn die_mid_stream(sent: usize) -> ! {
    complain(format_args!(
        "ERROR:    exiting with code 1 after {sent} stream events as MOCK_VLLM_DIE_MID_STREAM asks"
    ));
    // The connection may still hold the last event in its write buffer; while this future is
    // pending it flushes it.
    sleep(FLUSH_GRACE).await;
    exit_now(1)
}

/// Splits a recorded stream into its events, each keeping its blank-line terminator, so that the
/// events concatenated are the recording byte for byte.
fn split_events(recording: &'static [u8]) -> Vec<Bytes> {
    let recording = Bytes::from_static(recording);
    let mut events = Vec::new();
    let mut start = 0;
    while start < recording.len() {
        let end = recording[start..]
            .windows(2)
            .position(|pair| pair == b"\n\n")
            .map_or(recording.len(), |offset| start + offset + 2);
        events.push(recording.slice(start..end));
        start = end;
    }
    events
}

/// The parts of a synthetic chat completion that its whole and streamed forms share.
struct ChatCompletion {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

impl ChatCompletion {
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            total_tokens: self.prompt_tokens + CHAT_PIECES.len(),
            completion_tokens: CHAT_PIECES.len(),
            prompt_tokens_details: None,
        }
    }

    fn whole(&self) -> ChatCompletionBody<'_> {
        let message = ChatMessage {
            role: "assistant",
            content: CHAT_PIECES.concat(),
            refusal: None,
            annotations: None,
            audio: None,
            function_call: None,
            tool_calls: Vec::new(),
            reasoning_content: None,
        };
        ChatCompletionBody {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: vec![ChatChoice {
                index: 0,
                message,
                logprobs: None,
                finish_reason: "stop",
                stop_reason: None,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage: self.usage(),
            prompt_logprobs: None,
            kv_transfer_params: None,
        }
    }

    /// The role chunk, one chunk per content piece, the finish chunk, the usage chunk when asked
    /// for, and `[DONE]`, as vLLM streams them.
    fn chunks(&self, include_usage: bool) -> Vec<Bytes> {
        let role = ChunkChoice::delta(Some("assistant"), Some(""));
        let mut chunks = vec![self.chunk(vec![role], None)];
        for piece in CHAT_PIECES {
            chunks.push(self.chunk(vec![ChunkChoice::delta(None, Some(piece))], None));
        }
        let finish = ChunkChoice {
            finish_reason: Some("stop"),
            stop_reason: Some(None),
            ..ChunkChoice::delta(None, None)
        };
        chunks.push(self.chunk(vec![finish], None));
        if include_usage {
            chunks.push(self.chunk(Vec::new(), Some(self.usage())));
        }
        chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
        chunks
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> Bytes {
        let chunk = ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        let json = serde_json::to_string(&chunk)
            .expect("a chunk has only string keys and plain values, so it always serializes");
        Bytes::from(format!("data: {json}\n\n"))
    }
}

impl ChunkChoice {
    fn delta(role: Option<&'static str>, content: Option<&'static str>) -> Self {
        ChunkChoice {
            index: 0,
            delta: Delta { role, content },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
        }
    }
}

/// A rough prompt size for the usage block: the words in the messages' text.
fn count_words(messages: &[Value]) -> usize {
    messages
        .iter()
        .map(|message| match message.get("content") {
            Some(Value::String(text)) => text.split_whitespace().count(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .map(|text| text.split_whitespace().count())
                .sum(),
            _ => 0,
        })
        .sum()
}

impl AppState {
    fn new(cli: &Cli, knobs: Knobs) -> Self {
        let seed = u64::from(std::process::id()) ^ u64::from(unix_nanos());
        AppState {
            served_model: cli.served_model.clone(),
            api_key: cli.api_key.clone(),
            knobs,
            responses_events: split_events(RESPONSES_STREAM).into(),
            stats: Stats::default(),
            last_request: Mutex::new(None),
            // xorshift never leaves zero, so the seed must not be zero.
            id_state: AtomicU64::new(seed | 1),
            stop_listening: CancellationToken::new(),
        }
    }

    fn pacing(&self) -> Pacing {
        Pacing {
            delay: self.knobs.stream_delay,
            die_after: self.knobs.die_mid_stream,
            stall_after: self.knobs.stall_mid_stream,
        }
    }

    fn next_id(&self) -> u64 {
        let step = |mut x: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let previous = self
            .id_state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap_or_else(|x| x);
        step(previous)
    }

    fn record_last_request(&self, parts: &Parts, body_len: usize) {
        let mut headers = BTreeMap::new();
        for name in parts.headers.keys() {
            let values: Vec<_> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect();
            headers.insert(name.as_str().to_owned(), values.join(", "));
        }
        let record = RequestRecord {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers,
            body_len,
        };
        *self
            .last_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(record);
    }

    /// vLLM's check: OPTIONS passes, otherwise the scheme must be bearer (in any case) and the
    /// token must be the key.
    fn is_authorized(&self, parts: &Parts) -> bool {
        let Some(key) = &self.api_key else {
            return true;
        };
        if parts.method == Method::OPTIONS {
            return true;
        }
        let Some(authorization) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
        else {
            return false;
        };
        let (scheme, token) = authorization.split_once(' ').unwrap_or((authorization, ""));
        scheme.eq_ignore_ascii_case("bearer") && token == key
    }
}

impl Outcome {
    fn complete(&mut self) {
        if !self.settled {
            self.settled = true;
            self.state.stats.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.settled {
            self.state.stats.disconnects.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => false,
        };
        if ended {
            this.outcome.complete();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // A body that was empty from the start may be dropped without ever being polled.
        if self.inner.is_end_stream() {
            self.outcome.complete();
        }
    }
}

/// Logs one line to stdout.
fn say(line: fmt::Arguments<'_>) {
    emit(Output::Stdout, line);
}

/// Logs one line to stderr.
fn complain(line: fmt::Arguments<'_>) {
    emit(Output::Stderr, line);
}

/// Hands a line to the log writer once it runs, and writes it directly before that.
fn emit(output: Output, line: fmt::Arguments<'_>) {
    let line = format!("{line}\n");
    match LOG_QUEUE.get() {
        // A full queue means nobody reads our output; the line is dropped rather than stalling
        // the server.
        Some(queue) => drop(queue.try_send(LogItem::Line(output, line))),
        None => write_line(output, &line),
    }
}

/// Writes one whole line and flushes it; a closed pipe is not worth dying for.
fn write_line(output: Output, line: &str) {
    let _ = match output {
        Output::Stdout => {
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(line.as_bytes())
                .and_then(|()| stdout.flush())
        }
        Output::Stderr => io::stderr().lock().write_all(line.as_bytes()),
    };
}

fn start_log_writer() -> Result<(), String> {
    let (queue, lines) = mpsc::sync_channel(LOG_QUEUE_LINES);
    std::thread::Builder::new()
        .name("log-writer".to_owned())
        .spawn(move || {
            for item in lines {
                match item {
                    LogItem::Line(output, line) => write_line(output, &line),
                    LogItem::Flush(done) => drop(done.send(())),
                }
            }
        })
        .map_err(|error| format!("cannot start the log writer thread: {error}"))?;
    // Only main calls this, once, so the cell is always empty here.
    let _ = LOG_QUEUE.set(queue);
    Ok(())
}

/// Waits, at most `LOG_FLUSH_TIMEOUT`, until every queued line is written, so that an exit keeps
/// the lines that explain it even when our output is not read.
fn flush_log() {
    let Some(queue) = LOG_QUEUE.get() else {
        return;
    };
    let deadline = Instant::now() + LOG_FLUSH_TIMEOUT;
    let (done_tx, done_rx) = mpsc::channel();
    let mut item = LogItem::Flush(done_tx);
    loop {
        match queue.try_send(item) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                item = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let _ = done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// Exits at once, after giving the log writer a moment to write what is queued.
fn exit_now(code: u8) -> ! {
    flush_log();
    std::process::exit(i32::from(code))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn unix_nanos() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn serve(line: &str) -> Cli {
        match parse_args(&args(line), None) {
            Ok(Invocation::Serve(cli)) => cli,
            other => panic!("expected a serve command, got {other:?}"),
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value)))
            .collect()
    }

    #[test]
    fn serve_defaults_match_vllm() {
        let cli = serve("serve demo-model");
        assert_eq!(cli.served_model, "demo-model");
        assert_eq!(cli.host, "0.0.0.0");
        assert_eq!(cli.port, 8000);
        assert_eq!(cli.api_key, None);
    }

    #[test]
    fn unknown_vllm_options_are_skipped_with_their_values() {
        let cli = serve(
            "serve m --max-model-len 8192 --enforce-eager --tensor-parallel-size=2 \
             --seed -1 -tp 2 --port 9000 --host 127.0.0.1 --api-key k",
        );
        assert_eq!(cli.served_model, "m");
        assert_eq!(cli.port, 9000);
        assert_eq!(cli.host, "127.0.0.1");
        assert_eq!(cli.api_key.as_deref(), Some("k"));
    }

    #[test]
    fn flag_equals_value_form_is_understood() {
        let cli = serve("serve m --port=1234 --api-key=secret");
        assert_eq!(cli.port, 1234);
        assert_eq!(cli.api_key.as_deref(), Some("secret"));
    }

    #[test]
    fn command_line_api_key_wins_over_the_environment() {
        let from_env = parse_args(&args("serve m"), Some("env".to_owned()));
        let from_flag = parse_args(&args("serve m --api-key flag"), Some("env".to_owned()));
        assert!(
            matches!(from_env, Ok(Invocation::Serve(Cli { api_key: Some(ref k), .. })) if k == "env")
        );
        assert!(
            matches!(from_flag, Ok(Invocation::Serve(Cli { api_key: Some(ref k), .. })) if k == "flag")
        );
    }

    #[test]
    fn served_model_name_renames_the_listed_model() {
        assert_eq!(
            serve("serve m --served-model-name alias").served_model,
            "alias"
        );
        assert_eq!(serve("serve --model m").served_model, "m");
    }

    #[test]
    fn a_missing_model_command_or_value_is_an_error() {
        assert!(parse_args(&args(""), None).is_err());
        assert!(parse_args(&args("run m"), None).is_err());
        assert!(parse_args(&args("serve"), None).is_err());
        assert!(parse_args(&args("serve --enforce-eager"), None).is_err());
        assert!(parse_args(&args("serve m --port"), None).is_err());
        assert!(parse_args(&args("serve m --port 99999"), None).is_err());
    }

    #[test]
    fn help_and_version_win_anywhere() {
        assert_eq!(
            parse_args(&args("serve m --help"), None),
            Ok(Invocation::Help)
        );
        assert_eq!(
            parse_args(&args("--version"), None),
            Ok(Invocation::Version)
        );
    }

    #[test]
    fn every_documented_knob_parses_its_example() {
        let pairs: Vec<_> = KNOBS
            .iter()
            .map(|(name, example, _)| (*name, *example))
            .collect();
        let knobs = Knobs::from_vars(vars(&pairs)).expect("every example value is valid");
        assert_eq!(knobs.fail_status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(knobs.die_mid_stream, Some(3));
        assert!(knobs.ignore_sigterm && knobs.spawn_grandchild && knobs.flood);
    }

    #[test]
    fn bad_and_unknown_knobs_are_all_reported() {
        let errors = Knobs::from_vars(vars(&[
            ("MOCK_VLLM_STREAM_DELAY", "soon"),
            ("MOCK_VLLM_FAIL_STATUS", "200"),
            ("MOCK_VLLM_FLOOD", "maybe"),
            ("MOCK_VLLM_TYPO", "1"),
            ("UNRELATED", "x"),
        ]))
        .expect_err("the values are bad");
        assert_eq!(errors.len(), 4, "{errors:?}");
    }

    #[test]
    fn empty_knobs_mean_unset() {
        let knobs = Knobs::from_vars(vars(&[("MOCK_VLLM_EXIT_CODE", "")])).expect("empty is unset");
        assert_eq!(knobs.exit_code, 1);
        assert_eq!(knobs.shutdown_grace, Duration::from_secs(3));
    }

    #[test]
    fn recorded_stream_splits_into_events_that_concatenate_to_it() {
        let events = split_events(RESPONSES_STREAM);
        assert_eq!(events.concat(), RESPONSES_STREAM);
        assert!(events.len() > 100);
        assert!(
            events
                .iter()
                .all(|event| event.starts_with(b"event: ") && event.ends_with(b"\n\n"))
        );
    }

    #[test]
    fn error_types_follow_vllm_naming() {
        assert_eq!(error_type(StatusCode::BAD_REQUEST), "BadRequestError");
        assert_eq!(
            error_type(StatusCode::INTERNAL_SERVER_ERROR),
            "InternalServerError"
        );
        assert_eq!(
            error_type(StatusCode::SERVICE_UNAVAILABLE),
            "ServiceUnavailableError"
        );
    }

    #[test]
    fn chat_stream_ends_with_done_and_carries_the_whole_content() {
        let completion = ChatCompletion {
            id: "chatcmpl-0".to_owned(),
            created: 0,
            model: "m".to_owned(),
            prompt_tokens: 1,
        };
        let chunks = completion.chunks(true);
        assert_eq!(
            chunks.last().map(|chunk| &chunk[..]),
            Some(&b"data: [DONE]\n\n"[..])
        );
        let content: String = chunks[..chunks.len() - 1]
            .iter()
            .map(|chunk| {
                let json: Value = serde_json::from_slice(&chunk[6..]).expect("chunks are JSON");
                json["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        assert_eq!(content, "Hello from mock-vllm.");
    }
}
