//! A worker's connections to vLLM: HTTP/1.1 exchanges over plain sockets, and the worker's pool of
//! idle connections.
//!
//! A stream holds its upstream connection for as long as it lasts, so what a connection holds is
//! paid once per open stream. Here that is the socket and one read buffer, which starts at
//! `READ_START` bytes (under a page, so the buffers of many quiet streams share pages) and grows
//! only when a read fills it. hyper's client, which forwarded before, held an 8 KB read buffer,
//! an 8 KB write buffer, the first block of the channel to its connection (9.7 KB) and a task per
//! connection: about 12 KB of resident memory a stream more. The exchange runs in the request's
//! own task and the response body is read by the client connection's task, so a request and its
//! answer cross no task in between. The caller's deadline for the response head (the first-byte
//! timeout) is kept by a timer that stays with the connection from one exchange to the next.
//!
//! The protocol is the client side of RFC 9112, as much as a proxy in front of vLLM needs: the
//! request head is written in one piece (with a body read whole, in the same write); a streamed
//! body goes as it comes, with its declared length or chunked; the response head is parsed with
//! `httparse` a line at a time, a line equal to the one at its place in the worker's last head
//! taken as it was parsed then (1xx heads are skipped); the body is framed by `Content-Length`,
//! by chunked transfer coding (extensions and trailers are read and dropped; a length beside it
//! goes, and any other coding is refused; a chunk is given out whole, unless it is longer than
//! `READ_MAX`), or by the end of the connection, and HEAD requests and 204 and 304 answers have
//! none. The client gets the head in HTTP/1.1. A connection is kept for another request only
//! after an HTTP/1.1 answer without `Connection: close` whose body was read to its framed end with
//! nothing after it.
//!
//! [`Upstream`] owns one worker's pool: connections go back to it when their response body has
//! been read to its end, and leave it when they are found closed, when they have been idle for
//! `pool_idle_timeout` (before the upstream would close them; uvicorn: 5 s), or when the pool
//! already keeps `max_idle`. A response body dropped before its end (the client went away) closes
//! its connection, so vLLM sees the disconnect and aborts the generation. A request that failed on
//! a pooled connection before any answer came, and before any of a streamed body was taken, goes
//! again on a new connection (the pooled one was closing).

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::body::LimitedBody;
use crate::proxy::headers;
use crate::proxy::timer::Timer;
use crate::status::ReadCount;

/// A connection's first read buffer: under a page, so that quiet streams' buffers share pages.
const READ_START: usize = 1024;

/// The most a read buffer grows to, the largest response head accepted, and the largest chunk
/// held back until it is whole.
const READ_MAX: usize = 64 * 1024;

/// The most response header lines accepted (as hyper's client).
const MAX_HEADERS: usize = 100;

/// The most bytes of chunk-size lines and trailers accepted at once.
const MAX_LINE: usize = 16 * 1024;

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
    Connect(io::Error),
    #[error("connect timeout")]
    ConnectTimeout,
    /// The deadline `Upstream::send` was given passed before the response head came.
    #[error("no response by the deadline")]
    Timeout,
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("invalid response: {0}")]
    Protocol(&'static str),
    /// The client's side of a streamed request body failed (it is the `source`).
    #[error("the request body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One worker's way to vLLM: where it is, and the pool of idle connections to it.
pub struct Upstream {
    host: String,
    port: u16,
    /// The `Host` header every request carries (the upstream's authority), made once.
    pub host_header: HeaderValue,
    connect_timeout: Duration,
    pool: Arc<Pool>,
    /// This worker's reads, which its connections count.
    reads: Arc<ReadCount>,
}

impl Upstream {
    /// `base` is the upstream URL (`http://host:port[/prefix]`, checked by the configuration);
    /// `reads` counts the reads that bring data.
    pub fn new(
        base: &http::Uri,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        reads: Arc<ReadCount>,
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
        Ok(Upstream {
            host,
            port,
            host_header,
            connect_timeout,
            pool: Arc::new(Pool {
                idle: Mutex::new(Idle {
                    connections: Vec::new(),
                    reaper: false,
                }),
                idle_timeout,
                max_idle,
            }),
            reads,
        })
    }

    /// Sends a request on a pooled connection, or a new one, and returns the response once its
    /// head has arrived; [`UpstreamError::Timeout`] if that is not by `deadline`.
    pub async fn send(
        &self,
        head: Head<'_>,
        mut body: RequestBody,
        deadline: Instant,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let (head_bytes, chunked) = encode_head(head, &mut body);
        // Pooled connections first, then a new one (one exchange for both, so that this future
        // holds room for one).
        loop {
            let connection = match self.pool.take() {
                Some(connection) => connection,
                None => self.connect(deadline).await?,
            };
            let exchanged = exchange(
                connection,
                &head_bytes,
                chunked,
                &mut body,
                head.method,
                deadline,
            );
            match exchanged.await {
                Ok(answer) => return Ok(self.answer(answer)),
                // Only a pooled connection fails untouched: the request goes on another.
                Err(Failed {
                    error,
                    untouched: true,
                }) => {
                    tracing::debug!(%error, "a pooled upstream connection failed before answering; sending on another");
                }
                Err(Failed { error, .. }) => return Err(error),
            }
        }
    }

    fn answer(&self, (head, connection, framing, reusable): Answer) -> Response<ResponseBody> {
        let mut body = ResponseBody {
            connection: Some(connection),
            framing,
            reusable,
            pool: Arc::clone(&self.pool),
        };
        if body.framing.is_over() {
            body.finish();
        }
        head.map(|()| body)
    }

    /// A new connection, within `connect_timeout` and by `deadline`.
    async fn connect(&self, deadline: Instant) -> Result<Connection, UpstreamError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let (limit, late) = match Instant::now() + self.connect_timeout {
            connect_deadline if connect_deadline < deadline => {
                (connect_deadline, UpstreamError::ConnectTimeout)
            }
            _ => (deadline, UpstreamError::Timeout),
        };
        let tcp = match tokio::time::timeout_at(limit, connect).await {
            Err(_) => return Err(late),
            Ok(Err(error)) => return Err(UpstreamError::Connect(error)),
            Ok(Ok(tcp)) => tcp,
        };
        // Without TCP_NODELAY, a request head and its body written apart wait on vLLM's delayed ACK.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY upstream");
        }
        Ok(Connection {
            tcp,
            buffer: BytesMut::new(),
            next_read: READ_START,
            reused: false,
            timer: Timer::default(),
            reads: Arc::clone(&self.reads),
            drained: true,
        })
    }
}

/// An open connection to vLLM and what has been read from it but not yet used.
struct Connection {
    tcp: TcpStream,
    buffer: BytesMut,
    /// How much room the next read gets: doubled when a read fills it, up to [`READ_MAX`].
    next_read: usize,
    /// Whether it served a request before (and so may have been closed meanwhile by vLLM).
    reused: bool,
    /// For the deadline of each exchange. Kept with the connection, so that its sleep is moved on
    /// only when it fires early (see [`Timer`]): a sleep made, registered with the runtime's timer
    /// wheel and taken out again for each request cost 340 instructions a request more.
    timer: Timer,
    /// Where its reads of what vLLM wrote lately are counted.
    reads: Arc<ReadCount>,
    /// Whether the socket held nothing more after the last read (or a request has just been
    /// written): what the next read brings, vLLM wrote since.
    drained: bool,
}

impl Connection {
    /// Reads more into the buffer; `Ok(0)` at the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buffer.capacity() - self.buffer.len() < self.next_read {
            self.buffer.reserve(self.next_read);
        }
        let room = self.buffer.capacity() - self.buffer.len();
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.tcp),
            cx,
            &mut self.buffer
        ))?;
        if read == room && self.next_read < READ_MAX {
            self.next_read *= 2;
        }
        // Only data vLLM wrote since the socket was last found empty shows that it still
        // writes: a vLLM that froze leaves behind what it wrote, which a slow client's stream
        // may take minutes to read.
        if read > 0 && self.drained {
            self.reads.count();
        }
        self.drained = read < room;
        Poll::Ready(Ok(read))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Whether vLLM closed it (or sent something unasked) while it was idle.
    fn is_closed(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.tcp.try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A request's head as it goes to vLLM, borrowed from where the request is kept: the method, the
/// target in origin form, the client's headers, and the lines the gateway writes in place of the
/// client's. Hop-by-hop headers are left out as the head is written, rather than removed from the
/// map first (a removal or an insertion is a lookup in it).
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub target: &'a str,
    /// As the client sent them.
    pub headers: &'a HeaderMap,
    /// vLLM's authority, in place of the client's `Host`.
    pub host: &'a HeaderValue,
    /// The request's id, in place of the client's `X-Request-Id`.
    pub request_id: &'a HeaderValue,
    /// The upstream key, for a request that has no `Authorization` of its own.
    pub authorization: Option<&'a HeaderValue>,
}

/// The request line and headers, and a body read whole, in one buffer written at once; and
/// whether a streamed body goes chunked (it has no declared length).
fn encode_head(head: Head<'_>, body: &mut RequestBody) -> (Vec<u8>, bool) {
    let Head {
        method,
        target,
        headers,
        host,
        request_id,
        authorization,
    } = head;
    let whole = match body {
        RequestBody::Whole(bytes) => Some(std::mem::take(bytes)),
        _ => None,
    };
    // The framing is the gateway's own, from the body it sends, never the client's line: a
    // `Content-Length` that the client's `Connection` nominates is left out with the rest, and a
    // body sent without its length would be read by vLLM as the next request.
    let (length, chunked) = match (&whole, &*body) {
        (Some(bytes), _) => (Some(bytes.len() as u64), false),
        (None, RequestBody::Streamed(streamed)) => match streamed.size_hint().exact() {
            Some(length) => (Some(length), false),
            None => (None, true),
        },
        // No body: a `Content-Length: 0` the client sent goes on.
        (None, _) => (
            headers.contains_key(header::CONTENT_LENGTH).then_some(0),
            false,
        ),
    };
    let size = method.as_str().len()
        + target.len()
        + 16
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
        + host.len()
        + request_id.len()
        + authorization.map_or(0, HeaderValue::len)
        // Their names, and the framing line when one is added.
        + 80
        + whole.as_ref().map_or(0, Bytes::len);
    let mut encoded = Vec::with_capacity(size);
    encoded.extend_from_slice(method.as_str().as_bytes());
    encoded.push(b' ');
    encoded.extend_from_slice(target.as_bytes());
    encoded.extend_from_slice(b" HTTP/1.1\r\n");
    let nominated = headers::nominated(headers);
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        encoded.extend_from_slice(name.as_str().as_bytes());
        encoded.extend_from_slice(b": ");
        encoded.extend_from_slice(value.as_bytes());
        encoded.extend_from_slice(b"\r\n");
    };
    for (name, value) in headers {
        if !headers::is_hop_by_hop(name, &nominated)
            && name != header::HOST
            && *name != headers::X_REQUEST_ID
            && name != header::CONTENT_LENGTH
        {
            line(name, value);
        }
    }
    line(&header::HOST, host);
    line(&headers::X_REQUEST_ID, request_id);
    if let Some(authorization) = authorization {
        line(&header::AUTHORIZATION, authorization);
    }
    if let Some(length) = length {
        // itoa: `write!` and its formatting machinery took 200 instructions a request more.
        encoded.extend_from_slice(b"content-length: ");
        encoded.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
        encoded.extend_from_slice(b"\r\n");
    }
    if chunked {
        encoded.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    encoded.extend_from_slice(b"\r\n");
    if let Some(bytes) = whole {
        encoded.extend_from_slice(&bytes);
    }
    (encoded, chunked)
}

/// A failed exchange; `untouched` when nothing was answered and no streamed body was taken, so
/// the request may go again on another connection if this one had served before.
struct Failed {
    error: UpstreamError,
    untouched: bool,
}

/// The response head, the connection it came on, how its body is framed, and whether the
/// connection may serve again after it.
type Answer = (Response<()>, Connection, Framing, bool);

/// `future`, unless `deadline` passes first.
async fn within<T>(
    timer: &mut Timer,
    deadline: Instant,
    future: impl Future<Output = T>,
) -> Result<T, UpstreamError> {
    let mut future = pin!(future);
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Ok(output)),
        Poll::Pending if timer.expired(deadline, cx) => Poll::Ready(Err(UpstreamError::Timeout)),
        Poll::Pending => Poll::Pending,
    })
    .await
}

/// Writes the request and reads the response head, by `deadline`.
async fn exchange(
    mut connection: Connection,
    head: &[u8],
    chunked: bool,
    body: &mut RequestBody,
    method: &Method,
    deadline: Instant,
) -> Result<Answer, Failed> {
    let reused = connection.reused;
    let failed = |error: UpstreamError, untouched: bool| Failed {
        error,
        untouched: reused && untouched,
    };
    // Once any of a streamed body has been taken it cannot go again: a failure after that is
    // never untouched, however little vLLM answered.
    let streamed = matches!(body, RequestBody::Streamed(_));
    // Out of the connection while it waits on the connection's socket; back in with the answer.
    let mut timer = std::mem::take(&mut connection.timer);
    // Whatever comes now, vLLM wrote for this request.
    connection.drained = true;
    match within(&mut timer, deadline, connection.tcp.write_all(head)).await {
        Err(timeout) => return Err(failed(timeout, false)),
        Ok(Err(error)) => return Err(failed(error.into(), true)),
        Ok(Ok(())) => {}
    }
    if let RequestBody::Streamed(streamed) = body {
        within(
            &mut timer,
            deadline,
            write_streamed(&mut connection.tcp, streamed, chunked),
        )
        .await
        .and_then(|written| written)
        .map_err(|error| failed(error, false))?;
    }
    loop {
        match parse_head(&connection.buffer, method) {
            Ok(Some((length, Parsed::Interim))) => {
                connection.buffer.advance(length);
                continue;
            }
            Ok(Some((length, Parsed::Final(response, framing, reusable)))) => {
                connection.buffer.advance(length);
                connection.timer = timer;
                return Ok((response, connection, framing, reusable));
            }
            Ok(None) => {}
            Err(error) => return Err(failed(error, false)),
        }
        if connection.buffer.len() >= READ_MAX {
            return Err(failed(
                UpstreamError::Protocol("the response head is too large"),
                false,
            ));
        }
        let filled = within(&mut timer, deadline, connection.fill())
            .await
            .map_err(|timeout| failed(timeout, false))?;
        let untouched = connection.buffer.is_empty() && !streamed;
        match filled {
            Ok(0) => {
                return Err(failed(
                    io::Error::from(io::ErrorKind::UnexpectedEof).into(),
                    untouched,
                ));
            }
            Ok(_) => {}
            Err(error) => return Err(failed(error.into(), untouched)),
        }
    }
}

async fn write_streamed(
    tcp: &mut TcpStream,
    body: &mut LimitedBody,
    chunked: bool,
) -> Result<(), UpstreamError> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        let data = match frame {
            None => break,
            Some(Err(error)) => return Err(UpstreamError::Body(error)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        if chunked {
            let mut piece = Vec::with_capacity(data.len() + 16);
            piece.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            piece.extend_from_slice(&data);
            piece.extend_from_slice(b"\r\n");
            tcp.write_all(&piece).await?;
        } else {
            tcp.write_all(&data).await?;
        }
    }
    if chunked {
        tcp.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

enum Parsed {
    /// A 1xx head other than 101: skipped.
    Interim,
    Final(Response<()>, Framing, bool),
}

/// Parses a response head at the start of `buffer`: `None` while it is incomplete, else its
/// length and what it says.
fn parse_head(buffer: &[u8], method: &Method) -> Result<Option<(usize, Parsed)>, UpstreamError> {
    if buffer.is_empty() {
        return Ok(None);
    }
    let mut response = Response::new(());
    let by_lines = LAST_HEAD
        .try_with(|last| read_by_lines(buffer, &mut last.borrow_mut(), &mut response))
        .ok()
        .flatten();
    let (length, close) = match by_lines {
        Some(read) => read?,
        None => {
            response = Response::new(());
            match read_whole(buffer, &mut response)? {
                Some(read) => read,
                None => return Ok(None),
            }
        }
    };
    // The limit is the head's, whatever reads it came in: the check before each read lets one
    // read bring up to READ_MAX more.
    if length > READ_MAX {
        return Err(UpstreamError::Protocol("the response head is too large"));
    }
    let status = response.status();
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(UpstreamError::Protocol("unexpected protocol switch"));
        }
        return Ok(Some((length, Parsed::Interim)));
    }
    let framing = framing(method, status, response.headers())?;
    let reusable =
        response.version() == Version::HTTP_11 && !close && !matches!(framing, Framing::Close);
    // Chunked coding wins over a length beside it, which must then go (RFC 9112 section 6.3):
    // the client's framing is hyper's, from what is left.
    if matches!(framing, Framing::Chunked(_)) {
        response.headers_mut().remove(header::CONTENT_LENGTH);
    }
    // The answer goes to the client in the gateway's own HTTP/1.1, whatever vLLM spoke.
    *response.version_mut() = Version::HTTP_11;
    Ok(Some((length, Parsed::Final(response, framing, reusable))))
}

/// Reads a head that is complete in `buffer` a line at a time. A line byte-equal to the last
/// head's line at its position is taken as it was parsed then: vLLM answers with the same lines
/// in the same order (only `date` changes, once a second, and the length), and parsing them again
/// (httparse, then `http`'s checks and copies) was 3,700 instructions of a JSON request's 36,000.
/// Any other line is parsed alone by httparse, as it would be within the whole head (httparse
/// reads a head line by line), and checked by `http`. `None` when the head is not complete in
/// `buffer`, or starts with an empty line: [`read_whole`] decides those. Either way the head's
/// length and whether it asks to close the connection.
fn read_by_lines(
    buffer: &[u8],
    last: &mut LastHead,
    response: &mut Response<()>,
) -> Option<Result<(usize, bool), UpstreamError>> {
    let status_len = if !last.status_line.is_empty() && buffer.starts_with(&last.status_line) {
        last.status_line.len()
    } else {
        let len = line_end(buffer)?;
        let status_line = &buffer[..len];
        if status_line == b"\r\n" || status_line == b"\n" {
            return None;
        }
        match parse_status_line(status_line, &mut last.scratch) {
            Ok(status) => last.status = status,
            Err(error) => return Some(Err(error)),
        }
        last.status_line = if len <= LAST_LINE_BYTES {
            status_line.into()
        } else {
            Box::default()
        };
        len
    };
    let mut rest = &buffer[status_len..];
    (*response.status_mut(), *response.version_mut()) = last.status;
    let headers = response.headers_mut();
    headers.reserve(last.lines.len());
    let mut close = false;
    let mut index = 0;
    loop {
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
            let end = buffer.len() - rest.len() + if rest[0] == b'\r' { 2 } else { 1 };
            return Some(Ok((end, close)));
        }
        let known = last
            .lines
            .get(index)
            .filter(|(raw, _)| rest.starts_with(raw));
        let (line, len) = match known {
            Some((raw, line)) => (line.clone(), raw.len()),
            None => {
                let len = line_end(rest)?;
                if index == MAX_HEADERS {
                    return Some(Err(UpstreamError::Protocol("too many response headers")));
                }
                let line = match parse_header_line(&rest[..len], &mut last.scratch) {
                    Ok(line) => line,
                    Err(error) => return Some(Err(error)),
                };
                if len <= LAST_LINE_BYTES && index < LAST_LINES_MAX {
                    let kept = (Box::from(&rest[..len]), line.clone());
                    if let Some(slot) = last.lines.get_mut(index) {
                        *slot = kept;
                    } else if index == last.lines.len() {
                        last.lines.push(kept);
                    }
                }
                (line, len)
            }
        };
        close |= line.closes;
        if line.kept {
            headers.append(line.name, line.value);
        }
        rest = &rest[len..];
        index += 1;
    }
}

/// The length of the line at the start of `bytes`, with its `\n`, if it ends within them.
fn line_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .position(|&byte| byte == b'\n')
        .map(|end| end + 1)
}

/// The status line alone (with its ending), parsed by httparse.
fn parse_status_line(
    line: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(StatusCode, Version), UpstreamError> {
    let mut parsed = httparse::Response::new(&mut []);
    match parsed.parse(alone(line, scratch)) {
        Ok(httparse::Status::Complete(_)) => status_of(&parsed),
        Ok(httparse::Status::Partial) | Err(_) => {
            Err(UpstreamError::Protocol("malformed response head"))
        }
    }
}

/// One header line alone (with its ending), parsed by httparse and checked by `http`.
fn parse_header_line(line: &[u8], scratch: &mut Vec<u8>) -> Result<Line, UpstreamError> {
    let mut one = [httparse::EMPTY_HEADER; 1];
    match httparse::parse_headers(alone(line, scratch), &mut one) {
        Ok(httparse::Status::Complete((_, [header]))) => Line::parse(header),
        Ok(_) | Err(_) => Err(UpstreamError::Protocol("malformed response head")),
    }
}

/// `line` copied into `scratch` and followed by an empty line: a head of that line alone, which
/// httparse parses as it would the line within the whole head.
fn alone<'s>(line: &[u8], scratch: &'s mut Vec<u8>) -> &'s [u8] {
    scratch.clear();
    scratch.extend_from_slice(line);
    scratch.extend_from_slice(b"\r\n");
    scratch
}

/// The status and version httparse found.
fn status_of(parsed: &httparse::Response<'_, '_>) -> Result<(StatusCode, Version), UpstreamError> {
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
        .map_err(|_| UpstreamError::Protocol("invalid response status"))?;
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    Ok((status, version))
}

/// Parses the head at the start of `buffer` as a whole, with httparse: `None` while it is
/// incomplete. For the heads [`read_by_lines`] leaves.
fn read_whole(
    buffer: &[u8],
    response: &mut Response<()>,
) -> Result<Option<(usize, bool)>, UpstreamError> {
    // Uninitialised: httparse writes the lines it finds, and 100 empty ones are 3.2 KB to fill.
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buffer,
        &mut lines,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::Protocol("too many response headers"));
        }
        Err(_) => return Err(UpstreamError::Protocol("malformed response head")),
    };
    (*response.status_mut(), *response.version_mut()) = status_of(&parsed)?;
    let headers = response.headers_mut();
    headers.reserve(parsed.headers.len());
    let mut close = false;
    for raw in parsed.headers.iter() {
        let line = Line::parse(raw)?;
        close |= line.closes;
        if line.kept {
            headers.append(line.name, line.value);
        }
    }
    Ok(Some((length, close)))
}

/// A response header line as parsed and checked, and what it says of the connection.
#[derive(Clone)]
struct Line {
    name: HeaderName,
    value: HeaderValue,
    /// A `Connection` line asking to close the connection.
    closes: bool,
    /// Whether the line stays in the response: all but `Connection` lines that name no other
    /// header. (`Connection` speaks of this connection alone: it is read here, may it serve
    /// again, and kept only when it names headers for `headers::strip_hop_by_hop` to remove
    /// with it. Kept, then looked up and removed, it cost a thousand instructions.)
    kept: bool,
}

impl Line {
    fn parse(raw: &httparse::Header<'_>) -> Result<Line, UpstreamError> {
        let name = HeaderName::from_bytes(raw.name.as_bytes())
            .map_err(|_| UpstreamError::Protocol("invalid response header name"))?;
        let value = HeaderValue::from_bytes(raw.value)
            .map_err(|_| UpstreamError::Protocol("invalid response header value"))?;
        let (closes, kept) = if name == header::CONNECTION {
            (headers::asks_to_close(&value), headers::nominates(&value))
        } else {
            (false, true)
        };
        Ok(Line {
            name,
            value,
            closes,
            kept,
        })
    }
}

/// The last response head a thread read (see [`read_by_lines`]).
struct LastHead {
    /// The status line as vLLM wrote it, with its ending, and what it says.
    status_line: Box<[u8]>,
    status: (StatusCode, Version),
    /// The header lines after it, by position: as written (with the ending), and as parsed. At
    /// most [`LAST_LINES_MAX`] lines of at most [`LAST_LINE_BYTES`] are kept.
    lines: Vec<(Box<[u8]>, Line)>,
    /// Where a line is copied to be parsed alone.
    scratch: Vec<u8>,
}

impl LastHead {
    /// Nothing known yet.
    fn new() -> LastHead {
        LastHead {
            status_line: Box::default(),
            status: (StatusCode::OK, Version::HTTP_11),
            lines: Vec::new(),
            scratch: Vec::new(),
        }
    }
}

const LAST_LINES_MAX: usize = 16;
const LAST_LINE_BYTES: usize = 256;

thread_local! {
    static LAST_HEAD: RefCell<LastHead> = RefCell::new(LastHead::new());
}

/// How the response body is delimited (RFC 9112 section 6.3).
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Framing, UpstreamError> {
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        // The client's framing is hyper's: only chunked can be taken off (and a line that names
        // no coding at all frames nothing). vLLM's one line, `chunked`, is told without taking
        // the lines apart.
        let chunked = (first.as_bytes().eq_ignore_ascii_case(b"chunked")
            && codings.next().is_none())
            || (headers::tokens(headers, header::TRANSFER_ENCODING)
                .next()
                .is_some()
                && headers::chunked_only(headers));
        return if chunked {
            Ok(Framing::Chunked(Chunk::Size))
        } else {
            Err(UpstreamError::Protocol("unsupported transfer coding"))
        };
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        // Digits only (`+5` parses as a u64).
        let parsed = std::str::from_utf8(value.as_bytes().trim_ascii())
            .ok()
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u64>().ok())
            .ok_or(UpstreamError::Protocol("invalid content-length"))?;
        if length.is_some_and(|length| length != parsed) {
            return Err(UpstreamError::Protocol("conflicting content-length"));
        }
        length = Some(parsed);
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// How much of the response body is left, and how it is delimited.
enum Framing {
    /// This many bytes.
    Length(u64),
    /// Chunked transfer coding, at this point of it.
    Chunked(Chunk),
    /// Until vLLM closes the connection.
    Close,
    /// Read to its end.
    Done,
}

impl Framing {
    fn is_over(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Done)
    }
}

enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// vLLM's response body, read from its connection as the client side asks for it: the
/// connection goes back to the pool when the body has been read to its end, and closes if the
/// body is dropped before.
pub struct ResponseBody {
    connection: Option<Connection>,
    framing: Framing,
    reusable: bool,
    pool: Arc<Pool>,
}

impl ResponseBody {
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(mut connection) = self.connection.take()
            && self.reusable
            && connection.buffer.is_empty()
        {
            connection.reused = true;
            self.pool.put(connection);
        }
    }

    fn broken(
        &mut self,
        error: UpstreamError,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.framing = Framing::Done;
        self.connection = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            let buffer = &mut connection.buffer;
            // What the buffer holds, given out or consumed before reading more.
            match &mut this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) if !buffer.is_empty() => {
                    let data = take_counted(buffer, left);
                    if *left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !buffer.is_empty() => {
                    let data = buffer.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(chunk) if !buffer.is_empty() => match chunk {
                    Chunk::Size => match httparse::parse_chunk_size(buffer) {
                        Ok(httparse::Status::Complete((length, 0))) => {
                            buffer.advance(length);
                            *chunk = Chunk::Trailers;
                            continue;
                        }
                        Ok(httparse::Status::Complete((length, size))) => {
                            buffer.advance(length);
                            *chunk = Chunk::Data(size);
                            continue;
                        }
                        Ok(httparse::Status::Partial) if buffer.len() < MAX_LINE => {}
                        _ => return this.broken(UpstreamError::Protocol("invalid chunk size")),
                    },
                    // vLLM writes each event of a stream as one chunk: passed on whole, a chunk
                    // cut off by vLLM's death leaves no half event ahead of the error event that
                    // ends the stream, which a client's parser would take for a whole one.
                    Chunk::Data(left)
                        if *left <= buffer.len() as u64 || *left > READ_MAX as u64 =>
                    {
                        let data = take_counted(buffer, left);
                        if *left == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Chunk::Data(_) => {}
                    Chunk::DataEnd => {
                        if buffer.len() >= 2 {
                            if &buffer[..2] != b"\r\n" {
                                return this.broken(UpstreamError::Protocol("invalid chunk end"));
                            }
                            buffer.advance(2);
                            *chunk = Chunk::Size;
                            continue;
                        }
                        if buffer[0] != b'\r' {
                            return this.broken(UpstreamError::Protocol("invalid chunk end"));
                        }
                    }
                    Chunk::Trailers => match buffer.windows(2).position(|pair| pair == b"\r\n") {
                        Some(0) => {
                            buffer.advance(2);
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Some(line) => {
                            buffer.advance(line + 2);
                            continue;
                        }
                        None if buffer.len() < MAX_LINE => {}
                        None => return this.broken(UpstreamError::Protocol("trailers too large")),
                    },
                },
                _ => {}
            }
            match ready!(connection.poll_fill(cx)) {
                Ok(0) => {
                    if matches!(this.framing, Framing::Close) {
                        // The end of the connection is the end of this body.
                        this.reusable = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    return this.broken(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
                Ok(_) => {}
                Err(error) => return this.broken(error.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_over()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Up to `left` bytes from the front of `buffer`, counted off `left`.
fn take_counted(buffer: &mut BytesMut, left: &mut u64) -> Bytes {
    let take = usize::try_from(*left).map_or(buffer.len(), |left| left.min(buffer.len()));
    *left -= take as u64;
    buffer.split_to(take).freeze()
}

/// The idle connections of one worker.
struct Pool {
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    max_idle: usize,
}

struct Idle {
    /// Most recently used last: a request takes the warmest connection.
    connections: Vec<(Connection, Instant)>,
    /// Whether a task is sweeping out closed and expired connections.
    reaper: bool,
}

impl Pool {
    /// The warmest idle connection still open. Those that closed or idled too long are dropped
    /// on the way.
    fn take(&self) -> Option<Connection> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while let Some((connection, since)) = idle.connections.pop() {
            if now.saturating_duration_since(since) < self.idle_timeout && !connection.is_closed() {
                return Some(connection);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, connection: Connection) {
        let mut idle = self.idle.lock();
        if idle.connections.len() >= self.max_idle {
            return;
        }
        idle.connections.push((connection, Instant::now()));
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
            let mut idle = self.idle.lock();
            idle.connections.retain(|(connection, since)| {
                now.saturating_duration_since(*since) < self.idle_timeout && !connection.is_closed()
            });
            if idle.connections.is_empty() {
                idle.reaper = false;
                return;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncReadExt as _;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn bodies_are_framed_as_rfc_9112_says() {
        let framed = |method: Method, status: u16, pairs: &[(&str, &str)]| {
            framing(
                &method,
                StatusCode::from_u16(status).expect("status"),
                &headers(pairs),
            )
        };
        let length = [("content-length", "5")];
        assert!(matches!(
            framed(Method::HEAD, 200, &length),
            Ok(Framing::Length(0))
        ));
        assert!(matches!(
            framed(Method::GET, 204, &[]),
            Ok(Framing::Length(0))
        ));
        assert!(matches!(
            framed(Method::GET, 304, &length),
            Ok(Framing::Length(0))
        ));
        assert!(matches!(
            framed(Method::GET, 200, &length),
            Ok(Framing::Length(5))
        ));
        assert!(matches!(
            framed(
                Method::POST,
                200,
                &[("transfer-encoding", "Chunked"), ("content-length", "5")]
            ),
            Ok(Framing::Chunked(Chunk::Size))
        ));
        // A coding the client could not be told of.
        assert!(framed(Method::POST, 200, &[("transfer-encoding", "gzip, chunked")]).is_err());
        assert!(framed(Method::POST, 200, &[("transfer-encoding", "gzip")]).is_err());
        assert!(matches!(framed(Method::POST, 200, &[]), Ok(Framing::Close)));
        assert!(
            framed(
                Method::GET,
                200,
                &[("content-length", "5"), ("content-length", "6")]
            )
            .is_err()
        );
        assert!(framed(Method::GET, 200, &[("content-length", "-1")]).is_err());
        assert!(framed(Method::GET, 200, &[("content-length", "+5")]).is_err());
        assert!(framed(Method::GET, 200, &[("content-length", "")]).is_err());
        assert!(matches!(
            framed(Method::GET, 200, &[("content-length", " 5 ")]),
            Ok(Framing::Length(5))
        ));
    }

    #[test]
    fn request_heads_leave_out_hop_by_hop_lines_and_take_the_gateways_own() {
        let mut headers = HeaderMap::new();
        headers.append(header::HOST, HeaderValue::from_static("client"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-a, close"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append(header::TE, HeaderValue::from_static("trailers"));
        headers.append(&headers::X_REQUEST_ID, HeaderValue::from_static("theirs"));
        headers.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.append(header::ACCEPT, HeaderValue::from_static("text/plain"));
        let (host, id) = (
            HeaderValue::from_static("vllm:8000"),
            HeaderValue::from_static("ours"),
        );
        let head = |authorization| Head {
            method: &Method::POST,
            target: "/v1/responses?x=1",
            headers: &headers,
            host: &host,
            request_id: &id,
            authorization,
        };
        let encoded = |head, mut body| String::from_utf8(encode_head(head, &mut body).0);
        let key = HeaderValue::from_static("Bearer k");
        assert_eq!(
            encoded(
                head(Some(&key)),
                RequestBody::Whole(Bytes::from_static(b"{}"))
            ),
            Ok(
                "POST /v1/responses?x=1 HTTP/1.1\r\naccept: */*\r\naccept: text/plain\r\n\
                host: vllm:8000\r\nx-request-id: ours\r\nauthorization: Bearer k\r\n\
                content-length: 2\r\n\r\n{}"
                    .to_string()
            )
        );
        assert_eq!(
            encoded(head(None), RequestBody::Empty),
            Ok(
                "POST /v1/responses?x=1 HTTP/1.1\r\naccept: */*\r\naccept: text/plain\r\n\
                host: vllm:8000\r\nx-request-id: ours\r\n\r\n"
                    .to_string()
            )
        );
    }

    #[test]
    fn interim_heads_are_skipped_and_final_ones_parsed() {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert!(matches!(
            parse_head(interim, &Method::POST),
            Ok(Some((25, Parsed::Interim)))
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nA: b", &Method::GET),
            Ok(None)
        ));
        let head = b"HTTP/1.0 404 Not Found\r\nX-A: 1\r\nx-a: 2\r\ncontent-length: 0\r\n\r\nrest";
        let Ok(Some((length, Parsed::Final(response, _, reusable)))) =
            parse_head(head, &Method::GET)
        else {
            panic!("a complete head");
        };
        assert_eq!(length, head.len() - 4);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers().get_all("x-a").iter().count(), 2);
        assert!(!reusable, "an HTTP/1.0 answer closes its connection");
        assert_eq!(
            response.version(),
            Version::HTTP_11,
            "the gateway's own version"
        );
        assert!(parse_head(b"HTTP/1.1 2000 No\r\n\r\n", &Method::GET).is_err());
        assert!(parse_head(b"garbage\r\n\r\n", &Method::GET).is_err());
    }

    #[test]
    fn a_length_beside_chunked_coding_is_dropped_and_a_head_over_the_limit_refused() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n";
        let Ok(Some((_, Parsed::Final(response, Framing::Chunked(_), _)))) =
            parse_head(head, &Method::GET)
        else {
            panic!("a complete chunked head");
        };
        assert_eq!(response.headers().get(header::CONTENT_LENGTH), None);
        // Whole in one read, however large: the limit is the head's, not the read's.
        let large = format!(
            "HTTP/1.1 200 OK\r\nx-large: {}\r\ncontent-length: 0\r\n\r\n",
            "a".repeat(READ_MAX)
        );
        assert!(parse_head(large.as_bytes(), &Method::GET).is_err());
    }

    #[test]
    fn connection_decides_reuse_and_stays_only_when_it_names_headers() {
        let parsed = |connection: &str| {
            let head = format!(
                "HTTP/1.1 200 OK\r\nconnection: {connection}\r\nx-hop: 1\r\ncontent-length: 0\r\n\r\n"
            );
            let Ok(Some((_, Parsed::Final(response, _, reusable)))) =
                parse_head(head.as_bytes(), &Method::GET)
            else {
                panic!("a complete head");
            };
            let kept = response
                .headers()
                .get(header::CONNECTION)
                .map(|value| value.to_str().expect("ascii").to_owned());
            (kept, reusable)
        };
        assert_eq!(parsed("keep-alive"), (None, true));
        assert_eq!(parsed("Close"), (None, false));
        assert_eq!(parsed("x-hop, close"), (Some("x-hop, close".into()), false));
        assert_eq!(
            parsed("keep-alive, x-hop"),
            (Some("keep-alive, x-hop".into()), true)
        );
    }

    #[test]
    fn lines_like_the_last_heads_are_taken_as_they_are_now() {
        let parsed = |head: &str| {
            let Ok(Some((_, Parsed::Final(response, _, reusable)))) =
                parse_head(head.as_bytes(), &Method::GET)
            else {
                panic!("a complete head");
            };
            let lines: Vec<(String, String)> = response
                .headers()
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_str().expect("ascii").into()))
                .collect();
            (lines, reusable)
        };
        let line = |name: &str, value: &str| (name.to_string(), value.to_string());
        let first =
            "HTTP/1.1 200 OK\r\nServer: a\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n";
        let expected = vec![line("server", "a"), line("content-length", "0")];
        assert_eq!(parsed(first), (expected.clone(), true));
        assert_eq!(parsed(first), (expected, true), "the same head again");
        // Each position changes in turn: a value, a name's case, a name, the connection's wish.
        let changed =
            "HTTP/1.1 200 OK\r\nServer: b\r\ncontent-length: 0\r\nConnection: close\r\n\r\n";
        let expected = vec![line("server", "b"), line("content-length", "0")];
        assert_eq!(parsed(changed), (expected, false));
        let other =
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nServer: b\r\nx-extra: 1\r\nx-more: 2\r\n\r\n";
        let expected = vec![
            line("content-length", "0"),
            line("server", "b"),
            line("x-extra", "1"),
            line("x-more", "2"),
        ];
        assert_eq!(parsed(other), (expected, true));
        let fewer = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parsed(fewer), (vec![line("content-length", "0")], true));
        let renamed = "HTTP/1.1 200 OK\r\nx-zero: 0\r\nContent-Length: 0\r\n\r\n";
        let expected = vec![line("x-zero", "0"), line("content-length", "0")];
        assert_eq!(parsed(renamed), (expected, true));
        // A value too long to keep is taken all the same, and so is what follows it.
        let long = "x".repeat(LAST_LINE_BYTES);
        let head = format!("HTTP/1.1 200 OK\r\nx-long: {long}\r\nContent-Length: 0\r\n\r\n");
        let expected = vec![line("x-long", &long), line("content-length", "0")];
        assert_eq!(parsed(&head), (expected.clone(), true));
        assert_eq!(parsed(&head), (expected, true));
        assert!(
            parse_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nServer: \x7f\r\n\r\n",
                &Method::GET
            )
            .is_err()
        );
    }

    /// What a head reads as (status, version, lines, length, close), `None` while incomplete,
    /// or `Err` when refused.
    type Reading = Option<Result<(StatusCode, Version, Vec<(String, Vec<u8>)>, usize, bool), ()>>;

    fn reading(
        read: impl FnOnce(&mut Response<()>) -> Option<Result<(usize, bool), UpstreamError>>,
    ) -> Reading {
        let mut response = Response::new(());
        let read = read(&mut response)?;
        Some(read.map_err(|_| ()).map(|(length, close)| {
            let lines = response
                .headers()
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect();
            (response.status(), response.version(), lines, length, close)
        }))
    }

    #[test]
    fn heads_read_by_lines_read_as_whole_heads_do() {
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let long = format!(
            "HTTP/1.1 200 {}\r\nx-long: {}\r\nx: 1\r\n\r\n",
            "O".repeat(LAST_LINE_BYTES),
            "v".repeat(LAST_LINE_BYTES)
        );
        let heads: Vec<&[u8]> = vec![
            b"HTTP/1.1 200 OK\r\nServer: a\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nServer: a\r\nContent-Length: 10\r\nx-more: 1\r\n\r\nbody",
            b"HTTP/1.1 200 OK\nServer: a\nContent-Length: 0\n\n",
            b"HTTP/1.1 404 Not Found\r\nServer: a\r\n\r\n",
            b"HTTP/1.1 204\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nx: 1\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx:  padded \t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x\r\nx: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: \xe2\x80\xa6\r\n\r\n",
            b"\r\nHTTP/1.1 200 OK\r\n\r\n",
            long.as_bytes(),
            // Refused, whichever way they are read.
            b"HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx : a\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: a\rb\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: \x7f\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"garbage\r\n\r\n",
            many.as_bytes(),
        ];
        for head in &heads {
            let whole = reading(|response| read_whole(head, response).transpose());
            assert!(
                whole.is_some(),
                "{:?} is complete",
                String::from_utf8_lossy(head)
            );
            // By lines, with nothing known, then knowing every head read before it, then itself.
            let mut last = LastHead::new();
            for _ in 0..2 {
                let by_lines = reading(|response| read_by_lines(head, &mut last, response));
                let by_lines = by_lines.or_else(|| whole.clone());
                assert_eq!(by_lines, whole, "{:?}", String::from_utf8_lossy(head));
            }
            for other in &heads {
                let mut last = LastHead::new();
                let _ = reading(|response| read_by_lines(other, &mut last, response));
                let by_lines = reading(|response| read_by_lines(head, &mut last, response))
                    .or_else(|| whole.clone());
                assert_eq!(by_lines, whole, "{:?}", String::from_utf8_lossy(head));
            }
            // Cut short, a head is incomplete for both, or refused by both.
            for cut in 0..head.len() {
                let part = &head[..cut];
                let whole = reading(|response| read_whole(part, response).transpose());
                let mut last = LastHead::new();
                let _ = reading(|response| read_by_lines(head, &mut last, response));
                match reading(|response| read_by_lines(part, &mut last, response)) {
                    None => {}
                    Some(Err(())) => assert_eq!(whole, Some(Err(())), "{part:?}"),
                    Some(Ok(read)) => assert_eq!(whole, Some(Ok(read)), "{part:?}"),
                }
            }
        }
    }

    /// A listener on a free loopback port, and the port.
    async fn listen() -> (tokio::net::TcpListener, u16) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        (listener, port)
    }

    /// An upstream on loopback that reads one request and writes `pieces` apart, then closes the
    /// connection if `close`, else waits for the gateway to close it.
    async fn upstream(pieces: Vec<&'static [u8]>, close: bool) -> u16 {
        let (listener, port) = listen().await;
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await;
            for piece in pieces {
                socket.write_all(piece).await.expect("write");
                socket.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !close {
                let _ = socket.read(&mut request).await;
            }
        });
        port
    }

    /// An upstream on loopback at `port`.
    fn upstream_at(port: u16) -> Upstream {
        counted_upstream_at(port, Arc::default())
    }

    /// An upstream on loopback at `port` whose reads are counted in `reads`.
    fn counted_upstream_at(port: u16, reads: Arc<ReadCount>) -> Upstream {
        let base: http::Uri = format!("http://127.0.0.1:{port}").parse().expect("uri");
        Upstream::new(
            &base,
            Duration::from_secs(5),
            Duration::from_secs(5),
            8,
            reads,
        )
        .expect("upstream")
    }

    /// `GET /v1/models` through `upstream`, its head answered by `deadline`.
    async fn send_get_models(
        upstream: &Upstream,
        deadline: Instant,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let headers = HeaderMap::new();
        let request_id = HeaderValue::from_static("1");
        let request = Head {
            method: &Method::GET,
            target: "/v1/models",
            headers: &headers,
            host: &upstream.host_header,
            request_id: &request_id,
            authorization: None,
        };
        upstream.send(request, RequestBody::Empty, deadline).await
    }

    /// `GET /v1/models` through `upstream`, answered by `deadline`, and the whole response.
    async fn get_models(
        upstream: &Upstream,
        deadline: Instant,
    ) -> Result<(Response<()>, Bytes), UpstreamError> {
        let (head, body) = send_get_models(upstream, deadline).await?.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok((Response::from_parts(head, ()), bytes))
    }

    async fn fetch(port: u16) -> Result<(Response<()>, Bytes), UpstreamError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        get_models(&upstream_at(port), deadline).await
    }

    /// Only what vLLM wrote since the socket was last found empty counts as its sign of life: a
    /// backlog it wrote before it went quiet (a frozen vLLM, a slow client's stream) is counted
    /// once however many reads it takes, and what it writes afterwards counts again.
    #[tokio::test]
    async fn reads_of_a_backlog_count_once_and_fresh_writes_again() {
        const BACKLOG: usize = 100_000;
        let (listener, port) = listen().await;
        let (written_tx, written_rx) = tokio::sync::oneshot::channel();
        let (more_tx, more_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await;
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", BACKLOG + 1).into_bytes();
            answer.resize(answer.len() + BACKLOG, b'x');
            socket.write_all(&answer).await.expect("write");
            let _ = written_tx.send(());
            let _ = more_rx.await;
            socket.write_all(b"y").await.expect("write");
            let _ = socket.read(&mut request).await;
        });
        let reads = crate::status::VllmReads::default();
        let upstream = counted_upstream_at(port, reads.worker());
        let count = || reads.total();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut body = send_get_models(&upstream, deadline)
            .await
            .expect("answer")
            .into_body();
        written_rx.await.expect("the backlog written");
        let (mut taken, mut frames) = (0, 0);
        while taken < BACKLOG {
            let frame = body.frame().await.expect("a frame").expect("data");
            taken += frame.into_data().expect("data").len();
            frames += 1;
        }
        assert!(frames >= 5, "the backlog took {frames} reads");
        let backlog = count();
        assert!(
            (1..=2).contains(&backlog),
            "{backlog} counted for {frames} reads"
        );
        more_tx.send(()).expect("ask for more");
        let last = body.frame().await.expect("a frame").expect("data");
        assert_eq!(&last.into_data().expect("data")[..], b"y");
        assert_eq!(count(), backlog + 1, "a fresh write counts");
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_however_the_reads_split_them() {
        let port = upstream(
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r",
                b"\nhel",
                b"lo\r",
                b"\n0\r\ntrailer: x\r\n",
                b"\r\n",
            ],
            false,
        )
        .await;
        let (head, body) = fetch(port).await.expect("response");
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(&body[..], b"hello");
    }

    /// A chunk comes out as one frame however the reads split it, so a stream cut off halfway
    /// through one gives out only whole events; one longer than `READ_MAX` comes out as it is read.
    #[tokio::test]
    async fn chunks_are_given_out_whole_up_to_the_read_limit() {
        static LONG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut long = format!("{:x}\r\n", READ_MAX + 1).into_bytes();
            long.resize(long.len() + READ_MAX + 1, b'x');
            long.extend_from_slice(b"\r\n0\r\n\r\n");
            long
        });
        let port = upstream(
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                b"9\r\ndata: ",
                b"1\n\n",
                b"\r\n9\r\ndata: 2\n\n\r\n",
                b"9\r\ndata: 3",
            ],
            true,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut body = send_get_models(&upstream_at(port), deadline)
            .await
            .expect("response")
            .into_body();
        let mut frames = Vec::new();
        let end = loop {
            match body.frame().await {
                Some(Ok(frame)) => frames.push(frame.into_data().expect("data")),
                Some(Err(error)) => break error,
                None => panic!("a body cut short ends with an error"),
            }
        };
        assert_eq!(frames, [&b"data: 1\n\n"[..], &b"data: 2\n\n"[..]]);
        assert!(matches!(end, UpstreamError::Io(_)), "{end}");

        let port = upstream(
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                LONG.as_slice(),
            ],
            false,
        )
        .await;
        let mut body = send_get_models(&upstream_at(port), deadline)
            .await
            .expect("response")
            .into_body();
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            sizes.push(frame.expect("a frame").into_data().expect("data").len());
        }
        assert!(sizes.len() > 1, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), READ_MAX + 1);
    }

    /// A deadline that passed while its connection sat in the pool does not cut the connection's
    /// next exchange short, and a deadline that passes while vLLM is silent ends the exchange.
    #[tokio::test]
    async fn each_exchange_keeps_its_own_deadline_on_a_reused_connection() {
        let (listener, port) = listen().await;
        // One connection only: the two answered requests must share it. The third gets no answer.
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            for _ in 0..2 {
                let _ = socket.read(&mut request).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                socket.write_all(answer).await.expect("write");
            }
            while socket.read(&mut request).await.is_ok_and(|read| read > 0) {}
        });
        let upstream = upstream_at(port);
        let exchange = async |deadline| {
            let (_, body) = get_models(&upstream, deadline).await?;
            Ok::<_, UpstreamError>(body)
        };
        let first = Instant::now() + Duration::from_millis(50);
        assert_eq!(&exchange(first).await.expect("answered")[..], b"ok");
        tokio::time::sleep_until(first + Duration::from_millis(10)).await;
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(&exchange(later).await.expect("answered again")[..], b"ok");
        let started = Instant::now();
        let silent = exchange(started + Duration::from_millis(50)).await;
        assert!(matches!(silent, Err(UpstreamError::Timeout)), "{silent:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not by the deadline"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_one_delimited_by_the_close_is_whole() {
        let cut = upstream(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"],
            true,
        )
        .await;
        assert!(fetch(cut).await.is_err(), "10 bytes declared, 5 sent");
        let closed = upstream(vec![b"HTTP/1.1 200 OK\r\n\r\nhel", b"lo"], true).await;
        let (_, body) = fetch(closed).await.expect("response");
        assert_eq!(&body[..], b"hello");
        let bad = upstream(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
            true,
        )
        .await;
        assert!(fetch(bad).await.is_err(), "an invalid chunk size");
    }
}
