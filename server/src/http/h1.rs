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
//! Malformed requests get a 400 (431 for oversized heads, 501 for unknown transfer codings)
//! and a closed connection.

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
    service::{self, DISCARD_LIMIT, Reply, RequestBody, ZeroCopy},
    splice::{self, SplicePipe},
};
use crate::metrics;

/// Request line and headers together may not exceed this; beyond it the answer is 431.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Room asked for on every socket read.
const READ_SIZE: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE: usize = 4096;
/// Bodies up to this size are copied after the head into one write; larger ones go out
/// as a second iovec of the same writev, without a copy.
const INLINE_BODY: usize = 16 * 1024;
/// Why a body read fails when the client goes away.
const CLOSED_MID_BODY: &str = "the connection closed before the body ended";
/// What every HTTP/2 connection starts with; no HTTP/1 method begins like it.
const H2_PREFACE_START: &[u8] = b"PRI ";

/// How a connection served by the engine ended.
pub enum Ended {
    /// Closed (by either side) after its requests.
    Closed,
    /// The client opened with the HTTP/2 preface: the stream and the bytes read so far go
    /// to hyper.
    Http2(TcpStream, Vec<u8>),
}

struct Conn<'a> {
    stream: TcpStream,
    /// Bytes read from the socket and not consumed yet.
    buf: Vec<u8>,
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
        buf: Vec::with_capacity(READ_SIZE),
        activity,
        zero_copy: ctx.node.http.zero_copy,
        pipe: None,
    };

    // Tell HTTP/2 with prior knowledge from HTTP/1 by the first bytes.
    while conn.buf.len() < H2_PREFACE_START.len() && H2_PREFACE_START.starts_with(&conn.buf) {
        if conn.fill().await? == 0 {
            return Ok(Ended::Closed);
        }
    }
    if conn.buf.starts_with(H2_PREFACE_START) {
        return Ok(Ended::Http2(conn.stream, conn.buf));
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
            !head.http10 && framing.has_body() && expects_continue(&head.headers);
        let mut body = Body::new(&mut conn, framing, expects_continue);
        let reply = service::respond(ctx, &head.method, &head.path, &head.headers, &mut body).await;
        // A small body the service did not read is skipped so that the connection can
        // carry the next request; otherwise the stream is mid-message and must close.
        service::drain(&mut body, DISCARD_LIMIT).await;
        keep_alive &= body.is_finished();
        keep_alive &= !closing.get();
        conn.write_reply(head.method == Method::HEAD, reply, keep_alive)
            .await?;
        drop(in_progress);
        if !keep_alive {
            let _ = conn.stream.shutdown().await;
            return Ok(Ended::Closed);
        }
    }
}

impl Conn<'_> {
    /// Reads more bytes from the socket into `buf`; 0 at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        let (filled, capacity) = (self.buf.len(), self.buf.capacity());
        let buf = std::mem::take(&mut self.buf);
        let (result, slice) = self.stream.read(buf.slice_mut(filled..capacity)).await;
        self.buf = slice.into_inner();
        let n = result?;
        if n > 0 {
            self.activity.on_read(Instant::now());
        }
        Ok(n)
    }

    /// The next request's head: `None` if the client closed between requests.
    async fn read_head(&mut self) -> io::Result<Option<Result<Head, Refusal>>> {
        loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let head = Head::parse(&request);
                        self.buf.drain(..len);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() >= MAX_HEAD => {
                        return Ok(Some(Err(Refusal::new(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "request head too large\n",
                        ))));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Ok(Some(Err(Refusal::new(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "too many headers\n",
                        ))));
                    }
                    Err(_) => {
                        return Ok(Some(Err(Refusal::new(
                            StatusCode::BAD_REQUEST,
                            "malformed request\n",
                        ))));
                    }
                }
            }
            if self.fill().await? == 0 {
                return Ok(None);
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
            let len = body.as_ref().map_or(0, Bytes::len);
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(len.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");

        let result = match body {
            Some(body) if body.len() > INLINE_BODY && spliceable && self.zero_copy => {
                self.splice_reply(out, body).await
            }
            Some(body) if body.len() > INLINE_BODY => {
                self.write_head_and_body(HeadAndBody::new(out, body)).await
            }
            Some(body) => {
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
                Ok(pipe) => self.pipe = Some(pipe),
                Err(e) => {
                    tracing::warn!(error = %e, "no pipe for zero-copy replies; copying");
                    self.zero_copy = false;
                    return self.write_head_and_body(HeadAndBody::new(head, body)).await;
                }
            }
        }
        let pipe = self.pipe.as_ref().expect("made above");
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

    /// Takes the first `n` buffered bytes as an owned buffer, without a copy when they are
    /// all there is.
    fn take_front(&mut self, n: usize) -> Bytes {
        if n == self.buf.len() {
            return Bytes::from(std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(READ_SIZE),
            ));
        }
        let front = Bytes::copy_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        front
    }
}

impl Head {
    fn parse(request: &httparse::Request<'_, '_>) -> Result<Head, Refusal> {
        let bad = |message| Refusal::new(StatusCode::BAD_REQUEST, message);
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
        Ok(Head {
            method,
            path: target.path().to_owned(),
            http10: request.version == Some(0),
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

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

impl Framing {
    fn of(head: &Head) -> Result<Framing, Refusal> {
        let bad = |message| Refusal::new(StatusCode::BAD_REQUEST, message);
        let codings: Vec<String> = head
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .map(|v| v.to_str().map(|s| s.to_ascii_lowercase()))
            .collect::<Result<_, _>>()
            .map_err(|_| bad("bad transfer-encoding\n"))?;
        let lengths = head.headers.get_all(header::CONTENT_LENGTH);
        if !codings.is_empty() {
            // Both headers at once is how requests are smuggled past proxies.
            if lengths.iter().next().is_some() {
                return Err(bad("both transfer-encoding and content-length\n"));
            }
            let last = codings
                .iter()
                .flat_map(|c| c.split(','))
                .map(str::trim)
                .rfind(|c| !c.is_empty());
            return match last {
                Some("chunked") if !head.http10 => Ok(Framing::Chunked),
                _ => Err(Refusal::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "unsupported transfer-encoding\n",
                )),
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
    continue_pending: bool,
    finished: bool,
    failed: bool,
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
            continue_pending,
            finished: !framing.has_body(),
            failed: false,
        }
    }

    fn is_finished(&self) -> bool {
        self.finished && !self.failed
    }

    /// The next bytes of the body (Content-Length) or of the current chunk: whatever is
    /// buffered, up to what `remaining` allows, reading from the socket if nothing is.
    async fn take_remaining(&mut self) -> Result<Bytes, String> {
        if self.conn.buf.is_empty() && self.conn.fill().await.map_err(|e| e.to_string())? == 0 {
            return Err(CLOSED_MID_BODY.into());
        }
        let n = (self.conn.buf.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        Ok(self.conn.take_front(n))
    }

    /// Reads one CRLF-terminated line of a chunked body, without its CRLF.
    async fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(end) = self.conn.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.conn.buf[..end].to_vec();
                self.conn.buf.drain(..end + 2);
                return Ok(line);
            }
            if self.conn.buf.len() > MAX_LINE {
                return Err("chunked body line too long".into());
            }
            if self.conn.fill().await.map_err(|e| e.to_string())? == 0 {
                return Err(CLOSED_MID_BODY.into());
            }
        }
    }

    async fn next_chunked(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.chunk {
                ChunkState::Size => {
                    let line = self.line().await?;
                    let size = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .map(str::trim)
                        .filter(|s| !s.is_empty() && s.len() <= 16);
                    let size = size
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or("bad chunk size")?;
                    if size == 0 {
                        self.chunk = ChunkState::Trailers;
                    } else {
                        self.remaining = size;
                        self.chunk = ChunkState::Data;
                    }
                }
                ChunkState::Data => {
                    let bytes = self.take_remaining().await?;
                    if self.remaining == 0 {
                        self.chunk = ChunkState::DataEnd;
                    }
                    return Ok(Some(bytes));
                }
                ChunkState::DataEnd => {
                    if !self.line().await?.is_empty() {
                        return Err("chunk data longer than its size".into());
                    }
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if self.line().await?.is_empty() {
                        return Ok(None);
                    }
                }
            }
        }
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
        if self.continue_pending {
            self.continue_pending = false;
            let (result, _) = self
                .conn
                .stream
                .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
                .await;
            if let Err(e) = result {
                self.failed = true;
                return Some(Err(e.to_string()));
            }
        }
        let next = match self.framing {
            Framing::Length(_) if self.remaining == 0 => Ok(None),
            Framing::Length(_) => self.take_remaining().await.map(Some),
            Framing::Chunked => self.next_chunked().await,
        };
        match next {
            Ok(Some(bytes)) => Some(Ok(bytes)),
            Ok(None) => {
                self.finished = true;
                None
            }
            Err(e) => {
                self.failed = true;
                self.finished = true;
                Some(Err(e))
            }
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
