//! Server-sent events: one body chunk per event, paced, and dying or stalling mid-stream where
//! the knobs say.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, stream};
use tokio::sync::watch;
use tokio::time::sleep;

use crate::log::{complain, exit_now};

/// How long an exit waits after its last response chunk so that the kernel has it before we go.
pub(crate) const FLUSH_GRACE: Duration = Duration::from_millis(100);

/// How a stream paces and ends its events.
#[derive(Debug, Clone)]
pub(crate) struct Pacing {
    pub(crate) delay: Duration,
    pub(crate) die_after: Option<usize>,
    pub(crate) stall_after: Option<usize>,
    /// Turns true when the server begins to shut down, which aborts the stream.
    pub(crate) stopping: watch::Receiver<bool>,
}

/// Given how many events a stream has sent, the events that end it when the server aborts it.
pub(crate) type AbortTail = Arc<dyn Fn(usize) -> Vec<Bytes> + Send + Sync>;

/// A server-sent-events response sending each event as one body chunk. With an abort tail, a
/// shutdown that begins while the stream runs ends it with that tail, as vLLM aborts its
/// requests when it stops; without one, the stream runs on through the shutdown grace.
pub(crate) fn event_stream(
    events: Arc<[Bytes]>,
    pacing: Pacing,
    abort: Option<AbortTail>,
) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        )],
        Body::from_stream(paced_events(events, pacing, abort)),
    )
        .into_response()
}

/// Where a stream is: the next event to send, or the abort tail it is sending instead.
struct Cursor {
    next: usize,
    tail: Option<VecDeque<Bytes>>,
}

/// Yields the events one by one, pausing between them, dying or stalling where the knobs say,
/// and switching to the abort tail once the server stops. The die and stall checks run when the
/// stream is polled for the event after the Nth, so that the Nth has been handed to the
/// connection by then.
pub(crate) fn paced_events(
    events: Arc<[Bytes]>,
    pacing: Pacing,
    abort: Option<AbortTail>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let start = Cursor {
        next: 0,
        tail: None,
    };
    stream::unfold(start, move |mut cursor: Cursor| {
        let events = Arc::clone(&events);
        let pacing = pacing.clone();
        let abort = abort.clone();
        async move {
            if let Some(tail) = &mut cursor.tail {
                let event = tail.pop_front()?;
                return Some((Ok(event), cursor));
            }
            let next = cursor.next;
            if pacing.die_after == Some(next) {
                die_mid_stream(next).await;
            }
            if pacing.stall_after == Some(next) {
                std::future::pending::<()>().await;
            }
            let event = events.get(next)?.clone();
            if let Some(abort) = abort.filter(|_| next > 0) {
                let stopped = if pacing.delay.is_zero() {
                    *pacing.stopping.borrow()
                } else {
                    tokio::select! {
                        () = sleep(pacing.delay) => *pacing.stopping.borrow(),
                        () = stopped(pacing.stopping.clone()) => true,
                    }
                };
                if stopped {
                    let mut tail: VecDeque<Bytes> = abort(next).into();
                    let event = tail.pop_front()?;
                    cursor.tail = Some(tail);
                    return Some((Ok(event), cursor));
                }
            } else if next > 0 && !pacing.delay.is_zero() {
                sleep(pacing.delay).await;
            }
            cursor.next = next + 1;
            Some((Ok(event), cursor))
        }
    })
}

/// Resolves once the server is stopping; never, if it cannot tell.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub(crate) async fn die_mid_stream(sent: usize) -> ! {
    complain(format_args!(
        "ERROR:    exiting with code 1 after {sent} stream events as MOCK_VLLM_DIE_MID_STREAM asks"
    ));
    // The connection may still hold the last event in its write buffer; while this future is
    // pending it flushes it.
    sleep(FLUSH_GRACE).await;
    exit_now(1)
}
