//! The HTTP side: the router, the shared [`AppState`], and the listener with graceful drain.
//!
//! The proxy owns no process and no child state: it reads the [`UpstreamStatus`] watch and forwards
//! requests with one pooled upstream client.

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

/// What every request handler shares. Built once at start-up.
pub struct AppState {
    /// The one upstream client: its pool is the process's pool of connections to vLLM.
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

/// Serves until `draining` is cancelled, then stops accepting and lets in-flight requests finish
/// for up to `drain_timeout`, or until `abort` is cancelled (a second signal).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    drain_timeout: Duration,
    abort: CancellationToken,
) -> std::io::Result<()> {
    let draining = state.draining.clone();
    let router = app(state);
    // Without TCP_NODELAY, small writes (SSE events, short JSON answers) wait on the client's
    // delayed ACK: tens of milliseconds per response.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let server =
        axum::serve(listener, router).with_graceful_shutdown(draining.clone().cancelled_owned());
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = draining.cancelled() => {}
    }
    tracing::info!(drain_timeout = %humantime::format_duration(drain_timeout), "draining in-flight requests");
    tokio::select! {
        result = &mut server => result,
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
