//! The router: the gateway's own endpoints (`endpoints`) and forwarding (`forward`) for everything
//! else, under CORS as the live configuration says.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tower::{Layer as _, ServiceExt as _};

use crate::proxy::state::AppState;
use crate::proxy::{endpoints, forward};

/// The whole HTTP surface. A function of the state alone, so routing tests need no socket.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(endpoints::livez))
        .route("/readyz", get(endpoints::readyz))
        .route("/health", get(endpoints::readyz))
        .route("/metrics", get(endpoints::metrics))
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
