//! Admission control: at most `max_concurrent_requests` proxied requests are served at once by the
//! whole gateway, whichever worker thread accepted them; past that, requests wait for a turn first
//! in, first out, at most `max_queued_requests` of them and each for at most `queue_timeout`, and
//! the rest get 429. The gateway's own endpoints never come here.
//!
//! It owns one `tokio::sync::Semaphore` (fair, and usable from every worker's runtime) and the
//! count of requests waiting on it. A request's permit lives in its response body
//! ([`hold`]), so a stream holds its turn until it ends or the client goes away.
//!
//! A reload may change the limit: the next request resizes the semaphore to it. Growing adds
//! permits; shrinking forgets free ones and owes the rest, which permits then pay as they come
//! back, so requests already served finish undisturbed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use metrics::{counter, gauge, histogram};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;
use crate::proxy::errors::{ProxyError, Rejected};

/// The gateway-wide limit, shared by every worker (its state is cloned per worker around one
/// `Arc<Admission>`).
pub struct Admission {
    permits: Arc<Semaphore>,
    /// The limit the semaphore enforces now (0: none, and nothing to wait for): read by every
    /// request, so a changed `max_concurrent_requests` is seen without a lock.
    limit: AtomicU32,
    /// Permits that exist (free or held), less those owed: what `limit` amounts to. Changed
    /// only by `resize`, under this lock.
    total: Mutex<u32>,
    /// Permits to forget as they come back, after a shrink found too few of them free.
    owed: Arc<AtomicU32>,
    /// Requests waiting on `permits` now: the queue's depth, bounded by `max_queued_requests`.
    queued: AtomicU32,
}

/// A request's turn; dropping it gives the turn to the next request in the queue (or pays a
/// permit owed by a shrink).
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    owed: Arc<AtomicU32>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take()
            && pay_one(&self.owed)
        {
            permit.forget();
        }
    }
}

/// Takes one from `owed` if anything is owed.
fn pay_one(owed: &AtomicU32) -> bool {
    owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
        owed.checked_sub(1)
    })
    .is_ok()
}

impl Admission {
    /// `limit` is `max_concurrent_requests` at start.
    pub fn new(limit: u32) -> Self {
        gauge!("gateway_queue_depth").set(0.0);
        let limit = limit.min(Semaphore::MAX_PERMITS as u32);
        Admission {
            permits: Arc::new(Semaphore::new(limit as usize)),
            limit: AtomicU32::new(limit),
            total: Mutex::new(limit),
            owed: Arc::new(AtomicU32::new(0)),
            queued: AtomicU32::new(0),
        }
    }

    /// Brings the semaphore to `limit` permits, however many are held now.
    fn resize(&self, limit: u32) {
        let limit = limit.min(Semaphore::MAX_PERMITS as u32);
        let mut total = self.total.lock();
        // Another worker's request may have resized it meanwhile.
        if limit == *total {
            self.limit.store(limit, Ordering::Release);
            return;
        }
        if limit > *total {
            let mut more = limit - *total;
            // Whatever is still owed is forgiven first.
            while more > 0 && pay_one(&self.owed) {
                more -= 1;
            }
            self.permits.add_permits(more as usize);
        } else {
            self.owed.fetch_add(*total - limit, Ordering::AcqRel);
            // Free permits pay at once, one by one, so that none is forgotten twice; the rest
            // are paid as held permits come back.
            while self.owed.load(Ordering::Acquire) > 0 {
                let Ok(permit) = self.permits.try_acquire() else {
                    break;
                };
                if pay_one(&self.owed) {
                    permit.forget();
                } else {
                    break;
                }
            }
        }
        *total = limit;
        self.limit.store(limit, Ordering::Release);
        tracing::info!(max_concurrent_requests = limit, "concurrency limit changed");
    }

    /// Waits for the request's turn. `None` when there is no limit; 429 when the queue is full
    /// or the wait outlasts `queue_timeout`; 503 when `give_up` is cancelled meanwhile (the drain
    /// before a stop, or the end of an upgrade's).
    pub async fn admit(
        &self,
        proxy: &ProxyConfig,
        give_up: &CancellationToken,
    ) -> Result<Option<Permit>, ProxyError> {
        let limit = proxy.max_concurrent_requests;
        if limit != self.limit.load(Ordering::Acquire) {
            self.resize(limit);
        }
        if limit == 0 {
            return Ok(None);
        }
        let permits = &self.permits;
        let permit = |permit| {
            Some(Permit {
                permit: Some(permit),
                owed: Arc::clone(&self.owed),
            })
        };
        // A free permit goes to a waiter first, so this never jumps the queue.
        if let Ok(free) = Arc::clone(permits).try_acquire_owned() {
            return Ok(permit(free));
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
                Ok(Ok(turn)) => Ok(permit(turn)),
                // The semaphore is never closed; a closed one would mean no turn ever.
                Ok(Err(_)) | Err(_) => Err(reject(Rejected::QueueTimeout)),
            },
            () = give_up.cancelled() => Err(ProxyError::ShuttingDown),
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
