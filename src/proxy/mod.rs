//! The HTTP side: the router, the [`AppState`] handlers share, the proxy workers and the graceful
//! drain.
//!
//! The proxy owns no process and no child state: it reads the [`UpstreamStatus`] watch and forwards
//! requests with its worker's pooled upstream client. Each worker thread owns its runtime, its
//! accept loop on the shared listening socket, and its pool.

pub mod body;
pub mod errors;
pub mod forward;
pub mod headers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

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
            client: upstream_client(&config.proxy)?,
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
    /// the runtime that opened them, so each worker keeps its own.
    fn for_worker(&self) -> anyhow::Result<AppState> {
        Ok(AppState {
            client: upstream_client(&self.proxy)?,
            ..self.clone()
        })
    }
}

/// The pooled client for proxied requests. Idle connections are dropped before the upstream
/// would close them (uvicorn: 5 s), so a request never lands on a connection that is being closed;
/// hyper retries on its own a request that could not be written to a pooled connection.
fn upstream_client(proxy: &ProxyConfig) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(proxy.connect_timeout)
        .pool_idle_timeout(proxy.pool_idle_timeout)
        .pool_max_idle_per_host(usize::MAX)
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
        .allow_headers(Any)
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

/// Serves until `draining` is cancelled, then stops accepting and lets in-flight requests finish
/// for up to `drain_timeout`, or until `abort` is cancelled (a second signal).
///
/// The work is split across `workers` threads, each a single-threaded runtime with its own accept
/// loop on the shared listening socket and its own upstream connection pool, as nginx splits it
/// across worker processes: a request is read, forwarded and answered on one thread, with no
/// wake-ups across threads on the way.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    workers: usize,
    drain_timeout: Duration,
    abort: CancellationToken,
) -> std::io::Result<()> {
    let draining = state.draining.clone();
    let listener = listener.into_std()?;
    // Cancelled to drop every worker's connections at once.
    let close = CancellationToken::new();
    let mut finished = Vec::with_capacity(workers);
    for index in 0..workers.max(1) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let worker = Worker {
            listener: listener.try_clone()?,
            state: Arc::new(state.for_worker().map_err(std::io::Error::other)?),
            close: close.clone(),
        };
        std::thread::Builder::new()
            .name(format!("proxy-{index}"))
            .spawn(move || {
                let _ = done_tx.send(worker.run());
            })?;
        finished.push(done_rx);
    }
    drop(listener);
    let all_finished = async move {
        for done in finished {
            // A worker that went away without a word (it cannot panic) counts as finished.
            if let Ok(Err(error)) = done.await {
                return Err(error);
            }
        }
        Ok(())
    };
    tokio::pin!(all_finished);
    tokio::select! {
        result = &mut all_finished => return result,
        () = draining.cancelled() => {}
    }
    tracing::info!(drain_timeout = %humantime::format_duration(drain_timeout), "draining in-flight requests");
    let result = tokio::select! {
        result = &mut all_finished => result,
        () = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("drain_timeout expired; closing the remaining connections");
            Ok(())
        }
        () = abort.cancelled() => {
            tracing::warn!("second signal; closing the remaining connections");
            Ok(())
        }
    };
    close.cancel();
    result
}

/// One proxy worker: a thread with its own runtime, accept loop and upstream pool.
struct Worker {
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    close: CancellationToken,
}

impl Worker {
    fn run(self) -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = TcpListener::from_std(self.listener)?;
            let draining = self.state.draining.clone();
            // Without TCP_NODELAY, small writes (SSE events, short JSON answers) wait on the
            // client's delayed ACK: tens of milliseconds per response.
            let listener = listener.tap_io(|tcp| {
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "cannot set TCP_NODELAY");
                }
            });
            let server = axum::serve(listener, app(self.state))
                .with_graceful_shutdown(draining.cancelled_owned());
            tokio::select! {
                result = std::future::IntoFuture::into_future(server) => result,
                () = self.close.cancelled() => Ok(()),
            }
        })
    }
}
