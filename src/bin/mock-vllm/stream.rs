//! Server-sent events: one body chunk per event, paced, dying or stalling mid-stream where the
//! knobs say, and ended as vLLM ends them when the server stops or the engine dies.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, stream};
use tokio::sync::watch;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

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
    /// Cancelled when the engine dies, which ends the stream as its [`DeathEnding`] says.
    pub(crate) engine_died: CancellationToken,
}

/// Given how many events a stream has sent, the events that end it when the server aborts it.
pub(crate) type AbortTail = Arc<dyn Fn(usize) -> Vec<Bytes> + Send + Sync>;

/// How a stream in flight ends when the engine dies under it, as vLLM's generators end it.
#[derive(Clone)]
pub(crate) enum DeathEnding {
    /// These events, then the end: a chat stream's error chunk and `[DONE]`.
    Tail(Arc<[Bytes]>),
    /// The body fails, which cuts the connection before the chunked body's end: vLLM's Responses
    /// stream lets `EngineDeadError` escape, and uvicorn closes the connection.
    Cut,
}

/// Why a stream in flight stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interruption {
    Stopping,
    EngineDied,
}

/// The error that cuts a stream whose engine died.
#[derive(Debug)]
pub(crate) struct EngineDied;

impl std::fmt::Display for EngineDied {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("the engine died")
    }
}

impl std::error::Error for EngineDied {}

/// A server-sent-events response sending each event as one body chunk. With an abort tail, a
/// shutdown that begins while the stream runs ends it with that tail, as vLLM aborts its
/// requests when it stops; without one, the stream runs on through the shutdown grace. The
/// engine's death ends it as `death` says.
pub(crate) fn event_stream(
    events: Arc<[Bytes]>,
    pacing: Pacing,
    abort: Option<AbortTail>,
    death: DeathEnding,
) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        )],
        Body::from_stream(paced_events(events, pacing, abort, death)),
    )
        .into_response()
}

/// Where a stream is: the next event to send, or the tail it is sending instead, or its end.
struct Cursor {
    next: usize,
    tail: Option<VecDeque<Bytes>>,
    ended: bool,
}

/// Yields the events one by one, pausing between them, dying or stalling where the knobs say,
/// and switching to the abort tail once the server stops, or to the death ending once the engine
/// dies. The die and stall checks run when the stream is polled for the event after the Nth, so
/// that the Nth has been handed to the connection by then.
pub(crate) fn paced_events(
    events: Arc<[Bytes]>,
    pacing: Pacing,
    abort: Option<AbortTail>,
    death: DeathEnding,
) -> impl Stream<Item = Result<Bytes, EngineDied>> + Send + 'static {
    let start = Cursor {
        next: 0,
        tail: None,
        ended: false,
    };
    stream::unfold(start, move |mut cursor: Cursor| {
        let events = Arc::clone(&events);
        let pacing = pacing.clone();
        let abort = abort.clone();
        let death = death.clone();
        async move {
            if cursor.ended {
                return None;
            }
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
            let interruption = if next > 0 {
                pause(&pacing, abort.is_some()).await
            } else {
                None
            };
            let tail: VecDeque<Bytes> = match (interruption, &abort, &death) {
                // Only a stream with an abort tail is interrupted by a stop.
                (None, _, _) | (Some(Interruption::Stopping), None, _) => {
                    cursor.next = next + 1;
                    return Some((Ok(event), cursor));
                }
                (Some(Interruption::EngineDied), _, DeathEnding::Cut) => {
                    cursor.ended = true;
                    return Some((Err(EngineDied), cursor));
                }
                (Some(Interruption::EngineDied), _, DeathEnding::Tail(tail)) => {
                    tail.iter().cloned().collect()
                }
                (Some(Interruption::Stopping), Some(abort), _) => abort(next).into(),
            };
            let mut tail = tail;
            let event = tail.pop_front()?;
            cursor.tail = Some(tail);
            Some((Ok(event), cursor))
        }
    })
}

/// Waits out the pause before an event; cut short by the engine's death, and by a stop when
/// `stoppable`. Says what cut it short, the engine's death first.
async fn pause(pacing: &Pacing, stoppable: bool) -> Option<Interruption> {
    if !pacing.delay.is_zero() {
        tokio::select! {
            () = sleep(pacing.delay) => {}
            () = stopped(pacing.stopping.clone()), if stoppable => {}
            () = pacing.engine_died.cancelled() => {}
        }
    }
    if pacing.engine_died.is_cancelled() {
        Some(Interruption::EngineDied)
    } else if stoppable && *pacing.stopping.borrow() {
        Some(Interruption::Stopping)
    } else {
        None
    }
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
