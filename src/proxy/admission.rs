//! Admission control: at most `max_concurrent_requests` proxied requests are served at once by the
//! whole gateway, whichever worker thread accepted them; past that, requests wait for a turn first
//! in, first out, at most `max_queued_requests` of them and each for at most `queue_timeout`, and
//! the rest get 429. The gateway's own endpoints never come here.
//!
//! It owns one `tokio::sync::Semaphore` (fair, and usable from every worker's runtime) and the
//! count of requests waiting on it. A request's permit lives in its response body
//! ([`hold`]), so a stream holds its turn until it ends or the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use metrics::{counter, gauge, histogram};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;
use crate::proxy::errors::{ProxyError, Rejected};

/// The gateway-wide limit, shared by every worker (its state is cloned per worker around one
/// `Arc<Admission>`).
pub struct Admission {
    /// `None` when `max_concurrent_requests` is 0: no limit, and nothing to wait for.
    permits: Option<Arc<Semaphore>>,
    /// Requests waiting on `permits` now: the queue's depth, bounded by `max_queued_requests`.
    queued: AtomicU32,
}

/// A request's turn; dropping it gives the turn to the next request in the queue.
pub type Permit = OwnedSemaphorePermit;

impl Admission {
    /// `limit` is `max_concurrent_requests`, read once: the semaphore is sized at start.
    pub fn new(limit: u32) -> Self {
        let permits = (limit > 0).then(|| {
            gauge!("gateway_queue_depth").set(0.0);
            Arc::new(Semaphore::new((limit as usize).min(Semaphore::MAX_PERMITS)))
        });
        Admission {
            permits,
            queued: AtomicU32::new(0),
        }
    }

    /// Waits for the request's turn. `None` when there is no limit; 429 when the queue is full
    /// or the wait outlasts `queue_timeout`; 503 when the drain begins meanwhile.
    pub async fn admit(
        &self,
        proxy: &ProxyConfig,
        draining: &CancellationToken,
    ) -> Result<Option<Permit>, ProxyError> {
        let Some(permits) = &self.permits else {
            return Ok(None);
        };
        // A free permit goes to a waiter first, so this never jumps the queue.
        if let Ok(permit) = Arc::clone(permits).try_acquire_owned() {
            return Ok(Some(permit));
        }
        let max_queued = proxy.max_queued_requests;
        let joined = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < max_queued).then_some(queued + 1)
            });
        let Ok(depth) = joined else {
            return Err(reject(Rejected::QueueFull));
        };
        gauge!("gateway_queue_depth").set(f64::from(depth + 1));
        let _waiting = Waiting(&self.queued);
        let since = Instant::now();
        let turn = tokio::time::timeout(proxy.queue_timeout, Arc::clone(permits).acquire_owned());
        let outcome = tokio::select! {
            turn = turn => match turn {
                Ok(Ok(permit)) => Ok(Some(permit)),
                // The semaphore is never closed; a closed one would mean no turn ever.
                Ok(Err(_)) | Err(_) => Err(reject(Rejected::QueueTimeout)),
            },
            () = draining.cancelled() => Err(ProxyError::ShuttingDown),
        };
        histogram!("gateway_queue_wait_seconds").record(since.elapsed().as_secs_f64());
        outcome
    }
}

/// Counts a rejection and makes its error.
fn reject(rejected: Rejected) -> ProxyError {
    counter!("gateway_requests_rejected_total", "reason" => rejected.reason()).increment(1);
    ProxyError::TooManyRequests(rejected)
}

/// Leaves the queue however the wait ends (a turn, a timeout, the client gone).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let left = self.0.fetch_sub(1, Ordering::AcqRel) - 1;
        gauge!("gateway_queue_depth").set(f64::from(left));
    }
}

/// The response body, holding the request's turn until the body ends or is dropped.
pub fn hold<B>(body: B, permit: Option<Permit>) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    match permit {
        None => Body::new(body),
        Some(permit) => Body::new(Held {
            inner: body,
            permit: Some(permit),
        }),
    }
}

struct Held<B> {
    inner: B,
    /// Given back as soon as the body is over, even if the server keeps the body a while.
    permit: Option<Permit>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.permit = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
