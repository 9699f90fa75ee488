//! A worker's connections to vLLM: hyper's HTTP/1 client driven directly, and the worker's pool
//! of idle connections.
//!
//! A stream holds its upstream connection for as long as it lasts, so what a connection holds is
//! paid once per open stream: hyper's connection state, its buffers and the channel to its task.
//! The read buffer keeps hyper's adaptive size (8 KB, more only for bulk reads): only the pages a
//! buffer has been written to are resident, and an event stream writes a few hundred bytes at a
//! time from the buffer's start, so a smaller buffer saves nothing unless it is well under a page,
//! while a JSON answer of a few KB would then take several reads and writes instead of one.
//!
//! [`Upstream`] owns one worker's pool: connections live on the worker's runtime (each is driven by
//! a task of its own), go back to the pool when their response body has been read to its end, and
//! leave it when they close, when they have been idle for `pool_idle_timeout` (before the upstream
//! would close them; uvicorn: 5 s), or when the pool already keeps `max_idle`. A response body
//! dropped before its end (the client went away) drops its connection with it, which closes it, so
//! vLLM sees the disconnect and aborts the generation. A request that a pooled connection turned
//! down before sending any of it (it was closing) goes to another connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::body::LimitedBody;

/// The largest response head vLLM may send (its heads are a few hundred bytes), and the most a
/// connection's read buffer grows to.
const MAX_BUFFER: usize = 64 * 1024;

/// The body of a request to vLLM.
pub enum RequestBody {
    /// No body at all (most GETs): nothing is sent, not even an empty chunked body.
    Empty,
    /// A small body read whole: it leaves with the head, and can be sent again.
    Whole(Bytes),
    /// A longer or chunked body, streamed as the client sends it.
    Streamed(LimitedBody),
}

/// Why a request got no response from vLLM.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timeout")]
    ConnectTimeout,
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One worker's way to vLLM: where it is, and the pool of idle connections to it.
pub struct Upstream {
    host: String,
    port: u16,
    /// The `Host` header every request carries (the upstream's authority), made once.
    pub host_header: HeaderValue,
    builder: http1::Builder,
    connect_timeout: Duration,
    pool: Arc<Pool>,
}

impl Upstream {
    /// `base` is the upstream URL (`http://host:port[/prefix]`, checked by the configuration).
    pub fn new(
        base: &http::Uri,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> anyhow::Result<Upstream> {
        let authority = base
            .authority()
            .ok_or_else(|| anyhow::anyhow!("the upstream URL has no host"))?;
        let host = authority.host();
        // A bracketed IPv6 literal connects without its brackets.
        let host = host
            .strip_prefix('[')
            .and_then(|host| host.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        let port = authority.port_u16().unwrap_or(80);
        let host_header = HeaderValue::from_str(authority.as_str())?;
        let mut builder = http1::Builder::new();
        builder.max_buf_size(MAX_BUFFER);
        Ok(Upstream {
            host,
            port,
            host_header,
            builder,
            connect_timeout,
            pool: Arc::new(Pool {
                idle: Mutex::new(Idle {
                    connections: Vec::new(),
                    reaper: false,
                }),
                idle_timeout,
                max_idle,
            }),
        })
    }

    /// Sends `request` (whose URI is in origin form, with its `Host` header set) on a pooled
    /// connection, or a new one, and returns the response once its head has arrived.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        while let Some(mut sender) = self.pool.take() {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.pool.attach(response, sender)),
                Err(mut error) => match error.take_message() {
                    // Turned down before any of it was sent: the connection was closing.
                    Some(unsent) => request = unsent,
                    None => return Err(error.into_error().into()),
                },
            }
        }
        let mut sender = self.connect().await?;
        let response = sender.send_request(request).await?;
        Ok(self.pool.attach(response, sender))
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let tcp = match tokio::time::timeout(self.connect_timeout, connect).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout),
            Ok(Err(error)) => return Err(UpstreamError::Connect(error)),
            Ok(Ok(tcp)) => tcp,
        };
        // Without TCP_NODELAY, a request head and its body written apart wait on vLLM's delayed ACK.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY upstream");
        }
        let (sender, connection) = self.builder.handshake(TokioIo::new(tcp)).await?;
        // A combinator rather than an async block, which would hold the connection twice.
        tokio::spawn(connection.map(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        }));
        Ok(sender)
    }
}

/// The idle connections of one worker.
struct Pool {
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    max_idle: usize,
}

struct Idle {
    /// Most recently used last: a request takes the warmest connection.
    connections: Vec<(SendRequest<RequestBody>, Instant)>,
    /// Whether a task is sweeping out closed and expired connections.
    reaper: bool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The warmest idle connection that can take a request now. Those that closed or idled too
    /// long are dropped on the way.
    fn take(&self) -> Option<SendRequest<RequestBody>> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some((sender, since)) = idle.connections.pop() {
            if sender.is_ready() && now.saturating_duration_since(since) < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// Wraps a response so that its connection comes back here once its body has been read.
    fn attach(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: SendRequest<RequestBody>,
    ) -> Response<ResponseBody> {
        response.map(|inner| {
            let mut body = ResponseBody {
                inner,
                connection: Some((sender, Arc::clone(self))),
            };
            if body.inner.is_end_stream() {
                body.release();
            }
            body
        })
    }

    fn put(self: &Arc<Self>, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.connections.len() >= self.max_idle {
            return;
        }
        idle.connections.push((sender, Instant::now()));
        if !idle.reaper {
            idle.reaper = true;
            drop(idle);
            tokio::spawn(Arc::clone(self).reap());
        }
    }

    /// Every `idle_timeout`, drops the connections that closed or expired; ends once none is left.
    async fn reap(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.idle_timeout).await;
            let now = Instant::now();
            let mut idle = self.lock();
            idle.connections.retain(|(sender, since)| {
                !sender.is_closed() && now.saturating_duration_since(*since) < self.idle_timeout
            });
            if idle.connections.is_empty() {
                idle.reaper = false;
                return;
            }
        }
    }
}

/// vLLM's response body, holding its connection until the body ends: then the connection goes
/// back to the pool; dropped before that, it closes.
pub struct ResponseBody {
    inner: Incoming,
    connection: Option<(SendRequest<RequestBody>, Arc<Pool>)>,
}

impl ResponseBody {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.connection.take() {
            pool.put(sender);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            // A broken body leaves its connection unusable.
            Poll::Ready(Some(Err(_))) => this.connection = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl RequestBody {
    /// The body, when it was read whole.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            RequestBody::Whole(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// A copy to send again, unless it is streamed (and so, once sent, gone).
    pub fn try_clone(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Empty => Some(RequestBody::Empty),
            RequestBody::Whole(bytes) => Some(RequestBody::Whole(bytes.clone())),
            RequestBody::Streamed(_) => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut *self {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Whole(bytes) => {
                let bytes = std::mem::take(bytes);
                *self = RequestBody::Empty;
                Poll::Ready((!bytes.is_empty()).then(|| Ok(Frame::data(bytes))))
            }
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Whole(bytes) => bytes.is_empty(),
            RequestBody::Streamed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Whole(bytes) => SizeHint::with_exact(bytes.len() as u64),
            RequestBody::Streamed(body) => body.size_hint(),
        }
    }
}
