//! The run sequence: what the gateway does between its configuration and its exit code.
//!
//! [`run`] takes what it is given: the validated configuration, the bound (not yet listening)
//! socket, the live configuration, the shutdown triggers, the signals to forward to vLLM and the
//! metrics handle. It sets up nothing process-wide (signal handlers, the reaper and subreaper, the
//! open-files limit, the metrics recorder: `main` does), so tests drive it in-process.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use nix::sys::signal::Signal;
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::lifecycle::outcome::Outcome;
use crate::notify;
use crate::probe;
use crate::proxy::state::{AppState, LiveConfig};
use crate::proxy::workers::{self, Workers};
use crate::signals::Shutdown;
use crate::status::{ExternalHealth, UpstreamStatus};
use crate::supervisor::{self, SupervisorHandle};
use crate::telemetry;

/// What [`run`] is given besides the configuration and the socket.
pub struct Context {
    /// The configuration as reloads change it (the start-up one until then).
    pub live: LiveConfig,
    /// The stop triggers: the signal task cancels them, tests cancel them directly.
    pub shutdown: Shutdown,
    /// Signals to forward to vLLM's process group (under `serve`; dropped in standalone mode).
    pub forward: mpsc::UnboundedReceiver<Signal>,
    /// Renders `/metrics`; `None` turns the endpoint off.
    pub metrics: Option<PrometheusHandle>,
}

/// Runs the gateway until shutdown and returns its exit code. `socket` is bound to the listen
/// address and listens only once the gateway may serve (under `serve`: once vLLM is ready).
pub async fn run(config: Config, socket: TcpSocket, context: Context) -> anyhow::Result<u8> {
    match config.serve.clone() {
        None => run_standalone(config, socket, context).await,
        Some(_) => run_serve(config, socket, context).await,
    }
}

async fn run_standalone(config: Config, socket: TcpSocket, context: Context) -> anyhow::Result<u8> {
    let Context {
        live,
        shutdown,
        metrics,
        ..
    } = context;
    let (status_tx, status_rx) =
        watch::channel(UpstreamStatus::External(ExternalHealth::default()));
    let listener = workers::listen(socket)?;
    // The bound address, not the configured one: with port 0 the kernel picks the port.
    let address = listener.local_addr()?;
    let tracker = TaskTracker::new();
    tracker.spawn(probe::poll_upstream(
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
    tracing::info!(listen = %address, upstream = %config.upstream.base, "gateway listening");
    serve_and_drain(workers, &shutdown).await?;
    tracker.close();
    tracker.wait().await;
    tracing::info!("gateway stopped");
    Ok(0)
}

async fn run_serve(config: Config, socket: TcpSocket, context: Context) -> anyhow::Result<u8> {
    let Context {
        live,
        shutdown,
        forward,
        metrics,
    } = context;
    let serve = config
        .serve
        .clone()
        .expect("run_serve is only called with a serve config");
    let serve_startup_timeout = serve.startup_timeout;
    // The bound address (with port 0, the port the kernel picked), told before vLLM starts.
    tracing::info!(
        listen = %socket.local_addr()?,
        "listen address reserved; connections are accepted once vLLM is ready"
    );
    let (supervisor, supervised) =
        supervisor::start(serve, config.upstream.base.clone(), config.health);
    let status_rx = supervisor.status();
    let relay = tokio::spawn(relay(
        forward,
        supervisor.clone(),
        shutdown.graceful.clone(),
    ));
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
    supervisor.stop().await;
    let exit = supervised.await?;
    relay.abort();
    // The notifier ends once the supervisor's status sender is gone, after sending the last state.
    let _ = tokio::time::timeout(Duration::from_secs(1), notifier).await;
    served?;
    let code = exit.exit_code();
    match &exit {
        Outcome::Stopped => {}
        Outcome::ChildExited(info) => tracing::error!(
            exit = %info,
            exit_code = code,
            "vLLM exited on its own and the restart policy does not restart it; the gateway exits"
        ),
        Outcome::Prevented(info) => tracing::warn!(
            exit = %info,
            exit_code = code,
            "vLLM exited with a code of restart_prevent_exit_codes; the gateway exits with it"
        ),
        Outcome::GaveUp(reason) => tracing::error!(%reason, exit_code = code, "giving up on vLLM"),
    }
    Ok(code)
}

/// Forwards the signals meant for vLLM to the supervisor, and tells it when the shutdown begins
/// (before a signal that came with it, so that a child the signal ends is not restarted).
async fn relay(
    mut forward: mpsc::UnboundedReceiver<Signal>,
    supervisor: SupervisorHandle,
    graceful: CancellationToken,
) {
    let mut begun = false;
    loop {
        tokio::select! {
            biased;
            () = graceful.cancelled(), if !begun => {
                begun = true;
                supervisor.shutdown_begun();
            }
            Some(signal) = forward.recv() => supervisor.forward(signal),
            else => return,
        }
    }
}

/// Under `serve`, once vLLM is ready: opens the listener and proxies until the drain is over.
async fn serve_child(
    socket: TcpSocket,
    config: &Config,
    live: LiveConfig,
    shutdown: &Shutdown,
    status_rx: &watch::Receiver<UpstreamStatus>,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<()> {
    let address = socket.local_addr()?;
    // Draining starts at a stop signal, or when the child is gone for good.
    let draining = shutdown.graceful.child_token();
    let state = Arc::new(AppState::new(
        config,
        live,
        status_rx.clone(),
        metrics,
        draining.clone(),
    )?);
    let workers = start_workers(workers::listen(socket)?, &state)?;
    notify::ready("ready");
    tracing::info!(listen = %address, "gateway listening");
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
async fn serve_and_drain(workers: Workers, shutdown: &Shutdown) -> anyhow::Result<()> {
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
    let report = notify::report_drain(telemetry::requests_in_flight);
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

fn start_workers(listener: tokio::net::TcpListener, state: &AppState) -> anyhow::Result<Workers> {
    Workers::start(listener, state, workers::worker_count())
        .map_err(|error| anyhow::anyhow!("cannot start the proxy workers: {error}"))
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{self, Flags, Mode};
    use crate::proxy::state::live_config;

    /// How long a condition may take on a loaded machine.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// A stand-in vLLM on a port of its own: `/health`, `/v1/models`, and `/slow`, which tells
    /// `arrived` and answers once `release` fires.
    async fn upstream(
        arrived: Arc<tokio::sync::Notify>,
        release: Arc<tokio::sync::Notify>,
    ) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let app = Router::new()
            .route("/health", get(|| async { "" }))
            .route(
                "/v1/models",
                get(|| async { r#"{"object":"list","data":[{"id":"stand-in"}]}"# }),
            )
            .route(
                "/slow",
                get(move || async move {
                    arrived.notify_one();
                    release.notified().await;
                    "finished"
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    /// A standalone configuration for `upstream`, listening on a port of the kernel's choosing.
    fn standalone(upstream: String) -> Config {
        let mut flags = Flags::default();
        flags.set("llm_api_base", [upstream]);
        flags.set("host", ["127.0.0.1"]);
        flags.set("port", ["0"]);
        flags.set("health_interval", ["100ms"]);
        config::load(&flags, Mode::Standalone, &|_| None).expect("valid config")
    }

    /// Starts [`run`] on a socket bound here; returns its port, its shutdown and its task.
    fn start(config: Config) -> (u16, Shutdown, tokio::task::JoinHandle<anyhow::Result<u8>>) {
        let socket = workers::bind(config.listen).expect("bind");
        let port = socket.local_addr().expect("address").port();
        let shutdown = Shutdown::new();
        let (_forward_tx, forward) = mpsc::unbounded_channel();
        let context = Context {
            live: live_config(config.clone()),
            shutdown: shutdown.clone(),
            forward,
            metrics: None,
        };
        (port, shutdown, tokio::spawn(run(config, socket, context)))
    }

    /// A client for the gateway on `port`, once its `/readyz` answers 200.
    async fn client_once_ready(port: u16) -> reqwest::Client {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        wait_ready(&client, port).await;
        client
    }

    async fn wait_ready(client: &reqwest::Client, port: u16) {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let response = client.get(&url).send().await;
            if response.is_ok_and(|response| response.status() == 200) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_proxies_on_the_socket_it_is_given_and_returns_0_once_its_shutdown_is_cancelled() {
        let notify = Arc::new(tokio::sync::Notify::new());
        let upstream = upstream(Arc::clone(&notify), notify).await;
        let (port, shutdown, running) = start(standalone(upstream));
        let client = client_once_ready(port).await;
        let response = client
            .get(format!("http://127.0.0.1:{port}/v1/models"))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
        assert!(response.text().await.expect("body").contains("stand-in"));

        shutdown.graceful.cancel();
        let code = tokio::time::timeout(DEADLINE, running)
            .await
            .expect("run ends")
            .expect("no panic")
            .expect("no error");
        assert_eq!(code, 0);
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        assert!(refused.is_err(), "the listener is closed after run");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_in_flight_when_the_shutdown_begins_is_answered_before_run_returns() {
        let arrived = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let upstream = upstream(Arc::clone(&arrived), Arc::clone(&release)).await;
        let (port, shutdown, running) = start(standalone(upstream));
        let client = client_once_ready(port).await;
        let slow = tokio::spawn(client.get(format!("http://127.0.0.1:{port}/slow")).send());
        tokio::time::timeout(DEADLINE, arrived.notified())
            .await
            .expect("the request reaches the stand-in");
        shutdown.graceful.cancel();
        let readyz = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await;
        assert!(
            readyz.is_err() || readyz.is_ok_and(|response| response.status() == 503),
            "draining: not ready, or no longer listening"
        );
        assert!(
            !running.is_finished(),
            "run waits for the request in flight"
        );
        release.notify_one();
        let response = slow.await.expect("no panic").expect("answered");
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.expect("body"), "finished");
        let code = tokio::time::timeout(DEADLINE, running)
            .await
            .expect("run ends")
            .expect("no panic")
            .expect("no error");
        assert_eq!(code, 0);
    }
}
