//! `gateway`: a supervisor and reverse proxy for vLLM's OpenAI-compatible API.
//!
//! # Codemap
//!
//! - `cli`: the command line (clap); options only, no defaults.
//! - `config`: file + environment + flags merged and validated into [`config::Config`].
//! - `proxy`: the HTTP surface, served by one worker thread per CPU (each its own single-threaded
//!   runtime, accept loop and upstream pool). `proxy::conn` accepts client connections under the
//!   shared `max_connections` limit and enforces the client-side header, idle and send timeouts on
//!   the socket. `proxy::forward` forwards one request; `proxy::headers` holds the
//!   hop-by-hop rules; `proxy::body` wraps bodies with limits and timeouts; `proxy::errors` shapes
//!   every error as OpenAI JSON or a final SSE `error` event.
//! - `health`: `/livez`, `/readyz`, `/health`, `/metrics`, and the upstream `/health` probe.
//! - `status`: [`status::UpstreamStatus`], the one value on a `watch` channel that tells the proxy
//!   and the health endpoints whether the upstream can serve.
//! - `supervisor`: `gateway serve`. `state` is the child's state machine, `child` spawns and stops
//!   process groups, `guard` stops a group whose gateway was SIGKILLed, `reaper` owns every
//!   `waitpid`, `backoff` decides restarts, `output` relays the child's stdout/stderr into the log.
//!   The supervisor is an actor: one task owns the child.
//! - `signals`: the one task that turns signals into stop requests, reloads, or forwards them to
//!   the child.
//! - `reload`: SIGHUP: reads the configuration again and swaps in what may change while vLLM runs
//!   (`config::KEYS` says which keys) as the proxy's `proxy::Live`.
//! - `notify`: systemd `sd_notify` (readiness, status, start-timeout extensions, drain, watchdog,
//!   reloads).
//! - `telemetry`: logging setup (the access log through a queue off the request path), Prometheus
//!   metrics, one access-log record per request.
//!
//! # Flow
//!
//! A connection is accepted by `proxy::conn` once a permit of the connection limit is free; its
//! request enters `proxy::app`, reaches `forward::forward`, waits (under `serve`) until the
//! status says the child accepts requests, is rewritten and sent over the worker's pooled upstream
//! client; the answer streams back frame by frame through `body::UpstreamBody`. A request never
//! leaves the worker thread that accepted its connection.
//! Under `serve`, `run` binds the listen address (so a taken port fails at once), starts the
//! supervisor, waits for the first `Ready`, and only then listens and starts the proxy workers. On
//! SIGTERM readiness turns 503, the listener closes, in-flight requests drain, then the supervisor
//! stops the child's whole process group; it does so on every way out of `run_serve`, errors too.
//!
//! # Invariants
//!
//! - The proxy never touches child processes; it only reads the status watch.
//! - Forwarding a request reads the live configuration once, so its keys, limits and timeouts
//!   come from one configuration; only the reload task replaces it, and a reload never touches vLLM.
//! - Only the supervisor task mutates the child state, and only through `state::transition`.
//! - Only the reaper calls `waitpid`; nothing else reaps, so no exit status is ever stolen.
//! - Every signal to the child goes to its whole process group.
//! - Stream bodies are never collected: frames are forwarded as they arrive.
//! - No secret is ever formatted into a log line or an error (`config::Secret` has a redacting `Debug`).

#![warn(clippy::unwrap_used)]

pub mod cli;
pub mod config;
pub mod health;
pub mod notify;
pub mod proxy;
pub mod reload;
pub mod signals;
pub mod status;
pub mod supervisor;
pub mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy::{AppState, LiveConfig};
use crate::reload::Reloader;
use crate::signals::Shutdown;
use crate::status::{ExternalHealth, UpstreamStatus};
use crate::supervisor::{Control, Outcome};

/// Exit code when the gateway cannot start or gives up on vLLM.
pub const EXIT_FAILURE: u8 = 1;

/// Everything after configuration: signals, reloads, metrics, then [`run`]. Returns the process
/// exit code.
pub async fn main(config: Config, reloader: Reloader) -> u8 {
    let signals = match signals::install() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            return EXIT_FAILURE;
        }
    };
    let metrics = match telemetry::init_metrics() {
        Ok(handle) => Some(handle),
        Err(error) => {
            tracing::warn!(%error, "metrics are disabled");
            None
        }
    };
    if let Some(handle) = &metrics {
        tokio::spawn(telemetry::run_metrics_upkeep(handle.clone()));
    }
    let shutdown = Shutdown::new();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let live = reloader.live();
    let reload_task = tokio::spawn(reload::run(reloader, reload_rx));
    let signal_task = tokio::spawn(signals::handle(
        signals,
        shutdown.clone(),
        control_tx,
        reload_tx,
    ));
    let code = match run(config, live, shutdown, control_rx, metrics).await {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            EXIT_FAILURE
        }
    };
    signal_task.abort();
    reload_task.abort();
    code
}

/// Runs the gateway until shutdown. `live` is `config` as reloads change it; `shutdown` is the
/// trigger (tests cancel it directly); `control` carries signals to forward to the child.
pub async fn run(
    config: Config,
    live: LiveConfig,
    shutdown: Shutdown,
    control: mpsc::UnboundedReceiver<Control>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<u8> {
    supervisor::reaper::start();
    match config.serve.clone() {
        None => run_standalone(config, live, shutdown, metrics).await,
        Some(_) => run_serve(config, live, shutdown, control, metrics).await,
    }
}

async fn run_standalone(
    config: Config,
    live: LiveConfig,
    shutdown: Shutdown,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<u8> {
    let (status_tx, status_rx) =
        watch::channel(UpstreamStatus::External(ExternalHealth::default()));
    let listener = listen(reserve(&config)?)?;
    let tracker = TaskTracker::new();
    tracker.spawn(health::poll_upstream(
        config.upstream.base.clone(),
        config.health,
        status_tx,
        shutdown.graceful.clone(),
    ));
    let state = Arc::new(AppState::new(
        &config,
        live,
        status_rx,
        metrics,
        shutdown.graceful.clone(),
    )?);
    let workers = start_workers(listener, &state)?;
    notify::ready("ready (standalone proxy)");
    tracing::info!(listen = %config.listen, upstream = %config.upstream.base, "gateway listening");
    serve_and_drain(workers, &shutdown).await?;
    tracker.close();
    tracker.wait().await;
    tracing::info!("gateway stopped");
    Ok(0)
}

async fn run_serve(
    config: Config,
    live: LiveConfig,
    shutdown: Shutdown,
    control: mpsc::UnboundedReceiver<Control>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<u8> {
    let serve = config
        .serve
        .clone()
        .expect("run_serve is only called with a serve config");
    let serve_startup_timeout = serve.startup_timeout;
    // The address is taken now, so that a port in use fails the start before a model loads; it
    // listens (and accepts connections) only once vLLM is ready.
    let socket = reserve(&config)?;
    // The supervisor stops the child when this is cancelled: after the drain, not at the signal.
    let stop_child = tokio_util::sync::CancellationToken::new();
    let (status_rx, supervisor_task) = supervisor::start(
        serve,
        config.upstream.base.clone(),
        config.health,
        control,
        stop_child.clone(),
        shutdown.graceful.clone(),
    );
    let notifier = tokio::spawn(notify::follow(status_rx.clone(), serve_startup_timeout));

    // The listener opens only once the child is ready the first time.
    let mut first_ready = status_rx.clone();
    let became_ready = tokio::select! {
        result = first_ready.wait_for(|status| status.accepts_requests() || !status.may_become_ready()) => {
            result.is_ok_and(|status| status.accepts_requests())
        }
        () = shutdown.graceful.cancelled() => false,
    };
    let served = if became_ready {
        serve_child(socket, &config, live, &shutdown, &status_rx, metrics).await
    } else {
        notify::stopping();
        Ok(())
    };
    // Whatever happened to the proxy, vLLM's process group is stopped before the gateway exits.
    stop_child.cancel();
    let exit = supervisor_task.await?;
    // The notifier ends once the supervisor's status sender is gone, after sending the last state.
    let _ = tokio::time::timeout(Duration::from_secs(1), notifier).await;
    served?;
    Ok(match exit {
        Outcome::Stopped => 0,
        Outcome::ChildExited(info) => {
            tracing::info!(exit = %info, "vLLM exited and the restart policy does not restart it");
            u8::try_from(info.exit_code()).unwrap_or(EXIT_FAILURE)
        }
        Outcome::GaveUp(reason) => {
            tracing::error!(%reason, "giving up on vLLM");
            EXIT_FAILURE
        }
    })
}

/// Under `serve`, once vLLM is ready: opens the listener and proxies until the drain is over.
async fn serve_child(
    socket: TcpSocket,
    config: &Config,
    live: LiveConfig,
    shutdown: &Shutdown,
    status_rx: &watch::Receiver<UpstreamStatus>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<()> {
    // Draining starts at a stop signal, or when the child is gone for good.
    let draining = shutdown.graceful.child_token();
    let state = Arc::new(AppState::new(
        config,
        live,
        status_rx.clone(),
        metrics,
        draining.clone(),
    )?);
    let workers = start_workers(listen(socket)?, &state)?;
    notify::ready("ready");
    tracing::info!(listen = %config.listen, "gateway listening");
    let mut gone = status_rx.clone();
    let watch_child = tokio::spawn(async move {
        let _ = gone.wait_for(|status| !status.may_become_ready()).await;
        draining.cancel();
    });
    let served = serve_and_drain(workers, shutdown).await;
    watch_child.abort();
    served
}

/// Serves until the drain is over, telling systemd (STOPPING=1, then the count of requests left)
/// meanwhile. STOPPING=1 goes out exactly once, however fast the drain.
async fn serve_and_drain(workers: proxy::Workers, shutdown: &Shutdown) -> anyhow::Result<()> {
    let draining = workers.draining();
    let served = workers.serve(shutdown.fast.clone());
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => {
            // Ended without a drain: a worker failed.
            notify::stopping();
            return Ok(result?);
        }
        () = draining.cancelled() => {}
    }
    let report = notify::report_drain();
    tokio::pin!(report);
    let result = loop {
        tokio::select! {
            // The report first, so that its STOPPING=1 is sent before the drain can be seen over.
            biased;
            () = &mut report => {}
            result = &mut served => break result,
        }
    };
    Ok(result?)
}

fn start_workers(listener: TcpListener, state: &AppState) -> anyhow::Result<proxy::Workers> {
    proxy::Workers::start(listener, state, proxy::worker_count())
        .map_err(|error| anyhow::anyhow!("cannot start the proxy workers: {error}"))
}

/// Binds the listening address without listening yet.
fn reserve(config: &Config) -> anyhow::Result<TcpSocket> {
    let bind = || {
        let socket = match config.listen {
            std::net::SocketAddr::V4(_) => TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(config.listen)?;
        Ok::<_, std::io::Error>(socket)
    };
    bind().map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", config.listen))
}

fn listen(socket: TcpSocket) -> anyhow::Result<TcpListener> {
    let address = socket.local_addr()?;
    socket
        .listen(1024)
        .map_err(|error| anyhow::anyhow!("cannot listen on {address}: {error}"))
}

/// `gateway healthcheck`: 0 when the URL answers 200, 1 otherwise.
pub fn healthcheck(url: &str, timeout: Duration) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return ExitCode::from(EXIT_FAILURE),
    };
    let ok = runtime.block_on(async {
        let client = health::probe_client();
        matches!(client.get(url).timeout(timeout).send().await, Ok(response) if response.status().is_success())
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("gateway healthcheck: {url} is not ready");
        ExitCode::from(EXIT_FAILURE)
    }
}

/// Raises the soft open-files limit to the hard limit, as vLLM does: each proxied stream holds two
/// sockets, and systemd's default soft limit (1024) would cap the gateway near 500 streams.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "cannot raise the open-files limit");
            } else {
                tracing::debug!(from = soft, to = hard, "raised the open-files limit");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-files limit"),
    }
}
