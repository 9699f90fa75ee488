//! Client connections: the accept loop, the connection limit and the client-side timeouts.
//!
//! A worker accepts a connection only once it holds a permit of the [`ConnectionLimit`] that every
//! worker shares, so no more than `max_connections` client connections are ever open: past the
//! limit, new connections wait in the kernel's listen backlog, and the descriptors kept back for
//! connections to vLLM, the health probe and spawning vLLM stay free. An accept that fails for
//! want of descriptors or memory is logged and retried after a pause; it never ends the worker.
//!
//! The workers share one listening socket, and the kernel wakes every one of them for each new
//! connection: whichever calls accept first takes it, for as long as it stays open. Left alone, the
//! worker that happens to be free when a client opens its keep-alive connections takes most of
//! them, and one CPU does most of the work for their lifetime. So a worker with more connections
//! open than another ([`Balance`]) waits `BALANCE_PAUSE` before it accepts, and the other takes
//! the connection if it can; if it cannot, the first accepts it after the pause.
//!
//! Each connection is served by hyper's HTTP/1 server over a [`ClientIo`], which enforces the
//! client-side timeouts on the socket itself:
//!
//! - header: a request head must be whole `client_header_timeout` after the connection opened, or
//!   after the first byte of a later request arrived; if part of it came, the client gets a 408.
//! - idle: a kept-alive connection waits at most `client_idle_timeout` for its next request.
//! - send: a client that takes no byte of its response for `client_send_timeout` (its receive
//!   window stays shut) is cut off; hyper then drops the response body, and with it the upstream
//!   request, so vLLM aborts the generation.
//!
//! The timeouts live on the socket because that is where a stall shows: hyper polls a response
//! body only when it has room to write, so a timer on the body could not tell a client that stopped
//! reading from a model that is slow to produce its next token. Hyper has one timeout for the head
//! and the wait before it. It is set (to their sum) only because, with one set, hyper starts
//! reading the next head as soon as a response is done, which is when the idle clock starts; the
//! timer hyper is given for it, `HeadTimer`, hands out sleeps that never end, since the socket's
//! deadlines come first.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::proxy::router::{Responding, Surface};
use crate::proxy::state::{AppState, LiveConfig};
use crate::proxy::timer::Timer;
use crate::proxy::wake::WhenWoken;

/// The largest request head (request line and headers) accepted: a larger one gets 431. It also
/// bounds each connection's read and write buffers (hyper's default is about 400 KB), so that a
/// connection that sends half a head pins at most this much.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Descriptors kept back from client connections whatever the worker count: standard streams,
/// the main runtime, the signal pipe, the log, the health probe, spawning vLLM (its output
/// pipes, the guard's pipe, the pipes of the spawn itself), and the health listener's
/// connections, each of which may hold one to vLLM (for its `/metrics`).
pub const RESERVED_FDS: u64 = 64 + 2 * HEALTH_MAX_CONNECTIONS as u64;

/// The most connections the health listener keeps open; a new one closes the oldest. Probes and
/// scrapers need a few.
pub const HEALTH_MAX_CONNECTIONS: usize = 16;

/// Descriptors kept back for each proxy worker: its runtime's epoll and event descriptors and its
/// copy of the listening socket, with room to spare.
pub const RESERVED_FDS_PER_WORKER: u64 = 8;

/// The answer to a request whose head did not arrive whole in time.
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// How often the same accept trouble is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a connection with no request in progress when the drain begins is given to begin its
/// next one: a client sends its first request right after it connects, and a client in a loop
/// its next right after an answer, so this covers one on its way, while a connection held open
/// ahead of need (a client's pool, a browser's preconnect) holds the drain up no longer.
const NEXT_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// How long a worker with more connections open than another lets it go first at a new
/// connection: long enough for a busy worker's runtime to come round to its accept.
const BALANCE_PAUSE: Duration = Duration::from_millis(1);

/// The most response bytes a client connection keeps unsent in the kernel (TCP_NOTSENT_LOWAT)
/// before writes to it are refused and `client_send_timeout` starts: a few dozen events of a
/// stream, against the megabytes the kernel's own sizing allows.
const CLIENT_NOTSENT_LOWAT: u32 = 16 * 1024;

/// How many client connections each worker has open, shared by every worker.
#[derive(Clone)]
pub struct Balance {
    open: Arc<[AtomicUsize]>,
    index: usize,
}

impl Balance {
    /// One per worker, for `count` workers.
    pub fn new(count: usize) -> Vec<Balance> {
        let open: Arc<[AtomicUsize]> = (0..count.max(1)).map(|_| AtomicUsize::new(0)).collect();
        (0..open.len())
            .map(|index| Balance {
                open: Arc::clone(&open),
                index,
            })
            .collect()
    }

    /// Whether this worker has more connections open than some other worker.
    fn ahead(&self) -> bool {
        let mine = self.open[self.index].load(Ordering::Relaxed);
        self.open
            .iter()
            .any(|open| open.load(Ordering::Relaxed) < mine)
    }

    /// Client connections open now, on every worker.
    fn total(&self) -> usize {
        self.open
            .iter()
            .map(|open| open.load(Ordering::Relaxed))
            .sum()
    }

    /// Counts a connection in this worker's share while it is open.
    fn opened(&self) -> OpenShare {
        self.open[self.index].fetch_add(1, Ordering::Relaxed);
        OpenShare(self.clone())
    }
}

/// A connection in its worker's [`Balance`] share.
struct OpenShare(Balance);

impl Drop for OpenShare {
    fn drop(&mut self) {
        self.0.open[self.0.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many client connections may be open at once, shared by every worker.
#[derive(Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> ConnectionLimit {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// `max_connections` as configured, else derived from the open-files limit as it is now (after
/// `raise_open_files_limit`): see [`derive_max_connections`].
pub fn max_connections(configured: Option<u32>, workers: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let open_files = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => Some(soft),
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-files limit");
            None
        }
    };
    let derived = open_files.map(|limit| derive_max_connections(limit, workers));
    match (configured, derived) {
        (Some(max), Some(derived)) => {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            if max > derived {
                tracing::warn!(
                    max_connections = max,
                    open_files_limit = open_files,
                    fits = derived,
                    "max_connections is more than the open-files limit leaves room for: the gateway may run out of descriptors"
                );
            }
            max
        }
        (Some(max), None) => usize::try_from(max).unwrap_or(usize::MAX),
        (None, Some(derived)) => {
            if derived < 16 {
                tracing::warn!(
                    open_files_limit = open_files,
                    max_connections = derived,
                    "the open-files limit leaves room for very few client connections; raise it (LimitNOFILE=, ulimit -n)"
                );
            }
            derived
        }
        (None, None) => 1024,
    }
}

/// The default `max_connections` for an open-files limit: the reserve ([`RESERVED_FDS`] plus
/// [`RESERVED_FDS_PER_WORKER`] per worker) comes off first, and the rest is split in three, as
/// each client connection may hold a connection to vLLM, and the workers' pools may keep as many
/// again idle (each pools at most its share, `max_connections / workers`). At least 1.
pub fn derive_max_connections(open_files: u64, workers: usize) -> usize {
    let workers = u64::try_from(workers.max(1)).unwrap_or(u64::MAX);
    let reserve = RESERVED_FDS.saturating_add(RESERVED_FDS_PER_WORKER.saturating_mul(workers));
    let budget = open_files.saturating_sub(reserve) / 3;
    usize::try_from(budget)
        .unwrap_or(usize::MAX)
        .clamp(1, Semaphore::MAX_PERMITS)
}

/// The client-side timeouts, read from the live configuration as each connection is accepted, so
/// that a reload applies to the connections that follow.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    pub header: Duration,
    pub idle: Duration,
    pub send: Duration,
}

impl ClientTimeouts {
    pub fn from_config(proxy: &ProxyConfig) -> ClientTimeouts {
        ClientTimeouts {
            header: proxy.client_header_timeout,
            idle: proxy.client_idle_timeout,
            send: proxy.client_send_timeout,
        }
    }
}

/// Accepts and serves connections until `draining` is cancelled, then stops accepting (dropping
/// this worker's copy of the listening socket) and returns once every connection has finished:
/// busy ones after their response, idle ones after the answer to a request begun within a second
/// (a head begun by then has until its own deadline), or then. The caller cuts the wait short.
///
/// A request that reached the gateway before the drain is still served: connections already
/// waiting in the backlog are taken in, and each connection reads what it was sent before it is
/// told to finish.
pub async fn serve(
    listener: AsyncFd<std::net::TcpListener>,
    surface: Surface,
    live: LiveConfig,
    limit: ConnectionLimit,
    balance: Balance,
    draining: CancellationToken,
) {
    let connections = TaskTracker::new();
    let mut full = Throttle::default();
    let mut failing = Throttle::default();
    let mut backoff = Duration::ZERO;
    loop {
        let permit = match limit.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // A worker waiting in accept holds a permit too: the limit is reached only once
                // that many connections are open.
                if balance.total() >= limit.max && full.due() {
                    tracing::warn!(
                        max_connections = limit.max,
                        "at max_connections: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    permit = limit.permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = draining.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = accept(&listener, &balance) => accepted,
            () = draining.cancelled() => break,
        };
        match accepted {
            Ok(tcp) => {
                backoff = Duration::ZERO;
                let share = balance.opened();
                let connection = serve_connection(tcp, &surface, &live, &draining);
                // The slot frees only once the socket is closed. (A combinator, not an async
                // block, which would hold the connection's future twice.)
                connections.spawn(connection.map(move |()| drop((share, permit))));
            }
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                drop(permit);
                // Most likely out of descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM):
                // something other than client connections holds them, and may let go.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                if failing.due() {
                    let open_files_limit =
                        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                            .map_or(0, |(soft, _)| soft);
                    tracing::warn!(
                        %error,
                        open_files_limit,
                        max_connections = limit.max,
                        retry_in = ?backoff,
                        "the gateway cannot accept a client connection; retrying"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = draining.cancelled() => break,
                }
            }
        }
    }
    // What is already in the backlog was sent before the drain; what is not, is left to the
    // kernel to refuse once the last copy of the listening socket is closed.
    for _ in 0..limit.max {
        let Ok(permit) = limit.permits.clone().try_acquire_owned() else {
            break;
        };
        let Ok(tcp) = accept_now(listener.get_ref()) else {
            break;
        };
        let share = balance.opened();
        let connection = serve_connection(tcp, &surface, &live, &draining);
        connections.spawn(connection.map(move |()| drop((share, permit))));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves the health listener on the caller's runtime until `done` is cancelled: the gateway's
/// own endpoints alone ([`Surface::health`]), on at most [`HEALTH_MAX_CONNECTIONS`] connections
/// of its own, so that probes are answered however many connections the main listener holds.
/// A new connection is always taken in: at the limit the oldest open one is closed for it. A
/// probe is answered within moments of its connection, so connections that are held open (idle
/// ones, half-sent requests, a flood) are the ones that go, and cannot keep a probe waiting.
pub async fn serve_health(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    done: CancellationToken,
) -> io::Result<()> {
    // SAFETY: the AsyncFd owns the socket, so the descriptor stays open for as long as it is
    // registered.
    let listener = unsafe { AsyncFd::register(listener) }?;
    let live = Arc::clone(&state.live);
    let surface = Surface::health(state);
    let balance = Balance::new(1).swap_remove(0);
    let connections = TaskTracker::new();
    // Open connections, oldest first; each is closed by aborting its task.
    let mut open: std::collections::VecDeque<tokio::task::JoinHandle<()>> =
        std::collections::VecDeque::new();
    let mut failing = Throttle::default();
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener, &balance) => accepted,
            () = done.cancelled() => break,
        };
        let tcp = match accepted {
            Ok(tcp) => tcp,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                if failing.due() {
                    tracing::warn!(%error, "the health listener cannot accept a connection; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    () = done.cancelled() => break,
                }
            }
        };
        open.retain(|connection| !connection.is_finished());
        if open.len() >= HEALTH_MAX_CONNECTIONS
            && let Some(oldest) = open.pop_front()
        {
            oldest.abort();
        }
        open.push_back(connections.spawn(serve_connection(tcp, &surface, &live, &done)));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Waits for a connection and accepts it; a worker [`Balance::ahead`] of another first pauses
/// for [`BALANCE_PAUSE`], to let the other take it.
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
    balance: &Balance,
) -> io::Result<TcpStream> {
    loop {
        let mut ready = listener.readable().await?;
        if balance.ahead() {
            tokio::time::sleep(BALANCE_PAUSE).await;
        }
        match ready.try_io(|listener| accept_now(listener.get_ref())) {
            Ok(accepted) => return accepted,
            // Another worker took it.
            Err(_would_block) => {}
        }
    }
}

/// Accepts a connection waiting in the backlog, if there is one (`WouldBlock` if not).
fn accept_now(listener: &std::net::TcpListener) -> io::Result<TcpStream> {
    let (tcp, _) = listener.accept()?;
    tcp.set_nonblocking(true)?;
    TcpStream::from_std(tcp)
}

/// The peer gave up before its connection was accepted: nothing to report.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

fn http1_builder(timeouts: ClientTimeouts) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer {
            began: std::time::Instant::now(),
        })
        // Past ClientIo's own deadlines (see the module documentation).
        .header_read_timeout(timeouts.header.saturating_add(timeouts.idle))
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
}

/// hyper's timer, for its head timeout alone. The deadlines for a head are [`ClientIo`]'s, which
/// always come first, so the sleeps hyper asks for never end: a real one, registered with the
/// runtime's timer wheel and taken out again for every request, cost 570 instructions of a
/// request's 34,000 for nothing. For the same reason the deadline hyper sets them to needs no
/// clock read: hyper is told the time the connection began.
#[derive(Clone, Copy)]
struct HeadTimer {
    began: std::time::Instant,
}

impl hyper::rt::Timer for HeadTimer {
    fn now(&self) -> std::time::Instant {
        self.began
    }

    fn sleep(&self, _: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Never)
    }

    fn sleep_until(&self, _: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Never)
    }
}

/// A sleep that never ends (and, having no size, is boxed without an allocation).
struct Never;

impl Future for Never {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
}

impl hyper::rt::Sleep for Never {}

/// One connection, served until it closes; once `draining` is cancelled it finishes the request
/// in progress (without keep-alive) and closes. A connection with no request in progress when the
/// drain begins (accepted just before it or from the backlog during it, or kept alive between
/// two requests) is served its next one first if it begins within [`NEXT_REQUEST_GRACE`]: told
/// to finish at once, hyper would close it with the request still on its way, which the client
/// sees as a reset or a connection closed without an answer.
fn serve_connection(
    tcp: TcpStream,
    surface: &Surface,
    live: &LiveConfig,
    draining: &CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let timeouts = ClientTimeouts::from_config(&live.load().config.proxy);
    let builder = http1_builder(timeouts);
    // Without TCP_NODELAY, small writes (SSE events, short JSON answers) wait on the client's
    // delayed ACK: tens of milliseconds per response.
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    // A client that stops reading shuts its window; what the gateway writes then stays in the
    // kernel, unsent, and the send deadline starts only once a write is refused. The kernel's
    // buffer grows to megabytes (tcp_wmem), room for a whole generation, which vLLM would finish
    // for nobody: past this much unsent, writes are refused (sent-but-unacknowledged data, all a
    // fast client needs, is not counted).
    if let Err(error) = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(CLIENT_NOTSENT_LOWAT) {
        tracing::debug!(%error, "cannot set TCP_NOTSENT_LOWAT");
    }
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(ClientIo::new(tcp, timeouts, activity.clone()));
    let service = TrackedService {
        surface: surface.clone(),
        activity: activity.clone(),
    };
    let draining = draining.clone();
    let state = Arc::clone(surface.state());
    async move {
        let _open = OpenConnection::count();
        // Made in place rather than captured: a future captured and then pinned or awaited takes
        // its room twice in the task, which every open connection pays.
        let mut connection = std::pin::pin!(builder.serve_connection(io, service));
        let drain = std::pin::pin!(draining.cancelled());
        // The connection first: told to finish before it read anything, hyper would close it
        // with a request already sent unread.
        let result = tokio::select! {
            biased;
            result = connection.as_mut() => result,
            () = WhenWoken::new(drain) => {
                // From here on `drain_timeout` may expire: the connection's requests look at the
                // cut's flag, which this task sets when the cut wakes it (see `Cut`), before it
                // polls them again. (Boxed, as the grace below.)
                let mut cut = WhenWoken::new(Box::pin(state.cut.token.cancelled()));
                let mut see_cut = |cx: &mut Context<'_>| {
                    if Pin::new(&mut cut).poll(cx).is_ready() {
                        state.cut.see();
                    }
                };
                // A request in progress is finished; an idle connection is given its next
                // request, until the grace is over, or, once part of its head has come, until
                // the head's own deadline (`client_header_timeout`, then 408). (Boxed: only a
                // drain needs it, and every connection's task would hold it.)
                let started = activity.started.load(Ordering::Relaxed);
                let idle = started == activity.finished.load(Ordering::Relaxed);
                let mut grace = idle.then(|| Box::pin(tokio::time::sleep(NEXT_REQUEST_GRACE)));
                let ended = std::future::poll_fn(|cx| {
                    see_cut(cx);
                    match connection.as_mut().poll(cx) {
                        Poll::Ready(result) => Poll::Ready(Some(result)),
                        Poll::Pending if activity.started.load(Ordering::Relaxed) != started => {
                            Poll::Ready(None)
                        }
                        Poll::Pending
                            if grace.as_mut().is_none_or(|grace| {
                                grace.as_mut().poll(cx).is_ready()
                                    && !activity.head_begun.load(Ordering::Relaxed)
                            }) =>
                        {
                            Poll::Ready(None)
                        }
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await;
                match ended {
                    Some(result) => result,
                    None => {
                        connection.as_mut().graceful_shutdown();
                        std::future::poll_fn(|cx| {
                            see_cut(cx);
                            connection.as_mut().poll(cx)
                        })
                        .await
                    }
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "client connection ended with an error");
        }
    }
}

/// Counts a client connection in `gateway_client_connections` while it lives.
struct OpenConnection;

impl OpenConnection {
    fn count() -> OpenConnection {
        metrics::gauge!("gateway_client_connections").increment(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("gateway_client_connections").decrement(1.0);
    }
}

/// Counts a connection closed by one of the client-side timeouts.
fn count_timeout(kind: &'static str) {
    metrics::counter!("gateway_client_timeouts_total", "kind" => kind).increment(1);
}

/// What the socket side needs to know of a connection's requests: a request is being served
/// while `started` and `finished` differ; `finished` moving on means a response just ended.
/// And what the drain needs to know of the socket: whether part of a request head has come that
/// is not a request yet.
#[derive(Default)]
struct Activity {
    started: AtomicU32,
    finished: AtomicU32,
    head_begun: AtomicBool,
}

/// The HTTP surface as a hyper service, counting requests in and responses out for [`ClientIo`].
#[derive(Clone)]
struct TrackedService {
    surface: Surface,
    activity: Arc<Activity>,
}

impl hyper::service::Service<http::Request<Incoming>> for TrackedService {
    type Response = http::Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedResponse;

    fn call(&self, request: http::Request<Incoming>) -> TrackedResponse {
        self.activity.started.fetch_add(1, Ordering::Relaxed);
        TrackedResponse {
            response: self.surface.clone().respond(request),
            activity: Some(self.activity.clone()),
        }
    }
}

/// A response on its way, whose body is tracked once it comes. (A named future rather than an
/// async block, which would box the boxed response again, copying it.)
struct TrackedResponse {
    response: Responding,
    activity: Option<Arc<Activity>>,
}

impl Future for TrackedResponse {
    type Output = Result<http::Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(this.response.as_mut().poll(cx));
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            body,
            activity: this.activity.take(),
        })))
    }
}

/// A response body that counts its response as finished when it ends or is dropped.
struct TrackedBody {
    body: Body,
    activity: Option<Arc<Activity>>,
}

impl TrackedBody {
    fn finish(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.finished.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a connection's reading stands.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// Waiting for a request head, due whole by the deadline; `begun` once a byte of it came.
    /// A later request's deadline is set when a read first has to wait for more of its head
    /// (right after its first bytes): most heads arrive whole and never need one.
    Head {
        deadline: Option<Instant>,
        begun: bool,
    },
    /// Kept alive after a response, waiting for the next request's first byte.
    Idle { deadline: Instant },
    /// A request is being served: reads are its body's, or hyper watching for a hang-up.
    Busy,
    /// A read deadline passed: every read is the end of the stream.
    TimedOut,
}

/// A client's socket with the header, idle and send deadlines.
pub struct ClientIo {
    tcp: TcpStream,
    timeouts: ClientTimeouts,
    activity: Arc<Activity>,
    /// The `finished` count last seen, to notice a response ending.
    seen_finished: u32,
    reading: Reading,
    read_timer: Timer,
    /// Set while writes make no progress: when the client must have taken a byte by.
    write_deadline: Option<Instant>,
    write_timer: Timer,
}

impl ClientIo {
    fn new(tcp: TcpStream, timeouts: ClientTimeouts, activity: Arc<Activity>) -> ClientIo {
        ClientIo {
            tcp,
            timeouts,
            activity,
            seen_finished: 0,
            // The first head is due `client_header_timeout` after the connection opened.
            reading: Reading::Head {
                deadline: Some(Instant::now() + timeouts.header),
                begun: false,
            },
            read_timer: Timer::default(),
            write_deadline: None,
            write_timer: Timer::default(),
        }
    }

    /// Catches up with the requests hyper started and the responses that ended since last time.
    fn observe_requests(&mut self) {
        if matches!(self.reading, Reading::TimedOut) {
            return;
        }
        let finished = self.activity.finished.load(Ordering::Relaxed);
        if self.activity.started.load(Ordering::Relaxed) != finished {
            if !matches!(self.reading, Reading::Busy) {
                self.activity.head_begun.store(false, Ordering::Relaxed);
            }
            self.reading = Reading::Busy;
        } else if finished != self.seen_finished {
            self.seen_finished = finished;
            self.activity.head_begun.store(false, Ordering::Relaxed);
            self.reading = Reading::Idle {
                deadline: Instant::now() + self.timeouts.idle,
            };
        }
    }

    fn bytes_arrived(&mut self) {
        match &mut self.reading {
            Reading::Idle { .. } => {
                self.activity.head_begun.store(true, Ordering::Relaxed);
                self.reading = Reading::Head {
                    deadline: None,
                    begun: true,
                };
            }
            Reading::Head { begun, .. } => {
                self.activity.head_begun.store(true, Ordering::Relaxed);
                *begun = true;
            }
            Reading::Busy | Reading::TimedOut => {}
        }
    }

    /// The read deadline passed: answers 408 when part of a head came (and no response is still
    /// being written, which the 408 would cut into), then ends the stream so that hyper closes.
    fn read_timed_out(&mut self) {
        match self.reading {
            Reading::Head { begun: true, .. } => {
                count_timeout("header");
                if self.write_deadline.is_none() {
                    // Best effort: 80 bytes into an idle socket's empty send buffer.
                    let _ = self.tcp.try_write(REQUEST_TIMEOUT);
                }
                tracing::debug!(
                    timeout = ?self.timeouts.header,
                    "a request head did not arrive whole within client_header_timeout; closing the connection"
                );
            }
            Reading::Head { begun: false, .. } => {
                count_timeout("header");
                tracing::debug!(
                    timeout = ?self.timeouts.header,
                    "a connection sent no request within client_header_timeout; closing it"
                );
            }
            Reading::Idle { .. } => {
                count_timeout("idle");
                tracing::debug!(
                    timeout = ?self.timeouts.idle,
                    "a kept-alive connection was idle for client_idle_timeout; closing it"
                );
            }
            Reading::Busy | Reading::TimedOut => {}
        }
        self.reading = Reading::TimedOut;
    }

    fn write_progress(
        &mut self,
        polled: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(written)) if written > 0 => {
                self.write_deadline = None;
                Poll::Ready(Ok(written))
            }
            Poll::Pending => {
                let send = self.timeouts.send;
                let deadline = *self
                    .write_deadline
                    .get_or_insert_with(|| Instant::now() + send);
                if !self.write_timer.expired(deadline, cx) {
                    return Poll::Pending;
                }
                count_timeout("send");
                tracing::info!(
                    timeout = ?send,
                    "a client took no bytes of its response for client_send_timeout; closing its connection"
                );
                // What it did not take is thrown away rather than kept in the kernel for it.
                let _ = self.tcp.set_zero_linger();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no bytes for client_send_timeout",
                )))
            }
            other => other,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.observe_requests();
        if matches!(this.reading, Reading::TimedOut) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let header = this.timeouts.header;
                let deadline = match &mut this.reading {
                    Reading::Head { deadline, .. } => {
                        *deadline.get_or_insert_with(|| Instant::now() + header)
                    }
                    Reading::Idle { deadline } => *deadline,
                    Reading::Busy | Reading::TimedOut => return Poll::Pending,
                };
                if !this.read_timer.expired(deadline, cx) {
                    return Poll::Pending;
                }
                this.read_timed_out();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.write_progress(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.write_progress(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Lets a repeated warning through once per [`LOG_EVERY`].
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
}

impl Throttle {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + LOG_EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limit_leaves_the_reserve_and_room_for_upstream_connections() {
        // 1024 descriptors, 2 workers: 112 kept back, the rest split in three.
        assert_eq!(derive_max_connections(1024, 2), 304);
        let max = derive_max_connections(524_288, 8);
        assert!(3 * max as u64 + RESERVED_FDS + 8 * RESERVED_FDS_PER_WORKER <= 524_288);
        // A limit below the reserve still lets one connection in.
        assert_eq!(derive_max_connections(10, 8), 1);
    }
}
