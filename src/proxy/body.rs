//! Body wrappers on the hot path. They forward `Bytes` frames as they arrive (no collecting, no
//! re-framing) and add only what the proxy must enforce:
//!
//! - [`LimitedBody`]: the request body, cut off with [`BodyTooLarge`] past `max_body_bytes`.
//! - [`UpstreamBody`]: the response body, with the stream-idle or whole-request deadline, ending an
//!   event stream that broke (or outlasted a drain) with a final SSE `error` event instead of a
//!   hang or a silent cut.
//!
//! Backpressure is preserved: a frame is read from the upstream only when the client side polls
//! for the next one, so a slow client slows the upstream instead of growing a buffer here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::proxy::errors::{ProxyError, TimeoutKind, Unavailable};
use crate::proxy::timer::Timer;
use crate::proxy::wake::{Cut, CutFlag};
use crate::telemetry::RequestRecord;

/// The request body grew past the configured limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit")]
pub struct BodyTooLarge;

/// The client's side of the request body failed (it went away, or sent a malformed body): not
/// the upstream's fault.
#[derive(Debug, thiserror::Error)]
#[error("the request body could not be read: {0}")]
pub struct ClientBodyError(axum::Error);

pub struct LimitedBody {
    inner: axum::body::Body,
    remaining: u64,
    /// Set once the whole body has been read, so that a timeout while it was still arriving is
    /// blamed on the client.
    finished: Arc<AtomicBool>,
}

impl LimitedBody {
    pub fn new(inner: axum::body::Body, limit: u64, finished: Arc<AtomicBool>) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
            finished,
        }
    }
}

/// Trailers are not forwarded: vLLM never reads request trailers.
impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            let Some(frame) = ready!(Pin::new(&mut self.inner).poll_frame(cx)) else {
                self.finished.store(true, Ordering::Relaxed);
                return Poll::Ready(None);
            };
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_trailers) => continue,
                },
                Err(error) => return Poll::Ready(Some(Err(Box::new(ClientBodyError(error))))),
            };
            let len = data.len() as u64;
            if len > self.remaining {
                self.remaining = 0;
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
            }
            self.remaining -= len;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    // Not `is_end_stream`: the body is read to its final `None`, which is what marks it finished.

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body is timed.
pub enum Timing {
    /// An event stream: the deadline moves forward by `idle` with every frame.
    Stream { idle: Duration },
    /// Any other body: one deadline for the whole response.
    Whole,
}

/// `B` is vLLM's response body (`upstream::ResponseBody`).
pub struct UpstreamBody<B> {
    inner: B,
    timing: Timing,
    deadline: Instant,
    /// Armed only when the body has to wait for vLLM: a body read at once never touches it.
    timer: Timer,
    /// For a stream: seen once `drain_timeout` expires, which ends it with the error event.
    cut: Option<CutFlag>,
    /// Whether the bytes forwarded so far end on an SSE event boundary (`\n\n`), so a final
    /// error event can be framed correctly.
    at_boundary: bool,
    /// Set once the body has ended, normally or with the final error event.
    done: bool,
    record: RequestRecord,
}

impl<B: Body<Data = Bytes> + Unpin> UpstreamBody<B> {
    /// `cut` ends a stream with the SSE `error` event once seen (`AppState::cut`: whatever polls
    /// the body is woken for it, see [`Cut`]).
    pub fn new(
        inner: B,
        timing: Timing,
        deadline: Instant,
        cut: &Cut,
        record: RequestRecord,
    ) -> Self {
        let deadline = match timing {
            Timing::Stream { idle } => Instant::now() + idle,
            Timing::Whole => deadline,
        };
        // The server never polls a body that is already over (HEAD, 204, 304, an empty 200), so
        // such a response is complete from the start, not a client that went away.
        let mut record = record;
        if inner.is_end_stream() {
            record.set_complete();
        }
        let cut = match timing {
            Timing::Stream { .. } => Some(cut.flag()),
            Timing::Whole => None,
        };
        UpstreamBody {
            inner,
            timing,
            deadline,
            timer: Timer::default(),
            cut,
            at_boundary: true,
            done: false,
            record,
        }
    }

    fn fail(&mut self, error: ProxyError) -> Poll<Option<Result<Frame<Bytes>, BodyFailed>>> {
        self.done = true;
        tracing::warn!(request_id = %self.record.request_id(), error = %error, "upstream response broke off");
        self.record.set_error(error.metric_kind());
        match self.timing {
            Timing::Stream { .. } => {
                let event = error.sse_event(self.at_boundary);
                self.record.add_bytes(event.len());
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            // A plain body cannot carry an error once its headers went out; failing the body makes
            // the server abort the connection, so the client sees a truncated response, not a hang.
            Timing::Whole => Poll::Ready(Some(Err(BodyFailed(error)))),
        }
    }
}

/// The error a plain response body ends with when the upstream broke off.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyFailed(ProxyError);

impl<B> Body for UpstreamBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BodyFailed;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.cut.as_ref().is_some_and(CutFlag::is_seen) {
            return this.fail(ProxyError::DrainTimeout);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !data.is_empty() {
                        this.at_boundary = data.ends_with(b"\n\n");
                    }
                    this.record.add_bytes(data.len());
                }
                if let Timing::Stream { idle } = this.timing {
                    this.deadline = Instant::now() + idle;
                }
                // The server stops polling once a sized body is complete (or after trailers),
                // so completion is noted here rather than at the final `None`.
                if this.inner.is_end_stream() || frame.is_trailers() {
                    this.record.set_complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                tracing::debug!(request_id = %this.record.request_id(), error = %error, "upstream body error");
                this.fail(ProxyError::Unavailable(Unavailable::Reset))
            }
            Poll::Ready(None) => {
                this.done = true;
                this.record.set_complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !this.timer.expired(this.deadline, cx) {
                    return Poll::Pending;
                }
                let kind = match this.timing {
                    Timing::Stream { .. } => TimeoutKind::StreamIdle,
                    Timing::Whole => TimeoutKind::Request,
                };
                this.fail(ProxyError::Timeout(kind))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
