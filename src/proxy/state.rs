//! What every request handler shares: [`AppState`] (a worker's upstream connections, the upstream
//! path prefix, the precomputed auth header, the status watch and the worker's [`StatusCopy`] of
//! it), and [`Live`], the part of the configuration a reload may change, swapped whole and read
//! once per request from the worker's [`LiveCopy`].

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};

use crate::config::{Config, Cors, ProxyConfig};
use crate::proxy::admission::Admission;
use crate::proxy::upstream::Upstream;
use crate::proxy::wake::Cut;
use crate::status::{ReadCount, UpstreamStatus, VllmReads};

/// The configuration as the last reload left it (the start-up one until then), with what requests
/// derive from it prepared once. Keys a reload may not change keep their start-up values here
/// (`config::KEYS` says which).
#[derive(Clone)]
pub struct Live {
    pub config: Config,
    /// `None` leaves CORS off.
    pub(super) cors: Option<CorsLayer>,
}

impl Live {
    pub fn new(config: Config) -> Self {
        let cors = config.proxy.cors.as_ref().map(cors_layer);
        Live { config, cors }
    }
}

/// Shared by every worker and the reload: a reload swaps the whole [`Live`] at once, and a request
/// takes it through its worker's [`LiveCopy`].
pub type LiveConfig = Arc<ArcSwap<Live>>;

pub fn live_config(config: Config) -> LiveConfig {
    Arc::new(ArcSwap::from_pointee(Live::new(config)))
}

/// A worker's own copy of the live configuration, remade when a reload swaps the shared one.
/// A request holds its configuration to its end; counted on the shared one, that reference moved
/// its cache line between the workers' CPUs twice a request.
pub struct LiveCopy {
    shared: LiveConfig,
    /// The shared configuration it was copied from (held, so that its address, which tells
    /// whether a reload came, is not reused), and the copy.
    copy: Mutex<(Arc<Live>, Arc<Live>)>,
}

impl LiveCopy {
    pub fn new(shared: LiveConfig) -> LiveCopy {
        let source = shared.load_full();
        let copy = Arc::new(Live::clone(&source));
        LiveCopy {
            shared,
            copy: Mutex::new((source, copy)),
        }
    }

    /// The configuration as the last reload left it.
    pub fn load(&self) -> Arc<Live> {
        let current = self.shared.load();
        let mut copy = self.copy.lock();
        if !Arc::ptr_eq(&copy.0, &current) {
            let fresh = Arc::new(Live::clone(&current));
            *copy = (arc_swap::Guard::into_inner(current), fresh);
        }
        Arc::clone(&copy.1)
    }
}

impl Clone for LiveCopy {
    /// A copy of its own, for another worker.
    fn clone(&self) -> LiveCopy {
        LiveCopy::new(Arc::clone(&self.shared))
    }
}

/// What a request on its way needs to know of vLLM's status.
#[derive(Clone, Copy)]
pub struct Readiness {
    /// [`UpstreamStatus::accepts_requests`].
    pub accepts_requests: bool,
    /// [`UpstreamStatus::serving_pid`].
    pub serving_pid: Option<u32>,
}

impl Readiness {
    fn of(status: &UpstreamStatus) -> Readiness {
        Readiness {
            accepts_requests: status.accepts_requests(),
            serving_pid: status.serving_pid(),
        }
    }
}

/// A worker's copy of vLLM's [`Readiness`], taken again when the status changes. Read from the
/// status watch itself, a request under `serve` took the watch's lock three times, and the lock
/// moved its cache line between the workers' CPUs each time; whether the status changed is a
/// load of a version only the supervisor writes.
pub struct StatusCopy {
    seen: Mutex<(watch::Receiver<UpstreamStatus>, Readiness)>,
}

impl StatusCopy {
    pub fn new(mut status: watch::Receiver<UpstreamStatus>) -> StatusCopy {
        let readiness = Readiness::of(&status.borrow_and_update());
        StatusCopy {
            seen: Mutex::new((status, readiness)),
        }
    }

    /// vLLM's readiness as the supervisor last set it.
    pub fn readiness(&self) -> Readiness {
        let mut seen = self.seen.lock();
        let (status, readiness) = &mut *seen;
        // Once the supervisor is gone (an error), the status is read each time, as it stands.
        if status.has_changed().unwrap_or(true) {
            *readiness = Readiness::of(&status.borrow_and_update());
        }
        *readiness
    }
}

impl Clone for StatusCopy {
    /// A copy of its own, for another worker.
    fn clone(&self) -> StatusCopy {
        let status = self.seen.lock().0.clone();
        StatusCopy::new(status)
    }
}

/// What every request handler shares. Built once at start-up, then copied for each proxy worker
/// with a pool of its own.
#[derive(Clone)]
pub struct AppState {
    /// This worker's connections to vLLM for proxied requests, and its pool of idle ones.
    pub upstream: Arc<Upstream>,
    /// A client for the gateway's own requests to vLLM (its `/metrics`, to merge them).
    pub client: reqwest::Client,
    /// Upstream base URL without a trailing slash, e.g. `http://127.0.0.1:8000`.
    pub upstream_base: String,
    /// The base URL's path prefix without a trailing slash (usually empty).
    pub upstream_path: String,
    /// `Bearer <key>`, precomputed and marked sensitive, injected when the client sent none.
    pub upstream_auth: Option<HeaderValue>,
    /// What a reload may change: timeouts, limits, keys, CORS, the access log.
    pub live: LiveConfig,
    /// This worker's copy of `live`, which a forwarded request loads once and keeps to its end.
    pub live_copy: LiveCopy,
    pub status: watch::Receiver<UpstreamStatus>,
    /// This worker's copy of what requests need of `status`.
    pub status_copy: StatusCopy,
    /// How old a standalone health probe may be and still count.
    pub probe_freshness: Duration,
    pub metrics: Option<PrometheusHandle>,
    /// Cancelled when shutdown begins: readiness turns 503 and waiting requests give up.
    pub draining: CancellationToken,
    /// Cancelled when the workers stop accepting and let their connections finish: with
    /// `draining`, or alone for an in-place upgrade (readiness and waiting requests stay as they
    /// are, and new connections wait in the listening socket's backlog for the new image).
    pub closing: CancellationToken,
    /// When `drain_timeout` expires: running streams end with the SSE `error` event, and
    /// requests still waiting for vLLM's answer get 503 `drain_timeout`.
    pub cut: Cut,
    /// Cancelled when requests waiting for their turn or for vLLM give up with 503: when a stop's
    /// drain begins, and at the cut (an upgrade's drain holds them until then).
    pub give_up: CancellationToken,
    /// The concurrency limit and its queue, one for every worker.
    pub admission: Arc<Admission>,
    /// The proxy's reads from vLLM, one count per worker, which the supervisor reads.
    pub reads: VllmReads,
}

impl AppState {
    /// `config` is the start-up configuration, which `live` holds too until a reload.
    pub fn new(
        config: &Config,
        live: LiveConfig,
        status: watch::Receiver<UpstreamStatus>,
        metrics: Option<PrometheusHandle>,
        draining: CancellationToken,
        reads: VllmReads,
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
        let upstream_uri: http::Uri = config.upstream.base.parse()?;
        let upstream_path = upstream_uri.path().trim_end_matches('/').to_string();
        Ok(AppState {
            upstream: Arc::new(upstream(config, usize::MAX, reads.worker())?),
            client: upstream_client(&config.proxy, usize::MAX)?,
            upstream_base: config.upstream.base.clone(),
            upstream_path,
            upstream_auth,
            live_copy: LiveCopy::new(Arc::clone(&live)),
            live,
            status_copy: StatusCopy::new(status.clone()),
            status,
            probe_freshness: config.health.interval + config.health.timeout,
            metrics,
            closing: draining.child_token(),
            cut: Cut::new(CancellationToken::new()),
            give_up: draining.child_token(),
            draining,
            admission: Arc::new(Admission::new(config.proxy.max_concurrent_requests)),
            reads,
        })
    }
}

impl AppState {
    /// A copy for one proxy worker, with an upstream pool of its own: connections are driven by
    /// the runtime that opened them, so each worker keeps its own. The pool keeps at most
    /// `max_idle` idle connections (the worker's share of `max_connections`).
    ///
    /// The worker's tokens are children of the shared ones, cancelled with them: every request
    /// and connection checks them, and a token checked from two threads bounces its lock between
    /// their CPUs.
    pub(super) fn for_worker(&self, max_idle: usize) -> anyhow::Result<AppState> {
        // The pool's settings are restart-only keys: the live ones are the start-up ones.
        let live = self.live.load();
        Ok(AppState {
            upstream: Arc::new(upstream(&live.config, max_idle, self.reads.worker())?),
            client: upstream_client(&live.config.proxy, max_idle)?,
            draining: self.draining.child_token(),
            closing: self.closing.child_token(),
            cut: Cut::new(self.cut.token.child_token()),
            give_up: self.give_up.child_token(),
            ..self.clone()
        })
    }
}

/// The connections for proxied requests: idle ones are dropped before the upstream would close
/// them (uvicorn: 5 s), so a request never lands on a connection that is being closed.
fn upstream(config: &Config, max_idle: usize, reads: Arc<ReadCount>) -> anyhow::Result<Upstream> {
    Upstream::new(
        &config.upstream.base.parse()?,
        config.proxy.connect_timeout,
        config.proxy.pool_idle_timeout,
        max_idle,
        reads,
    )
}

/// The client for the gateway's own requests to vLLM, pooled as the proxied ones are.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Flags, Mode};

    fn config(request_timeout: &str) -> Config {
        let mut flags = Flags::default();
        flags.set("llm_api_base", ["http://127.0.0.1:9"]);
        flags.set("request_timeout", [request_timeout]);
        config::load(&flags, Mode::Standalone, &|_| None).expect("valid config")
    }

    #[test]
    fn a_workers_copy_is_its_own_and_follows_each_reload() {
        let shared = live_config(config("10s"));
        let copy = LiveCopy::new(Arc::clone(&shared));
        let first = copy.load();
        assert!(
            !Arc::ptr_eq(&first, &shared.load_full()),
            "a copy, not the shared one"
        );
        assert!(
            Arc::ptr_eq(&first, &copy.load()),
            "the same copy until a reload"
        );
        assert_eq!(first.config.proxy.request_timeout, Duration::from_secs(10));

        shared.store(Arc::new(Live::new(config("20s"))));
        let second = copy.load();
        assert_eq!(second.config.proxy.request_timeout, Duration::from_secs(20));
        assert_eq!(
            first.config.proxy.request_timeout,
            Duration::from_secs(10),
            "a request keeps the configuration it began with"
        );
        assert!(!Arc::ptr_eq(&second, &shared.load_full()));

        let other = copy.clone();
        assert!(
            !Arc::ptr_eq(&other.load(), &second),
            "another worker gets its own"
        );
        assert_eq!(
            other.load().config.proxy.request_timeout,
            Duration::from_secs(20)
        );
    }

    #[test]
    fn a_workers_status_copy_follows_every_change() {
        use crate::lifecycle::state::ChildState;
        use crate::status::ChildStatus;

        let child = |state| {
            UpstreamStatus::Child(ChildStatus {
                state,
                restarts: 0,
                last_exit: None,
            })
        };
        let since = tokio::time::Instant::now();
        let (supervisor, status) = watch::channel(child(ChildState::Starting { pid: 7, since }));
        let copy = StatusCopy::new(status);
        let readiness = copy.readiness();
        assert!(!readiness.accepts_requests);
        assert_eq!(readiness.serving_pid, None);

        supervisor.send_replace(child(ChildState::Ready { pid: 7, since }));
        let readiness = copy.readiness();
        assert!(readiness.accepts_requests);
        assert_eq!(readiness.serving_pid, Some(7));
        let other = copy.clone();
        assert_eq!(
            other.readiness().serving_pid,
            Some(7),
            "another worker's copy"
        );

        supervisor.send_replace(child(ChildState::Backoff {
            attempt: 1,
            until: since,
        }));
        assert!(!copy.readiness().accepts_requests);
        assert!(!other.readiness().accepts_requests);
        // The supervisor gone, the last status stands.
        supervisor.send_replace(child(ChildState::Ready { pid: 8, since }));
        drop(supervisor);
        assert_eq!(copy.readiness().serving_pid, Some(8));
    }
}
