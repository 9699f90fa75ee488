//! Forwarding one request: authorise, hold it while a supervised child is not ready, rewrite the
//! headers, stream the body up, stream the answer back. Nothing is buffered and nothing is parsed.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::config::Config;
use crate::proxy::admission::{self, Permit};
use crate::proxy::body::{BodyTooLarge, LimitedBody, Timing, UpstreamBody};
use crate::proxy::errors::{ProxyError, TimeoutKind, Unavailable};
use crate::proxy::headers::X_REQUEST_ID;
use crate::proxy::state::{AppState, Live};
use crate::proxy::upstream::{RequestBody, ResponseBody, UpstreamError};
use crate::proxy::{headers, keepalive, upstream};
use crate::telemetry::RequestRecord;

static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// The fallback handler: everything the gateway does not answer itself goes upstream.
pub async fn forward(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let live = state.live_copy.load();
    forward_under(state, live, request).await
}

/// Forwards `request` under `live`, this request's settings whatever a reload does before it ends.
pub async fn forward_under(state: Arc<AppState>, live: Arc<Live>, request: Request) -> Response {
    let config = &live.config;
    let request_id = request_id(request.headers());
    let mut record = RequestRecord::new(
        request_id.clone(),
        request.method(),
        request.uri().path(),
        config.log.access_log,
    );
    // The request's turn under `max_concurrent_requests`, held until its response body ends.
    let mut permit = None;
    let result = proxy(
        &state,
        config,
        request,
        &request_id,
        &mut record,
        &mut permit,
    )
    .await;
    let mut response = match result {
        Ok(Proxied::Answered((response, upstream_body, timing, sent_at))) => {
            let stream = matches!(timing, Timing::Stream { .. });
            record.set_response(response.status().as_u16(), stream);
            let deadline = sent_at + config.proxy.request_timeout;
            let body = UpstreamBody::new(upstream_body, timing, deadline, &state.cut, record);
            response.map(|()| admission::hold(body, permit))
        }
        Ok(Proxied::Waiting(pending)) => {
            let admitted = pending.admitted;
            let exchange = exchange(Arc::clone(&state), Arc::clone(&live), pending);
            keepalive::respond(
                Arc::clone(&state),
                Arc::clone(&live),
                admitted,
                exchange,
                record,
                permit,
            )
        }
        Err(error) => {
            match &error {
                ProxyError::Unavailable(_) | ProxyError::Timeout(_) => {
                    tracing::warn!(request_id = %record.request_id(), error = %error, "upstream request failed");
                }
                _ => {
                    tracing::debug!(request_id = %record.request_id(), error = %error, "request refused")
                }
            }
            record.set_failed(error.status().as_u16(), error.metric_kind());
            let response = error.into_response();
            // The gateway's own body, written whole: its length is the response's bytes_out.
            if let Some(length) = http_body::Body::size_hint(response.body()).exact() {
                record.add_bytes(length as usize);
            }
            drop(record);
            response
        }
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id);
    response
}

/// The response head, its body, how the body is timed, and when the request went upstream (the
/// whole-request deadline counts from there).
pub type Forwarded = (http::Response<()>, ResponseBody, Timing, Instant);

/// How `proxy` left a request.
enum Proxied {
    /// vLLM answered (or failed in a way the client is told of).
    Answered(Forwarded),
    /// A streaming request still waiting for vLLM after `stream_keepalive_after`: its stream
    /// begins now, kept alive until vLLM answers (`keepalive`).
    Waiting(Pending),
}

/// A request read and checked, to go upstream once vLLM is ready.
pub struct Pending {
    parts: http::request::Parts,
    body: RequestBody,
    /// For a streamed body: whether it has all been read (see `proxy`).
    streamed_body_finished: Option<Arc<AtomicBool>>,
    header_timeout: std::time::Duration,
    header_kind: TimeoutKind,
    limit: u64,
    request_id: HeaderValue,
    /// When the request was admitted: the wait for a ready vLLM counts from here.
    pub admitted: Instant,
}

impl Pending {
    /// The request body, when it was small enough to be read whole.
    pub fn whole_body(&self) -> Option<&[u8]> {
        self.body.as_bytes()
    }
}

/// Request bodies up to this size that declare their length are read whole before they go
/// upstream: they leave with the headers in one write, and a request refused by a vLLM that just
/// died can be sent again to the next one. Longer or chunked bodies stream through.
const WHOLE_BODY_MAX: u64 = 64 * 1024;

async fn proxy(
    state: &AppState,
    config: &Config,
    request: Request,
    request_id: &HeaderValue,
    record: &mut RequestRecord,
    permit: &mut Option<Permit>,
) -> Result<Proxied, ProxyError> {
    // The response headers are due by the first-byte or the whole-request deadline, whichever
    // is sooner, counted from when the request goes upstream; a small body must arrive within
    // the same time from when the request did. Waiting for a ready vLLM has its own limit.
    let (header_timeout, header_kind) =
        if config.proxy.first_byte_timeout <= config.proxy.request_timeout {
            (config.proxy.first_byte_timeout, TimeoutKind::FirstByte)
        } else {
            (config.proxy.request_timeout, TimeoutKind::Request)
        };
    let body_deadline = record.started() + header_timeout;

    let (mut parts, body) = request.into_parts();
    // Tunnels and traces have no place in front of vLLM (and CONNECT's answer cannot be relayed).
    if parts.method == http::Method::CONNECT || parts.method == http::Method::TRACE {
        return Err(ProxyError::MethodNotAllowed(
            if parts.method == http::Method::CONNECT {
                "CONNECT"
            } else {
                "TRACE"
            },
        ));
    }
    authorize(config, &mut parts.headers)?;
    if has_dot_segment(parts.uri.path()) {
        return Err(ProxyError::BadRequest(
            "the request path must not contain `.` or `..` segments",
        ));
    }
    let limit = config.proxy.max_body_bytes;
    let length = content_length(&parts.headers);
    if length.is_some_and(|length| length > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    // A body without a length is chunked, and goes on decoded from that (RFC 9112 section 6.1:
    // 501 for a coding not understood).
    if length.is_none() && !headers::chunked_only(&parts.headers) {
        return Err(ProxyError::NotImplemented(
            "a request body in a transfer coding other than chunked",
        ));
    }
    // A request without a body (most GETs) must stay without one, rather than become an empty
    // chunked body.
    // For a streamed body: whether it has all been read, so that a timeout while it was still
    // arriving is the client's (408), not vLLM's (504).
    let mut streamed_body_finished = None;
    let body = if http_body::Body::is_end_stream(&body) {
        RequestBody::Empty
    } else if length.is_some_and(|length| length <= WHOLE_BODY_MAX) {
        RequestBody::Whole(read_whole(body, body_deadline).await?)
    } else {
        let finished = Arc::new(AtomicBool::new(false));
        streamed_body_finished = Some(Arc::clone(&finished));
        RequestBody::Streamed(LimitedBody::new(body, limit, finished))
    };
    *permit = state
        .admission
        .admit(&config.proxy, &state.give_up)
        .await
        .map_err(|error| match error {
            ProxyError::ShuttingDown => gave_up(state),
            error => error,
        })?;
    let pending = Pending {
        parts,
        body,
        streamed_body_finished,
        header_timeout,
        header_kind,
        limit,
        request_id: request_id.clone(),
        admitted: Instant::now(),
    };
    match keepalive::after(state, config, pending.whole_body()) {
        Some(after) => {
            match tokio::time::timeout(after, wait_until_ready(state, config, pending.admitted))
                .await
            {
                Ok(ready) => ready?,
                Err(_) => return Ok(Proxied::Waiting(pending)),
            }
        }
        None => wait_until_ready(state, config, pending.admitted).await?,
    }
    send_pending(state, config, pending, record)
        .await
        .map(Proxied::Answered)
}

/// What is left of a waiting stream's request once its stream has begun: the rest of the wait,
/// then the exchange with vLLM.
fn exchange(state: Arc<AppState>, live: Arc<Live>, pending: Pending) -> keepalive::Exchange {
    Box::new(move |record| {
        Box::pin(async move {
            let config = &live.config;
            wait_until_ready(&state, config, pending.admitted).await?;
            send_pending(&state, config, pending, record).await
        })
    })
}

/// Sends a request whose vLLM is ready, once more to a replacement if the first refused it.
pub async fn send_pending(
    state: &AppState,
    config: &Config,
    pending: Pending,
    record: &RequestRecord,
) -> Result<Forwarded, ProxyError> {
    let Pending {
        parts,
        body,
        streamed_body_finished,
        header_timeout,
        header_kind,
        limit,
        request_id,
        admitted: _,
    } = pending;
    let request_id = &request_id;
    let target = upstream_target(&state.upstream_path, &parts.method, &parts.uri)?;
    // What goes upstream: no hop-by-hop headers, the upstream's `Host`, the request id, and the
    // upstream key unless the client sent its own.
    let head = upstream::Head {
        method: &parts.method,
        target: &target,
        headers: &parts.headers,
        host: &state.upstream.host_header,
        request_id,
        authorization: state
            .upstream_auth
            .as_ref()
            .filter(|_| !parts.headers.contains_key(header::AUTHORIZATION)),
    };
    // Under `serve`, a refused connection most likely means vLLM just died and the supervisor has
    // not noticed yet: such a request (never sent) waits for the next vLLM and goes again, once.
    let serving_pid = config
        .ready_wait_timeout()
        .and_then(|_| state.status_copy.readiness().serving_pid);
    let again = serving_pid.and_then(|_| body.try_clone());
    let mut sent_at = Instant::now();
    let deadline = sent_at + header_timeout;
    let mut outcome = send(state, head, body, deadline, header_kind, limit, record).await;
    if let (Err(ProxyError::Unavailable(Unavailable::Connect)), Some(body)) = (&outcome, again)
        && wait_for_replacement(state, config, serving_pid).await?
    {
        tracing::debug!(request_id = %record.request_id(), "vLLM refused the connection; sending again to its replacement");
        sent_at = Instant::now();
        let deadline = sent_at + header_timeout;
        outcome = send(state, head, body, deadline, header_kind, limit, record).await;
    }
    if let (Err(ProxyError::Timeout(_)), Some(finished)) = (&outcome, &streamed_body_finished)
        && !finished.load(Ordering::Relaxed)
    {
        return Err(ProxyError::BodyTimeout);
    }
    let (head, body, timing) = downstream_response(config, outcome?);
    Ok((head, body, timing, sent_at))
}

/// The upstream's response as the client gets it, and how its body is to be timed.
fn downstream_response(
    config: &Config,
    response: http::Response<ResponseBody>,
) -> (http::Response<()>, ResponseBody, Timing) {
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if config.proxy.cors.is_some() {
        headers::strip_cors(&mut parts.headers);
    }
    let timing = if headers::is_event_stream(&parts.headers) {
        parts
            .headers
            .insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
        Timing::Stream {
            idle: config.proxy.stream_idle_timeout,
        }
    } else {
        Timing::Whole
    };
    (http::Response::from_parts(parts, ()), body, timing)
}

/// Sends the request and waits for the response headers until `deadline`.
async fn send(
    state: &AppState,
    head: upstream::Head<'_>,
    body: RequestBody,
    deadline: Instant,
    kind: TimeoutKind,
    limit: u64,
    record: &RequestRecord,
) -> Result<http::Response<ResponseBody>, ProxyError> {
    // The exchange first: when the answer has come, the cut no longer matters. (Its connection's
    // task polls this again when the cut comes: see `Cut`.)
    let mut exchange = std::pin::pin!(state.upstream.send(head, body, deadline));
    let sent = std::future::poll_fn(|cx| match exchange.as_mut().poll(cx) {
        Poll::Ready(sent) => Poll::Ready(Some(sent)),
        Poll::Pending if state.cut.is_seen() => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await;
    let Some(sent) = sent else {
        return Err(ProxyError::DrainTimeout);
    };
    match sent {
        Err(UpstreamError::Timeout) => Err(ProxyError::Timeout(kind)),
        Err(error) => Err(classify(&error, limit, record)),
        Ok(response) => Ok(response),
    }
}

/// Reads a body whose declared length is small; hyper ends it with an error if fewer bytes come.
async fn read_whole(body: Body, deadline: Instant) -> Result<bytes::Bytes, ProxyError> {
    match tokio::time::timeout_at(deadline, http_body_util::BodyExt::collect(body)).await {
        Err(_) => Err(ProxyError::BodyTimeout),
        Ok(Err(_)) => Err(ProxyError::BadRequest("the request body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The request target sent upstream: the base URL's path prefix, then the request's path and
/// query, byte for byte, in origin form (the path `/` when an absolute-form target had none);
/// or `*` for `OPTIONS *`, the only request that may have it (RFC 9112 section 3.2.4).
fn upstream_target<'a>(
    prefix: &str,
    method: &http::Method,
    uri: &'a http::Uri,
) -> Result<Cow<'a, str>, ProxyError> {
    let path_and_query = uri.path_and_query().map_or("/", |target| target.as_str());
    if path_and_query == "*" {
        return if method == http::Method::OPTIONS {
            Ok(Cow::Borrowed(path_and_query))
        } else {
            Err(ProxyError::BadRequest(
                "the request target `*` is for OPTIONS only",
            ))
        };
    }
    let slash = if path_and_query.starts_with('/') {
        ""
    } else {
        "/"
    };
    if prefix.is_empty() && slash.is_empty() {
        return Ok(Cow::Borrowed(path_and_query));
    }
    let target = format!("{prefix}{slash}{path_and_query}");
    http::uri::PathAndQuery::try_from(target.as_str())
        .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))?;
    Ok(Cow::Owned(target))
}

/// Whether the path has a `.` or `..` segment, plain or percent-encoded. URL handling resolves
/// them, so vLLM would get another path than the client sent (and a base path prefix could be
/// escaped); such a request is refused instead. `\` counts as a separator, as URLs treat it.
fn has_dot_segment(path: &str) -> bool {
    path.split(['/', '\\']).any(|segment| {
        [".", "..", "%2e", ".%2e", "%2e.", "%2e%2e"]
            .iter()
            .any(|dots| segment.eq_ignore_ascii_case(dots))
    })
}

/// Why a waiting request gives up: the drain before a stop began, or `drain_timeout` expired.
fn gave_up(state: &AppState) -> ProxyError {
    if state.cut.token.is_cancelled() {
        ProxyError::DrainTimeout
    } else {
        ProxyError::ShuttingDown
    }
}

/// After a refused connection: waits until the child that refused is replaced by a ready one.
/// False when it is not replaced within `ready_wait_timeout` or is gone for good; the drain
/// before a stop (or the end of an upgrade's) ends the wait with 503.
async fn wait_for_replacement(
    state: &AppState,
    config: &Config,
    refused_by: Option<u32>,
) -> Result<bool, ProxyError> {
    let Some(wait) = config.ready_wait_timeout() else {
        return Ok(false);
    };
    let mut status = state.status.clone();
    let replaced = status.wait_for(|status| {
        (status.accepts_requests() && status.serving_pid() != refused_by)
            || !status.may_become_ready()
    });
    tokio::select! {
        result = tokio::time::timeout(wait, replaced) => {
            Ok(matches!(result, Ok(Ok(status)) if status.accepts_requests()))
        }
        () = state.give_up.cancelled() => Err(gave_up(state)),
    }
}

/// Checks the client's key when the gateway has its own keys. A client key is for the gateway
/// only: it is removed, and the upstream key (if any) is injected in its place.
fn authorize(config: &Config, headers: &mut HeaderMap) -> Result<(), ProxyError> {
    if config.proxy.api_keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 11.1), as vLLM treats it.
        .and_then(|value| {
            let (scheme, key) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key)
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(ProxyError::Unauthorized);
    };
    // Compare against every key without stopping early, so timing does not tell which matched.
    let matched = config.proxy.api_keys.iter().fold(false, |matched, key| {
        matched | constant_time_eq(key.expose(), presented)
    });
    if !matched {
        return Err(ProxyError::Unauthorized);
    }
    headers.remove(header::AUTHORIZATION);
    Ok(())
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Under `serve`, holds the request while the child is not ready, up to `ready_wait_timeout`
/// from `since`.
pub async fn wait_until_ready(
    state: &AppState,
    config: &Config,
    since: Instant,
) -> Result<(), ProxyError> {
    let Some(wait) = config.ready_wait_timeout() else {
        return Ok(());
    };
    if state.status_copy.readiness().accepts_requests {
        return Ok(());
    }
    let not_ready = || {
        let status = state.status.borrow();
        ProxyError::NotReady {
            retry_after_secs: status.retry_after_secs(),
            why: status.describe(),
        }
    };
    if wait.is_zero() || !state.status.borrow().may_become_ready() {
        return Err(not_ready());
    }
    let mut status = state.status.clone();
    tokio::select! {
        result = tokio::time::timeout_at(since + wait, status.wait_for(|status| status.accepts_requests() || !status.may_become_ready())) => {
            match result {
                Ok(Ok(status)) if status.accepts_requests() => Ok(()),
                _ => Err(not_ready()),
            }
        }
        () = state.give_up.cancelled() => Err(gave_up(state)),
    }
}

/// Maps a failed upstream exchange to what the client is told.
fn classify(error: &UpstreamError, limit: u64, record: &RequestRecord) -> ProxyError {
    match error {
        UpstreamError::Body(cause) if cause.is::<BodyTooLarge>() => {
            ProxyError::BodyTooLarge { limit }
        }
        UpstreamError::Body(_) => ProxyError::BadRequest("the request body could not be read"),
        UpstreamError::Protocol(reason) => {
            // Never vLLM's way: whoever answers on its port is worth a look.
            tracing::warn!(request_id = %record.request_id(), reason, "vLLM's response could not be read");
            ProxyError::Unavailable(Unavailable::Invalid)
        }
        error => {
            tracing::debug!(request_id = %record.request_id(), error = %error, "upstream error");
            match error {
                UpstreamError::ConnectTimeout => ProxyError::Timeout(TimeoutKind::Connect),
                UpstreamError::Connect(_) => ProxyError::Unavailable(Unavailable::Connect),
                _ => ProxyError::Unavailable(Unavailable::Reset),
            }
        }
    }
}

/// The client's `x-request-id` when it is sane (bounded length, URL-safe characters), else a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(&X_REQUEST_ID) {
        let bytes = value.as_bytes();
        let sane = !bytes.is_empty()
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if sane {
            return value.clone();
        }
    }
    // Eight digits at a time (a digit at a time, shifting a u128, cost 150 instructions a
    // request; a table lookup a digit, unrolled, 700 bytes of code).
    let mut buffer = [0u8; 32];
    let id = fastrand::u128(..);
    for (index, digits) in buffer.chunks_exact_mut(8).enumerate() {
        digits.copy_from_slice(&hex_digits((id >> (96 - 32 * index)) as u32));
    }
    HeaderValue::from_bytes(&buffer).expect("hex digits are a valid header value")
}

/// The eight lowercase hex digits of `value`, the first the highest, worked out in the eight
/// bytes of one integer at once.
fn hex_digits(value: u32) -> [u8; 8] {
    // Each nibble to a byte of its own, the highest in the highest byte.
    let spread = u64::from(value);
    let spread = (spread | spread << 16) & 0x0000_ffff_0000_ffff;
    let spread = (spread | spread << 8) & 0x00ff_00ff_00ff_00ff;
    let nibbles = (spread | spread << 4) & 0x0f0f_0f0f_0f0f_0f0f;
    // A byte of 10 or more gets the distance from '0' + 10 to 'a' added; no byte carries over.
    let letters = ((nibbles + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (nibbles + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_client_request_ids_are_kept_and_others_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        assert_eq!(request_id(&headers), "abc-123_x.y:z");
        headers.insert(
            &X_REQUEST_ID,
            HeaderValue::from_static("bad id with spaces"),
        );
        let generated = request_id(&headers);
        assert_eq!(generated.len(), 32);
        assert!(
            generated
                .to_str()
                .expect("ascii")
                .bytes()
                .all(|b| b.is_ascii_hexdigit())
        );
        assert_ne!(generated, request_id(&headers), "fresh ids differ");
        // 128 random bits in hex, the first digit the highest.
        fastrand::seed(7);
        let generated = request_id(&HeaderMap::new());
        fastrand::seed(7);
        assert_eq!(generated, format!("{:032x}", fastrand::u128(..)));
    }

    #[test]
    fn hex_digits_are_those_format_writes() {
        let edges = [0, 9, 10, 15, 0x0123_4567, 0x89ab_cdef, u32::MAX];
        let random = (0..1000).map(|_| fastrand::u32(..));
        for value in edges.into_iter().chain(random) {
            let digits = String::from_utf8(hex_digits(value).to_vec());
            assert_eq!(digits, Ok(format!("{value:08x}")));
        }
    }

    #[test]
    fn upstream_targets_keep_the_path_and_query_bytes() {
        let target = |prefix: &str, uri: &str| {
            upstream_target(prefix, &http::Method::GET, &uri.parse().expect("uri"))
                .expect("target")
                .to_string()
        };
        assert_eq!(
            target("", "/v1/responses?stream=true&x=%20"),
            "/v1/responses?stream=true&x=%20"
        );
        assert_eq!(
            target("/llm", "/v1/models/org%2Fname"),
            "/llm/v1/models/org%2Fname"
        );
        assert_eq!(target("", "http://gateway:1/health?a"), "/health?a");
        assert_eq!(target("/llm", "/health"), "/llm/health");
        assert_eq!(target("", "http://gateway:1?a"), "/?a");
        assert_eq!(target("/llm", "http://gateway:1?a"), "/llm/?a");
        let star = "*".parse().expect("asterisk-form");
        assert_eq!(
            upstream_target("", &http::Method::OPTIONS, &star).expect("OPTIONS *"),
            "*"
        );
        assert!(upstream_target("", &http::Method::GET, &star).is_err());
    }

    #[test]
    fn dot_segments_are_found_in_every_spelling() {
        for path in [
            "/v1/../health",
            "/v1/./models",
            "/v1/%2e%2e/x",
            "/v1/%2E./x",
            "/v1/.%2e",
            "/v1\\..\\x",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/v1/models/org.name",
            "/v1/...",
            "/v1/responses/resp_1",
            "/",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
