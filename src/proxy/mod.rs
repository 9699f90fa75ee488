//! The HTTP side: the router, the [`AppState`] handlers share, the proxy workers and the graceful
//! drain.
//!
//! The proxy owns no process and no child state: it reads the [`UpstreamStatus`] watch and forwards
//! requests with its worker's pooled upstream client. Each worker thread owns its runtime, its
//! accept loop on the shared listening socket, and its pool. The configuration a reload may change
//! is [`Live`], swapped whole by the reload and read once per request.

pub mod body;
pub mod conn;
pub mod errors;
pub mod forward;
pub mod headers;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tower::{Layer as _, ServiceExt as _};
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};

use crate::config::{Config, Cors, ProxyConfig};
use crate::health;
use crate::status::UpstreamStatus;

/// The configuration as the last reload left it (the start-up one until then), with what requests
/// derive from it prepared once. Keys a reload may not change keep their start-up values here
/// (`config::KEYS` says which).
pub struct Live {
    pub config: Config,
    /// `None` leaves CORS off.
    cors: Option<CorsLayer>,
}

impl Live {
    pub fn new(config: Config) -> Self {
        let cors = config.proxy.cors.as_ref().map(cors_layer);
        Live { config, cors }
    }
}

/// Shared by every worker and the reload: a reload swaps the whole [`Live`] at once, and a request
/// takes the current one with an atomic load and a reference count, no lock.
pub type LiveConfig = Arc<ArcSwap<Live>>;

pub fn live_config(config: Config) -> LiveConfig {
    Arc::new(ArcSwap::from_pointee(Live::new(config)))
}

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
    /// What a reload may change: timeouts, limits, keys, CORS, the access log. A request loads it
    /// once (`live.load_full()`) and keeps that copy to its end.
    pub live: LiveConfig,
    pub status: watch::Receiver<UpstreamStatus>,
    /// How old a standalone health probe may be and still count.
    pub probe_freshness: Duration,
    pub metrics: Option<PrometheusHandle>,
    /// Cancelled when shutdown begins: readiness turns 503 and waiting requests give up.
    pub draining: CancellationToken,
}

impl AppState {
    /// `config` is the start-up configuration, which `live` holds too until a reload.
    pub fn new(
        config: &Config,
        live: LiveConfig,
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
            live,
            status,
            probe_freshness: config.health.interval + config.health.timeout,
            metrics,
            draining,
        })
    }
}

impl AppState {
    /// A copy for one proxy worker, with an upstream pool of its own: connections are driven by
    /// the runtime that opened them, so each worker keeps its own. The pool keeps at most
    /// `max_idle` idle connections (the worker's share of `max_connections`).
    fn for_worker(&self, max_idle: usize) -> anyhow::Result<AppState> {
        // The pool's settings are restart-only keys: the live ones are the start-up ones.
        Ok(AppState {
            client: upstream_client(&self.live.load().config.proxy, max_idle)?,
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
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .route("/health", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(forward::forward)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), cors))
        .with_state(state)
}

/// CORS as the live configuration says, so that a reload can turn it on, off, or change the
/// origins. With CORS off a request goes straight through. This reads the live configuration apart
/// from `forward`: a reload landing between the two only means that one request's CORS headers
/// follow the previous configuration.
async fn cors(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let layer = state.live.load().cors.clone();
    match layer {
        None => next.run(request).await,
        Some(layer) => match layer.layer(next).oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
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
    /// For `drain_timeout`, read when the drain begins.
    live: LiveConfig,
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
        let limit = conn::ConnectionLimit::new(conn::max_connections(
            state.live.load().config.proxy.max_connections,
            count,
        ));
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
            live: Arc::clone(&state.live),
        })
    }

    /// Cancelled when the drain begins.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Serves until `draining` is cancelled, then stops accepting and lets in-flight requests
    /// finish for up to `drain_timeout` (as configured when the drain begins), or until `abort` is
    /// cancelled (a second signal). A worker that fails ends every worker at once.
    pub async fn serve(mut self, abort: CancellationToken) -> std::io::Result<()> {
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
                let drain_timeout = self.live.load().config.drain_timeout;
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
            let live = Arc::clone(&state.live);
            let served = conn::serve(listener, app(state), live, limit, draining);
            tokio::select! {
                () = served => {}
                () = close.cancelled() => {}
            }
        });
        Ok(())
    }
}
