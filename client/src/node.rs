//! One cache node as the client sees it: HTTP requests to it over a bounded pool of
//! keep-alive connections, and its health.
//!
//! Shard GETs run in tasks of their own: a reader that stops waiting (late binding
//! cancels the slowest shards of every read; FUSE interrupts reads) drops only its end of
//! a channel, and the request goes on to its end. That keeps HTTP/1.1 connections, which
//! hyper closes when a response is dropped half read, and it lets every request count
//! toward the node's health and latency, however its reader fared.
//!
//! Health: a node that refuses or breaks connections is down at once; one whose reads fail
//! twice in a row (timeouts, error statuses, oversized answers) is down too. Reads skip down
//! nodes while a background task probes the data path (a GET of the shard whose read
//! failed last, answered with the shard or 404 through the node's index and device) with
//! jittered exponential backoff, and marks the node up again when it answers: on trial,
//! until a read sent since is answered, so that one failed read sends it back down and
//! its probes go on from where their backoff was. After three failed probes of that key,
//! every other probe asks for a key no chunk has, so one key the node cannot serve does
//! not keep it down. Writes count against a node's writes only: a PUT may wait seconds
//! for the node to evict, and that says nothing about its reads. Nothing is written to a
//! node for a second after it failed.
//!
//! A request has two clocks: the wait for one of the client's connections (over HTTP/2,
//! one of the node's streams), which is the client's queue and ends as `NoConnection`,
//! leaving the node's health alone; and the shard timeout from the moment hyper hands
//! the request its connection.

use std::{
    error::Error as StdError,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection, HttpConnector},
    },
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
};

use crate::metrics::{ClientMetrics, NodeStats, inc};

pub type HttpClient = Client<NodeConnector, Full<Bytes>>;

/// A shard GET in flight: the reader's end of a request that runs in its own task.
pub type ShardFetch = BoxFuture<'static, Result<Option<Bytes>, NodeError>>;

/// Consecutive failed reads after which a node is considered down.
const FAILURES_BEFORE_DOWN: u32 = 2;
/// How long nothing is written to a node after one of its requests failed.
const WRITE_PAUSE: Duration = Duration::from_secs(1);
/// First and longest wait between probes of a down node (before jitter).
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Probes of a failed key before probes alternate with the key no chunk has.
const DEEP_PROBES: u32 = 3;
/// Requests in flight to one node over HTTP/2: the node's stream limit (its
/// `max_concurrent_streams`). More would queue inside hyper, on the node's clock.
const H2_STREAMS: usize = 64;
/// The key probes ask for. Chunk names are 64 hexadecimal digits, so no shard is ever
/// stored under it and a working node answers 404 from its shard path.
pub const PROBE_KEY: &str = "slapshot-probe";
/// Shard GETs a node may have in flight in their own tasks: four per connection to it,
/// and 64 at least (over HTTP/2 one connection carries many requests at once).
const DETACHED_PER_CONNECTION: usize = 4;
const MIN_DETACHED: usize = 64;
/// Responses to `get_text` (health, metrics) are cut at this size.
const TEXT_LIMIT: usize = 16 << 20;

/// Largest reply to a PUT: a status and at most an error message, which is never used.
const PUT_REPLY_LIMIT: usize = 64 << 10;

/// Whether a shard PUT may replace what the node holds under the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    Always,
    /// Create-only (`If-None-Match: *`): for a node that said it holds nothing, so that a
    /// shard another client wrote there since is kept.
    IfAbsent,
}

/// What a shard PUT that did not fail did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutDone {
    Written,
    /// Create-only, and the node holds a shard under the name (or is storing one).
    Taken,
}

/// How to reach and judge nodes; the same for every node of a fleet.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub connect_timeout: Duration,
    pub shard_timeout: Duration,
    pub max_connections: usize,
    pub http2: bool,
    pub token: Option<HeaderValue>,
    /// The largest response body a shard GET may have: the largest frame of any code.
    pub max_shard_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("connection refused or unreachable")]
    Unreachable,
    #[error("timed out")]
    Timeout,
    /// The request waited for one of the client's own connections to the node and was
    /// never sent: the client is saturated, which says nothing of the node.
    #[error("no connection to the node came free in time")]
    NoConnection,
    #[error("answered {0}")]
    Status(u16),
    #[error("answered with more than the {limit} bytes a shard can have")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Transport(String),
}

#[derive(Debug, Default)]
struct Health {
    down: bool,
    consecutive_failures: u32,
    probing: bool,
    /// Writes skip the node until then.
    no_writes_until: Option<Instant>,
    /// The key of the last shard read that failed: probes ask for it, so that a node whose
    /// index answers but whose device does not stays down.
    probe_key: Option<Arc<str>>,
    /// Back up after a probe, since then, and no read sent since has been answered: one
    /// failed read sent since sends it down again, and its probes go on from the backoff
    /// they had reached. Reads sent before it went down do not count for or against it.
    trial_since: Option<Instant>,
    /// Probes of the failed key that failed in a row: past `DEEP_PROBES`, every other probe
    /// asks for the key no chunk has, so that one key the node cannot serve (a bad
    /// extent) does not keep it down; the trial then judges it by the next read.
    probes_failed: u32,
    /// The wait before the next probe (doubling while probes fail, kept through a trial).
    backoff: Option<Duration>,
}

pub struct Node {
    pub id: String,
    pub addr: String,
    base: String,
    http: HttpClient,
    settings: NodeSettings,
    health: Mutex<Health>,
    stats: Arc<NodeStats>,
    metrics: Arc<ClientMetrics>,
    /// Shard GETs to this node in flight in their own tasks. Per node, so that a node
    /// that answers slowly holds only its own slots: reads keep binding to the others.
    detached: Arc<Semaphore>,
    /// With HTTP/2, the node's streams: a request waits for one on the client's clock.
    streams: Option<Semaphore>,
}

impl Node {
    pub fn new(
        id: String,
        addr: String,
        settings: NodeSettings,
        metrics: Arc<ClientMetrics>,
    ) -> Arc<Self> {
        let stats = metrics.node(&id);
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(settings.connect_timeout));
        tcp.set_nodelay(true);
        let connector = NodeConnector {
            tcp,
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            // A request waits for a connection no longer than its own timeout; a bit more
            // so that the request's timeout, not this one, is what ends it.
            wait: settings.shard_timeout + Duration::from_secs(1),
            stats: stats.clone(),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_max_idle_per_host(settings.max_connections);
        if settings.http2 {
            // Windows sized for shards, as the node's own HTTP/2 settings are: the default
            // 64 KiB window would cost a round trip per 64 KiB of every shard.
            builder
                .http2_only(true)
                .http2_initial_stream_window_size(4 << 20)
                .http2_initial_connection_window_size(16 << 20)
                .http2_max_frame_size(256 << 10);
        }
        Arc::new(Self {
            base: format!("http://{addr}"),
            id,
            addr,
            http: builder.build(connector),

            health: Mutex::new(Health::default()),
            stats,
            metrics,
            // A request holds its slot while it waits for a connection and while its
            // response drains, so the bound is well above the connections.
            detached: Arc::new(Semaphore::new(
                (DETACHED_PER_CONNECTION * settings.max_connections).max(MIN_DETACHED),
            )),
            // hyper carries every HTTP/2 request to a node on one connection.
            streams: settings.http2.then(|| Semaphore::new(H2_STREAMS)),
            settings,
        })
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_up(&self) -> bool {
        !self.health().down
    }

    /// Up, and no request to it failed in the last second.
    pub fn is_writable(&self) -> bool {
        let health = self.health();
        !health.down && health.no_writes_until.is_none_or(|t| Instant::now() >= t)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        token: bool,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if token && let Some(token) = &self.settings.token {
            request = request.header(header::AUTHORIZATION, token.clone());
        }
        request
            .body(Full::new(body))
            .expect("a well-formed request")
    }

    /// Sends a request and reads the whole response, at most `limit` bytes of body,
    /// within `timeout`.
    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), NodeError> {
        // Two clocks: the wait for one of the client's connections (or, over HTTP/2, one
        // of the node's streams), which is the client's queue; and from the moment hyper
        // hands the request its connection and sends it, which is the node's time. Only
        // the second is the node's to answer for. The first allows a connect begun at its
        // end to finish (or fail, which is the node's).
        // One timer for both clocks: reset when the request is sent.
        let queue = tokio::time::sleep(timeout + self.settings.connect_timeout);
        let mut queue = std::pin::pin!(queue);
        let _stream = match &self.streams {
            Some(streams) => tokio::select! {
                stream = streams.acquire() => Some(stream.expect("never closed")),
                () = &mut queue => return Err(NodeError::NoConnection),
            },
            None => None,
        };
        let mut request = request;
        let mut sent = hyper_util::client::legacy::connect::capture_connection(&mut request);
        let exchange = async move {
            let response = self.http.request(request).await.map_err(request_error)?;
            read_response(response, limit).await
        };
        let mut exchange = std::pin::pin!(exchange);
        tokio::select! {
            biased;
            result = &mut exchange => return result,
            _ = sent.wait_for_connection_metadata() => {}
            () = &mut queue => return Err(NodeError::NoConnection),
        }
        queue.as_mut().reset(tokio::time::Instant::now() + timeout);
        tokio::select! {
            biased;
            result = &mut exchange => result,
            () = &mut queue => Err(NodeError::Timeout),
        }
    }

    /// GET a shard: `Ok(None)` if the node does not have it. The request runs in a task of
    /// its own, so dropping the returned future does not cut it short: its response is
    /// read to the end, the connection stays open, and the outcome counts toward the
    /// node's health and latency. Such tasks are bounded in number per node (`detached`):
    /// when all of a node's slots are taken the reader waits for one before its request
    /// is sent, and a reader that gives up while waiting (late binding, once k other
    /// shards are in) has sent nothing. A slow node thus slows only its own requests.
    ///
    /// The request is sent at once (not when the returned future is first polled), so a
    /// read that pushes a hedge and finishes before polling it has still sent it.
    pub fn get_shard(self: &Arc<Self>, key: Arc<str>) -> ShardFetch {
        match self.detached.clone().try_acquire_owned() {
            Ok(slot) => self.spawn_get(key, slot).boxed(),
            Err(_) => {
                inc(&self.metrics.queued_requests);
                let node = self.clone();
                async move {
                    // The wait for a slot is the client's queue, bounded like the wait
                    // for a connection: a read that needs this node must learn in time
                    // that its shard is not coming, to read around it or go to the origin.
                    let wait = node.settings.connect_timeout + node.settings.shard_timeout;
                    let slot =
                        match tokio::time::timeout(wait, node.detached.clone().acquire_owned())
                            .await
                        {
                            Ok(slot) => slot.expect("the semaphore is never closed"),
                            Err(_) => return Err(NodeError::NoConnection),
                        };
                    // Marked down while this request waited: not sent.
                    if !node.is_up() {
                        return Err(NodeError::NoConnection);
                    }
                    node.spawn_get(key, slot).await
                }
                .boxed()
            }
        }
    }

    /// Starts a shard GET in a task that holds `slot`; the future is its answer.
    fn spawn_get(
        self: &Arc<Self>,
        key: Arc<str>,
        slot: OwnedSemaphorePermit,
    ) -> impl Future<Output = Result<Option<Bytes>, NodeError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let node = self.clone();
        tokio::spawn(async move {
            let result = node.get_shard_here(key).await;
            if tx.send(result).is_err() {
                inc(&node.metrics.drained_responses);
            }
            drop(slot);
        });
        async move {
            rx.await.unwrap_or_else(|_| {
                Err(NodeError::Transport(
                    "the request's task ended early".into(),
                ))
            })
        }
    }

    /// A shard GET in the caller's task, with its effects on metrics and health.
    async fn get_shard_here(self: &Arc<Self>, key: Arc<str>) -> Result<Option<Bytes>, NodeError> {
        let started = Instant::now();
        let request = self.request(
            Method::GET,
            &format!("/v1/shards/{key}"),
            true,
            Bytes::new(),
        );
        let result = match self
            .exchange(
                request,
                self.settings.shard_timeout,
                self.settings.max_shard_len,
            )
            .await
        {
            Ok((StatusCode::OK, body)) => Ok(Some(body)),
            Ok((StatusCode::NOT_FOUND, _)) => Ok(None),
            Ok((status, _)) => Err(NodeError::Status(status.as_u16())),
            Err(e) => Err(e),
        };
        let elapsed = started.elapsed();
        self.stats.latency.observe(elapsed);
        let m = &self.metrics;
        match &result {
            Ok(Some(_)) => {
                m.shard_latency.observe(elapsed);
                inc(&m.shards_ok);
            }
            Ok(None) => inc(&m.shards_absent),
            Err(NodeError::Timeout | NodeError::NoConnection) => inc(&m.shards_timed_out),
            Err(_) => inc(&m.shards_failed),
        }
        match &result {
            Ok(_) => {
                let mut health = self.health();
                health.consecutive_failures = 0;
                // A read sent since it came back was answered: the trial is over.
                if health.trial_since.is_some_and(|since| started >= since) {
                    health.trial_since = None;
                    health.backoff = None;
                    health.probes_failed = 0;
                }
            }
            Err(e) => {
                if *e != NodeError::NoConnection {
                    self.health().probe_key = Some(key);
                }
                self.failed(e, Some(started));
            }
        }
        result
    }

    /// PUT a shard, with its crc32 so that the node refuses damaged bytes. The outcome
    /// counts toward the node's writes only.
    pub async fn put_shard(
        self: &Arc<Self>,
        key: &str,
        body: Bytes,
        mode: PutMode,
        timeout: Duration,
    ) -> Result<PutDone, NodeError> {
        let started = Instant::now();
        let crc = crc32fast::hash(&body);
        let mut request = self.request(Method::PUT, &format!("/v1/shards/{key}"), true, body);
        let headers = request.headers_mut();
        headers.insert(slapshot_core::CRC_HEADER, HeaderValue::from(crc));
        if mode == PutMode::IfAbsent {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        }
        let result = match self.exchange(request, timeout, PUT_REPLY_LIMIT).await {
            Ok((StatusCode::CREATED | StatusCode::NO_CONTENT, _)) => Ok(PutDone::Written),
            Ok((StatusCode::PRECONDITION_FAILED, _)) if mode == PutMode::IfAbsent => {
                Ok(PutDone::Taken)
            }
            Ok((status, _)) => Err(NodeError::Status(status.as_u16())),
            Err(e) => Err(e),
        };
        self.stats.latency.observe(started.elapsed());
        if let Err(e) = &result {
            self.failed(e, None);
        }
        result
    }

    /// GET a path (such as /health or /metrics) and return the status and text.
    pub async fn get_text(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, String), NodeError> {
        let request = self.request(Method::GET, path, false, Bytes::new());
        let (status, body) = self.exchange(request, timeout, TEXT_LIMIT).await?;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }

    /// Notes a failed request: no writes for a while; for reads (`read_started` is when the
    /// read was sent), toward being marked down.
    fn failed(self: &Arc<Self>, error: &NodeError, read_started: Option<Instant>) {
        if *error == NodeError::NoConnection {
            // Never sent: the client's own queue, not the node, was slow.
            return;
        }
        inc(&self.stats.failures);
        let went_down = {
            let mut health = self.health();
            health.no_writes_until = Some(Instant::now() + WRITE_PAUSE);
            // A read sent before the node came back says nothing of it now, whatever
            // went wrong with it.
            let stale = read_started
                .is_some_and(|sent| health.trial_since.is_some_and(|since| sent < since));
            match error {
                _ if stale => false,
                // A refused connection is unambiguous, whatever the request: the node is
                // gone (or restarting), and the prober sees when it is back.
                NodeError::Unreachable => !health.down,
                // So is a broken read. A broken write is not: a node short of memory for
                // a body answers 503 and closes without reading it, and the client, still
                // sending, sees a reset. Writes pause (above); reads judge the node.
                NodeError::Transport(_) => read_started.is_some() && !health.down,
                _ if read_started.is_some() => {
                    health.consecutive_failures += 1;
                    let on_trial = health
                        .trial_since
                        .is_some_and(|since| read_started.is_some_and(|sent| sent >= since));
                    !health.down
                        && (on_trial || health.consecutive_failures >= FAILURES_BEFORE_DOWN)
                }
                _ => false,
            }
        };
        if went_down {
            self.mark_down();
        }
    }

    fn mark_down(self: &Arc<Self>) {
        {
            let mut health = self.health();
            if health.down {
                return;
            }
            health.down = true;
            if health.probing {
                return;
            }
            health.probing = true;
        }
        inc(&self.metrics.nodes_down);
        tracing::warn!(node = %self.id, addr = %self.addr, "node marked down");
        // The prober holds the node weakly, so that it ends with the client.
        tokio::spawn(probe_until_up(Arc::downgrade(self)));
    }

    /// One probe: whether the shard path answers in time, for the key whose read failed
    /// last (a shard, or a 404, read through the node's index and device), or for a key no
    /// chunk has; `None` if the client had no connection to send it on.
    async fn probe(&self) -> Option<bool> {
        let key = {
            let health = self.health();
            let deep = health.probes_failed < DEEP_PROBES || health.probes_failed.is_multiple_of(2);
            match &health.probe_key {
                Some(key) if deep => key.clone(),
                _ => PROBE_KEY.into(),
            }
        };
        let request = self.request(
            Method::GET,
            &format!("/v1/shards/{key}"),
            true,
            Bytes::new(),
        );
        match self
            .exchange(
                request,
                self.settings.shard_timeout,
                self.settings.max_shard_len,
            )
            .await
        {
            Ok((StatusCode::NOT_FOUND | StatusCode::OK, _)) => Some(true),
            Err(NodeError::NoConnection) => None,
            _ => Some(false),
        }
    }
}

async fn probe_until_up(node: Weak<Node>) {
    let Some(mut backoff) = node
        .upgrade()
        .map(|n| n.health().backoff.unwrap_or(PROBE_BACKOFF_MIN))
    else {
        return;
    };
    loop {
        tokio::time::sleep(jitter(backoff)).await;
        let Some(node) = node.upgrade() else { return };
        let answered = node.probe().await;
        if answered == Some(true) {
            {
                let mut health = node.health();
                health.down = false;
                health.probing = false;
                health.consecutive_failures = 0;
                health.no_writes_until = None;
                health.trial_since = Some(Instant::now());
                // Should the trial fail, probing goes on from here, not from the start.
                health.backoff = Some((backoff * 2).min(PROBE_BACKOFF_MAX));
            }
            node.metrics
                .nodes_down
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            inc(&node.metrics.node_recoveries);
            tracing::info!(node = %node.id, addr = %node.addr, "node is back up");
            return;
        }
        // A probe that found no connection (the client's own requests hold them all) says
        // nothing of the node: the same wait again.
        if answered == Some(false) {
            node.health().probes_failed += 1;
            backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
        }
    }
}

/// `base` scaled by a random factor in [0.5, 1.5), so that the clients of a fleet do not
/// probe a recovering node in lockstep. The randomness is std's per-process hash keys,
/// which are enough for spreading timers.
fn jitter(base: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let random = RandomState::new().hash_one(Instant::now());
    base.mul_f64(0.5 + (random >> 11) as f64 / (1u64 << 53) as f64)
}

/// Reads a response's whole body, at most `limit` bytes, into one buffer as it arrives.
/// A body in one frame is kept as it came; one in several is copied into a buffer of its
/// announced length. Holding the frames until the end instead (as `collect` does) costs a
/// list entry and a pinned slice of the receive buffer per frame, so a node that sends a
/// shard as half a million one-byte chunks would cost tens of MiB per response.
async fn read_response<B>(
    response: http::Response<B>,
    limit: usize,
) -> Result<(StatusCode, Bytes), NodeError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let status = response.status();
    // A body announced as larger than any shard is refused before it is read.
    let announced = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit as u64) {
        return Err(NodeError::TooLarge { limit });
    }
    let mut body = std::pin::pin!(response.into_body());
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|e| NodeError::Transport(e.to_string()))?;
        // Trailers carry nothing the client uses.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        total += data.len();
        if total > limit {
            return Err(NodeError::TooLarge { limit });
        }
        if let Some(buffer) = &mut joined {
            buffer.extend_from_slice(&data);
        } else if let Some(head) = first.take() {
            let capacity = announced.map_or(total, |len| len as usize).max(total);
            let mut buffer = bytes::BytesMut::with_capacity(capacity);
            buffer.extend_from_slice(&head);
            buffer.extend_from_slice(&data);
            joined = Some(buffer);
        } else {
            first = Some(data);
        }
    }
    let body = match (joined, first) {
        (Some(buffer), _) => buffer.freeze(),
        (None, Some(head)) => head,
        (None, None) => Bytes::new(),
    };
    Ok((status, body))
}

/// The node's side of a hyper error.
fn request_error(e: hyper_util::client::legacy::Error) -> NodeError {
    // Waiting for a free connection is neither a refusal nor the node's fault.
    let mut cause: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(inner) = cause {
        if inner.is::<PoolWait>() {
            return NodeError::NoConnection;
        }
        cause = inner.source();
    }
    if e.is_connect() {
        NodeError::Unreachable
    } else {
        NodeError::Transport(e.to_string())
    }
}

/// No connection to the node came free in time.
#[derive(Debug, thiserror::Error)]
#[error("no connection to the node came free in time")]
struct PoolWait;

/// Opens TCP connections to a node, at most `slots` at a time: hyper's pool opens a new
/// connection whenever no idle one is ready, so without this bound a burst of requests
/// (or a black-holed node holding every connection until its timeout) would open as many
/// connections as there are requests. A connection holds its slot until it closes.
#[derive(Clone)]
pub struct NodeConnector {
    tcp: HttpConnector,
    slots: Arc<Semaphore>,
    wait: Duration,
    stats: Arc<NodeStats>,
}

impl tower_service::Service<Uri> for NodeConnector {
    type Response = NodeConnection;
    type Error = Box<dyn StdError + Send + Sync>;
    type Future = BoxFuture<'static, Result<NodeConnection, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.tcp, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mut tcp, slots, wait, stats) = (
            self.tcp.clone(),
            self.slots.clone(),
            self.wait,
            self.stats.clone(),
        );
        Box::pin(async move {
            // hyper races this against an idle connection coming back to the pool; when
            // the idle one wins, this goes on in the background and, if it gets a slot
            // before `wait`, leaves one more idle connection within the bound.
            let slot = tokio::time::timeout(wait, slots.acquire_owned())
                .await
                .map_err(|_| PoolWait)?
                .map_err(|_| PoolWait)?;
            let io = tower_service::Service::<Uri>::call(&mut tcp, uri).await?;
            inc(&stats.connections_opened);
            Ok(NodeConnection { io, _slot: slot })
        })
    }
}

/// A TCP connection that holds one of its node's connection slots while it is open.
pub struct NodeConnection {
    io: TokioIo<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl Connection for NodeConnection {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for NodeConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for NodeConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type FrameStream = futures::stream::Iter<
        std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
    >;

    /// A response whose body arrives as `frames`, with `length` announced if given.
    fn response_of(
        frames: Vec<Bytes>,
        length: Option<usize>,
    ) -> http::Response<http_body_util::StreamBody<FrameStream>> {
        let frames: Vec<_> = frames
            .into_iter()
            .map(|b| Ok(hyper::body::Frame::data(b)))
            .collect();
        let mut builder = http::Response::builder().status(200);
        if let Some(length) = length {
            builder = builder.header(header::CONTENT_LENGTH, length);
        }
        builder
            .body(http_body_util::StreamBody::new(futures::stream::iter(
                frames,
            )))
            .unwrap()
    }

    #[tokio::test]
    async fn bodies_in_many_frames_are_joined_and_bounded() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        // One frame: kept as it came.
        let one = Bytes::from(payload.clone());
        let (_, body) = read_response(response_of(vec![one.clone()], None), 1 << 20)
            .await
            .unwrap();
        assert_eq!(body, payload);
        assert_eq!(body.as_ptr(), one.as_ptr(), "a single frame is not copied");
        // One-byte frames, as a hostile node's chunked encoding could send them, with and
        // without a length: joined in one buffer of the body's size.
        for length in [Some(payload.len()), None] {
            let tiny: Vec<Bytes> = payload.iter().map(|&b| Bytes::from(vec![b])).collect();
            let (_, body) = read_response(response_of(tiny, length), 1 << 20)
                .await
                .unwrap();
            assert_eq!(body, payload);
        }
        // Past the limit, announced or not: refused.
        let tiny: Vec<Bytes> = payload.iter().map(|&b| Bytes::from(vec![b])).collect();
        assert_eq!(
            read_response(response_of(tiny, None), 99_999).await.err(),
            Some(NodeError::TooLarge { limit: 99_999 })
        );
        assert_eq!(
            read_response(response_of(vec![], Some(100_000)), 99_999)
                .await
                .err(),
            Some(NodeError::TooLarge { limit: 99_999 })
        );
        let (_, empty) = read_response(response_of(vec![], None), 10).await.unwrap();
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn a_request_waiting_for_a_slot_gives_up_in_time() {
        let node = node();
        // Every slot taken by requests that never end.
        let all = node.detached.available_permits() as u32;
        let taken = node.detached.clone().acquire_many_owned(all).await.unwrap();
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), node.get_shard("a-key".into()))
            .await
            .expect("the wait for a slot is bounded");
        assert_eq!(answer, Err(NodeError::NoConnection));
        assert!(started.elapsed() >= Duration::from_millis(200), "it waited");
        // A node marked down while a request waited: the request is not sent.
        let waiting = node.get_shard("a-key".into());
        node.health().down = true;
        drop(taken);
        assert_eq!(waiting.await, Err(NodeError::NoConnection));
    }

    fn node() -> Arc<Node> {
        let settings = NodeSettings {
            connect_timeout: Duration::from_millis(100),
            shard_timeout: Duration::from_millis(100),
            max_connections: 4,
            http2: false,
            token: None,
            max_shard_len: 1 << 20,
        };
        Node::new(
            "n".into(),
            // Nothing listens on loopback's port 9 (discard) here: these tests send nothing
            // but the probes of a node marked down, which fail.
            "127.0.0.1:9".into(),
            settings,
            Arc::new(ClientMetrics::default()),
        )
    }

    #[tokio::test]
    async fn a_put_waiting_for_eviction_does_not_mark_a_node_down() {
        let node = node();
        // A PUT that times out (the node was evicting) or is refused for space, again
        // and again: the node still serves reads, so it stays up; only writes pause.
        for error in [
            NodeError::Timeout,
            NodeError::Status(507),
            NodeError::Timeout,
        ] {
            node.failed(&error, None);
        }
        // A write whose connection broke (a node refusing a body it has no memory for
        // closes without reading it) pauses writes too, and no more.
        node.failed(&NodeError::Transport("connection reset".into()), None);
        assert!(node.is_up());
        assert!(!node.is_writable(), "writes pause after a failed write");
        // The same failures on reads do mark it down.
        node.failed(&NodeError::Status(503), Some(Instant::now()));
        assert!(node.is_up(), "one failure is not enough");
        node.failed(&NodeError::Status(503), Some(Instant::now()));
        assert!(!node.is_up());
    }

    #[tokio::test]
    async fn a_node_on_trial_goes_down_at_its_first_failed_read_and_waits_on() {
        let node = node();
        let before = Instant::now();
        {
            let mut health = node.health();
            health.trial_since = Some(Instant::now());
            health.backoff = Some(Duration::from_millis(800));
        }
        // A read sent before the node came back does not judge it.
        node.failed(&NodeError::Timeout, Some(before));
        assert!(node.is_up(), "an old read ended the trial");
        node.failed(&NodeError::Status(500), Some(Instant::now()));
        assert!(!node.is_up(), "one failure on trial is enough");
        assert_eq!(
            node.health().backoff,
            Some(Duration::from_millis(800)),
            "the probes go on from where they were"
        );
        // Nor does a broken connection of a read sent before it came back.
        let third = super::tests::node();
        let sent = Instant::now();
        third.health().trial_since = Some(Instant::now());
        third.failed(&NodeError::Transport("reset".into()), Some(sent));
        third.failed(&NodeError::Unreachable, Some(sent));
        assert!(third.is_up(), "a stale broken read marked the node down");
        third.failed(&NodeError::Transport("reset".into()), Some(Instant::now()));
        assert!(!third.is_up(), "a fresh broken read marks it down");
        // A request never sent says nothing: it neither counts nor ends a trial.
        let other = super::tests::node();
        other.health().trial_since = Some(Instant::now());
        other.failed(&NodeError::NoConnection, Some(Instant::now()));
        assert!(other.is_up());
    }

    #[tokio::test]
    async fn a_success_between_failures_keeps_a_node_up() {
        let node = node();
        node.failed(&NodeError::Timeout, Some(Instant::now()));
        node.health().consecutive_failures = 0;
        node.failed(&NodeError::Timeout, Some(Instant::now()));
        assert!(node.is_up());
        node.failed(&NodeError::Unreachable, None);
        assert!(!node.is_up(), "a refused connection marks down at once");
    }

    #[test]
    fn jitter_spreads_around_the_base() {
        let base = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..200).map(|_| jitter(base)).collect();
        assert!(draws.iter().all(|d| *d >= base / 2 && *d < base * 3 / 2));
        assert!(draws.iter().any(|d| *d < base) && draws.iter().any(|d| *d > base));
    }
}
