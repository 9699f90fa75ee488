//! Server-sent events: one body chunk per event, paced, and dying or stalling mid-stream where
//! the knobs say.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, stream};
use tokio::time::sleep;

use crate::log::{complain, exit_now};

/// How long an exit waits after its last response chunk so that the kernel has it before we go.
pub(crate) const FLUSH_GRACE: Duration = Duration::from_millis(100);

/// How a stream paces and ends its events.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    pub(crate) delay: Duration,
    pub(crate) die_after: Option<usize>,
    pub(crate) stall_after: Option<usize>,
}

/// A server-sent-events response sending each event as one body chunk.
pub(crate) fn event_stream(events: Arc<[Bytes]>, pacing: Pacing) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        )],
        Body::from_stream(paced_events(events, pacing)),
    )
        .into_response()
}

/// Yields the events one by one, pausing between them and dying or stalling where the knobs say.
/// The die and stall checks run when the stream is polled for the event after the Nth, so that the
/// Nth has been handed to the connection by then.
pub(crate) fn paced_events(
    events: Arc<[Bytes]>,
    pacing: Pacing,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    stream::unfold(0, move |next: usize| {
        let events = Arc::clone(&events);
        async move {
            if pacing.die_after == Some(next) {
                die_mid_stream(next).await;
            }
            if pacing.stall_after == Some(next) {
                std::future::pending::<()>().await;
            }
            let event = events.get(next)?.clone();
            if next > 0 && !pacing.delay.is_zero() {
                sleep(pacing.delay).await;
            }
            Some((Ok(event), next + 1))
        }
    })
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
