//! The fleet client: k-of-M late-binding chunk reads, fill on miss, chunk writes.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared},
    stream::FuturesUnordered,
};
use http::HeaderValue;
use slapshot_core::{
    ChunkName, CodeParams, CodecKind, ErasureCodec, Placement, SealedChunk, codec_for,
    codec_with_kind,
    shard_frame::{self, ShardHeader},
};
use tokio::sync::Semaphore;

use crate::{
    config::{ConfigError, FleetConfig, ReadMode},
    hedge::{LatencyWindow, TokenBucket},
    metrics::{ClientMetrics, inc},
    node::{HttpClient, Node, NodeError, http_client},
    origin::{Origin, open_origin_with},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error(
        "chunk {name}: {have} of the {need} shards needed are in the fleet, and there is no origin to fall back to"
    )]
    FleetMiss {
        name: ChunkName,
        have: usize,
        need: usize,
    },
    #[error("chunk {name} is in neither the fleet nor the origin {origin}")]
    NotFound { name: ChunkName, origin: String },
    #[error("chunk {name} from the origin {origin} does not match its name")]
    CorruptOrigin { name: ChunkName, origin: String },
    #[error("chunk {name}: the origin failed: {message}")]
    Origin { name: ChunkName, message: String },
    #[error("chunk {name}: the origin did not answer within {timeout:?}")]
    OriginTimeout { name: ChunkName, timeout: Duration },
    #[error("chunk {name}: {written} of {total} shards stored, fewer than the {need} a read needs")]
    PutFailed {
        name: ChunkName,
        written: usize,
        total: usize,
        need: usize,
    },
    #[error("a chunk of {len} bytes is too large for the shard format")]
    TooLarge { len: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginError),
}

/// Which remote tier served a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSource {
    Fleet,
    Origin,
}

/// How a PUT of a whole chunk went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutReport {
    pub written: usize,
    pub failed: usize,
}

/// What one node said about a chunk during a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Not asked (down, or not needed).
    NotAsked,
    /// A valid shard with this index.
    Shard(u8),
    /// 404, or a shard that failed verification: a place to repair.
    Missing,
    /// An error or a timeout: the node may be fine but we learnt nothing.
    Failed,
}

/// The outcome of asking the fleet.
struct FleetRead {
    chunk: Option<Bytes>,
    degraded: bool,
    valid: usize,
    /// Per rank in the placement.
    answers: Vec<Answer>,
}

pub struct FleetClient {
    inner: Arc<Inner>,
}

impl Clone for FleetClient {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

type OriginFetch = Shared<BoxFuture<'static, Result<Bytes, ChunkError>>>;

struct Inner {
    config: FleetConfig,
    code: CodeParams,
    codec: Box<dyn ErasureCodec>,
    placement: Placement,
    nodes: Vec<Arc<Node>>,
    http: HttpClient,
    token: Option<HeaderValue>,
    origin: Option<Arc<dyn Origin>>,
    origin_permits: Arc<Semaphore>,
    inflight: Mutex<HashMap<ChunkName, OriginFetch>>,
    metrics: Arc<ClientMetrics>,
    hedge_bucket: Mutex<TokenBucket>,
    latencies: Mutex<LatencyWindow>,
}

/// Hedge delay before any latency has been observed.
const DEFAULT_HEDGE_DELAY: Duration = Duration::from_millis(5);
/// Hedges that may be banked during a quiet spell.
const HEDGE_BURST: f64 = 10.0;

impl FleetClient {
    /// A client for the fleet in `config`, with the origin it names (if any).
    pub fn new(config: FleetConfig) -> Result<Self, ClientError> {
        let origin = config
            .origin
            .as_deref()
            .map(|o| open_origin_with(o, &config.origin_options))
            .transpose()?;
        Self::with_origin(config, origin)
    }

    /// A client with an origin of the caller's choosing (tests inject counting or failing
    /// origins here).
    pub fn with_origin(
        config: FleetConfig,
        origin: Option<Arc<dyn Origin>>,
    ) -> Result<Self, ClientError> {
        config.validate()?;
        let code = config.code()?;
        let placement =
            Placement::new(&config.members()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let token = config
            .token()?
            .map(|t| HeaderValue::try_from(format!("Bearer {t}")))
            .transpose()
            .map_err(|_| ConfigError::Invalid("the token is not a valid header value".into()))?;
        let nodes = config
            .nodes
            .iter()
            .map(|n| Arc::new(Node::new(n.id.clone(), n.addr.clone())))
            .collect();
        let inner = Inner {
            codec: codec_for(code),
            code,
            placement,
            nodes,
            http: http_client(config.timeouts.connect.0),
            token,
            origin,
            origin_permits: Arc::new(Semaphore::new(config.max_origin_fetches)),
            inflight: Mutex::new(HashMap::new()),
            metrics: Arc::new(ClientMetrics::default()),
            hedge_bucket: Mutex::new(TokenBucket::new(config.read.hedge_budget, HEDGE_BURST)),
            latencies: Mutex::new(LatencyWindow::default()),
            config,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn metrics(&self) -> &Arc<ClientMetrics> {
        &self.inner.metrics
    }

    pub fn config(&self) -> &FleetConfig {
        &self.inner.config
    }

    pub fn origin(&self) -> Option<&Arc<dyn Origin>> {
        self.inner.origin.as_ref()
    }

    /// The nodes (in fleet-file order) that hold a chunk's shards, best first.
    pub fn placement(&self, name: &ChunkName) -> Vec<&str> {
        self.inner
            .placement
            .rank(name, self.inner.code.total())
            .into_iter()
            .map(|i| self.inner.nodes[i].id.as_str())
            .collect()
    }

    /// Node ids and whether the client currently considers each up.
    pub fn node_health(&self) -> Vec<(String, bool)> {
        self.inner
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.is_up()))
            .collect()
    }

    /// GET a path on every node, concurrently, with the shard timeout.
    pub async fn get_from_each_node(
        &self,
        path: &str,
    ) -> Vec<(String, String, Result<(u16, String), NodeError>)> {
        let timeout = self
            .inner
            .config
            .timeouts
            .shard
            .0
            .max(Duration::from_secs(1));
        let requests = self.inner.nodes.iter().map(|node| async move {
            (
                node.id.clone(),
                node.addr.clone(),
                node.get_text(&self.inner.http, path, timeout).await,
            )
        });
        futures::future::join_all(requests).await
    }

    /// Reads a chunk: from any k of its M shards in the fleet, or from the origin (after
    /// which the fleet is filled in the background). The bytes returned always match the
    /// name.
    pub async fn get_chunk(&self, name: &ChunkName) -> Result<Bytes, ChunkError> {
        self.get_chunk_with_source(name)
            .await
            .map(|(chunk, _)| chunk)
    }

    /// Like `get_chunk`, and says whether the fleet or the origin had the chunk (the
    /// worker's tier statistics need to know).
    pub async fn get_chunk_with_source(
        &self,
        name: &ChunkName,
    ) -> Result<(Bytes, ChunkSource), ChunkError> {
        let inner = &self.inner;
        let ranked = inner.placement.rank(name, inner.code.total());
        let read = self.read_fleet(name, &ranked).await;
        if let Some(chunk) = read.chunk {
            inc(&inner.metrics.fleet_hits);
            if read.degraded {
                inc(&inner.metrics.degraded_rebuilds);
            }
            // Read repair: nodes that answered without a valid shard get theirs back.
            if read.answers.contains(&Answer::Missing) {
                self.spawn_fill(*name, chunk.clone(), ranked, read.answers, |a| {
                    a == Answer::Missing
                });
            }
            return Ok((chunk, ChunkSource::Fleet));
        }
        if inner.origin.is_none() {
            inc(&inner.metrics.failures);
            return Err(ChunkError::FleetMiss {
                name: *name,
                have: read.valid,
                need: inner.code.data(),
            });
        }
        match self.fetch_from_origin(name).await {
            Ok(chunk) => {
                inc(&inner.metrics.origin_fills);
                self.spawn_fill(*name, chunk.clone(), ranked, read.answers, |a| {
                    !matches!(a, Answer::Shard(_))
                });
                Ok((chunk, ChunkSource::Origin))
            }
            Err(e) => {
                inc(&inner.metrics.failures);
                Err(e)
            }
        }
    }

    /// Asks the placement's nodes for shards and rebuilds the chunk from the first k
    /// valid ones; the requests still outstanding then are cancelled.
    async fn read_fleet(&self, name: &ChunkName, ranked: &[usize]) -> FleetRead {
        let inner = &self.inner;
        let k = inner.code.data();
        let key = name.to_hex();
        let mut answers = vec![Answer::NotAsked; ranked.len()];
        let up: Vec<usize> = (0..ranked.len())
            .filter(|&rank| inner.nodes[ranked[rank]].is_up())
            .collect();
        let (first, mut reserve): (Vec<usize>, VecDeque<usize>) = match inner.config.read.mode {
            ReadMode::All => (up, VecDeque::new()),
            ReadMode::Hedged => {
                let split = k.min(up.len());
                (up[..split].to_vec(), up[split..].iter().copied().collect())
            }
        };
        if inner.config.read.mode == ReadMode::Hedged {
            lock(&inner.hedge_bucket).deposit();
        }

        let mut pending = FuturesUnordered::new();
        for rank in first {
            pending.push(self.fetch_shard(rank, ranked[rank], &key));
        }
        let hedge_at = tokio::time::Instant::now() + self.hedge_delay();
        let mut hedged = reserve.is_empty();

        let mut shards: Vec<(usize, Bytes)> = Vec::with_capacity(k);
        let mut chunk_len: Option<u32> = None;
        let mut kind: Option<CodecKind> = None;
        while shards.len() < k {
            if pending.is_empty() {
                // A failed request in hedged mode is replaced at once: that is not a
                // hedge, the read cannot finish without it.
                match reserve.pop_front() {
                    Some(rank) => {
                        pending.push(self.fetch_shard(rank, ranked[rank], &key));
                        continue;
                    }
                    None => break,
                }
            }
            let next = if hedged {
                pending.next().await
            } else {
                tokio::select! {
                    next = pending.next() => next,
                    () = tokio::time::sleep_until(hedge_at) => {
                        hedged = true;
                        if lock(&inner.hedge_bucket).try_take() {
                            for rank in reserve.drain(..) {
                                inc(&inner.metrics.hedges_sent);
                                pending.push(self.fetch_shard(rank, ranked[rank], &key));
                            }
                        }
                        continue;
                    }
                }
            };
            let Some((rank, result)) = next else { continue };
            let before = shards.len();
            answers[rank] = match result {
                Ok(Some(frame)) => match shard_frame::parse(&frame) {
                    Ok((header, payload)) if self.acceptable(&header, chunk_len, kind) => {
                        chunk_len = Some(header.chunk_len);
                        kind = Some(header.codec);
                        let index = usize::from(header.index);
                        if !shards.iter().any(|(i, _)| *i == index) {
                            let start = frame.len() - payload.len();
                            shards.push((index, frame.slice(start..)));
                        }
                        Answer::Shard(header.index)
                    }
                    _ => {
                        inc(&inner.metrics.corrupt_shards);
                        tracing::warn!(chunk = %name, node = %inner.nodes[ranked[rank]].id, "shard failed verification");
                        Answer::Missing
                    }
                },
                Ok(None) => Answer::Missing,
                Err(_) => Answer::Failed,
            };
            // In hedged mode an answer that brought no new shard is replaced at once by
            // the next node in rank order.
            if shards.len() == before
                && inner.config.read.mode == ReadMode::Hedged
                && let Some(rank) = reserve.pop_front()
            {
                pending.push(self.fetch_shard(rank, ranked[rank], &key));
            }
        }
        drop(pending);

        let valid = shards.len();
        let mut read = FleetRead {
            chunk: None,
            degraded: false,
            valid,
            answers,
        };
        let Some(chunk_len) = chunk_len.filter(|_| valid >= k) else {
            return read;
        };
        let parts: Vec<(usize, &[u8])> = shards.iter().map(|(i, b)| (*i, b.as_ref())).collect();
        // Shards keep the codec they were written with: those of an older kind (Reed-Solomon
        // over GF(2^16) before the GF(2^8) codec) are read with that kind's codec. The frame
        // parser only lets kinds that fit the code through, so the fallback is never used.
        let older;
        let codec = match kind {
            Some(kind) if kind != inner.code.codec() => {
                older = codec_with_kind(inner.code, kind).ok();
                older.as_deref().unwrap_or(inner.codec.as_ref())
            }
            _ => inner.codec.as_ref(),
        };
        match codec.decode(chunk_len as usize, &parts) {
            Ok(chunk) if name.matches(&chunk) => {
                read.degraded = shards.iter().any(|(i, _)| *i >= k);
                read.chunk = Some(Bytes::from(chunk));
            }
            _ => {
                // Every shard passed its own crc, yet together they are not this chunk: some
                // node holds a shard of other bytes under this name. Treat as a miss.
                inc(&inner.metrics.corrupt_shards);
                tracing::warn!(chunk = %name, "shards rebuilt into bytes that do not match the name");
                read.valid = 0;
            }
        }
        read
    }

    /// Whether a shard belongs to this fleet's code and agrees with the shards before it
    /// (same chunk length and codec kind: shards of two kinds cannot be decoded together).
    fn acceptable(
        &self,
        header: &ShardHeader,
        chunk_len: Option<u32>,
        kind: Option<CodecKind>,
    ) -> bool {
        header.params == self.inner.code
            && chunk_len.is_none_or(|len| len == header.chunk_len)
            && kind.is_none_or(|kind| kind == header.codec)
    }

    fn hedge_delay(&self) -> Duration {
        let inner = &self.inner;
        match inner.config.read.hedge_delay {
            Some(delay) => delay.0,
            None => lock(&inner.latencies).p95().unwrap_or(DEFAULT_HEDGE_DELAY),
        }
    }

    /// One shard GET, with its effects on metrics and the node's health.
    async fn fetch_shard(
        &self,
        rank: usize,
        node: usize,
        key: &str,
    ) -> (usize, Result<Option<Bytes>, NodeError>) {
        let inner = &self.inner;
        let node = &inner.nodes[node];
        let started = Instant::now();
        let result = node
            .get_shard(
                &inner.http,
                inner.token.as_ref(),
                key,
                inner.config.timeouts.shard.0,
            )
            .await;
        let m = &inner.metrics;
        match &result {
            Ok(Some(_)) => {
                let latency = started.elapsed();
                m.shard_latency.observe(latency);
                lock(&inner.latencies).record(latency);
                inc(&m.shards_ok);
            }
            Ok(None) => inc(&m.shards_absent),
            Err(NodeError::Timeout) => inc(&m.shards_timed_out),
            Err(_) => inc(&m.shards_failed),
        }
        node.record(result.as_ref().map(drop), &inner.http, m);
        (rank, result)
    }

    /// Fetches a chunk from the origin, sharing one fetch among concurrent callers and
    /// holding one of the limited origin permits while it runs.
    async fn fetch_from_origin(&self, name: &ChunkName) -> Result<Bytes, ChunkError> {
        let fetch = {
            let mut inflight = lock(&self.inner.inflight);
            inflight
                .entry(*name)
                .or_insert_with(|| {
                    let inner = self.inner.clone();
                    let name = *name;
                    async move {
                        let result = inner.fetch_origin_once(&name).await;
                        lock(&inner.inflight).remove(&name);
                        result
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        fetch.await
    }

    /// Encodes a chunk and writes its shards to the nodes whose answers `needs_shard`
    /// picks, off the caller's path. Nodes that keep a valid shard keep its index; the
    /// missing indices go to the picked nodes in rank order.
    fn spawn_fill(
        &self,
        name: ChunkName,
        chunk: Bytes,
        ranked: Vec<usize>,
        answers: Vec<Answer>,
        needs_shard: fn(Answer) -> bool,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let held: HashSet<u8> = answers
                .iter()
                .filter_map(|a| {
                    if let Answer::Shard(i) = a {
                        Some(*i)
                    } else {
                        None
                    }
                })
                .collect();
            let missing = (0..this.inner.code.total() as u8).filter(|i| !held.contains(i));
            let targets: Vec<(usize, u8)> = (0..ranked.len())
                .filter(|&rank| needs_shard(answers[rank]))
                .map(|rank| ranked[rank])
                .zip(missing)
                .collect();
            if targets.is_empty() {
                return;
            }
            let Ok(frames) = this.frames(&chunk) else {
                return;
            };
            let report = this.put_frames(&name, &frames, &targets).await;
            let m = &this.inner.metrics;
            m.fill_shards_written
                .fetch_add(report.written as u64, std::sync::atomic::Ordering::Relaxed);
            m.fill_shards_failed
                .fetch_add(report.failed as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(chunk = %name, written = report.written, failed = report.failed, "fleet filled");
        });
    }

    /// The M framed shards of a chunk.
    fn frames(&self, chunk: &[u8]) -> Result<Vec<Bytes>, ChunkError> {
        let chunk_len =
            u32::try_from(chunk.len()).map_err(|_| ChunkError::TooLarge { len: chunk.len() })?;
        let shards = self
            .inner
            .codec
            .encode(chunk)
            .map_err(|_| ChunkError::TooLarge { len: chunk.len() })?;
        Ok(shards
            .iter()
            .enumerate()
            .map(|(index, payload)| {
                Bytes::from(shard_frame::frame(
                    &ShardHeader::new(self.inner.code, index as u8, chunk_len),
                    payload,
                ))
            })
            .collect())
    }

    /// PUTs shard `index` to node `node` for every target, concurrently. Nodes known to be
    /// down are not tried.
    async fn put_frames(
        &self,
        name: &ChunkName,
        frames: &[Bytes],
        targets: &[(usize, u8)],
    ) -> PutReport {
        let inner = &self.inner;
        let key = name.to_hex();
        let puts = targets.iter().map(|&(node, index)| {
            let key = &key;
            async move {
                let node = &inner.nodes[node];
                if !node.is_up() {
                    return false;
                }
                let timeout = inner.config.timeouts.shard.0 * 4;
                let result = node
                    .put_shard(
                        &inner.http,
                        inner.token.as_ref(),
                        key,
                        frames[usize::from(index)].clone(),
                        timeout,
                    )
                    .await;
                node.record(result.as_ref().copied(), &inner.http, &inner.metrics);
                result.is_ok()
            }
        });
        let results = futures::future::join_all(puts).await;
        let written = results.iter().filter(|ok| **ok).count();
        PutReport {
            written,
            failed: results.len() - written,
        }
    }

    /// Stores a sealed chunk across the fleet: shard i to the node of rank i. Succeeds if
    /// at least k shards were stored.
    pub async fn put_chunk(&self, chunk: &SealedChunk) -> Result<PutReport, ChunkError> {
        let name = chunk.name();
        let frames = self.frames(chunk.bytes())?;
        let ranked = self.inner.placement.rank(name, self.inner.code.total());
        let targets: Vec<(usize, u8)> = ranked
            .iter()
            .enumerate()
            .map(|(rank, &node)| (node, rank as u8))
            .collect();
        let report = self.put_frames(name, &frames, &targets).await;
        if report.written < self.inner.code.data() {
            return Err(ChunkError::PutFailed {
                name: *name,
                written: report.written,
                total: frames.len(),
                need: self.inner.code.data(),
            });
        }
        Ok(report)
    }
}

impl Inner {
    async fn fetch_origin_once(&self, name: &ChunkName) -> Result<Bytes, ChunkError> {
        let origin = self.origin.as_ref().expect("only called with an origin");
        let _permit = self
            .origin_permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        inc(&self.metrics.origin_fetches);
        let timeout = self.config.timeouts.origin.0;
        let fetched = tokio::time::timeout(timeout, origin.get(name))
            .await
            .map_err(|_| ChunkError::OriginTimeout {
                name: *name,
                timeout,
            })?;
        match fetched {
            Ok(Some(bytes)) if name.matches(&bytes) => Ok(bytes),
            Ok(Some(_)) => Err(ChunkError::CorruptOrigin {
                name: *name,
                origin: origin.describe(),
            }),
            Ok(None) => Err(ChunkError::NotFound {
                name: *name,
                origin: origin.describe(),
            }),
            Err(e) => Err(ChunkError::Origin {
                name: *name,
                message: e.to_string(),
            }),
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data
/// consistent, so a panic elsewhere does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
