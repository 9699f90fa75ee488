//! The proxy's errors and how they look to a client: OpenAI-shaped JSON bodies
//! (`{"error":{"message","type","param","code"}}`), or, once an event stream has begun,
//! a final SSE `error` event. Messages name what went wrong, never internals such as
//! upstream addresses or keys; the details go to the log.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("invalid request: {0}")]
    BadRequest(&'static str),
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("{0} requests are not proxied")]
    MethodNotAllowed(&'static str),
    #[error("not supported: {0}")]
    NotImplemented(&'static str),
    #[error("not found: {0}")]
    NotFound(&'static str),
    /// `why`: vLLM's state in words (`loading model: ... (42 s)`, `restart 2 in 4 s`).
    #[error("the model server is not ready: {why}")]
    NotReady { retry_after_secs: u64, why: String },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// A stream still running when `drain_timeout` expired (a stop, or an in-place upgrade).
    #[error("the stream was cut: the gateway is restarting or stopping and drain_timeout expired")]
    DrainTimeout,
    #[error("too many requests: {0}")]
    TooManyRequests(Rejected),
    #[error("the model server is unavailable: {0}")]
    Unavailable(Unavailable),
    #[error("the model server did not answer in time: {0}")]
    Timeout(TimeoutKind),
}

/// Why admission control turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// `max_queued_requests` were already waiting.
    QueueFull,
    /// It waited `queue_timeout` without getting a turn.
    QueueTimeout,
}

impl Rejected {
    /// The `reason` label of `gateway_requests_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::QueueFull => "queue_full",
            Rejected::QueueTimeout => "queue_timeout",
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rejected::QueueFull => "the request queue is full",
            Rejected::QueueTimeout => "no turn within queue_timeout",
        })
    }
}

/// Why the upstream could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Refused or unreachable: nothing was sent.
    Connect,
    /// The connection broke before a complete response arrived.
    Reset,
    /// The response head could not be read, or cannot go on to the client (malformed, too
    /// large, in a transfer coding other than chunked).
    Invalid,
}

/// Which of the proxy's timeouts expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    Connect,
    FirstByte,
    Request,
    StreamIdle,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unavailable::Connect => "connection refused or unreachable",
            Unavailable::Reset => "connection closed before the response completed",
            Unavailable::Invalid => "its response could not be read",
        })
    }
}

impl std::fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutKind::Connect => "connect timeout",
            TimeoutKind::FirstByte => "no response headers within first_byte_timeout",
            TimeoutKind::Request => "response not complete within request_timeout",
            TimeoutKind::StreamIdle => "no stream data within stream_idle_timeout",
        })
    }
}

impl ProxyError {
    /// How a proxied request went wrong, as the `kind` label of `gateway_upstream_errors_total`.
    pub fn metric_kind(&self) -> Option<&'static str> {
        Some(match self {
            ProxyError::Unavailable(Unavailable::Connect) => "connect",
            ProxyError::Timeout(TimeoutKind::Connect) => "connect",
            ProxyError::Timeout(TimeoutKind::FirstByte) => "timeout_first_byte",
            ProxyError::Timeout(TimeoutKind::Request) => "timeout_request",
            ProxyError::Timeout(TimeoutKind::StreamIdle) => "timeout_idle",
            ProxyError::Unavailable(Unavailable::Reset) => "reset_mid_stream",
            ProxyError::Unavailable(Unavailable::Invalid) => "invalid_response",
            // Not vLLM's doing, but the one way the gateway itself ends a response that vLLM
            // was still giving: without a kind, its record would blame the client.
            ProxyError::DrainTimeout => "drain_timeout",
            _ => return None,
        })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::NotReady { .. } | ProxyError::ShuttingDown | ProxyError::DrainTimeout => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Unavailable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The OpenAI `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTimeout
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::NotFound(_) => "invalid_request_error",
            ProxyError::NotReady { .. } | ProxyError::ShuttingDown | ProxyError::DrainTimeout => {
                "server_error"
            }
            // As OpenAI's own rate-limit errors say it.
            ProxyError::TooManyRequests(_) => "requests",
            ProxyError::Unavailable(_) | ProxyError::Timeout(_) => "upstream_error",
        }
    }

    /// The OpenAI `code` field: stable, for clients to match on.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "invalid_api_key",
            ProxyError::BodyTooLarge { .. } => "request_too_large",
            ProxyError::BadRequest(_) => "invalid_request",
            ProxyError::BodyTimeout => "request_timeout",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::NotFound(_) => "not_found",
            ProxyError::NotReady { .. } => "upstream_not_ready",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::DrainTimeout => "drain_timeout",
            ProxyError::TooManyRequests(_) => "too_many_requests",
            ProxyError::Unavailable(_) => "upstream_unavailable",
            ProxyError::Timeout(_) => "upstream_timeout",
        }
    }

    /// The `{"error":{...}}` object every OpenAI client understands.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": null,
                "code": self.code(),
            }
        })
    }

    /// A final SSE event for a stream that broke after its headers were sent. It carries both the
    /// Responses API's `error` event fields and the nested `error` object, which the OpenAI SDKs
    /// turn into an exception. It starts with a blank line so that it is dispatched on its own
    /// even when the upstream died halfway through an event.
    pub fn sse_event(&self, at_event_boundary: bool) -> Bytes {
        let data = serde_json::json!({
            "type": "error",
            "code": self.code(),
            "message": self.to_string(),
            "param": null,
            "error": self.body()["error"],
        });
        let prefix = if at_event_boundary { "" } else { "\n\n" };
        Bytes::from(format!("{prefix}event: error\ndata: {data}\n\n"))
    }

    /// [`ProxyError::sse_event`] for a stream whose `200` went out before any answer existed (a
    /// waiting stream kept alive): it also carries the status the client would have got.
    pub fn sse_event_with_status(&self) -> Bytes {
        status_event(self.status().as_u16(), &self.body()["error"])
    }
}

/// A final SSE `error` event carrying an HTTP status and an OpenAI `error` object (the gateway's
/// own, or vLLM's), shaped as [`ProxyError::sse_event`] is, with the status beside the code.
pub fn status_event(status: u16, error: &serde_json::Value) -> Bytes {
    let data = serde_json::json!({
        "type": "error",
        "status": status,
        "code": error["code"],
        "message": error["message"],
        "param": error["param"],
        "error": error,
    });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let retry_after_secs = match self {
            ProxyError::NotReady {
                retry_after_secs, ..
            } => Some(retry_after_secs),
            // The queue moves as requests finish: soon, but no one knows when.
            ProxyError::TooManyRequests(_) => Some(1),
            _ => None,
        };
        if let Some(retry_after_secs) = retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if let ProxyError::MethodNotAllowed(_) = self {
            // What a 405 must name (RFC 9110 section 15.5.6): every method that is proxied.
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_openai_shaped() {
        let body = ProxyError::Unavailable(Unavailable::Connect).body();
        assert_eq!(body["error"]["code"], "upstream_unavailable");
        assert_eq!(body["error"]["type"], "upstream_error");
        assert!(body["error"]["param"].is_null());
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    #[test]
    fn sse_error_event_is_framed_and_parses() {
        let event = ProxyError::Timeout(TimeoutKind::StreamIdle).sse_event(false);
        let text = std::str::from_utf8(&event).expect("utf-8");
        assert!(text.starts_with("\n\nevent: error\ndata: {"));
        assert!(text.ends_with("}\n\n"));
        let data = text
            .trim()
            .strip_prefix("event: error\ndata: ")
            .expect("data line");
        let value: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(value["type"], "error");
        assert_eq!(value["error"]["code"], "upstream_timeout");
    }
}
