//! The HTTP side: the router, the [`AppState`] handlers share, the proxy workers and the graceful
//! drain.
//!
//! The proxy owns no process and no child state: it reads the [`UpstreamStatus`] watch and forwards
//! requests with its worker's pooled upstream client. Each worker thread owns its runtime, its
//! accept loop on the shared listening socket, and its pool.

pub mod body;
pub mod conn;
pub mod errors;
pub mod forward;
pub mod headers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};

use crate::config::{Config, Cors, ProxyConfig};
use crate::health;
use crate::status::UpstreamStatus;

/// What every request handler shares. Built once at start-up, then copied for each proxy worker
/// with a pool of its own.
#[derive(Clone)]
pub struct AppState {
    /// This worker's upstream client: its pool is the worker's pool of connections to vLLM.
    pub client: reqwest::Client,
    /// Upstream base URL without a trailing slash, e.g. `http://127.0.0.1:8000`.
    pub upstream_base: String,
    /// The same, parsed once, so that a request only sets its path and query on a copy.
    pub upstream_url: reqwest::Url,
    /// The base URL's path prefix without a trailing slash (usually empty).
    pub upstream_path: String,
    /// `Bearer <key>`, precomputed and marked sensitive, injected when the client sent none.
    pub upstream_auth: Option<HeaderValue>,
    pub proxy: ProxyConfig,
    pub status: watch::Receiver<UpstreamStatus>,
    /// How long a request waits for a child that is not ready; `None` in standalone mode.
    pub ready_wait_timeout: Option<Duration>,
    /// How old a standalone health probe may be and still count.
    pub probe_freshness: Duration,
    pub access_log: bool,
    pub metrics: Option<PrometheusHandle>,
    /// Appends the upstream's /metrics to ours.
    pub metrics_merge_upstream: bool,
    /// Cancelled when shutdown begins: readiness turns 503 and waiting requests give up.
    pub draining: CancellationToken,
}

impl AppState {
    pub fn new(
        config: &Config,
        status: watch::Receiver<UpstreamStatus>,
        metrics: Option<PrometheusHandle>,
        draining: CancellationToken,
    ) -> anyhow::Result<Self> {
        let upstream_auth = match &config.upstream.api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| anyhow::anyhow!("upstream_api_key must be printable ASCII"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let upstream_url = reqwest::Url::parse(&config.upstream.base)?;
        let upstream_path = upstream_url.path().trim_end_matches('/').to_string();
        Ok(AppState {
            client: upstream_client(&config.proxy, usize::MAX)?,
            upstream_base: config.upstream.base.clone(),
            upstream_url,
            upstream_path,
            upstream_auth,
            proxy: config.proxy.clone(),
            status,
            ready_wait_timeout: config.serve.as_ref().map(|serve| serve.ready_wait_timeout),
            probe_freshness: config.health.interval + config.health.timeout,
            access_log: config.log.access_log,
            metrics,
            metrics_merge_upstream: config.metrics_merge_upstream,
            draining,
        })
    }
}

impl AppState {
    /// A copy for one proxy worker, with an upstream pool of its own: connections are driven by
    /// the runtime that opened them, so each worker keeps its own. The pool keeps at most
    /// `max_idle` idle connections (the worker's share of `max_connections`).
    fn for_worker(&self, max_idle: usize) -> anyhow::Result<AppState> {
        Ok(AppState {
            client: upstream_client(&self.proxy, max_idle)?,
            ..self.clone()
        })
    }
}

/// The pooled client for proxied requests. Idle connections are dropped before the upstream
/// would close them (uvicorn: 5 s), so a request never lands on a connection that is being closed;
/// hyper retries on its own a request that could not be written to a pooled connection.
fn upstream_client(proxy: &ProxyConfig, max_idle: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(proxy.connect_timeout)
        .pool_idle_timeout(proxy.pool_idle_timeout)
        .pool_max_idle_per_host(max_idle)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http1_only()
        .build()?)
}

/// The whole HTTP surface. A function of the state alone, so routing tests need no socket.
pub fn app(state: Arc<AppState>) -> Router {
    let cors = state.proxy.cors.clone();
    let router = Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .route("/health", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(forward::forward)
        .with_state(state);
    match cors {
        None => router,
        Some(cors) => router.layer(cors_layer(&cors)),
    }
}

fn cors_layer(cors: &Cors) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods(Any)
        // Mirrored rather than `*`: in a preflight, `*` does not cover Authorization, which every
        // OpenAI SDK sends.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(Any)
        .max_age(Duration::from_secs(600));
    match cors {
        Cors::AnyOrigin => layer.allow_origin(Any),
        Cors::Origins(origins) => layer.allow_origin(AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        )),
    }
}

/// How many proxy workers to run: one per CPU the process may use (cgroup quotas and affinity
/// count), at most [`MAX_WORKERS`].
pub fn worker_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |cpus| cpus.get())
        .min(MAX_WORKERS)
}

/// More workers than this only add idle upstream connections: one vLLM is the bottleneck long
/// before eight cores of proxying are.
const MAX_WORKERS: usize = 8;

/// The proxy's worker threads, started and serving.
///
/// The work is split across threads, each a single-threaded runtime with its own accept loop on
/// the shared listening socket and its own upstream connection pool, as nginx splits it across
/// worker processes: a request is read, forwarded and answered on one thread, with no wake-ups
/// across threads on the way.
pub struct Workers {
    /// One per worker: its outcome once its server has stopped.
    finished: FuturesUnordered<oneshot::Receiver<std::io::Result<()>>>,
    /// Cancelled to drop every worker's connections at once.
    close: CancellationToken,
    draining: CancellationToken,
}

impl Workers {
    /// Builds every worker (runtime, listener registration, upstream pool) before starting any,
    /// so that a failure (no file descriptors left, say) fails the start instead of leaving the
    /// gateway short of workers.
    pub fn start(
        listener: TcpListener,
        state: &AppState,
        count: usize,
    ) -> std::io::Result<Workers> {
        let listener = listener.into_std()?;
        let close = CancellationToken::new();
        let count = count.max(1);
        let limit =
            conn::ConnectionLimit::new(conn::max_connections(state.proxy.max_connections, count));
        tracing::info!(
            max_connections = limit.max(),
            "client connections are limited"
        );
        let max_idle = limit.max().div_ceil(count);
        let mut built = Vec::with_capacity(count);
        for _ in 0..count {
            match Worker::build(&listener, state, &close, &limit, max_idle) {
                Ok(worker) => built.push(worker),
                Err(error) => {
                    built.into_iter().for_each(Worker::discard);
                    return Err(error);
                }
            }
        }
        let finished = FuturesUnordered::new();
        let mut built = built.into_iter().enumerate();
        while let Some((index, worker)) = built.next() {
            let (done_tx, done_rx) = oneshot::channel();
            // The worker goes over once the thread exists, so that a failed spawn leaves it here
            // to be discarded rather than dropped (and its runtime with it) in async code.
            let (worker_tx, worker_rx) = std::sync::mpsc::sync_channel::<Worker>(1);
            let spawned = std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || {
                    if let Ok(worker) = worker_rx.recv() {
                        let _ = done_tx.send(worker.run());
                    }
                });
            if let Err(error) = spawned {
                close.cancel();
                worker.discard();
                built.for_each(|(_, worker)| worker.discard());
                return Err(error);
            }
            if let Err(std::sync::mpsc::SendError(worker)) = worker_tx.send(worker) {
                close.cancel();
                worker.discard();
                built.for_each(|(_, worker)| worker.discard());
                return Err(std::io::Error::other("a proxy worker thread died at start"));
            }
            finished.push(done_rx);
        }
        Ok(Workers {
            finished,
            close,
            draining: state.draining.clone(),
        })
    }

    /// Cancelled when the drain begins.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Serves until `draining` is cancelled, then stops accepting and lets in-flight requests
    /// finish for up to `drain_timeout`, or until `abort` is cancelled (a second signal). A worker
    /// that fails ends every worker at once.
    pub async fn serve(
        mut self,
        drain_timeout: Duration,
        abort: CancellationToken,
    ) -> std::io::Result<()> {
        let close = self.close.clone();
        let draining = self.draining.clone();
        let all_finished = async move {
            while let Some(done) = self.finished.next().await {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Err(error),
                    Err(_) => {
                        return Err(std::io::Error::other("a proxy worker stopped unexpectedly"));
                    }
                }
            }
            Ok(())
        };
        tokio::pin!(all_finished);
        let result = tokio::select! {
            result = &mut all_finished => Some(result),
            () = draining.cancelled() => None,
        };
        let result = match result {
            Some(result) => result,
            None => {
                tracing::info!(drain_timeout = %humantime::format_duration(drain_timeout), "draining in-flight requests");
                tokio::select! {
                    result = &mut all_finished => result,
                    () = tokio::time::sleep(drain_timeout) => {
                        tracing::warn!("drain_timeout expired; closing the remaining connections");
                        Ok(())
                    }
                    () = abort.cancelled() => {
                        tracing::warn!("second signal; closing the remaining connections");
                        Ok(())
                    }
                }
            }
        };
        close.cancel();
        result
    }
}

/// One proxy worker: a thread with its own runtime, accept loop and upstream pool.
struct Worker {
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    state: Arc<AppState>,
    close: CancellationToken,
    limit: conn::ConnectionLimit,
}

impl Worker {
    fn build(
        listener: &std::net::TcpListener,
        state: &AppState,
        close: &CancellationToken,
        limit: &conn::ConnectionLimit,
        max_idle: usize,
    ) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            // Registers the socket with this worker's runtime, not the caller's.
            let _runtime = runtime.enter();
            TcpListener::from_std(listener.try_clone()?)
        };
        let listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                runtime.shutdown_background();
                return Err(error);
            }
        };
        let state = match state.for_worker(max_idle) {
            Ok(state) => Arc::new(state),
            Err(error) => {
                drop(listener);
                runtime.shutdown_background();
                return Err(std::io::Error::other(error));
            }
        };
        Ok(Worker {
            runtime,
            listener,
            state,
            close: close.clone(),
            limit: limit.clone(),
        })
    }

    /// Drops a worker that never ran, from async code (where dropping a runtime would block).
    fn discard(self) {
        drop(self.listener);
        self.runtime.shutdown_background();
    }

    fn run(self) -> std::io::Result<()> {
        let Worker {
            runtime,
            listener,
            state,
            close,
            limit,
        } = self;
        runtime.block_on(async move {
            let draining = state.draining.clone();
            let timeouts = conn::ClientTimeouts::from_config(&state.proxy);
            let served = conn::serve(listener, app(state), timeouts, limit, draining);
            tokio::select! {
                () = served => {}
                () = close.cancelled() => {}
            }
        });
        Ok(())
    }
}
