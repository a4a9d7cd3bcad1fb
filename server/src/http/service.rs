//! Request routing and the shard API.

use std::{
    convert::Infallible,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use slapshot_core::{CRC_HEADER, ShardKey};

use super::{
    CoreContext,
    conn::{ActiveGuard, Activity},
};
use crate::{
    faults::{Fault, FaultSettings, Faults},
    metrics::{self, add},
    store::{PendingRecord, PutMode, PutOutcome, RecordFull, StoreError, Tier},
};

/// Header telling which tier served a GET (memory or flash); for operators and tests.
pub const TIER_HEADER: &str = "x-slapshot-tier";

const SHARD_PREFIX: &str = "/v1/shards/";

/// A response body held in memory. It keeps the connection's request in progress until
/// hyper drops it, which happens once the bytes have been handed to the socket.
pub struct ResponseBody {
    data: Option<Bytes>,
    _in_progress: ActiveGuard,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A request body as the service sees it, whichever HTTP engine carries it.
// The futures stay on their runtime thread (thread per core), so they need not be Send.
#[allow(async_fn_in_trait)]
pub trait RequestBody {
    /// Known lower bound and, when the length was declared, the exact length.
    fn size_hint(&self) -> (u64, Option<u64>);

    /// The next piece of the body; `None` at its end; an error if the client broke off.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>>;

    /// True while the client waits for `100 Continue` before sending the body: reading
    /// would invite a body the service means to refuse.
    fn awaiting_continue(&self) -> bool {
        false
    }

    /// Reads the next part of the body into `record`: the bytes added, 0 at the end. The
    /// native engine reads straight from the socket into the record's buffer.
    async fn read_into(&mut self, record: &mut PendingRecord) -> Result<usize, BodyError> {
        loop {
            match self.next_chunk().await {
                None => return Ok(0),
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    record.push(&data).map_err(BodyError::Full)?;
                    return Ok(data.len());
                }
                Some(Err(e)) => return Err(BodyError::Broken(e)),
            }
        }
    }
}

/// Why a request body could not be read into its record.
#[derive(Debug)]
pub enum BodyError {
    /// The client broke off or broke the framing.
    Broken(String),
    /// The record cannot take more (too large, or over the body budget).
    Full(RecordFull),
}

/// hyper's request body (HTTP/2, and HTTP/1.1 with `--http1 hyper`). It tells the
/// connection's watchdog while it is being received, for the minimum body rate.
pub struct HyperBody {
    incoming: Incoming,
    activity: Rc<Activity>,
    started: bool,
    /// The request asked for `100 Continue`, which hyper sends when the body is first
    /// read: until then, reading would invite a body the service may mean to refuse.
    awaiting_continue: bool,
}

impl HyperBody {
    pub fn new(incoming: Incoming, activity: Rc<Activity>, expects_continue: bool) -> Self {
        Self {
            incoming,
            activity,
            started: false,
            awaiting_continue: expects_continue,
        }
    }
}

impl Drop for HyperBody {
    fn drop(&mut self) {
        if self.started {
            self.activity.body_ended();
        }
    }
}

impl RequestBody for HyperBody {
    fn size_hint(&self) -> (u64, Option<u64>) {
        let hint = self.incoming.size_hint();
        (hint.lower(), hint.exact())
    }

    fn awaiting_continue(&self) -> bool {
        self.awaiting_continue
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        self.awaiting_continue = false;
        if !self.started && !self.incoming.is_end_stream() {
            self.started = true;
            self.activity.body_started(Instant::now());
        }
        loop {
            match self.incoming.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(e.to_string())),
            }
        }
    }
}

/// Marks a reply whose body may be handed to the kernel by reference (spliced) instead of
/// copied: its memory is never reused while the kernel may still read it (see
/// `store::aligned`). Engines that cannot splice simply copy.
#[derive(Debug, Clone, Copy)]
pub struct ZeroCopy;

/// Marks a reply after which the connection must close without reading the rest of the
/// request (a body the node has no memory for).
#[derive(Debug, Clone, Copy)]
pub struct CloseConnection;

/// Serves one request through hyper and counts it.
pub async fn handle(
    ctx: Rc<CoreContext>,
    req: Request<Incoming>,
    in_progress: ActiveGuard,
    activity: Rc<Activity>,
) -> Result<Response<ResponseBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let response = respond(
        &ctx,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        &mut HyperBody::new(body, activity, expects_continue(&parts.headers)),
    )
    .await;
    Ok(response.map(|data| ResponseBody {
        data: data.filter(|d| !d.is_empty()),
        _in_progress: in_progress,
    }))
}

/// Serves one request and counts it; the engine writes the reply.
pub async fn respond<B: RequestBody>(
    ctx: &Rc<CoreContext>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &mut B,
) -> Reply {
    let started = Instant::now();
    let slot = metrics::method_slot(method);
    let response = route(ctx, method, path, headers, body).await;
    let m = ctx.metrics();
    m.record_request(slot, response.status().as_u16(), started.elapsed());
    if let Some(data) = response.body() {
        add(&m.response_bytes, data.len() as u64);
    }
    response
}

pub type Reply = Response<Option<Bytes>>;

async fn route<B: RequestBody>(
    ctx: &Rc<CoreContext>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &mut B,
) -> Reply {
    if let Some(key) = path.strip_prefix(SHARD_PREFIX) {
        return shard(ctx, method, key, headers, body).await;
    }
    if path == "/admin/faults"
        && let Some(faults) = &ctx.node.faults
    {
        // Changing faults is a write: it needs the token whenever writes do, and reading
        // them whenever reads do.
        let needs_token = *method != Method::GET || ctx.node.http.auth_reads;
        if needs_token && !authorized(ctx, headers) {
            return reject_body(unauthorized(), body).await;
        }
        return admin_faults(faults, method, body).await;
    }
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/health") => {
            if ctx.node.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ok\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let body = ctx.node.metrics.render(
                ctx.node.store.gauges(),
                crate::metrics::BodyGauges {
                    used: ctx.node.budget.used(),
                    limit: ctx.node.budget.limit(),
                    refused: ctx.node.budget.refused(),
                },
                ctx.node.is_draining(),
            );
            let mut reply = Response::new(Some(Bytes::from(body)));
            reply.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            reply
        }
        (_, "/health" | "/metrics") => method_not_allowed("GET, HEAD"),
        _ => text(
            StatusCode::NOT_FOUND,
            "no such endpoint; shards live under /v1/shards/{key}\n",
        ),
    }
}

/// How often a stalled request looks whether the stall was lifted.
const STALL_POLL: std::time::Duration = std::time::Duration::from_millis(10);

fn unauthorized() -> Reply {
    let mut reply = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    reply
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    reply
}

/// `/admin/faults`: see `crate::faults`.
async fn admin_faults<B: RequestBody>(faults: &Faults, method: &Method, body: &mut B) -> Reply {
    match *method {
        Method::GET => text(StatusCode::OK, faults.settings().render()),
        Method::DELETE => {
            faults.set(FaultSettings::default());
            text(StatusCode::OK, faults.settings().render())
        }
        Method::PUT => {
            // Settings are a few short lines.
            let mut bytes = Vec::new();
            while let Some(chunk) = body.next_chunk().await {
                match chunk {
                    Ok(data) if bytes.len() + data.len() <= 4096 => bytes.extend_from_slice(&data),
                    Ok(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "settings over 4 KiB\n"),
                    Err(_) => return text(StatusCode::BAD_REQUEST, "unreadable body\n"),
                }
            }
            match faults.settings().update(&String::from_utf8_lossy(&bytes)) {
                Ok(next) => {
                    faults.set(next);
                    text(StatusCode::OK, faults.settings().render())
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => method_not_allowed("GET, PUT, DELETE"),
    }
}

async fn shard<B: RequestBody>(
    ctx: &Rc<CoreContext>,
    method: &Method,
    key: &str,
    headers: &HeaderMap,
    body: &mut B,
) -> Reply {
    let needs_token = match *method {
        Method::GET | Method::HEAD => ctx.node.http.auth_reads,
        Method::PUT | Method::DELETE => true,
        _ => return method_not_allowed("GET, HEAD, PUT, DELETE"),
    };
    if needs_token && !authorized(ctx, headers) {
        return reject_body(unauthorized(), body).await;
    }
    // Injected faults meet requests the node would serve (after the method and token
    // checks), as a slow or failing node's would.
    if let Some(faults) = &ctx.node.faults {
        match faults.draw() {
            Fault::None => {}
            Fault::Delay(delay) => monoio::time::sleep(delay).await,
            Fault::Error => {
                return reject_body(
                    text(StatusCode::SERVICE_UNAVAILABLE, "injected fault\n"),
                    body,
                )
                .await;
            }
            // A black hole: no answer while the stall lasts. A request stalled when it is
            // lifted carries on; one that outlasts the watchdog's timeouts loses its
            // connection, as a stuck request would.
            Fault::Stall => {
                while faults.settings().stall {
                    monoio::time::sleep(STALL_POLL).await;
                }
            }
        }
    }
    let key = match ShardKey::parse(key) {
        Ok(key) => key,
        Err(e) => {
            return reject_body(
                text(StatusCode::BAD_REQUEST, format!("bad shard key: {e}\n")),
                body,
            )
            .await;
        }
    };
    match *method {
        Method::GET => get(ctx, key).await,
        Method::HEAD => head(ctx, key).await,
        Method::PUT => put(ctx, key, headers, body).await,
        _ => delete(ctx, key).await,
    }
}

/// Bodies up to this size are read and dropped when a request is refused before its body
/// was looked at, so that the client's keep-alive connection stays usable; larger ones
/// are left unread and the connection is closed after the reply.
pub const DISCARD_LIMIT: u64 = 64 * 1024;

async fn reject_body<B: RequestBody>(reply: Reply, body: &mut B) -> Reply {
    discard(reply, body, DISCARD_LIMIT).await
}

/// Reads and drops up to `limit` bytes of a refused request's body before replying.
/// Closing a socket with unread input makes the kernel send a reset, which can destroy
/// the reply before the client reads it; draining first makes the refusal arrive.
async fn discard<B: RequestBody>(reply: Reply, body: &mut B, limit: u64) -> Reply {
    drain(body, limit).await;
    reply
}

/// Reads and drops what is left of a body, up to about `limit` bytes. It never invites a
/// body the client is holding back for `100 Continue`.
pub async fn drain<B: RequestBody>(body: &mut B, limit: u64) {
    if body.awaiting_continue() {
        return;
    }
    let mut discarded = 0u64;
    while discarded <= limit {
        match body.next_chunk().await {
            Some(Ok(data)) => discarded += data.len() as u64,
            _ => break,
        }
    }
}

/// Whether a request holds its body back for `100 Continue` (both engines ask).
pub(crate) fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

fn authorized(ctx: &CoreContext, headers: &HeaderMap) -> bool {
    let Some(token) = &ctx.node.http.token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
        .is_some_and(|given| token_matches(given, token.as_bytes()))
}

/// The credentials of an `Authorization: Bearer TOKEN` header. Auth schemes are
/// case-insensitive (RFC 9110 section 11.1), so `bearer` and `BEARER` work too.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares in constant time (`subtle`), so response timing does not reveal how much of a
/// guessed token was right. Only the length can be told apart, which a token of a fixed,
/// generated length does not give away.
fn token_matches(given: &[u8], token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.ct_eq(token).into()
}

async fn get(ctx: &Rc<CoreContext>, key: ShardKey<'_>) -> Reply {
    let Some(shard) = ctx.store.get(key).await else {
        return text(StatusCode::NOT_FOUND, "shard not found\n");
    };
    let (crc, tier, zero_copy) = (shard.crc, shard.tier, shard.zero_copy);
    let mut reply = Response::new(Some(shard.data));
    if zero_copy {
        reply.extensions_mut().insert(ZeroCopy);
    }
    shard_headers(&mut reply, crc, tier);
    reply
}

/// HEAD: the length and crc32 a GET would answer with, without reading the payload.
async fn head(ctx: &Rc<CoreContext>, key: ShardKey<'_>) -> Reply {
    let Some(info) = ctx.store.head(key).await else {
        return text(StatusCode::NOT_FOUND, "shard not found\n");
    };
    let mut reply = Response::new(None);
    shard_headers(&mut reply, info.crc, info.tier);
    reply
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(info.len));
    reply
}

fn shard_headers(reply: &mut Reply, crc: u32, tier: Tier) {
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CRC_HEADER, HeaderValue::from(crc));
    headers.insert(
        TIER_HEADER,
        HeaderValue::from_static(if tier == Tier::Memory {
            "memory"
        } else {
            "flash"
        }),
    );
}

async fn put<B: RequestBody>(
    ctx: &Rc<CoreContext>,
    key: ShardKey<'_>,
    headers: &HeaderMap,
    body: &mut B,
) -> Reply {
    let max = ctx.store.max_payload();
    let expected_crc = match headers.get(CRC_HEADER) {
        None => None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            Some(crc) => Some(crc),
            None => {
                let reply = text(
                    StatusCode::BAD_REQUEST,
                    format!("{CRC_HEADER} must be a decimal crc32\n"),
                );
                return reject_body(reply, body).await;
            }
        },
    };
    let mode = match headers.get(header::IF_NONE_MATCH) {
        None => PutMode::Always,
        Some(value) if value.as_bytes().trim_ascii() == b"*" => PutMode::IfAbsent,
        // Shards have no entity tags, so no other condition could be evaluated.
        Some(_) => {
            let reply = text(
                StatusCode::BAD_REQUEST,
                "If-None-Match on a shard PUT must be *\n",
            );
            return reject_body(reply, body).await;
        }
    };
    // An oversized body is drained (up to a bound) so that the 413 reaches the client.
    let drain_limit = max.saturating_mul(4).max(DISCARD_LIMIT);
    let (lower, exact) = body.size_hint();
    if exact.is_some_and(|len| len > max) {
        return discard(too_large(max), body, drain_limit).await;
    }
    // The buffer is paid for from the body budget before it exists and before the client
    // is invited to send (100 Continue goes out with the first read). A chunked body
    // starts small and grows, paying as it goes.
    let expected = exact.unwrap_or(lower.max(CHUNKED_START)).min(max);
    let Some(mut record) =
        PendingRecord::new(key, expected as usize, max as usize, &ctx.node.budget)
    else {
        return over_budget();
    };
    loop {
        match body.read_into(&mut record).await {
            Ok(0) => break,
            Ok(n) => add(&ctx.metrics().request_bytes, n as u64),
            Err(BodyError::Full(RecordFull::TooLarge)) => {
                drop(record);
                return discard(too_large(max), body, drain_limit).await;
            }
            Err(BodyError::Full(RecordFull::OverBudget)) => return over_budget(),
            // The client closed or broke the stream before the body ended.
            Err(BodyError::Broken(e)) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("incomplete request body: {e}\n"),
                );
            }
        }
    }
    if let Some(expected) = expected_crc {
        let actual = record.crc();
        if actual != expected {
            return text(
                StatusCode::BAD_REQUEST,
                format!("crc32 mismatch: {CRC_HEADER} says {expected}, the body has {actual}\n"),
            );
        }
    }
    match ctx.store.put(key, record, mode).await {
        Ok(PutOutcome::Created) => empty(StatusCode::CREATED),
        Ok(PutOutcome::Replaced) => empty(StatusCode::NO_CONTENT),
        Ok(PutOutcome::Exists) => text(
            StatusCode::PRECONDITION_FAILED,
            "the shard exists or is being written\n",
        ),
        Err(e) => store_unavailable(&e),
    }
}

async fn delete(ctx: &Rc<CoreContext>, key: ShardKey<'_>) -> Reply {
    match ctx.store.delete(key).await {
        Ok(true) => empty(StatusCode::NO_CONTENT),
        Ok(false) => text(StatusCode::NOT_FOUND, "shard not found\n"),
        Err(e) => store_unavailable(&e),
    }
}

fn store_unavailable(e: &StoreError) -> Reply {
    let status = match e {
        StoreError::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(
        status,
        format!("store unavailable: {}\n", crate::errors::Chain(e)),
    )
}

/// Room a chunked body of unknown length starts with; it doubles as it arrives.
const CHUNKED_START: u64 = 64 * 1024;

/// The node has no memory for this body now: 503, and the connection is closed without
/// reading what the client may still send.
fn over_budget() -> Reply {
    let mut reply = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "request bodies in flight exceed the node's memory budget; retry later\n",
    );
    reply
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    reply
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    reply.extensions_mut().insert(CloseConnection);
    reply
}

fn too_large(max: u64) -> Reply {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("shard larger than the {max}-byte limit\n"),
    )
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    reply
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    reply
}

fn empty(status: StatusCode) -> Reply {
    let mut reply = Response::new(None);
    *reply.status_mut() = status;
    reply
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut reply = Response::new(Some(body.into()));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, token_matches};

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secret", b"secreT"));
        assert!(!token_matches(b"secret", b"secret2"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc ", "bEaReR abc"] {
            assert_eq!(bearer_token(value.as_bytes()), Some(&b"abc"[..]), "{value}");
        }
        for value in ["Basic abc", "Bearerabc", "Bearer ", "abc"] {
            assert_eq!(bearer_token(value.as_bytes()), None, "{value}");
        }
    }
}
