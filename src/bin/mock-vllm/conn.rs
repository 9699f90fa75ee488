//! Client connections, served as uvicorn serves vLLM's API: HTTP/1.1 only, `TCP_NODELAY` on, and
//! a kept-alive connection closed once it has been idle for the keep-alive timeout.
//!
//! uvicorn (`timeout_keep_alive`, which vLLM sets from `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, 5 s by
//! default) arms its timer when a response is complete and no other request is waiting, disarms
//! it whenever bytes arrive, and when it fires closes the socket without a word. A connection that
//! has not completed a response yet is never timed out. Here each connection keeps an [`Idle`]
//! clock with the same rules: a request in flight holds it stopped until its response body ends
//! or is dropped, and every read that brings bytes stops it.
//!
//! A stop closes the listener, lets every connection finish its response in flight and closes
//! idle ones at once (hyper's graceful shutdown, as uvicorn's), and waits for all of them.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::log::complain;
use crate::state::AppState;

/// How long the accept loop pauses after an accept error that is not about one connection (out
/// of descriptors, say), as axum's and uvicorn's loops do, so that it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Accepts and serves connections until `stop` resolves, then drains them.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    state: Arc<AppState>,
    stop: impl Future<Output = ()>,
) {
    let keep_alive = state.knobs.keep_alive_timeout;
    let connections = TaskTracker::new();
    let draining = CancellationToken::new();
    tokio::pin!(stop);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    complain(format_args!("ERROR:    cannot accept a connection: {error}"));
                    tokio::select! {
                        () = &mut stop => break,
                        () = sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        set_nodelay(&stream);
        connections.spawn(serve_connection(
            stream,
            remote,
            app.clone(),
            Arc::clone(&state),
            keep_alive,
            draining.clone(),
        ));
    }
    drop(listener);
    draining.cancel();
    connections.close();
    connections.wait().await;
}

/// Serves one connection until the client closes it, a graceful stop finishes it, or it has been
/// idle for `keep_alive`.
async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    app: Router,
    state: Arc<AppState>,
    keep_alive: Duration,
    draining: CancellationToken,
) {
    let idle = Arc::new(Idle::default());
    let io = TokioIo::new(IdleIo {
        inner: stream,
        idle: Arc::clone(&idle),
    });
    let service = {
        let idle = Arc::clone(&idle);
        service_fn(move |mut request: Request<Incoming>| {
            // Taken before anything awaits, so that a request dropped half-way settles it too.
            let in_flight = InFlight::begin(Arc::clone(&idle));
            request.extensions_mut().insert(ConnectInfo(remote));
            let app = app.clone();
            async move {
                let response = match app.oneshot(request.map(Body::new)).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|inner| InFlightBody {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let connection = http1::Builder::new().serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            // A connection that fails (the client reset it, say) is simply over, as in uvicorn.
            _ = connection.as_mut() => return,
            () = draining.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle.expired(keep_alive) => {
                state.stats.keep_alive_closes.fetch_add(1, Ordering::SeqCst);
                // Dropping the connection closes the socket, without a response, as uvicorn does.
                return;
            }
        }
    }
}

/// Small SSE events must not wait on Nagle's algorithm; uvicorn's sockets also disable it.
fn set_nodelay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        complain(format_args!("WARNING:  cannot set TCP_NODELAY: {error}"));
    }
}

/// Errors that concern only the connection being accepted, after which the next accept can go on
/// at once.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A connection's keep-alive clock: running from the end of its last response while no request
/// is in flight and no byte has come since.
#[derive(Default)]
struct Idle {
    clock: Mutex<Clock>,
    /// Wakes the connection's task when the clock starts.
    started: Notify,
}

#[derive(Default)]
struct Clock {
    in_flight: usize,
    /// When the clock started; `None` while it is stopped.
    since: Option<Instant>,
}

impl Idle {
    fn clock(&self) -> std::sync::MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes came: whatever they are, the connection is not idle (uvicorn's `data_received`).
    fn bytes_received(&self) {
        self.clock().since = None;
    }

    fn request_began(&self) {
        let mut clock = self.clock();
        clock.in_flight += 1;
        clock.since = None;
    }

    /// A response is complete (or abandoned); with no other request in flight the clock starts.
    fn request_ended(&self) {
        let mut clock = self.clock();
        clock.in_flight = clock.in_flight.saturating_sub(1);
        if clock.in_flight == 0 {
            clock.since = Some(Instant::now());
            drop(clock);
            // One waiter, the connection's task: a permit stored while it is busy is not lost.
            self.started.notify_one();
        }
    }

    /// Resolves once the clock has run for `timeout` without being stopped.
    async fn expired(&self, timeout: Duration) {
        loop {
            let since = self.clock().since;
            match since {
                Some(since) if since.elapsed() >= timeout => return,
                Some(since) => {
                    tokio::select! {
                        () = sleep_until(since + timeout) => {}
                        () = self.started.notified() => {}
                    }
                }
                None => self.started.notified().await,
            }
        }
    }
}

/// One request in flight on a connection, from the moment hyper hands it over until its response
/// body ends or is dropped.
struct InFlight(Arc<Idle>);

impl InFlight {
    fn begin(idle: Arc<Idle>) -> InFlight {
        idle.request_began();
        InFlight(idle)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that holds its request in flight until the body ends or is dropped.
struct InFlightBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for InFlightBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, telling the connection's [`Idle`] clock whenever bytes arrive.
struct IdleIo {
    inner: TcpStream,
    idle: Arc<Idle>,
}

impl AsyncRead for IdleIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.idle.bytes_received();
        }
        polled
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// Whether the clock expires within `within` (paused time, so this takes no real time).
    async fn expires_within(idle: &Idle, within: Duration) -> bool {
        tokio::time::timeout(within, idle.expired(TIMEOUT))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_answered_is_never_idle() {
        let idle = Idle::default();
        assert!(!expires_within(&idle, TIMEOUT * 10).await);
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_runs_from_the_end_of_the_last_response() {
        let idle = Arc::new(Idle::default());
        let request = InFlight::begin(Arc::clone(&idle));
        assert!(!expires_within(&idle, TIMEOUT * 2).await, "busy");
        drop(request);
        assert!(!expires_within(&idle, TIMEOUT - Duration::from_millis(10)).await);
        assert!(expires_within(&idle, Duration::from_millis(20)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_stop_the_clock_until_the_next_response_ends() {
        let idle = Arc::new(Idle::default());
        drop(InFlight::begin(Arc::clone(&idle)));
        tokio::time::advance(TIMEOUT / 2).await;
        idle.bytes_received();
        assert!(!expires_within(&idle, TIMEOUT * 2).await, "half a request");
        drop(InFlight::begin(Arc::clone(&idle)));
        assert!(expires_within(&idle, TIMEOUT + Duration::from_millis(10)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipelined_request_keeps_the_connection_busy() {
        let idle = Arc::new(Idle::default());
        let first = InFlight::begin(Arc::clone(&idle));
        let second = InFlight::begin(Arc::clone(&idle));
        drop(first);
        assert!(!expires_within(&idle, TIMEOUT * 2).await);
        drop(second);
        assert!(expires_within(&idle, TIMEOUT + Duration::from_millis(10)).await);
    }
}
