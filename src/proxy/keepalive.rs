//! Waiting streams kept alive: under `serve`, a streaming request (`"stream": true` in a body small
//! enough to be read whole) that has waited `stream_keepalive_after` for vLLM to become ready gets
//! `200 text/event-stream` at once, and an SSE comment every `stream_keepalive_interval`
//! (`: waiting for the model server: loading, 42 s`) until vLLM answers, so that clients and
//! proxies that give up on a silent connection keep waiting. vLLM's stream then follows as it
//! comes; a vLLM that answers anything but a stream, or a wait that runs out, ends the stream with
//! the final `error` event carrying the status and code the client would have got.
//!
//! The waiting and relaying run in a task of the worker's runtime that feeds the response body
//! through a channel; it owns the request, its access record and its admission permit, and ends
//! (dropping the request to vLLM) as soon as the client goes away.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderName, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt as _;
use metrics::counter;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Config;
use crate::lifecycle::state::ChildState;
use crate::proxy::admission::Permit;
use crate::proxy::body::{Timing, UpstreamBody};
use crate::proxy::errors::{ProxyError, status_event};
use crate::proxy::state::{AppState, Live};
use crate::proxy::upstream::ResponseBody;
use crate::status::UpstreamStatus;
use crate::telemetry::RequestRecord;

static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// vLLM's answer: the response head, its body, how the body is timed, when it was sent.
pub type Answer = (http::Response<()>, ResponseBody, Timing, Instant);

/// The rest of a request's way to vLLM (`forward` makes it: wait until ready, then send), given
/// the request's record to log against. This module never calls `forward` itself, which calls it.
pub type Exchange = Box<
    dyn for<'a> FnOnce(
            &'a RequestRecord,
        )
            -> Pin<Box<dyn Future<Output = Result<Answer, ProxyError>> + Send + 'a>>
        + Send,
>;

/// How much of a non-stream answer from vLLM is read to find its error code.
const ERROR_BODY_MAX: usize = 64 * 1024;

/// How long this request may wait silently before its stream begins: `Some` only under `serve`,
/// with keep-alive on, while vLLM is not ready (but may become so), for a streaming request.
/// `body` is the request body, when it was read whole.
pub fn after(state: &AppState, config: &Config, body: Option<&[u8]>) -> Option<Duration> {
    let serve = config.serve.as_ref()?;
    if serve.stream_keepalive_after.is_zero() || serve.ready_wait_timeout.is_zero() {
        return None;
    }
    if state.status_copy.readiness().accepts_requests {
        return None;
    }
    if !state.status.borrow().may_become_ready() {
        return None;
    }
    wants_stream(body?).then_some(serve.stream_keepalive_after)
}

/// Whether a JSON body asks for a stream (`"stream": true` at its top level).
fn wants_stream(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Stream {
        #[serde(default)]
        stream: serde_json::Value,
    }
    serde_json::from_slice::<Stream>(body).is_ok_and(|body| body.stream == true)
}

/// Begins the stream of a request still waiting for vLLM since `admitted`, and leaves the rest
/// (`exchange`, then relaying) to a task. `live` is the request's configuration.
pub fn respond(
    state: Arc<AppState>,
    live: Arc<Live>,
    admitted: Instant,
    exchange: Exchange,
    mut record: RequestRecord,
    permit: Option<Permit>,
) -> Response {
    record.set_response(StatusCode::OK.as_u16(), true);
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        let outcome = relay(&state, &live.config, admitted, exchange, record, &sender).await;
        counter!("gateway_waiting_streams_total", "outcome" => outcome).increment(1);
        drop(permit);
    });
    let mut response = Response::new(Body::new(Channel(receiver)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
    response
}

/// Waits for vLLM with comments, then relays its answer. Returns the `outcome` label.
async fn relay(
    state: &AppState,
    config: &Config,
    admitted: Instant,
    exchange: Exchange,
    mut record: RequestRecord,
    sender: &mpsc::Sender<Bytes>,
) -> &'static str {
    let interval = config
        .serve
        .as_ref()
        .map_or(Duration::from_secs(10), |serve| {
            serve.stream_keepalive_interval
        });
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut comment_bytes = 0;
    // In a block of its own, so that the exchange's borrow of the record ends with it.
    let result = {
        let mut exchange = exchange(&record);
        loop {
            tokio::select! {
                result = &mut exchange => break result,
                _ = ticker.tick() => {
                    let line = comment(&state.status.borrow(), admitted);
                    comment_bytes += line.len();
                    if sender.send(line).await.is_err() {
                        return "client_disconnect";
                    }
                }
                () = sender.closed() => return "client_disconnect",
                () = state.cut.token.cancelled() => break Err(ProxyError::DrainTimeout),
            }
        }
    };
    record.add_bytes(comment_bytes);
    let (head, body, timing, sent_at) = match result {
        Ok(forwarded) => forwarded,
        Err(error) => {
            tracing::warn!(request_id = %record.request_id(), error = %error, "waiting stream failed");
            record.set_error(error.metric_kind());
            return finish(&mut record, sender, error.sse_event_with_status(), "failed").await;
        }
    };
    let status = head.status();
    if status != StatusCode::OK || !matches!(timing, Timing::Stream { .. }) {
        let deadline = sent_at + config.proxy.request_timeout;
        let limited = http_body_util::Limited::new(body, ERROR_BODY_MAX);
        let bytes = tokio::time::timeout_at(deadline, limited.collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        let error = upstream_error(status, &bytes);
        tracing::warn!(request_id = %record.request_id(), status = status.as_u16(), "vLLM answered a waiting stream with an error");
        return finish(
            &mut record,
            sender,
            status_event(status.as_u16(), &error),
            "upstream_error",
        )
        .await;
    }
    let deadline = sent_at + config.proxy.request_timeout;
    let mut body = UpstreamBody::new(body, timing, deadline, &state.cut, record);
    // This task is no connection's, so it watches the cut for its body itself (see `Cut`).
    let mut cut = std::pin::pin!(state.cut.token.cancelled());
    let mut next_frame = |cx: &mut Context<'_>| {
        if !state.cut.is_seen() && cut.as_mut().poll(cx).is_ready() {
            state.cut.see();
        }
        http_body::Body::poll_frame(Pin::new(&mut body), cx)
    };
    while let Some(frame) = std::future::poll_fn(&mut next_frame).await {
        let Ok(frame) = frame else {
            return "failed";
        };
        if let Ok(data) = frame.into_data()
            && sender.send(data).await.is_err()
        {
            return "client_disconnect";
        }
    }
    "relayed"
}

/// Sends the final event and notes the request as answered.
async fn finish(
    record: &mut RequestRecord,
    sender: &mpsc::Sender<Bytes>,
    event: Bytes,
    outcome: &'static str,
) -> &'static str {
    record.add_bytes(event.len());
    if sender.send(event).await.is_err() {
        return "client_disconnect";
    }
    record.set_complete();
    outcome
}

/// `: waiting for the model server: loading, 42 s`, with the child's state in words and the
/// seconds waited so far.
fn comment(status: &UpstreamStatus, since: Instant) -> Bytes {
    let state = match status {
        UpstreamStatus::Child(child) => match child.state {
            ChildState::Starting { .. } => "loading",
            ref other => other.name(),
        },
        UpstreamStatus::External(_) => "not ready",
    };
    let waited = since.elapsed().as_secs();
    Bytes::from(format!(
        ": waiting for the model server: {state}, {waited} s\n\n"
    ))
}

/// The OpenAI `error` object of vLLM's answer: its own when it sent one (`{"error": {...}}`, or
/// the older flat `{"message", "type", "code"}`), else one that names the status.
fn upstream_error(status: StatusCode, body: &[u8]) -> serde_json::Value {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(parsed) = parsed {
        if parsed["error"].is_object() {
            return parsed["error"].clone();
        }
        if parsed["message"].is_string() {
            return serde_json::json!({
                "message": parsed["message"],
                "type": parsed["type"],
                "param": parsed["param"],
                "code": parsed["code"],
            });
        }
    }
    let message = if status == StatusCode::OK {
        "the model server answered a streaming request without a stream".to_string()
    } else {
        format!("the model server answered {}", status.as_u16())
    };
    serde_json::json!({
        "message": message,
        "type": "upstream_error",
        "param": null,
        "code": "upstream_error",
    })
}

/// The response body: what the task sends, as it sends it.
struct Channel(mpsc::Receiver<Bytes>);

impl http_body::Body for Channel {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|data| Ok(Frame::data(data))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_top_level_stream_true_asks_for_a_stream() {
        assert!(wants_stream(br#"{"model":"m","stream":true}"#));
        assert!(!wants_stream(br#"{"model":"m","stream":false}"#));
        assert!(!wants_stream(br#"{"model":"m","stream":"true"}"#));
        assert!(!wants_stream(br#"{"model":"m","input":{"stream":true}}"#));
        assert!(!wants_stream(b"not json"));
    }

    #[test]
    fn vllms_error_object_is_kept_and_a_bare_status_is_named() {
        let nested =
            br#"{"error":{"message":"no","type":"NotFoundError","param":"model","code":404}}"#;
        assert_eq!(
            upstream_error(StatusCode::NOT_FOUND, nested)["type"],
            "NotFoundError"
        );
        let flat = br#"{"object":"error","message":"busy","type":"ServiceUnavailableError","param":null,"code":503}"#;
        assert_eq!(
            upstream_error(StatusCode::SERVICE_UNAVAILABLE, flat)["code"],
            503
        );
        let bare = upstream_error(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(bare["code"], "upstream_error");
        assert_eq!(bare["message"], "the model server answered 502");
    }
}
