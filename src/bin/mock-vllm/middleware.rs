//! Layers around every request: `/v1` counting, recording and key check; uvicorn's access log;
//! `x-request-id` echo; the headers uvicorn and vLLM's CORS middleware add to every answer; and
//! around the JSON endpoints, vLLM's check of their content type.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::log::say;
use crate::openai::{openai_error, unauthorized, unsupported_media_type};
use crate::state::{AppState, Outcome, TrackedBody};

/// Request bodies are read whole to record their length; this bounds the memory one request takes.
pub(crate) const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What uvicorn names itself in every response's `server` header.
const UVICORN: HeaderValue = HeaderValue::from_static("uvicorn");

const ORIGIN: HeaderValue = HeaderValue::from_static("Origin");

/// Counts and records `/v1` requests, checks the API key as vLLM does, and settles each request's
/// outcome when its response body ends or is dropped.
pub(crate) async fn track_api_request(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    // vLLM guards every path that starts with /v1, not only /v1/.
    if !request.uri().path().starts_with("/v1") {
        return next.run(request).await;
    }
    state.stats.requests.fetch_add(1, Ordering::SeqCst);
    let outcome = Outcome {
        state: Arc::clone(&state),
        settled: false,
    };
    let (parts, body) = request.into_parts();
    let response = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
        Ok(body) => {
            state.record_last_request(&parts, body.len());
            if state.is_authorized(&parts) {
                next.run(Request::from_parts(parts, Body::from(body))).await
            } else {
                unauthorized()
            }
        }
        Err(error) => openai_error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {error}"),
        ),
    };
    response.map(|inner| Body::new(TrackedBody { inner, outcome }))
}

/// Logs each response as uvicorn's access log does, when its headers are ready.
pub(crate) async fn log_access(request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |info| info.0.to_string());
    let method = request.method().clone();
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |target| target.as_str().to_owned());
    let version = request.version();
    let response = next.run(request).await;
    let status = response.status();
    say(format_args!(
        "INFO:     {client} - \"{method} {target} {version:?}\" {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    ));
    response
}

/// Echoes `x-request-id`, as vLLM does with request-id headers enabled.
pub(crate) async fn echo_request_id(request: Request, next: Next) -> Response {
    let request_id = request.headers().get(&X_REQUEST_ID).cloned();
    let mut response = next.run(request).await;
    if let Some(request_id) = request_id {
        response.headers_mut().insert(X_REQUEST_ID, request_id);
    }
    response
}

/// Adds `server: uvicorn`, which uvicorn sends on every response of vLLM's.
pub(crate) async fn add_server_header(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response.headers_mut().insert(header::SERVER, UVICORN);
    response
}

/// Adds `vary: Origin`, as vLLM's CORS middleware does to every answer that passes through it,
/// whether or not the request has an `Origin`. It sits inside the key check, as in vLLM, so a
/// 401 for a missing key goes out without it.
pub(crate) async fn add_vary_origin(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response.headers_mut().append(header::VARY, ORIGIN);
    response
}

/// vLLM's check of a JSON endpoint's content type (`validate_json_request`), a dependency of the
/// route: it runs once the route and method matched and the key passed, before the body is read,
/// and refuses any media type but `application/json` (in any case, parameters after `;` ignored),
/// a missing one included.
pub(crate) async fn require_json(request: Request, next: Next) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map_or(Some(""), |value| value.to_str().ok());
    let is_json = content_type.is_some_and(|content_type| {
        content_type
            .split(';')
            .next()
            .is_some_and(|media_type| media_type.eq_ignore_ascii_case("application/json"))
    });
    if is_json {
        next.run(request).await
    } else {
        unsupported_media_type()
    }
}
