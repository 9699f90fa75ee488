//! The router: the gateway's own endpoints (`endpoints`) and forwarding (`forward`) for everything
//! else, under CORS as the live configuration says. [`Surface`] is what each client connection
//! calls: it sends a forwarded request straight to `forward` when it can.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, get};
use hyper::body::Incoming;
use tower::{Layer as _, ServiceExt as _};

use crate::proxy::errors::ProxyError;
use crate::proxy::state::AppState;
use crate::proxy::{endpoints, forward};

/// The gateway's own endpoints, by path; every other path is forwarded.
const OWN_ENDPOINTS: [(&str, Endpoint); 4] = [
    ("/livez", || get(endpoints::livez)),
    ("/readyz", || get(endpoints::readyz)),
    ("/health", || get(endpoints::readyz)),
    ("/metrics", || get(endpoints::metrics)),
];

type Endpoint = fn() -> MethodRouter<Arc<AppState>>;

/// A response on its way from [`Surface::respond`].
pub type Responding = Pin<Box<dyn Future<Output = Response> + Send>>;

/// The whole HTTP surface. A function of the state alone, so routing tests need no socket.
pub fn app(state: Arc<AppState>) -> Router {
    own_endpoints()
        .fallback(forward::forward)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), cors))
        .with_state(state)
}

/// The health listener's surface: the gateway's own endpoints and nothing else (every other path
/// is a 404, never forwarded).
pub fn health_app(state: Arc<AppState>) -> Router {
    own_endpoints()
        .fallback(|| async { ProxyError::NotFound(HEALTH_PORT_SERVES) })
        .with_state(state)
}

/// What the health listener's 404 says.
const HEALTH_PORT_SERVES: &str = "the health port serves only /livez, /readyz, /health and /metrics; requests for vLLM go to the gateway's main port";

fn own_endpoints() -> Router<Arc<AppState>> {
    OWN_ENDPOINTS
        .iter()
        .fold(Router::new(), |router, (path, endpoint)| {
            router.route(path, endpoint())
        })
}

/// The HTTP surface as a client connection calls it: [`app`], except that while CORS is off (the
/// default) a request for any path but the gateway's own goes straight to `forward`. What that
/// skips (the route lookup, the CORS middleware, and the boxed futures and copies of both) was
/// about a tenth of the CPU time the gateway spends on a forwarded request.
#[derive(Clone)]
pub struct Surface {
    router: Router,
    state: Arc<AppState>,
    /// Whether requests for other paths than the gateway's own are forwarded (not on the health
    /// listener).
    forwards: bool,
}

impl Surface {
    pub fn new(state: Arc<AppState>) -> Surface {
        Surface {
            router: app(Arc::clone(&state)),
            state,
            forwards: true,
        }
    }

    /// The health listener's: [`health_app`].
    pub fn health(state: Arc<AppState>) -> Surface {
        Surface {
            router: health_app(Arc::clone(&state)),
            state,
            forwards: false,
        }
    }

    /// The state its requests are served with.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The response to `request`, on its way. The future is boxed here, one layer deep: a large
    /// future is copied whole each time it moves, and a forwarded request's is several KB.
    pub fn respond(self, request: http::Request<Incoming>) -> Responding {
        let request = request.map(Body::new);
        let live = self.state.live_copy.load();
        let own = OWN_ENDPOINTS
            .iter()
            .any(|(path, _)| *path == request.uri().path());
        if self.forwards && live.cors.is_none() && !own {
            return boxed_in_place(|| forward::forward_under(self.state, live, request));
        }
        Box::pin(async move {
            match self.router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        })
    }
}

/// The future `make` makes, boxed. With the box allocated first, the release build writes the
/// future straight into it; `Box::pin(make())` made it on the stack and copied it into the box,
/// which for a forwarded request's 3.8 KB future was 420 instructions a request.
fn boxed_in_place<F>(make: impl FnOnce() -> F) -> Responding
where
    F: Future<Output = Response> + Send + 'static,
{
    let boxed: Pin<Box<F>> = Box::into_pin(Box::write(Box::new_uninit(), make()));
    boxed
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http::{Request, StatusCode};
    use tokio::sync::watch;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt as _;

    use super::*;
    use crate::config::{self, Flags, Mode};
    use crate::lifecycle::state::{ChildState, ExitInfo};
    use crate::proxy::state::live_config;
    use crate::status::{ChildStatus, ExternalHealth, Probe, UpstreamStatus, VllmReads};

    /// The router over `status`, for a standalone gateway whose upstream is never reached.
    fn router(
        status: UpstreamStatus,
    ) -> (Router, watch::Sender<UpstreamStatus>, CancellationToken) {
        let mut flags = Flags::default();
        flags.set("llm_api_base", ["http://127.0.0.1:9"]);
        let config = config::load(&flags, Mode::Standalone, &|_| None).expect("valid config");
        let (status_tx, status_rx) = watch::channel(status);
        let draining = CancellationToken::new();
        let state = AppState::new(
            &config,
            live_config(config.clone()),
            status_rx,
            None,
            draining.clone(),
            VllmReads::default(),
        )
        .expect("state");
        (app(Arc::new(state)), status_tx, draining)
    }

    async fn get(router: &Router, path: &str) -> (StatusCode, serde_json::Value) {
        let request = Request::get(path).body(Body::empty()).expect("request");
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    fn probed(ok: bool) -> UpstreamStatus {
        UpstreamStatus::External(ExternalHealth {
            last_probe: Some(Probe {
                ok,
                at: Instant::now(),
                detail: if ok {
                    String::new()
                } else {
                    "upstream /health answered 500".into()
                },
            }),
        })
    }

    fn child(state: ChildState) -> UpstreamStatus {
        UpstreamStatus::Child(ChildStatus {
            state,
            restarts: 0,
            last_exit: None,
        })
    }

    #[tokio::test]
    async fn readyz_and_health_follow_the_last_probe_and_turn_503_when_draining() {
        let (router, status_tx, draining) =
            router(UpstreamStatus::External(ExternalHealth::default()));
        let (code, body) = get(&router, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "not_ready");
        assert_eq!(body["reason"], "upstream /health not probed yet");

        status_tx.send_replace(probed(true));
        for path in ["/readyz", "/health"] {
            let (code, body) = get(&router, path).await;
            assert_eq!(code, StatusCode::OK, "{path}");
            assert_eq!(body["status"], "ready", "{path}");
        }

        status_tx.send_replace(probed(false));
        let (code, body) = get(&router, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "upstream /health answered 500");

        status_tx.send_replace(probed(true));
        draining.cancel();
        let (code, body) = get(&router, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "draining");
    }

    #[tokio::test]
    async fn livez_stays_200_until_the_child_is_gone_for_good() {
        let now = Instant::now();
        let (router, status_tx, _draining) =
            router(child(ChildState::Starting { pid: 7, since: now }));
        let (code, body) = get(&router, "/livez").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["status"], "alive");
        assert_eq!(body["state"], "starting");
        let (code, _) = get(&router, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);

        status_tx.send_replace(child(ChildState::Ready { pid: 7, since: now }));
        let (code, body) = get(&router, "/readyz").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["pid"], 7);

        status_tx.send_replace(child(ChildState::Exited {
            status: Some(ExitInfo::Code(3)),
        }));
        let (code, body) = get(&router, "/livez").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "dead");
    }

    #[tokio::test]
    async fn metrics_is_404_when_metrics_are_disabled() {
        let (router, _status_tx, _draining) = router(probed(true));
        let request = Request::get("/metrics")
            .body(Body::empty())
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}
