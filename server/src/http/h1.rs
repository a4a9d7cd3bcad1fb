//! The native HTTP/1.1 engine, on monoio's completion-based (io_uring) sockets.
//!
//! hyper over monoio's poll adapter serves HTTP/1.1 correctly and fast enough for the
//! throughput bar, but it can only write response bodies by copying them into the socket.
//! Owning the HTTP/1.1 write path lets a GET hand a shard's pages to the kernel instead
//! (see `splice`); docs/PERFORMANCE.md has the measurements behind this. HTTP/2 stays
//! with hyper: a connection that opens with the HTTP/2 preface is handed over.
//!
//! The engine speaks what the shard API needs: keep-alive and pipelined requests,
//! Content-Length and chunked request bodies, `Expect: 100-continue`, HTTP/1.0 clients.
//! Framing is strict (RFC 9112): a chunk size is hex digits and nothing else before its
//! extensions, every line of a chunked body ends in CRLF, trailers are bounded, a transfer
//! coding other than `chunked` is refused with 501, and an HTTP/1.1 request without
//! exactly one Host is refused. Malformed requests get a 400 (431 for oversized heads) and
//! a closed connection.
//!
//! Parsing is linear in the bytes received, whatever the client's pacing: the read buffer
//! has a cursor (consumed bytes are skipped, not moved, and the rest is moved down only
//! when that is paid for by what was consumed), the end of a head is searched for only in
//! bytes that arrived since the last search, and the full head is parsed once it is there
//! (plus at doubling sizes on the way, so that garbage is refused early). A body with a
//! declared length is read from the socket straight into its record buffer.

use std::{cell::Cell, io, rc::Rc, time::Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use monoio::{
    buf::{IoBufMut, IoVecBuf},
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
};

use super::{
    CoreContext,
    conn::Activity,
    service::{self, BodyError, CloseConnection, DISCARD_LIMIT, Reply, RequestBody, ZeroCopy},
    splice::{self, SplicePipe},
};
use crate::{budget::BodyPermit, metrics, store::PendingRecord};

/// Request line and headers together may not exceed this; beyond it the answer is 431.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Every connection's read buffer starts this small; a head or chunked body that needs
/// more grows it (up to `READ_SIZE`, or `MAX_HEAD` for a head), paying the growth from the
/// body budget, and it shrinks back when the connection goes idle. Ten thousand idle
/// keep-alive connections then hold 40 MiB, not 640.
const INITIAL_BUF: usize = 4 * 1024;
/// Room asked for on every socket read once a buffer is in use for a body.
const READ_SIZE: usize = 64 * 1024;
/// A read is worth its system call only with this much room; with less, the buffer is
/// compacted or grown first.
const MIN_READ: usize = 1024;
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE: usize = 4096;
/// Trailer fields accepted after a chunked body (they are read and dropped).
const MAX_TRAILERS: usize = 32;
/// How long, and how much, a refused client's remaining input is read and dropped.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;
/// Bodies up to this size are copied after the head into one write; larger ones go out
/// as a second iovec of the same writev, without a copy.
const INLINE_BODY: usize = 16 * 1024;
/// Why a body read fails when the client goes away.
const CLOSED_MID_BODY: &str = "the connection closed before the body ended";
/// What every HTTP/2 connection starts with; no HTTP/1 method begins like it.
pub const H2_PREFACE_START: &[u8] = b"PRI ";

/// How a connection served by the engine ended.
pub enum Ended {
    /// Closed (by either side) after its requests.
    Closed,
    /// The client opened with the HTTP/2 preface: the stream and the bytes read so far go
    /// to hyper.
    Http2(TcpStream, Vec<u8>),
}

/// Bytes read from the socket: `data[start..]` is not consumed yet.
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
}

impl ReadBuf {
    fn new() -> Self {
        Self {
            data: Vec::with_capacity(INITIAL_BUF),
            start: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.data[self.start..]
    }

    fn len(&self) -> usize {
        self.data.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks `n` bytes as consumed: O(1).
    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.data.len());
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
    }

    /// Makes at least `want` bytes of room after the unread bytes without exceeding
    /// `limit` bytes of allocation: moves the unread bytes down when at least as many have
    /// been consumed (so each byte moves at most once per byte consumed before it), grows
    /// the allocation otherwise. Returns the room there is (zero when `limit` is reached
    /// with the buffer full of unread bytes).
    fn make_room(&mut self, want: usize, limit: usize) -> usize {
        let free = self.data.capacity() - self.data.len();
        if free >= want {
            return free;
        }
        if self.start > 0 && self.start >= self.len() {
            self.data.drain(..self.start);
            self.start = 0;
        }
        let free = self.data.capacity() - self.data.len();
        if free < want && self.data.capacity() < limit {
            // Doubling keeps the copies of a growing head linear.
            let target = (self.data.len() + want)
                .max(2 * self.data.capacity())
                .min(limit);
            self.data.reserve_exact(target - self.data.len());
        }
        self.data.capacity() - self.data.len()
    }
}

struct Conn<'a> {
    stream: TcpStream,
    buf: ReadBuf,
    /// Pays for `buf` beyond `INITIAL_BUF`.
    buf_permit: Option<BodyPermit>,
    ctx: &'a CoreContext,
    activity: &'a Activity,
    /// Send replies marked zero-copy by splicing (see `splice`).
    zero_copy: bool,
    /// Made on the first spliced reply.
    pipe: Option<SplicePipe>,
}

struct Head {
    method: Method,
    path: String,
    http10: bool,
    headers: HeaderMap,
}

/// A request refused before it reached the service.
struct Refusal {
    status: StatusCode,
    message: &'static str,
}

impl Refusal {
    fn new(status: StatusCode, message: &'static str) -> Self {
        Self { status, message }
    }

    fn bad(message: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// Serves HTTP/1.1 requests on `stream` until the client leaves, an error or a shutdown
/// (`closing`) ends the connection.
pub async fn serve(
    ctx: &Rc<CoreContext>,
    stream: TcpStream,
    activity: &Rc<Activity>,
    closing: &Cell<bool>,
) -> io::Result<Ended> {
    let mut conn = Conn {
        stream,
        buf: ReadBuf::new(),
        buf_permit: None,
        ctx,
        activity,
        zero_copy: ctx.node.http.zero_copy,
        pipe: None,
    };

    // Tell HTTP/2 with prior knowledge from HTTP/1 by the first bytes.
    while conn.buf.len() < H2_PREFACE_START.len() && H2_PREFACE_START.starts_with(conn.buf.unread())
    {
        if conn.fill(INITIAL_BUF).await? == 0 {
            return Ok(Ended::Closed);
        }
    }
    if conn.buf.unread().starts_with(H2_PREFACE_START) {
        let replay = conn.buf.unread().to_vec();
        return Ok(Ended::Http2(conn.stream, replay));
    }

    loop {
        let head = match conn.read_head().await? {
            None => return Ok(Ended::Closed),
            Some(Ok(head)) => head,
            Some(Err(refusal)) => {
                conn.refuse(ctx, refusal).await;
                return Ok(Ended::Closed);
            }
        };
        let in_progress = activity.begin_request();
        let framing = match Framing::of(&head) {
            Ok(framing) => framing,
            Err(refusal) => {
                conn.refuse(ctx, refusal).await;
                return Ok(Ended::Closed);
            }
        };
        let mut keep_alive = head.keep_alive();
        let expects_continue =
            !head.http10 && framing.has_body() && service::expects_continue(&head.headers);
        let mut body = Body::new(&mut conn, framing, expects_continue);
        let reply = service::respond(ctx, &head.method, &head.path, &head.headers, &mut body).await;
        if reply.extensions().get::<CloseConnection>().is_some() {
            // The node will not read this body (it has no memory for it): answer and
            // close, without inviting or draining anything.
            keep_alive = false;
        } else {
            // A small body the service did not read is skipped so that the connection can
            // carry the next request; otherwise the stream is mid-message and must close.
            service::drain(&mut body, DISCARD_LIMIT).await;
            keep_alive &= body.is_finished();
        }
        drop(body);
        keep_alive &= !closing.get();
        conn.write_reply(head.method == Method::HEAD, reply, keep_alive)
            .await?;
        drop(in_progress);
        if !keep_alive {
            let _ = conn.stream.shutdown().await;
            return Ok(Ended::Closed);
        }
        conn.shrink_when_idle();
    }
}

impl Conn<'_> {
    /// Reads more bytes from the socket into the buffer, which may grow to `limit`
    /// bytes (paid from the body budget beyond `INITIAL_BUF`); 0 at end of stream. An
    /// error if the buffer is full of unread bytes at `limit`, or the budget is spent.
    /// Heads read into whatever room the buffer has (`MIN_READ` at least); bodies ask
    /// for larger reads, so a chunked body grows the buffer.
    async fn fill(&mut self, limit: usize) -> io::Result<usize> {
        let want = if limit > MAX_LINE + 2 && limit != MAX_HEAD {
            (limit / 4).clamp(MIN_READ, READ_SIZE)
        } else {
            MIN_READ.min(limit)
        };
        let before = self.buf.data.capacity();
        let room = self.buf.make_room(want, limit);
        let capacity = self.buf.data.capacity();
        if capacity > before && capacity > INITIAL_BUF {
            let paid = match &mut self.buf_permit {
                Some(permit) => permit.grow_to(capacity as u64),
                None => match self.ctx.node.budget.try_take(capacity as u64) {
                    Some(permit) => {
                        self.buf_permit = Some(permit);
                        true
                    }
                    None => false,
                },
            };
            if !paid {
                return Err(io::Error::other(
                    "no body budget left for this connection's read buffer",
                ));
            }
        }
        if room == 0 {
            return Err(io::Error::other("read buffer full"));
        }
        let filled = self.buf.data.len();
        let data = std::mem::take(&mut self.buf.data);
        let (result, slice) = self.stream.read(data.slice_mut(filled..capacity)).await;
        self.buf.data = slice.into_inner();
        let n = result?;
        if n > 0 {
            self.activity.on_read(Instant::now(), n);
        }
        Ok(n)
    }

    /// Between requests: a buffer that grew for a big head or a chunked body goes back
    /// to its first size, and its budget with it.
    fn shrink_when_idle(&mut self) {
        if self.buf.data.capacity() > INITIAL_BUF && self.buf.len() <= INITIAL_BUF {
            let mut small = Vec::with_capacity(INITIAL_BUF);
            small.extend_from_slice(self.buf.unread());
            self.buf = ReadBuf {
                data: small,
                start: 0,
            };
            self.buf_permit = None;
        }
    }

    /// The next request's head: `None` if the client closed between requests.
    async fn read_head(&mut self) -> io::Result<Option<Result<Head, Refusal>>> {
        // Bytes of the unread part already searched for the end of the head.
        let mut scanned = 0;
        // Partial parses happen at doubling sizes only, so that garbage is refused early
        // while a head that trickles in byte by byte costs linear time.
        let mut next_probe = 512;
        loop {
            let unread = self.buf.unread();
            if let Some(end) = head_end(unread, scanned) {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                let parsed = request.parse(&unread[..end]);
                let result = match parsed {
                    Ok(httparse::Status::Complete(len)) => {
                        let head = Head::parse(&request);
                        self.buf.consume(len);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) => Err(Refusal::bad("malformed request\n")),
                    Err(e) => Err(refusal_for(e)),
                };
                return Ok(Some(result));
            }
            scanned = unread.len();
            if unread.len() >= MAX_HEAD {
                return Ok(Some(Err(Refusal::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large\n",
                ))));
            }
            if unread.len() >= next_probe {
                next_probe = unread.len() * 2;
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                if let Err(e) = httparse::Request::new(&mut headers).parse(unread) {
                    return Ok(Some(Err(refusal_for(e))));
                }
            } else if !unread.is_empty() && unread.len() < 16 && !starts_like_a_method(unread) {
                return Ok(Some(Err(Refusal::bad("malformed request\n"))));
            }
            match self.fill(MAX_HEAD).await {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                // The client closed in the middle of a head: nothing to answer.
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Other => {
                    return Ok(Some(Err(Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no memory for this request head now\n",
                    ))));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Answers a request that cannot be served, counts it, and leaves the connection to be
    /// closed.
    async fn refuse(&mut self, ctx: &CoreContext, refusal: Refusal) {
        ctx.metrics().record_request(
            metrics::METHODS.len() - 1,
            refusal.status.as_u16(),
            Default::default(),
        );
        let mut reply = Reply::new(Some(Bytes::from_static(refusal.message.as_bytes())));
        *reply.status_mut() = refusal.status;
        reply.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let _ = self.write_reply(false, reply, false).await;
        let _ = self.stream.shutdown().await;
        self.linger().await;
    }

    /// After a refusal: closing a socket with unread input makes the kernel send a reset,
    /// which can destroy the reply before the client reads it (a client still sending an
    /// oversized head, say). So what the client still sends is read and dropped, into the
    /// buffer the connection has, until it closes, or for `LINGER_TIME` and `LINGER_BYTES`
    /// at most (nginx's lingering close).
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER_TIME;
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            self.buf.consume(self.buf.len());
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            let limit = self.buf.data.capacity().max(INITIAL_BUF);
            match monoio::time::timeout(left, self.fill(limit)).await {
                Ok(Ok(n)) if n > 0 => discarded += n,
                _ => return,
            }
        }
    }

    /// Writes a reply: the head, then the body without copying it when it is large.
    /// `head_only` answers a HEAD request: no body, but the length a GET would have had.
    async fn write_reply(
        &mut self,
        head_only: bool,
        reply: Reply,
        keep_alive: bool,
    ) -> io::Result<()> {
        let (parts, body) = reply.into_parts();
        let spliceable = parts.extensions.get::<ZeroCopy>().is_some();
        // The length a GET's body has, which a HEAD reply announces too (RFC 9110, 8.6).
        let full_len = body.as_ref().map_or(0, Bytes::len);
        let body = if head_only {
            None
        } else {
            body.filter(|b| !b.is_empty())
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut has_length = false;
        for (name, value) in &parts.headers {
            // The engine decides whether the connection stays open, and says so below.
            if name == header::CONNECTION {
                continue;
            }
            if name == header::CONTENT_LENGTH {
                // HEAD replies carry the length of the body a GET would have sent.
                if !head_only {
                    continue;
                }
                has_length = true;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if parts.status != StatusCode::NO_CONTENT && !has_length {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(full_len.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");

        let m = self.ctx.metrics();
        let result = match body {
            Some(body) if body.len() > INLINE_BODY && spliceable && self.zero_copy => {
                self.splice_reply(out, body).await
            }
            Some(body) if body.len() > INLINE_BODY => {
                metrics::add(&m.bodies_writev, 1);
                self.write_head_and_body(HeadAndBody::new(out, body)).await
            }
            Some(body) => {
                metrics::add(&m.bodies_inline, 1);
                out.extend_from_slice(&body);
                self.stream.write_all(out).await.0.map(drop)
            }
            None => self.stream.write_all(out).await.0.map(drop),
        };
        self.activity.on_write(Instant::now());
        result
    }

    /// Sends a reply whose body is spliceable without copying it; falls back to writev if
    /// the connection cannot get a pipe.
    async fn splice_reply(&mut self, head: Vec<u8>, body: Bytes) -> io::Result<()> {
        if self.pipe.is_none() {
            match SplicePipe::new() {
                Ok(pipe) => {
                    tracing::debug!(capacity = pipe.capacity(), "a pipe for spliced replies");
                    self.pipe = Some(pipe);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no pipe for zero-copy replies; copying");
                    self.zero_copy = false;
                    metrics::add(&self.ctx.metrics().bodies_writev, 1);
                    return self.write_head_and_body(HeadAndBody::new(head, body)).await;
                }
            }
        }
        let pipe = self.pipe.as_ref().expect("made above");
        metrics::add(&self.ctx.metrics().bodies_spliced, 1);
        splice::send(&self.stream, pipe, &head, &body, self.activity).await
    }

    /// Writes a head and body with writev until both are out. (monoio's own
    /// `write_vectored_all` mishandles partial writes in 0.2.4: it shortens the iovec but
    /// never advances its base, so a retry would send the wrong bytes.)
    async fn write_head_and_body(&mut self, mut out: HeadAndBody) -> io::Result<()> {
        while !out.is_done() {
            let (result, returned) = self.stream.writev(out).await;
            out = returned;
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Where the head ends (just past its blank line) in `buf`, searching only from `from`
/// (less the three bytes a terminator could straddle). A bare LF ends a line too, as
/// httparse accepts (RFC 9112 section 2.2 allows it in heads).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while let Some(offset) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + offset;
        let blank = (nl >= 1 && buf[nl - 1] == b'\n')
            || (nl >= 2 && buf[nl - 1] == b'\r' && buf[nl - 2] == b'\n');
        if blank {
            return Some(nl + 1);
        }
        i = nl + 1;
    }
    None
}

/// True if `bytes` could be the start of a request line (a token of method characters).
fn starts_like_a_method(bytes: &[u8]) -> bool {
    // Empty lines before a request line are ignored (RFC 9112, section 2.2; httparse skips
    // them too): some clients send a CRLF after a body, and it may arrive on its own.
    let line = bytes
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .map_or(&[][..], |start| &bytes[start..]);
    line.iter()
        .take_while(|&&b| b != b' ')
        .all(|b| b.is_ascii_alphabetic() || *b == b'-' || *b == b'_')
}

fn refusal_for(e: httparse::Error) -> Refusal {
    match e {
        httparse::Error::TooManyHeaders => Refusal::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too many headers\n",
        ),
        _ => Refusal::bad("malformed request\n"),
    }
}

impl Head {
    fn parse(request: &httparse::Request<'_, '_>) -> Result<Head, Refusal> {
        let bad = Refusal::bad;
        let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
            .map_err(|_| bad("bad method\n"))?;
        let target: http::Uri = request
            .path
            .unwrap_or_default()
            .parse()
            .map_err(|_| bad("bad request target\n"))?;
        let mut headers = HeaderMap::with_capacity(request.headers.len());
        for h in request.headers.iter() {
            let name =
                HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("bad header name\n"))?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("bad header value\n"))?;
            headers.append(name, value);
        }
        let http10 = request.version == Some(0);
        // RFC 9112 section 3.2: an HTTP/1.1 request has exactly one Host.
        let hosts = headers.get_all(header::HOST).iter().count();
        if (!http10 && hosts == 0) || hosts > 1 {
            return Err(bad("an HTTP/1.1 request needs exactly one Host header\n"));
        }
        Ok(Head {
            method,
            path: target.path().to_owned(),
            http10,
            headers,
        })
    }

    /// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to
    /// keep it.
    fn keep_alive(&self) -> bool {
        let tokens = |token: &str| {
            self.headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if self.http10 {
            tokens("keep-alive")
        } else {
            !tokens("close")
        }
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

impl Framing {
    fn of(head: &Head) -> Result<Framing, Refusal> {
        let bad = Refusal::bad;
        let mut codings = Vec::new();
        for value in head.headers.get_all(header::TRANSFER_ENCODING) {
            let value = value.to_str().map_err(|_| bad("bad transfer-encoding\n"))?;
            codings.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_ascii_lowercase),
            );
        }
        let lengths = head.headers.get_all(header::CONTENT_LENGTH);
        if head.headers.contains_key(header::TRANSFER_ENCODING) {
            // Both headers at once is how requests are smuggled past proxies.
            if lengths.iter().next().is_some() {
                return Err(bad("both transfer-encoding and content-length\n"));
            }
            // The node decodes no coding but chunked: anything else, alone or stacked
            // under chunked, would be stored still encoded (RFC 9112 section 6.1: 501).
            if codings.iter().any(|c| c != "chunked") {
                return Err(Refusal::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "unsupported transfer-encoding\n",
                ));
            }
            if head.http10 {
                return Err(bad("transfer-encoding in an HTTP/1.0 request\n"));
            }
            // Chunked exactly once (applying it twice is forbidden).
            return match codings.len() {
                1 => Ok(Framing::Chunked),
                _ => Err(bad("bad transfer-encoding\n")),
            };
        }
        let mut length = None;
        for value in lengths.iter() {
            for part in value
                .to_str()
                .map_err(|_| bad("bad content-length\n"))?
                .split(',')
            {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("bad content-length\n"));
                }
                let n: u64 = part.parse().map_err(|_| bad("bad content-length\n"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad("conflicting content-length\n"));
                }
                length = Some(n);
            }
        }
        Ok(Framing::Length(length.unwrap_or(0)))
    }

    fn has_body(&self) -> bool {
        *self != Framing::Length(0)
    }
}

/// Parses a chunk-size line (without its CRLF): one to sixteen hex digits, then either
/// nothing or chunk extensions, which may be preceded by spaces or tabs (RFC 9112 section
/// 7.1.1: `chunk-size [ chunk-ext ]`, `chunk-ext = *( BWS ";" ... )`). No sign, no
/// leading space, no `0x`.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    let after_space = rest.iter().position(|&b| b != b' ' && b != b'\t');
    match after_space {
        None if rest.is_empty() => {}
        Some(i) if rest[i] == b';' => {}
        _ => return None,
    }
    let text = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(text, 16).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data,
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// A request body read straight from the connection.
struct Body<'c, 'a> {
    conn: &'c mut Conn<'a>,
    framing: Framing,
    /// Bytes left in the body (Content-Length) or in the current chunk.
    remaining: u64,
    chunk: ChunkState,
    trailers: usize,
    continue_pending: bool,
    /// The watchdog is counting this body's bytes (see `Activity::body_started`).
    receiving: bool,
    finished: bool,
    failed: bool,
}

impl Drop for Body<'_, '_> {
    fn drop(&mut self) {
        if self.receiving {
            self.conn.activity.body_ended();
        }
    }
}

impl<'c, 'a> Body<'c, 'a> {
    fn new(conn: &'c mut Conn<'a>, framing: Framing, continue_pending: bool) -> Self {
        let remaining = if let Framing::Length(n) = framing {
            n
        } else {
            0
        };
        Self {
            conn,
            framing,
            remaining,
            chunk: ChunkState::Size,
            trailers: 0,
            continue_pending,
            receiving: false,
            finished: !framing.has_body(),
            failed: false,
        }
    }

    fn is_finished(&self) -> bool {
        self.finished && !self.failed
    }

    /// Before the first byte of the body is read: invites the body if the client waits
    /// for that, and starts the watchdog's rate count.
    async fn begin(&mut self) -> Result<(), String> {
        if self.continue_pending {
            self.continue_pending = false;
            let (result, _) = self
                .conn
                .stream
                .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
                .await;
            result.map_err(|e| e.to_string())?;
        }
        if !self.receiving {
            self.receiving = true;
            self.conn.activity.body_started(Instant::now());
        }
        Ok(())
    }

    /// Fills the buffer if it is empty; an error at end of stream.
    async fn fill_some(&mut self, limit: usize) -> Result<(), String> {
        if self.conn.buf.is_empty() && self.conn.fill(limit).await.map_err(|e| e.to_string())? == 0
        {
            return Err(CLOSED_MID_BODY.into());
        }
        Ok(())
    }

    /// The next bytes of the body (Content-Length) or of the current chunk: whatever is
    /// buffered, up to what `remaining` allows, reading from the socket if nothing is.
    async fn take_remaining(&mut self) -> Result<Bytes, String> {
        self.fill_some(READ_SIZE).await?;
        let n = (self.conn.buf.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        let bytes = Bytes::copy_from_slice(&self.conn.buf.unread()[..n]);
        self.conn.buf.consume(n);
        Ok(bytes)
    }

    /// Reads one CRLF-terminated line of a chunked body, without its CRLF. A bare LF is
    /// not a line end here: inside a body it is how requests get smuggled.
    async fn line(&mut self) -> Result<Vec<u8>, String> {
        let mut scanned: usize = 0;
        loop {
            let unread = self.conn.buf.unread();
            let from = scanned.saturating_sub(1);
            if let Some(end) = unread[from..].windows(2).position(|w| w == b"\r\n") {
                let end = from + end;
                let line = unread[..end].to_vec();
                self.conn.buf.consume(end + 2);
                return Ok(line);
            }
            scanned = unread.len();
            if scanned > MAX_LINE {
                return Err("chunked body line too long".into());
            }
            if self
                .conn
                .fill(MAX_LINE + 2)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err(CLOSED_MID_BODY.into());
            }
        }
    }

    /// Moves the framing on to the next chunk's data; false at the end of the body.
    async fn next_chunk_data(&mut self) -> Result<bool, String> {
        loop {
            match self.chunk {
                ChunkState::Size => {
                    let line = self.line().await?;
                    let size = parse_chunk_size(&line).ok_or("bad chunk size")?;
                    if size == 0 {
                        self.chunk = ChunkState::Trailers;
                    } else {
                        self.remaining = size;
                        self.chunk = ChunkState::Data;
                    }
                }
                ChunkState::Data if self.remaining == 0 => self.chunk = ChunkState::DataEnd,
                ChunkState::Data => return Ok(true),
                ChunkState::DataEnd => {
                    if !self.line().await?.is_empty() {
                        return Err("chunk data longer than its size".into());
                    }
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if self.line().await?.is_empty() {
                        return Ok(false);
                    }
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err("too many trailer fields".into());
                    }
                }
            }
        }
    }

    /// Moves buffered body bytes (no more than the body or chunk has left) into `record`.
    fn copy_buffered(&mut self, record: &mut PendingRecord) -> Result<usize, BodyError> {
        let n = (self.conn.buf.len() as u64).min(self.remaining) as usize;
        record
            .push(&self.conn.buf.unread()[..n])
            .map_err(BodyError::Full)?;
        self.conn.buf.consume(n);
        self.remaining -= n as u64;
        Ok(n)
    }

    fn fail(&mut self, e: String) -> String {
        self.failed = true;
        self.finished = true;
        e
    }
}

impl RequestBody for Body<'_, '_> {
    fn size_hint(&self) -> (u64, Option<u64>) {
        match self.framing {
            Framing::Length(n) => (n, Some(n)),
            Framing::Chunked => (0, None),
        }
    }

    fn awaiting_continue(&self) -> bool {
        self.continue_pending
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        if self.finished {
            return None;
        }
        if let Err(e) = self.begin().await {
            return Some(Err(self.fail(e)));
        }
        let next = match self.framing {
            Framing::Length(_) if self.remaining == 0 => Ok(None),
            Framing::Length(_) => self.take_remaining().await.map(Some),
            Framing::Chunked => match self.next_chunk_data().await {
                Ok(true) => self.take_remaining().await.map(Some),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            },
        };
        match next {
            Ok(Some(bytes)) => Some(Ok(bytes)),
            Ok(None) => {
                self.finished = true;
                None
            }
            Err(e) => Some(Err(self.fail(e))),
        }
    }

    /// Buffered bytes are copied into the record; the rest of a chunk or of a declared
    /// length is read from the socket straight into the record's buffer.
    async fn read_into(&mut self, record: &mut PendingRecord) -> Result<usize, BodyError> {
        if self.finished {
            return Ok(0);
        }
        self.begin()
            .await
            .map_err(|e| BodyError::Broken(self.fail(e)))?;
        if self.framing == Framing::Chunked {
            match self.next_chunk_data().await {
                Ok(true) => {}
                Ok(false) => {
                    self.finished = true;
                    return Ok(0);
                }
                Err(e) => return Err(BodyError::Broken(self.fail(e))),
            }
        } else if self.remaining == 0 {
            self.finished = true;
            return Ok(0);
        }
        if !self.conn.buf.is_empty() {
            return self.copy_buffered(record);
        }
        let want = (self.remaining.min(READ_SIZE as u64 * 16) as usize).min(record.spare());
        if want == 0 {
            // No room left in the record (a chunked body outgrew it): read into the
            // connection's buffer and copy, which grows the record (or refuses).
            self.fill_some(READ_SIZE)
                .await
                .map_err(|e| BodyError::Broken(self.fail(e)))?;
            return self.copy_buffered(record);
        }
        let buf = record.lend();
        let from = buf.len();
        let (result, slice) = self
            .conn
            .stream
            .read(buf.slice_mut(from..from + want))
            .await;
        record.filled(slice.into_inner(), from);
        match result {
            Ok(0) => Err(BodyError::Broken(self.fail(CLOSED_MID_BODY.into()))),
            Ok(n) => {
                self.conn.activity.on_read(Instant::now(), n);
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) => Err(BodyError::Broken(self.fail(e.to_string()))),
        }
    }
}

/// A reply head and a large body written with writev, the body not copied.
struct HeadAndBody {
    head: Vec<u8>,
    body: Bytes,
    /// Bytes of head and body already written.
    written: usize,
    /// On the heap, so that the iovecs stay put however the value itself moves.
    iovecs: Box<[libc::iovec; 2]>,
    count: usize,
}

impl HeadAndBody {
    fn new(head: Vec<u8>, body: Bytes) -> Self {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut this = Self {
            head,
            body,
            written: 0,
            iovecs: Box::new([empty, empty]),
            count: 0,
        };
        this.aim();
        this
    }

    fn is_done(&self) -> bool {
        self.written >= self.head.len() + self.body.len()
    }

    fn advance(&mut self, n: usize) {
        self.written += n;
        self.aim();
    }

    /// Points the iovecs at what is left to write.
    fn aim(&mut self) {
        let head_left = &self.head[self.written.min(self.head.len())..];
        let body_left = &self.body[self
            .written
            .saturating_sub(self.head.len())
            .min(self.body.len())..];
        self.count = 0;
        for part in [head_left, body_left] {
            if !part.is_empty() {
                self.iovecs[self.count] = libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                };
                self.count += 1;
            }
        }
    }
}

// SAFETY: the iovecs point into `head`'s heap buffer and `body`'s memory, both owned by
// this value and never mutated or reallocated while it lives; the iovec array itself is
// boxed, so its address is stable while monoio owns the value for a writev.
unsafe impl IoVecBuf for HeadAndBody {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex_digits_only() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"5;name=value"), Some(5));
        assert_eq!(parse_chunk_size(b"5 ;name"), Some(5));
        assert_eq!(parse_chunk_size(b"0"), Some(0));
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b" 5",
            b"5 ",
            b"0x5",
            b"5 x",
            b"zz",
            b"1ffffffffffffffff",
        ] {
            assert_eq!(
                parse_chunk_size(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_end_of_a_head_is_found_from_where_the_last_search_stopped() {
        let head = b"GET / HTTP/1.1\r\nhost: x\r\n\r\nrest";
        assert_eq!(head_end(head, 0), Some(27));
        // Resuming inside the terminator still finds it.
        assert_eq!(head_end(head, 26), Some(27));
        assert_eq!(head_end(&head[..26], 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nhost: x\n\nrest", 0), Some(24));
    }

    #[test]
    fn the_read_cursor_moves_bytes_only_when_paid_for() {
        let mut buf = ReadBuf::new();
        buf.data.extend_from_slice(&[1u8; 3000]);
        buf.consume(100);
        // Few bytes consumed, many unread: grow instead of moving them.
        let room = buf.make_room(2000, 16 * 1024);
        assert!(room >= 2000);
        assert_eq!(buf.start, 100);
        buf.consume(2800);
        let capacity = buf.data.capacity();
        buf.data.resize(capacity, 2);
        buf.consume(capacity / 2);
        // Now more was consumed than is unread: moving is cheap and makes the room.
        let unread = buf.unread().to_vec();
        assert!(buf.make_room(1000, capacity) >= 1000);
        assert_eq!(buf.start, 0);
        assert_eq!(buf.unread(), &unread[..]);
    }
}
