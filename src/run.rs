//! The run sequence: what the gateway does between its configuration and its exit code.
//!
//! [`run`] takes what it is given: the validated configuration, the bound (not yet listening)
//! socket, the live configuration, the shutdown triggers, the signals to forward to vLLM, the
//! metrics handle, upgrade requests, and what a previous image handed over. It sets up nothing
//! process-wide (signal handlers, the reaper and subreaper, the open-files limit, the metrics
//! recorder: `main` does), so tests drive it in-process.
//!
//! An in-place upgrade (under `serve`, once vLLM has been ready) is the old image's side here:
//! stop accepting while the listening socket stays open (new connections wait in its backlog),
//! drain for up to `drain_timeout`, take the supervisor's description of vLLM, and exec the new
//! binary (`hand_over`). If any step fails, the workers start again on the same socket and the
//! supervisor goes on.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::lifecycle::outcome::Outcome;
use crate::notify;
use crate::probe;
use crate::proxy::conn;
use crate::proxy::state::{AppState, LiveConfig};
use crate::proxy::workers::{self, Workers};
use crate::reload::UpgradeRequest;
use crate::signals::{self, Shutdown};
use crate::status::{ExternalHealth, UpstreamStatus, VllmReads};
use crate::supervisor::{self, Inherited, SupervisorHandle};
use crate::telemetry;
use crate::upgrade::handover::{self, HandedChild, Handover};

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
    /// Requests to re-execute a replaced binary in place (from SIGHUP).
    pub upgrades: mpsc::Receiver<UpgradeRequest>,
    /// What a previous image of the gateway handed over across an in-place upgrade.
    pub inherited: Option<Inherited>,
    /// The health listener's socket, bound (or inherited, listening), when `health_port` is set.
    pub health: Option<TcpSocket>,
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
        upgrades,
        health,
        forward,
        ..
    } = context;
    // No vLLM to forward signals to: the signal task sees the channel closed, and says so.
    drop(forward);
    let refuser = tokio::spawn(refuse_upgrades(
        upgrades,
        "in-place upgrades are made under `gateway serve` only; restart the gateway to run the new binary",
    ));
    let (status_tx, status_rx) =
        watch::channel(UpstreamStatus::External(ExternalHealth::default()));
    let listener = workers::listen(socket)?;
    // The bound address, not the configured one: with port 0 the kernel picks the port.
    let address = listener.local_addr()?;
    let tracker = TaskTracker::new();
    let reads = VllmReads::default();
    tracker.spawn(probe::poll_upstream(
        config.upstream.base.clone(),
        config.health,
        status_tx,
        shutdown.graceful.clone(),
        reads.clone(),
    ));
    let health = HealthListener::open(health, &config, &live, &status_rx, &metrics, &shutdown)?;
    let state = Arc::new(AppState::new(
        &config,
        live,
        status_rx,
        metrics,
        shutdown.graceful.clone(),
        reads,
    )?);
    let workers = start_workers(&listener, &state)?;
    // The workers hold their own copies, which they let go when the drain begins; keeping this
    // one would leave the socket open through the drain, with new connections waiting unserved.
    drop(listener);
    notify::ready("ready (standalone proxy)");
    tracing::info!(listen = %address, upstream = %config.upstream.base, "gateway listening");
    serve_and_drain(workers, &shutdown).await?;
    refuser.abort();
    tracker.close();
    tracker.wait().await;
    HealthListener::close(health).await;
    tracing::info!("gateway stopped");
    Ok(0)
}

async fn run_serve(config: Config, socket: TcpSocket, context: Context) -> anyhow::Result<u8> {
    let Context {
        live,
        shutdown,
        forward,
        metrics,
        mut upgrades,
        inherited,
        health,
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
    // Counted by the proxy's workers, weighed by the supervisor against a probe that timed out.
    let reads = VllmReads::default();
    let (supervisor, supervised) = supervisor::start(
        serve,
        config.upstream.base.clone(),
        config.health,
        inherited,
        reads.clone(),
    );
    let status_rx = supervisor.status();
    // Open from the start: probes get their answers while the model loads.
    let health = match HealthListener::open(health, &config, &live, &status_rx, &metrics, &shutdown)
    {
        Ok(health) => health,
        Err(error) => {
            supervisor.stop().await;
            let _ = supervised.await;
            return Err(error);
        }
    };
    let relay = tokio::spawn(relay(
        forward,
        supervisor.clone(),
        shutdown.graceful.clone(),
    ));
    let notifier = tokio::spawn(notify::follow(status_rx.clone(), serve_startup_timeout));

    // The listener opens only once the child is ready the first time.
    let mut first_ready = status_rx.clone();
    let first_ready =
        first_ready.wait_for(|status| status.accepts_requests() || !status.may_become_ready());
    tokio::pin!(first_ready);
    let became_ready = loop {
        tokio::select! {
            result = &mut first_ready => break result.is_ok_and(|status| status.accepts_requests()),
            () = shutdown.graceful.cancelled() => break false,
            Some(request) = upgrades.recv() => request.refuse(
                "vLLM has not been ready yet; send SIGHUP again once the gateway is ready".into(),
            ),
        }
    };
    let served = if became_ready {
        let serving = Serving {
            config: &config,
            live,
            shutdown: &shutdown,
            status_rx: &status_rx,
            metrics,
            supervisor: &supervisor,
            health: health.as_ref(),
            reads,
        };
        serve_child(socket, serving, &mut upgrades).await
    } else {
        notify::stopping();
        Ok(())
    };
    // Whatever happened to the proxy, vLLM's process group is stopped before the gateway exits.
    supervisor.stop().await;
    let exit = supervised.await?;
    relay.abort();
    HealthListener::close(health).await;
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

/// What `serve_child` serves with.
struct Serving<'a> {
    config: &'a Config,
    live: LiveConfig,
    shutdown: &'a Shutdown,
    status_rx: &'a watch::Receiver<UpstreamStatus>,
    metrics: Option<PrometheusHandle>,
    supervisor: &'a SupervisorHandle,
    /// The health listener, to hand over with the main socket.
    health: Option<&'a HealthListener>,
    /// The proxy's reads from vLLM, which the supervisor weighs.
    reads: VllmReads,
}

/// Under `serve`, once vLLM is ready: opens the listener and proxies until the drain before the
/// stop is over. An upgrade request drains the workers and execs the new binary; should that
/// not happen, the workers start again on the same socket.
async fn serve_child(
    socket: TcpSocket,
    serving: Serving<'_>,
    upgrades: &mut mpsc::Receiver<UpgradeRequest>,
) -> anyhow::Result<()> {
    // Kept open while the workers come and go, across an upgrade's exec too; let go when a stop's
    // drain begins, so that the socket closes once the workers have taken in their backlog.
    let listener = workers::listen(socket)?;
    let address = listener.local_addr()?;
    let mut kept = Some(listener);
    let mut first = true;
    while let Some(listener) = &kept {
        // Draining starts at a stop signal, or when the child is gone for good.
        let draining = serving.shutdown.graceful.child_token();
        let state = Arc::new(AppState::new(
            serving.config,
            Arc::clone(&serving.live),
            serving.status_rx.clone(),
            serving.metrics.clone(),
            draining.clone(),
            serving.reads.clone(),
        )?);
        let workers = start_workers(listener, &state)?;
        if std::mem::take(&mut first) {
            notify::ready("ready");
            tracing::info!(listen = %address, "gateway listening");
        }
        let closing = workers.closing();
        let mut gone = serving.status_rx.clone();
        let child_gone = draining.clone();
        let watch_child = tokio::spawn(async move {
            let _ = gone.wait_for(|status| !status.may_become_ready()).await;
            child_gone.cancel();
        });
        let served = serve_and_drain(workers, serving.shutdown);
        tokio::pin!(served);
        let mut upgrade: Option<UpgradeRequest> = None;
        let served = loop {
            tokio::select! {
                result = &mut served => break result,
                () = draining.cancelled(), if kept.is_some() => kept = None,
                Some(request) = upgrades.recv() => {
                    if upgrade.is_some() || closing.is_cancelled() {
                        request.refuse("the gateway is already draining".into());
                        continue;
                    }
                    tracing::info!(
                        new_binary = %request.path.display(),
                        "upgrading in place: no new connections are accepted (they wait in the backlog); draining in-flight requests"
                    );
                    notify::status("upgrading in place: draining in-flight requests");
                    closing.cancel();
                    upgrade = Some(request);
                }
            }
        };
        watch_child.abort();
        let served = served?;
        let Some(request) = upgrade else {
            return Ok(());
        };
        let Some(listener) = kept.as_ref().filter(|_| served == Served::Closed) else {
            request.refuse("the gateway is stopping".into());
            return Ok(());
        };
        let reason = hand_over(listener, &serving, &request.path).await;
        request.refuse(reason);
        tracing::info!(listen = %address, "serving again with this image");
    }
    Ok(())
}

/// The end of an in-place upgrade, once the workers have drained: takes the supervisor's
/// description of vLLM, and execs the new binary with it. Returns only if the exec did not
/// happen, with why; the supervisor goes on then.
async fn hand_over(listener: &std::net::TcpListener, serving: &Serving<'_>, path: &Path) -> String {
    let stopping = || serving.shutdown.graceful.is_cancelled();
    if stopping() {
        return "the gateway is stopping".into();
    }
    let Some(serve) = &serving.config.serve else {
        return "in-place upgrades are made under `gateway serve` only".into();
    };
    let snapshot = match serving.supervisor.hand_over().await {
        Ok(snapshot) => snapshot,
        Err(reason) => return reason,
    };
    let child = snapshot.child;
    let description = Handover {
        version: handover::VERSION,
        from_version: env!("CARGO_PKG_VERSION").into(),
        listener_fd: listener.as_raw_fd(),
        health_fd: serving.health.map(|health| health.listener.as_raw_fd()),
        vllm_port: serve.vllm_port,
        vllm_pid: child.map(|child| child.pid),
        guard_fd: child.and_then(|child| child.guard_fd),
        stdout_fd: child.and_then(|child| child.stdout_fd),
        stderr_fd: child.and_then(|child| child.stderr_fd),
        child: child.map(|child| HandedChild {
            pgid: child.pid,
            state: child.state,
        }),
        restarts: snapshot.restarts,
        failed_starts: snapshot.history.failed_starts,
        backoff_level: snapshot.history.level,
    };
    tracing::info!(
        new_binary = %path.display(),
        vllm_pid = description.vllm_pid,
        "executing the new gateway binary in place; vLLM keeps running"
    );
    // Probes it accepted would be cut by the exec: it lets them finish, and the socket holds the
    // next ones in its backlog for the new image.
    if let Some(health) = serving.health {
        health.pause().await;
    }
    telemetry::flush_logs();
    let reason = match signals::hold() {
        // A stop asked for meanwhile wins (the exec would lose it): the supervisor resumes and
        // stops. From here on no signal is handled: one that comes waits, pending, for the new
        // image, and one whose handler ran before the hold is seen here, though the signal task
        // may not have acted on it yet.
        Ok(held) if stopping() || held.stop_received() => "the gateway is stopping".into(),
        Ok(_held) => {
            let error = crate::upgrade::exec::exec(path, &description);
            format!("cannot execute {}: {error}", path.display())
        }
        Err(error) => format!("cannot hold the signals back for the exec: {error}"),
    };
    serving.supervisor.resume();
    if let Some(health) = serving.health
        && let Err(error) = health.serve()
    {
        tracing::error!(%error, "cannot serve the health listener again");
    }
    reason
}

/// The health listener (`health_port`): the gateway's own endpoints on a port of their own, with a
/// connection limit of their own, served on the main runtime from start to exit, through the
/// drain (where `/readyz` turns 503) and, across an in-place upgrade, on the same socket.
struct HealthListener {
    /// The socket itself, open for as long as the gateway runs, and handed over by an upgrade.
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    /// The accept loop while it runs, and what stops it.
    serving: Mutex<Option<(CancellationToken, HealthServed)>>,
}

type HealthServed = tokio::task::JoinHandle<std::io::Result<()>>;

impl HealthListener {
    /// How long the health listener's open connections get to finish once it stops.
    const CLOSE_WAIT: Duration = Duration::from_secs(1);

    /// Starts listening on `socket` (if there is a health listener) and serving it.
    fn open(
        socket: Option<TcpSocket>,
        config: &Config,
        live: &LiveConfig,
        status: &watch::Receiver<UpstreamStatus>,
        metrics: &Option<PrometheusHandle>,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Option<HealthListener>> {
        let Some(socket) = socket else {
            return Ok(None);
        };
        let listener = workers::listen(socket)?;
        let address = listener.local_addr()?;
        let state = Arc::new(AppState::new(
            config,
            Arc::clone(live),
            status.clone(),
            metrics.clone(),
            shutdown.graceful.clone(),
            VllmReads::default(),
        )?);
        let health = HealthListener {
            listener,
            state,
            serving: Mutex::default(),
        };
        health.serve()?;
        tracing::info!(health_listen = %address, "health listener open: /livez, /readyz, /health, /metrics");
        Ok(Some(health))
    }

    /// Starts the accept loop.
    fn serve(&self) -> std::io::Result<()> {
        let done = CancellationToken::new();
        let served = tokio::spawn(conn::serve_health(
            self.listener.try_clone()?,
            Arc::clone(&self.state),
            done.clone(),
        ));
        *self.serving.lock() = Some((done, served));
        Ok(())
    }

    /// Stops the accept loop and gives open connections [`Self::CLOSE_WAIT`] to finish; the socket
    /// stays open, and new connections wait in its backlog (for an upgrade's new image).
    async fn pause(&self) {
        let Some((done, mut served)) = self.serving.lock().take() else {
            return;
        };
        done.cancel();
        match tokio::time::timeout(Self::CLOSE_WAIT, &mut served).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the health listener failed"),
            Ok(_) => {}
            Err(_) => served.abort(),
        }
    }

    async fn close(health: Option<HealthListener>) {
        if let Some(health) = health {
            health.pause().await;
        }
    }
}

/// Refuses every upgrade request, with `reason`, until the senders are gone.
async fn refuse_upgrades(mut upgrades: mpsc::Receiver<UpgradeRequest>, reason: &'static str) {
    while let Some(request) = upgrades.recv().await {
        request.refuse(reason.into());
    }
}

/// How the workers' serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// The drain before a stop is over (or a worker failed).
    Stopped,
    /// The workers closed without a stop: an in-place upgrade's drain is over.
    Closed,
}

/// Serves until the drain is over, telling systemd (STOPPING=1, then the count of requests left)
/// meanwhile. STOPPING=1 goes out exactly once, however fast the drain. A drain for an upgrade
/// (`closing` without `draining`) tells systemd nothing: the reload already did.
async fn serve_and_drain(workers: Workers, shutdown: &Shutdown) -> anyhow::Result<Served> {
    let draining = workers.draining();
    let closing = workers.closing();
    let served = workers.serve(shutdown.fast.clone());
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => {
            if closing.is_cancelled() && !draining.is_cancelled() {
                result?;
                return Ok(Served::Closed);
            }
            // Ended without a drain: a worker failed.
            notify::stopping();
            result?;
            return Ok(Served::Stopped);
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
    result?;
    Ok(Served::Stopped)
}

fn start_workers(listener: &std::net::TcpListener, state: &AppState) -> anyhow::Result<Workers> {
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
        let (_upgrade_tx, upgrades) = mpsc::channel(1);
        let context = Context {
            live: live_config(config.clone()),
            shutdown: shutdown.clone(),
            forward,
            metrics: None,
            upgrades,
            inherited: None,
            health: None,
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
