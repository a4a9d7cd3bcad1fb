//! The fleet client: k-of-M late-binding chunk reads, fill on miss, chunk writes.
//!
//! Who owns what. A read (`get_chunk`) is a future its caller may drop at any await: a
//! timeout, a FUSE interrupt. So nothing that must finish runs inside it:
//! - each shard GET runs in a task of its own (`Node::get_shard`); dropping the read drops
//!   only the receiving ends, and the requests end on their own: within the wait for a
//!   connection (the shard timeout and a connect's) and the shard timeout after it;
//! - an origin fetch and the fill after it run in a task the client spawns (a "flight"),
//!   found by later readers of the chunk through `flights` and removed from it by the
//!   task itself when it ends, whatever the outcome; readers only watch its result, and
//!   the origin permit is the task's, not a reader's;
//! - repairs after a read run in spawned tasks, admitted by `Background`, which bounds
//!   their number and bytes, lets one fill or repair run per chunk, and drops and counts
//!   what does not fit.
//!
//! Which shards belong together. Every frame names its code (k, M), codec kind and chunk
//! length, and carries a tag of its chunk's name. A read groups valid shards by code and
//! decodes the first group to reach its own k, so clients with different codes (a
//! rollout) read each other's chunks; shards tagged with another chunk's name are counted
//! and repaired, and cannot push out correct ones.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use http::HeaderValue;
use slapshot_core::{
    CHUNK_SIZE, ChunkName, CodeParams, CodecKind, ErasureCodec, Placement, SealedChunk, codec_for,
    codec_with_kind,
    shard_frame::{self, FRAME_HEADER_LEN, ShardHeader},
};
use tokio::sync::{Semaphore, watch};

use crate::{
    config::{ConfigError, FleetConfig, ReadMode},
    hedge::{LatencyWindow, TokenBucket},
    metrics::{ClientMetrics, inc},
    node::{Node, NodeError, NodeSettings, PutDone, PutMode},
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
    #[error("a chunk of {len} bytes is larger than the {CHUNK_SIZE}-byte chunks the fleet stores")]
    TooLarge { len: usize },
}

/// Errors of the client library print their cause inline and do not return it from
/// `source()` (see `ConfigError`); these forward both to the wrapped error.
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

/// The code a shard was written with: shards decode together only with others of the
/// same code, codec kind and chunk length, and are decoded with those parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Code {
    params: CodeParams,
    kind: CodecKind,
    chunk_len: u32,
}

impl Code {
    fn of(header: &ShardHeader) -> Self {
        Self {
            params: header.params,
            kind: header.codec,
            chunk_len: header.chunk_len,
        }
    }

    fn shard_len(&self) -> usize {
        self.params.shard_len(self.chunk_len as usize)
    }
}

/// What one node (by rank in the placement) said about a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Not asked (down, or not needed), or the read ended before its answer came.
    NotAsked,
    /// A valid shard of this chunk: its code and index.
    Shard(Code, u8),
    /// 404: the node holds nothing under the name, a place to write (if it still holds
    /// nothing when the write arrives: another client may have written there meanwhile).
    Missing,
    /// A shard that failed verification, or another chunk's: a place to write, over it.
    Bad,
    /// An error or a timeout: the node may be fine, but we learnt nothing, and nothing is
    /// written to it.
    Failed,
}

/// Shards of one code collected during a read. Two nodes may hold the same index (one
/// of them lying, perhaps), so shards are kept per node, not per index.
struct Group {
    code: Code,
    shards: Vec<GroupShard>,
    /// Some k of these shards rebuilt into bytes that are not the chunk: at least one of
    /// them carries other bytes than its frame claims.
    suspect: bool,
}

impl Group {
    /// How many distinct indices the group holds (indices are below 64).
    fn distinct(&self) -> usize {
        let mut seen = 0u64;
        for shard in &self.shards {
            seen |= 1 << shard.index;
        }
        seen.count_ones() as usize
    }
}

/// A valid-looking shard: its index and payload.
struct GroupShard {
    index: usize,
    payload: Bytes,
}

/// A group's shards rebuilt into the chunk.
struct Decoded {
    group: usize,
    chunk: SealedChunk,
    /// Shard indices the chunk was rebuilt from.
    used: Vec<usize>,
}

/// Decodes one read may try when some k shards of a code with k data shards rebuild into
/// bytes that are not the chunk (a node holds a well-framed shard of other content). Each
/// try costs a decode and a hash, about 0.15 ms for a 512 KiB chunk. The budget finds the
/// chunk around two liars in any order of arrival: 1 try for the first k shards, k + 1
/// more once a shard is added (every k-subset of k + 1 holds a liar), and the (k + 1)k/2
/// subsets that leave out two of them once another comes. Subsets of the latest shards
/// are tried first, so liars that answer fast (a lie costs no disk read) are usually left
/// out at once. Capped for wide codes.
fn decode_budget(k: usize) -> usize {
    (2 + k + (k + 1) * k / 2).min(MAX_DECODE_ATTEMPTS)
}
const MAX_DECODE_ATTEMPTS: usize = 128;
/// How long a fill or repair waits for the answers the read did not wait for.
const REST_WAIT: Duration = Duration::from_secs(2);

/// A codec for frames of another code or kind than ours.
type OtherCodec = ((CodeParams, CodecKind), Arc<dyn ErasureCodec>);

/// A shard GET in flight, with the rank of the node it went to.
type RankedFetch = BoxFuture<'static, (usize, Result<Option<Bytes>, NodeError>)>;

/// The outcome of asking the fleet.
struct FleetRead {
    /// The chunk and the code it was decoded from.
    chunk: Option<(SealedChunk, Code)>,
    degraded: bool,
    /// Some k shards of one code rebuilt into other bytes: a node lies, and a repair is
    /// due even if every node answered with a shard.
    lied: bool,
    /// The most distinct shards one code had: how close a miss came.
    best: usize,
    heard: Heard,
}

/// What a read learnt of the nodes, handed on to the fill or repair after it.
struct Heard {
    /// Per rank in the placement.
    answers: Vec<Answer>,
    /// The payload of each `Shard` answer, per rank: the fill compares it with what the
    /// index should hold, so that lying shards are rewritten and correct ones are not.
    payloads: Vec<Option<Bytes>>,
    /// Requests still in flight when the read ended. A fill or repair hears them out
    /// (for a while) to learn what those nodes hold; otherwise they are dropped and end
    /// on their own.
    rest: FuturesUnordered<RankedFetch>,
    /// Per rank: whether the read sent it a request (answered or not). A fill asks only
    /// the others: a node whose answer is late already has one request to answer.
    asked: Vec<bool>,
}

type FlightResult = Option<Result<SealedChunk, ChunkError>>;

/// An origin fetch in flight: its readers watch `result`.
struct Flight {
    id: u64,
    result: watch::Receiver<FlightResult>,
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

struct Inner {
    config: FleetConfig,
    code: CodeParams,
    codec: Arc<dyn ErasureCodec>,
    /// Codecs of other codes met in frames, a few at most (a rollout has two codes).
    codecs: Mutex<Vec<OtherCodec>>,
    placement: Placement,
    nodes: Vec<Arc<Node>>,
    origin: Option<Arc<dyn Origin>>,
    origin_permits: Arc<Semaphore>,
    flights: Mutex<HashMap<ChunkName, Flight>>,
    next_flight: AtomicU64,
    background: Arc<Background>,
    metrics: Arc<ClientMetrics>,
    hedge_bucket: Mutex<TokenBucket>,
    /// Time from a read's start to its k-th valid shard.
    kth_arrivals: Mutex<LatencyWindow>,
}

/// Hedge delay before any k-th arrival has been observed.
const DEFAULT_HEDGE_DELAY: Duration = Duration::from_millis(5);
/// How much later than twice its delay a hedged read may end and still count as made
/// quick by its hedge (a hedge's round trip on a busy client).
const HEDGE_SLACK: Duration = Duration::from_millis(5);
/// Hedge requests that may be banked during a quiet spell.
const HEDGE_BURST: f64 = 10.0;
/// Codecs of foreign codes kept at once.
const OTHER_CODECS: usize = 8;

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
        let metrics = Arc::new(ClientMetrics::default());
        let settings = NodeSettings {
            connect_timeout: config.timeouts.connect.0,
            shard_timeout: config.timeouts.shard.0,
            max_connections: config.connections.max_per_node,
            http2: config.connections.http2,
            token,
            // The largest frame of any code: a whole chunk in one shard (k = 1).
            max_shard_len: FRAME_HEADER_LEN + CHUNK_SIZE,
        };
        let nodes = config
            .nodes
            .iter()
            .map(|n| {
                Node::new(
                    n.id.clone(),
                    n.addr.clone(),
                    settings.clone(),
                    metrics.clone(),
                )
            })
            .collect();
        let inner = Inner {
            codec: Arc::from(codec_for(code)),
            codecs: Mutex::new(Vec::new()),
            code,
            placement,
            nodes,
            origin,
            origin_permits: Arc::new(Semaphore::new(config.max_origin_fetches)),
            flights: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
            background: Arc::new(Background {
                max_tasks: config.background.max_tasks,
                max_bytes: usize::try_from(config.background.max_bytes.bytes())
                    .unwrap_or(usize::MAX),
                state: Mutex::new(BackgroundState::default()),
                metrics: metrics.clone(),
            }),
            hedge_bucket: Mutex::new(TokenBucket::new(config.read.hedge_budget, HEDGE_BURST)),
            kth_arrivals: Mutex::new(LatencyWindow::default()),
            metrics,
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

    /// How long a hedged read waits for its k-th shard before it hedges: the configured
    /// delay, or the p95 of recent k-th arrivals.
    pub fn hedge_delay(&self) -> Duration {
        self.inner.hedge_delay()
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
                node.get_text(path, timeout).await,
            )
        });
        futures::future::join_all(requests).await
    }

    /// Reads a chunk: from any k of its M shards in the fleet, or from the origin (after
    /// which the fleet is filled in the background). The chunk returned has been verified
    /// against the name; read from the fleet, it is the data shards as they were received
    /// ([`SealedChunk::parts`]), not copied into one buffer; those parts are slices of the
    /// HTTP client's receive buffers, so a caller that keeps the chunk beyond its use keeps
    /// [`SealedChunk::compact`] instead. Dropping the future at any point leaves nothing
    /// behind but requests and an origin fetch that end on their own.
    pub async fn get_chunk(&self, name: &ChunkName) -> Result<SealedChunk, ChunkError> {
        self.get_chunk_with_source(name)
            .await
            .map(|(chunk, _)| chunk)
    }

    /// Like `get_chunk`, and says whether the fleet or the origin had the chunk (the
    /// worker's tier statistics need to know).
    pub async fn get_chunk_with_source(
        &self,
        name: &ChunkName,
    ) -> Result<(SealedChunk, ChunkSource), ChunkError> {
        let inner = &self.inner;
        let ranked = inner.placement.rank(name, inner.code.total());
        let read = inner.read_fleet(name, &ranked).await;
        if let Some((chunk, code)) = read.chunk {
            inc(&inner.metrics.fleet_hits);
            if read.degraded {
                inc(&inner.metrics.degraded_rebuilds);
            }
            // Read repair: nodes that answered without a valid shard (or with a second
            // copy of an index) get theirs back, in the code the chunk was read in.
            if read.lied || wants_repair(code, &read.heard.answers) {
                inner.spawn_repair(*name, &chunk, code, ranked, read.heard);
            }
            return Ok((chunk, ChunkSource::Fleet));
        }
        if inner.origin.is_none() {
            inc(&inner.metrics.failures);
            return Err(ChunkError::FleetMiss {
                name: *name,
                have: read.best,
                need: inner.code.data(),
            });
        }
        match inner.fetch_from_origin(name, ranked, read.heard).await {
            Ok(chunk) => {
                inc(&inner.metrics.origin_fills);
                Ok((chunk, ChunkSource::Origin))
            }
            Err(e) => {
                inc(&inner.metrics.failures);
                Err(e)
            }
        }
    }

    /// Stores a sealed chunk across the fleet: shard i to the node of rank i. Succeeds if
    /// at least k shards were stored.
    pub async fn put_chunk(&self, chunk: &SealedChunk) -> Result<PutReport, ChunkError> {
        let inner = &self.inner;
        let name = chunk.name();
        let code = inner.own_code(chunk.len())?;
        let frames = inner.frames(name, &chunk.to_bytes(), code)?;
        let ranked = inner.placement.rank(name, inner.code.total());
        let targets: Vec<Target> = ranked
            .iter()
            .enumerate()
            .map(|(rank, &node)| Target {
                node,
                index: rank as u8,
                mode: PutMode::Always,
            })
            .collect();
        let report = inner.put_frames(name, &frames, &targets).await;
        let written = report.written;
        if written < inner.code.data() {
            return Err(ChunkError::PutFailed {
                name: *name,
                written,
                total: frames.len(),
                need: inner.code.data(),
            });
        }
        Ok(PutReport {
            written,
            failed: report.failed + report.skipped,
        })
    }
}

/// One shard PUT of a batch: shard `index` to node `node`.
struct Target {
    node: usize,
    index: u8,
    mode: PutMode,
}

/// What a batch of PUTs did.
#[derive(Default)]
struct WriteReport {
    written: usize,
    failed: usize,
    /// Not tried: the node was down or had just failed.
    skipped: usize,
    /// Create-only PUTs refused because the node had a shard under the name by then.
    taken: usize,
}

impl Inner {
    /// Asks the placement's nodes for shards and rebuilds the chunk from the first code
    /// to have k valid ones.
    async fn read_fleet(&self, name: &ChunkName, ranked: &[usize]) -> FleetRead {
        let k = self.code.data();
        let key: Arc<str> = name.to_hex().into();
        let mut answers = vec![Answer::NotAsked; ranked.len()];
        let mut payloads: Vec<Option<Bytes>> = vec![None; ranked.len()];
        let up: Vec<usize> = (0..ranked.len())
            .filter(|&rank| self.nodes[ranked[rank]].is_up())
            .collect();
        let hedged_mode = self.config.read.mode == ReadMode::Hedged;
        let mut asked = vec![false; ranked.len()];
        for &rank in &up {
            asked[rank] = true;
        }
        let (first, mut reserve): (Vec<usize>, VecDeque<usize>) = if hedged_mode {
            let split = k.min(up.len());
            (up[..split].to_vec(), up[split..].iter().copied().collect())
        } else {
            (up, VecDeque::new())
        };
        if hedged_mode {
            lock(&self.hedge_bucket).deposit();
        }

        let started = tokio::time::Instant::now();
        let mut pending = FuturesUnordered::new();
        for rank in first {
            pending.push(self.fetch(rank, ranked[rank], &key));
        }
        let delay = self.hedge_delay();
        let mut hedge_at = (!reserve.is_empty()).then(|| started + delay);
        // Set once a hedge request went out: the read's k-th arrival is then the hedge's,
        // not what the first k nodes would have taken.
        let mut hedged = false;
        let mut groups: Vec<Group> = Vec::new();
        let mut done: Option<Decoded> = None;
        let mut attempts = 0;
        while done.is_none() {
            if pending.is_empty() {
                // A failed request in hedged mode is replaced at once: that is not a
                // hedge, the read cannot finish without it.
                match reserve.pop_front() {
                    Some(rank) => {
                        pending.push(self.fetch(rank, ranked[rank], &key));
                        continue;
                    }
                    None => break,
                }
            }
            let next = match hedge_at {
                Some(at) => tokio::select! {
                    next = pending.next() => next,
                    () = tokio::time::sleep_until(at) => {
                        // The k-th shard is later than it is in 95% of reads: ask for the
                        // missing ones elsewhere, one token per request.
                        hedge_at = None;
                        let have = self.own_shards(&groups);
                        hedged = self.hedge(k.saturating_sub(have), &mut reserve, &mut pending, ranked, &key) > 0;
                        continue;
                    }
                },
                None => pending.next().await,
            };
            let Some((rank, result)) = next else { continue };
            let (answer, payload) = self.examine(name, rank, ranked, result);
            answers[rank] = answer;
            let mut progressed = false;
            if let (Answer::Shard(code, index), Some(payload)) = (answer, payload) {
                let at = match groups.iter().position(|g| g.code == code) {
                    Some(at) => at,
                    None => {
                        groups.push(Group {
                            code,
                            shards: Vec::new(),
                            suspect: false,
                        });
                        groups.len() - 1
                    }
                };
                payloads[rank] = Some(payload.clone());
                let group = &mut groups[at];
                let index = usize::from(index);
                let new_index = !group.shards.iter().any(|s| s.index == index);
                group.shards.push(GroupShard { index, payload });
                // A second copy of an index matters once the group is suspect: it may be
                // the true one.
                if group.distinct() >= code.params.data() && (new_index || group.suspect) {
                    done = self
                        .decode_group(name, group, &mut attempts)
                        .map(|(chunk, used)| Decoded {
                            group: at,
                            chunk,
                            used,
                        });
                }
                // A shard that completes no decode of a suspect group is no progress
                // towards the read either: more shards are needed.
                progressed = done.is_some() || (new_index && !group.suspect);
            }
            // In hedged mode an answer that brought no new shard is replaced at once by
            // the next node in rank order.
            if !progressed
                && hedged_mode
                && done.is_none()
                && let Some(rank) = reserve.pop_front()
            {
                pending.push(self.fetch(rank, ranked[rank], &key));
            }
            // A miss is known as soon as the answers still to come cannot make up k: the
            // origin need not wait for the slowest node's 404 (or its timeout).
            if done.is_none()
                && (attempts >= decode_budget(k)
                    || !self.may_complete(&groups, pending.len() + reserve.len()))
            {
                break;
            }
        }

        for &rank in &reserve {
            asked[rank] = false;
        }
        let mut read = FleetRead {
            chunk: None,
            degraded: false,
            lied: groups.iter().any(|g| g.suspect),
            best: groups
                .iter()
                .filter(|g| !g.suspect)
                .map(Group::distinct)
                .max()
                .unwrap_or(0),
            heard: Heard {
                answers,
                payloads,
                rest: pending,
                asked,
            },
        };
        if let Some(decoded) = done {
            let code = groups[decoded.group].code;
            // A read that had to find its way around a liar says nothing of how long k
            // shards take to come.
            // A hedged read that the hedge made quick records the delay: its first k nodes
            // would have taken at least that, and its own time (the delay and a hedge's
            // round trip) would push the p95 up by a round trip every few dozen reads
            // while a node is slow, until hedges came too late to help. One the hedge did
            // not make quick (the whole fleet is slow) records its time, so that the
            // trigger rises with the fleet.
            if !groups[decoded.group].suspect {
                let elapsed = started.elapsed();
                let waited = if hedged && elapsed <= 2 * delay + HEDGE_SLACK {
                    delay
                } else {
                    elapsed
                };
                lock(&self.kth_arrivals).record(waited);
            }
            read.degraded = decoded.used.iter().any(|&i| i >= code.params.data());
            read.chunk = Some((decoded.chunk, code));
        }
        read
    }

    /// The most distinct shards a group of our own code holds that is not suspect: how far
    /// the read is from its k.
    fn own_shards(&self, groups: &[Group]) -> usize {
        groups
            .iter()
            .filter(|g| g.code.params == self.code && !g.suspect)
            .map(Group::distinct)
            .max()
            .unwrap_or(0)
    }

    /// Whether `outstanding` more shards could still complete a decode: of our own code
    /// (from none, or from what it has), or of a code already met in this read.
    fn may_complete(&self, groups: &[Group], outstanding: usize) -> bool {
        let own = self.own_shards(groups);
        // A suspect group has its k indices: any further shard opens new subsets.
        own + outstanding >= self.code.data()
            || groups.iter().any(|g| {
                if g.suspect {
                    outstanding > 0
                } else {
                    g.distinct() + outstanding >= g.code.params.data()
                }
            })
    }

    /// Tries to rebuild the chunk from `group`, whose newest shard just arrived: every
    /// k-subset of distinct indices that holds the newest shard (the others were tried
    /// before), the latest shards first, within the read's budget of attempts. Returns the
    /// chunk and the indices it came from.
    fn decode_group(
        &self,
        name: &ChunkName,
        group: &mut Group,
        attempts: &mut usize,
    ) -> Option<(SealedChunk, Vec<usize>)> {
        let code = group.code;
        let codec = self.codec(code.params, code.kind)?;
        let indices: Vec<usize> = group.shards.iter().map(|s| s.index).collect();
        let mut failed = false;
        let found = search_subsets(&indices, code.params.data(), attempts, |chosen| {
            let shards: Vec<(usize, Bytes)> = chosen
                .iter()
                .map(|&at| &group.shards[at])
                .map(|s| (s.index, s.payload.clone()))
                .collect();
            // The data shards stay where they were received: the chunk is verified and
            // handed on in parts, never joined here.
            let chunk = codec
                .decode_parts(code.chunk_len as usize, &shards)
                .ok()
                .and_then(|parts| SealedChunk::verified_parts(*name, parts).ok());
            match chunk {
                Some(chunk) => Some((chunk, shards.iter().map(|(i, _)| *i).collect())),
                None => {
                    failed = true;
                    None
                }
            }
        });
        if failed && !group.suspect {
            group.suspect = true;
            inc(&self.metrics.lying_reads);
            tracing::warn!(chunk = %name, "shards rebuilt into bytes that do not match the name; reading more");
        }
        found
    }

    /// Sends up to `wanted` hedge requests to the reserve nodes, each paid with a token;
    /// returns how many went out.
    fn hedge(
        &self,
        wanted: usize,
        reserve: &mut VecDeque<usize>,
        pending: &mut FuturesUnordered<RankedFetch>,
        ranked: &[usize],
        key: &Arc<str>,
    ) -> usize {
        let wanted = wanted.min(reserve.len());
        for sent in 0..wanted {
            if !lock(&self.hedge_bucket).try_take() {
                self.metrics
                    .hedges_refused
                    .fetch_add((wanted - sent) as u64, Ordering::Relaxed);
                return sent;
            }
            let rank = reserve.pop_front().expect("wanted <= reserve.len()");
            inc(&self.metrics.hedges_sent);
            pending.push(self.fetch(rank, ranked[rank], key));
        }
        wanted
    }

    /// Judges one node's answer: a valid shard of this chunk (its code, index and
    /// payload), a place that lacks one, or nothing learnt.
    fn examine(
        &self,
        name: &ChunkName,
        rank: usize,
        ranked: &[usize],
        result: Result<Option<Bytes>, NodeError>,
    ) -> (Answer, Option<Bytes>) {
        let frame = match result {
            Ok(Some(frame)) => frame,
            Ok(None) => return (Answer::Missing, None),
            Err(_) => return (Answer::Failed, None),
        };
        let node = &self.nodes[ranked[rank]].id;
        match shard_frame::parse(&frame) {
            Ok((header, payload)) if header.may_belong_to(name) => {
                let code = Code::of(&header);
                if code.params != self.code || code.kind != self.code.codec() {
                    inc(&self.metrics.other_code_shards);
                }
                let start = frame.len() - payload.len();
                (
                    Answer::Shard(code, header.index),
                    Some(frame.slice(start..)),
                )
            }
            Ok(_) => {
                inc(&self.metrics.corrupt_shards);
                inc(&self.metrics.foreign_shards);
                tracing::warn!(chunk = %name, node = %node, "a node holds another chunk's shard under this name");
                (Answer::Bad, None)
            }
            Err(e) => {
                inc(&self.metrics.corrupt_shards);
                tracing::warn!(chunk = %name, node = %node, error = %e, "shard failed verification");
                (Answer::Bad, None)
            }
        }
    }

    fn fetch(&self, rank: usize, node: usize, key: &Arc<str>) -> RankedFetch {
        let fetch = self.nodes[node].get_shard(key.clone());
        async move { (rank, fetch.await) }.boxed()
    }

    fn hedge_delay(&self) -> Duration {
        match self.config.read.hedge_delay {
            Some(delay) => delay.0,
            None => lock(&self.kth_arrivals)
                .p95()
                .unwrap_or(DEFAULT_HEDGE_DELAY),
        }
    }

    /// The codec that reads (and writes) shards of `params` and `kind`.
    fn codec(&self, params: CodeParams, kind: CodecKind) -> Option<Arc<dyn ErasureCodec>> {
        if params == self.code && kind == self.code.codec() {
            return Some(self.codec.clone());
        }
        let mut codecs = lock(&self.codecs);
        if let Some((_, codec)) = codecs.iter().find(|(key, _)| *key == (params, kind)) {
            return Some(codec.clone());
        }
        // The frame parser lets only kinds that fit their code through.
        let codec: Arc<dyn ErasureCodec> = Arc::from(codec_with_kind(params, kind).ok()?);
        if codecs.len() == OTHER_CODECS {
            codecs.remove(0);
        }
        codecs.push(((params, kind), codec.clone()));
        Some(codec)
    }

    /// This client's code for a chunk of `len` bytes.
    fn own_code(&self, len: usize) -> Result<Code, ChunkError> {
        if len > CHUNK_SIZE {
            return Err(ChunkError::TooLarge { len });
        }
        Ok(Code {
            params: self.code,
            kind: self.code.codec(),
            chunk_len: len as u32,
        })
    }

    /// Fetches a chunk from the origin, in a task shared by every reader of the chunk.
    async fn fetch_from_origin(
        self: &Arc<Self>,
        name: &ChunkName,
        ranked: Vec<usize>,
        heard: Heard,
    ) -> Result<SealedChunk, ChunkError> {
        let mut result = {
            let mut flights = lock(&self.flights);
            match flights.get(name) {
                Some(flight) => flight.result.clone(),
                None => {
                    let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    flights.insert(
                        *name,
                        Flight {
                            id,
                            result: rx.clone(),
                        },
                    );
                    tokio::spawn(self.clone().fly(*name, id, tx, ranked, heard));
                    rx
                }
            }
        };
        match result.wait_for(Option::is_some).await {
            Ok(answer) => answer.clone().expect("waited for Some"),
            Err(_) => Err(ChunkError::Origin {
                name: *name,
                message: "the origin fetch ended without an answer".into(),
            }),
        }
    }

    /// A flight: the origin fetch, its answer to the readers, then the fill. Its entry in
    /// `flights` goes when it ends (on an error, before the readers hear of it, so that no
    /// later reader inherits it). `heard.rest` are the read's requests still in flight
    /// (the miss was known before the slowest nodes answered): the fill hears them out
    /// rather than ask those nodes again.
    async fn fly(
        self: Arc<Self>,
        name: ChunkName,
        id: u64,
        tx: watch::Sender<FlightResult>,
        ranked: Vec<usize>,
        heard: Heard,
    ) {
        let entry = FlightEntry {
            inner: self.clone(),
            name,
            id,
        };
        let Some(result) = self.fetch_origin_once(&name, id, &tx).await else {
            return;
        };
        let chunk = match result {
            Ok(chunk) => chunk,
            Err(e) => {
                drop(entry);
                let _ = tx.send(Some(Err(e)));
                return;
            }
        };
        let _ = tx.send(Some(Ok(chunk.clone())));
        // Readers who come during the fill get the chunk from here rather than start a
        // second fetch and fill.
        let Ok(code) = self.own_code(chunk.len()) else {
            return;
        };
        if let Some(permit) = self.background.admit(name, write_bytes(code)) {
            self.write_back(name, chunk.to_bytes(), code, ranked, heard)
                .await;
            drop(permit);
        }
        drop(entry);
    }

    /// Fetches and verifies a chunk, holding an origin permit; `None` if every reader had
    /// gone by the time a permit came free (the fetch is skipped and its entry removed).
    async fn fetch_origin_once(
        &self,
        name: &ChunkName,
        id: u64,
        readers: &watch::Sender<FlightResult>,
    ) -> Option<Result<SealedChunk, ChunkError>> {
        let origin = self.origin.as_ref().expect("only called with an origin");
        let timeout = self.config.timeouts.origin.0;
        // The wait for a permit is bounded too: when every permit is held by fetches from
        // an origin that hangs, readers hear so within the origin timeout.
        let Ok(permit) = tokio::time::timeout(timeout, self.origin_permits.acquire()).await else {
            return Some(Err(ChunkError::OriginTimeout {
                name: *name,
                timeout,
            }));
        };
        let _permit = permit.expect("the semaphore is never closed");
        {
            // Under the lock, so that no reader joins between the count and the removal.
            // The entry holds one receiver itself.
            let mut flights = lock(&self.flights);
            if readers.receiver_count() <= 1 {
                if flights.get(name).is_some_and(|f| f.id == id) {
                    flights.remove(name);
                }
                inc(&self.metrics.origin_abandoned);
                return None;
            }
        }
        inc(&self.metrics.origin_fetches);
        let Ok(fetched) = tokio::time::timeout(timeout, origin.get(name)).await else {
            return Some(Err(ChunkError::OriginTimeout {
                name: *name,
                timeout,
            }));
        };
        Some(match fetched {
            Ok(Some(bytes)) => {
                SealedChunk::verified(*name, bytes).map_err(|_| ChunkError::CorruptOrigin {
                    name: *name,
                    origin: origin.describe(),
                })
            }
            Ok(None) => Err(ChunkError::NotFound {
                name: *name,
                origin: origin.describe(),
            }),
            Err(e) => Err(ChunkError::Origin {
                name: *name,
                message: e.to_string(),
            }),
        })
    }

    /// Starts a repair in the background, if the bounds admit it.
    fn spawn_repair(
        self: &Arc<Self>,
        name: ChunkName,
        chunk: &SealedChunk,
        code: Code,
        ranked: Vec<usize>,
        heard: Heard,
    ) {
        let Some(permit) = self.background.admit(name, write_bytes(code)) else {
            return;
        };
        // A repair cuts the chunk into shards again, from one buffer: the join is paid
        // only by a repair that was admitted.
        let chunk = chunk.to_bytes();
        let inner = self.clone();
        tokio::spawn(async move {
            inner.write_back(name, chunk, code, ranked, heard).await;
            drop(permit);
        });
    }

    /// Writes `code`'s shards of a chunk to the nodes that lack one. First it completes
    /// the picture, for at most `REST_WAIT`: the answers of requests still in flight, and
    /// the shards of up nodes the read did not ask, so that no index is given to a node
    /// while another holds it. Every shard of `code` heard is compared with what its index
    /// holds: a node that lies is rewritten, and only such nodes.
    async fn write_back(
        &self,
        name: ChunkName,
        chunk: Bytes,
        code: Code,
        mut ranked: Vec<usize>,
        heard: Heard,
    ) {
        let Heard {
            mut answers,
            mut payloads,
            mut rest,
            mut asked,
        } = heard;
        let Ok(frames) = self.frames(&name, &chunk, code) else {
            return;
        };
        // A chunk of a wider code than ours (a rollout) has shards on nodes beyond our M:
        // they are asked too, or an index one of them holds could be given again. The
        // placement's ranking extends ours, so ranks keep their meaning.
        if code.params.total() > ranked.len() {
            ranked = self.placement.rank(&name, code.params.total());
            answers.resize(ranked.len(), Answer::NotAsked);
            payloads.resize(ranked.len(), None);
            asked.resize(ranked.len(), false);
        }
        let key: Arc<str> = name.to_hex().into();
        let deadline = tokio::time::Instant::now() + self.config.timeouts.shard.0.min(REST_WAIT);
        while let Ok(Some((rank, result))) = tokio::time::timeout_at(deadline, rest.next()).await {
            (answers[rank], payloads[rank]) = self.examine(&name, rank, &ranked, result);
        }
        // Past the deadline nobody would hear the answers: no requests are sent.
        let mut asks: FuturesUnordered<RankedFetch> = (0..answers.len())
            .filter(|_| tokio::time::Instant::now() < deadline)
            .filter(|&rank| !asked[rank] && self.nodes[ranked[rank]].is_up())
            .map(|rank| self.fetch(rank, ranked[rank], &key))
            .collect();
        while let Ok(Some((rank, result))) = tokio::time::timeout_at(deadline, asks.next()).await {
            (answers[rank], payloads[rank]) = self.examine(&name, rank, &ranked, result);
        }
        // Every shard heard is compared with what its index holds, in its own code: a
        // shard of another code (a rollout) is kept only if it is a true shard of this
        // chunk in that code, and one that gives the chunk another length is a lie
        // whatever its code (a chunk has one length, the one its name was read at).
        let mut other_codes: Vec<(Code, Option<Vec<Bytes>>)> = Vec::new();
        for rank in 0..answers.len() {
            let (Answer::Shard(c, index), Some(payload)) = (answers[rank], &payloads[rank]) else {
                continue;
            };
            let truth: Option<&Vec<Bytes>> = if c == code {
                Some(&frames)
            } else if c.chunk_len as usize != chunk.len() {
                None
            } else {
                let at = match other_codes.iter().position(|(k, _)| *k == c) {
                    Some(at) => at,
                    None => {
                        other_codes.push((c, self.frames(&name, &chunk, c).ok()));
                        other_codes.len() - 1
                    }
                };
                match &other_codes[at].1 {
                    Some(frames) => Some(frames),
                    // A code this client cannot encode: nothing to judge it by.
                    None => continue,
                }
            };
            let lies = truth.is_none_or(|frames| {
                frames
                    .get(usize::from(index))
                    .is_none_or(|frame| frame[FRAME_HEADER_LEN..] != payload[..])
            });
            if lies {
                inc(&self.metrics.corrupt_shards);
                let node = &self.nodes[ranked[rank]].id;
                tracing::warn!(chunk = %name, node = %node, index, "a shard with a valid frame holds other bytes");
                answers[rank] = Answer::Bad;
            }
        }
        let plan = plan_writes(code, &answers);
        if plan.is_empty() {
            return;
        }
        // Where the node said 404, the write is create-only: what another client wrote
        // there since (a shard of its code, in a rollout) stays. Everywhere else the plan
        // means to replace what the node holds.
        let targets: Vec<Target> = plan
            .iter()
            .map(|&(rank, index)| Target {
                node: ranked[rank],
                index,
                mode: if answers[rank] == Answer::Missing {
                    PutMode::IfAbsent
                } else {
                    PutMode::Always
                },
            })
            .collect();
        let report = self.put_frames(&name, &frames, &targets).await;
        let m = &self.metrics;
        m.fill_shards_written
            .fetch_add(report.written as u64, Ordering::Relaxed);
        m.fill_shards_failed
            .fetch_add(report.failed as u64, Ordering::Relaxed);
        m.fill_shards_skipped
            .fetch_add(report.skipped as u64, Ordering::Relaxed);
        m.fill_shards_taken
            .fetch_add(report.taken as u64, Ordering::Relaxed);
        tracing::debug!(chunk = %name, written = report.written, failed = report.failed, skipped = report.skipped, taken = report.taken, "shards written back");
    }

    /// The framed shards of a chunk in `code`.
    fn frames(&self, name: &ChunkName, chunk: &[u8], code: Code) -> Result<Vec<Bytes>, ChunkError> {
        let too_large = || ChunkError::TooLarge { len: chunk.len() };
        let codec = self.codec(code.params, code.kind).ok_or_else(too_large)?;
        let shards = codec.encode(chunk).map_err(|_| too_large())?;
        Ok(shards
            .iter()
            .enumerate()
            .map(|(index, payload)| {
                let header = ShardHeader {
                    codec: code.kind,
                    ..ShardHeader::new(name, code.params, index as u8, code.chunk_len)
                };
                Bytes::from(shard_frame::frame(&header, payload))
            })
            .collect())
    }

    /// PUTs each target's shard to its node, concurrently. Nodes that are down or have
    /// just failed are not tried.
    async fn put_frames(
        &self,
        name: &ChunkName,
        frames: &[Bytes],
        targets: &[Target],
    ) -> WriteReport {
        let key = name.to_hex();
        let timeout = self.config.timeouts.put.0;
        let puts = targets.iter().map(|target| {
            let key = &key;
            async move {
                let node = &self.nodes[target.node];
                if !node.is_writable() {
                    return None;
                }
                let frame = frames[usize::from(target.index)].clone();
                Some(node.put_shard(key, frame, target.mode, timeout).await)
            }
        });
        let mut report = WriteReport::default();
        for result in futures::future::join_all(puts).await {
            match result {
                Some(Ok(PutDone::Written)) => report.written += 1,
                Some(Ok(PutDone::Taken)) => report.taken += 1,
                Some(Err(_)) => report.failed += 1,
                None => report.skipped += 1,
            }
        }
        report
    }
}

/// Removes a flight's entry when the flight ends, however it ends; only its own entry,
/// not a later flight's for the same chunk.
struct FlightEntry {
    inner: Arc<Inner>,
    name: ChunkName,
    id: u64,
}

impl Drop for FlightEntry {
    fn drop(&mut self) {
        let mut flights = lock(&self.inner.flights);
        if flights.get(&self.name).is_some_and(|f| f.id == self.id) {
            flights.remove(&self.name);
        }
    }
}

/// Bytes a fill or repair of `code` holds: the chunk, its framed shards, and the shards
/// heard from the nodes (kept to be checked against the framed ones).
fn write_bytes(code: Code) -> usize {
    code.chunk_len as usize + code.params.total() * (FRAME_HEADER_LEN + 2 * code.shard_len())
}

/// Whether a read's answers call for a repair in `code`: a node lacks a shard, holds one
/// that gives the chunk another length, or two nodes hold the same index; and some index
/// of the code is not known to be held (when every index is, as for a chunk of a 4-of-5
/// client read by a 4-of-6 one, there is nothing to give).
fn wants_repair(code: Code, answers: &[Answer]) -> bool {
    let mut held = HashSet::new();
    let mut wanted = false;
    for answer in answers {
        match *answer {
            Answer::Missing | Answer::Bad => wanted = true,
            Answer::Shard(c, _) if c.chunk_len != code.chunk_len => wanted = true,
            Answer::Shard(c, index) if c == code => wanted |= !held.insert(index),
            _ => {}
        }
    }
    wanted && held.len() < code.params.total()
}

/// Which rank gets which shard index when `code` is written back after `answers`.
///
/// - Writes go to nodes that lack a valid shard (`Missing`), and to the second holder of
///   an index held twice. Never to a node that failed or that we did not hear from.
/// - A node holding a valid shard of another code keeps it (another client may read it
///   during a rollout), unless that code cannot be read by anyone: its M is no more than
///   ours (so its readers ask a subset of the nodes we asked) and it has fewer than its k
///   shards even counting every node we did not hear from, while ours would not reach k
///   without those nodes. Such shards would otherwise keep the chunk from ever being read
///   from the fleet again.
/// - Indices held are not given again. A target keeps the index of its rank when free
///   (where `put_chunk` puts it); the index of a silent node's rank is left to that node,
///   which most likely holds it.
fn plan_writes(code: Code, answers: &[Answer]) -> Vec<(usize, u8)> {
    let total = code.params.total();
    let silent = answers
        .iter()
        .filter(|a| matches!(a, Answer::NotAsked | Answer::Failed))
        .count();
    let mut held = vec![false; total];
    let mut targets = Vec::new();
    for (rank, answer) in answers.iter().enumerate() {
        match *answer {
            Answer::Shard(c, index) if c == code => {
                let index = usize::from(index);
                if held[index] {
                    targets.push(rank);
                } else {
                    held[index] = true;
                }
            }
            Answer::Missing | Answer::Bad => targets.push(rank),
            _ => {}
        }
    }
    let held_count = held.iter().filter(|h| **h).count();
    if held_count + targets.len() < code.params.data() {
        let mut others: Vec<Code> = Vec::new();
        for answer in answers {
            if let Answer::Shard(c, _) = *answer
                && c != code
                && !others.contains(&c)
            {
                others.push(c);
            }
        }
        for other in others {
            let mut indices = HashSet::new();
            let ranks: Vec<usize> = (0..answers.len())
                .filter(|&rank| match answers[rank] {
                    Answer::Shard(c, index) if c == other => {
                        indices.insert(index);
                        true
                    }
                    _ => false,
                })
                .collect();
            let readable_somewhere = other.params.total() > answers.len()
                || indices.len() + silent >= other.params.data();
            if !readable_somewhere {
                targets.extend(ranks);
            }
        }
        targets.sort_unstable();
    }

    let mut free: Vec<bool> = held.iter().map(|h| !h).collect();
    let mut plan = Vec::new();
    let mut later = Vec::new();
    for rank in targets {
        if rank < total && free[rank] {
            free[rank] = false;
            plan.push((rank, rank as u8));
        } else {
            later.push(rank);
        }
    }
    for (rank, answer) in answers.iter().enumerate() {
        if rank < total && matches!(answer, Answer::NotAsked | Answer::Failed) {
            free[rank] = false;
        }
    }
    let mut spare = (0..total).filter(|&i| free[i]);
    // Ranks beyond the code's M are outside the chunk's placement (a wider reader): its
    // readers never ask them.
    for rank in later.into_iter().filter(|&rank| rank < total) {
        let Some(index) = spare.next() else { break };
        plan.push((rank, index as u8));
    }
    plan.sort_unstable();
    plan
}

/// Fills and repairs running, and the bounds on them.
struct Background {
    max_tasks: usize,
    max_bytes: usize,
    state: Mutex<BackgroundState>,
    metrics: Arc<ClientMetrics>,
}

#[derive(Default)]
struct BackgroundState {
    tasks: usize,
    bytes: usize,
    chunks: HashSet<ChunkName>,
}

/// A fill or repair's place within the bounds, given back when it is dropped.
struct BackgroundPermit {
    background: Arc<Background>,
    name: ChunkName,
    bytes: usize,
}

impl Background {
    /// Admits a fill or repair of `bytes` for the chunk `name`, or drops it (counted): one
    /// runs per chunk at a time, and the running ones stay within the bounds.
    fn admit(self: &Arc<Self>, name: ChunkName, bytes: usize) -> Option<BackgroundPermit> {
        let mut state = lock(&self.state);
        if state.chunks.contains(&name) {
            inc(&self.metrics.background_dropped_busy);
            return None;
        }
        if state.tasks >= self.max_tasks || state.bytes + bytes > self.max_bytes {
            inc(&self.metrics.background_dropped_full);
            return None;
        }
        state.tasks += 1;
        state.bytes += bytes;
        state.chunks.insert(name);
        self.publish(&state);
        Some(BackgroundPermit {
            background: self.clone(),
            name,
            bytes,
        })
    }

    fn publish(&self, state: &BackgroundState) {
        let m = &self.metrics;
        m.background_tasks
            .store(state.tasks as u64, Ordering::Relaxed);
        m.background_bytes
            .store(state.bytes as u64, Ordering::Relaxed);
    }
}

impl Drop for BackgroundPermit {
    fn drop(&mut self) {
        let mut state = lock(&self.background.state);
        state.tasks -= 1;
        state.bytes -= self.bytes;
        state.chunks.remove(&self.name);
        self.background.publish(&state);
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data
/// consistent, so a panic elsewhere does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The subset search of a read, apart from decoding: shards are given by index in order
/// of arrival, the last one just arrived. Tries (with `try_subset`, on positions in
/// `indices`) every k-subset of distinct indices that holds the newest shard (the others
/// were tried before), the latest shards first, while `attempts` is within the budget.
fn search_subsets<T>(
    indices: &[usize],
    k: usize,
    attempts: &mut usize,
    mut try_subset: impl FnMut(&[usize]) -> Option<T>,
) -> Option<T> {
    let newest = indices.len().checked_sub(1)?;
    let latest_first: Vec<usize> = (0..newest).rev().collect();
    let mut chosen = Vec::with_capacity(k);
    for subset in Combinations::new(latest_first.len(), k.checked_sub(1)?) {
        if *attempts >= decode_budget(k) {
            return None;
        }
        chosen.clear();
        chosen.extend(subset.iter().map(|&i| latest_first[i]));
        chosen.push(newest);
        let mut seen = 0u64;
        let repeated = chosen.iter().any(|&at| {
            let bit = 1 << indices[at];
            let again = seen & bit != 0;
            seen |= bit;
            again
        });
        if repeated {
            continue;
        }
        *attempts += 1;
        if let Some(found) = try_subset(&chosen) {
            return Some(found);
        }
    }
    None
}

/// The r-element subsets of 0..n, as sorted index lists in lexicographic order.
struct Combinations {
    n: usize,
    next: Option<Vec<usize>>,
}

impl Combinations {
    fn new(n: usize, r: usize) -> Self {
        Self {
            n,
            next: (r <= n).then(|| (0..r).collect()),
        }
    }
}

impl Iterator for Combinations {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        let current = self.next.take()?;
        let r = current.len();
        let mut following = current.clone();
        // The rightmost position that can still move right, then everything after it
        // packed behind it.
        if let Some(at) = (0..r).rev().find(|&i| following[i] < self.n - r + i) {
            following[at] += 1;
            for i in at + 1..r {
                following[i] = following[i - 1] + 1;
            }
            self.next = Some(following);
        }
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(k: usize, m: usize) -> Code {
        let params = CodeParams::new(k, m).unwrap();
        Code {
            params,
            kind: params.codec(),
            chunk_len: 1000,
        }
    }

    fn shard(code: Code, index: u8) -> Answer {
        Answer::Shard(code, index)
    }

    /// Two liars among the k + 2 shards of a code, in every order of arrival: the read
    /// finds an honest k-subset within its budget (k = 4 and 8, the widths the fleet
    /// tests run), and each subset is tried once.
    #[test]
    fn two_liars_are_left_out_within_the_budget_whatever_the_order() {
        for k in [4, 8] {
            let n = k + 2;
            for first in 0..n {
                for second in first + 1..n {
                    // Arrival position p holds index p; liars at `first` and `second`.
                    let mut attempts = 0;
                    let mut tried = HashSet::new();
                    let mut found = None;
                    for arrived in k..=n {
                        let indices: Vec<usize> = (0..arrived).collect();
                        found = search_subsets(&indices, k, &mut attempts, |chosen| {
                            let mut sorted = chosen.to_vec();
                            sorted.sort_unstable();
                            assert!(tried.insert(sorted), "a subset tried twice");
                            (!chosen.contains(&first) && !chosen.contains(&second))
                                .then(|| chosen.to_vec())
                        });
                        if found.is_some() {
                            break;
                        }
                    }
                    assert!(
                        found.is_some(),
                        "k = {k}, liars arriving {first} and {second}: {attempts} tries"
                    );
                    assert!(attempts <= decode_budget(k));
                }
            }
        }
    }

    #[test]
    fn combinations_are_every_subset_once() {
        let all: Vec<Vec<usize>> = Combinations::new(5, 3).collect();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0], vec![0, 1, 2]);
        assert_eq!(all[9], vec![2, 3, 4]);
        let distinct: HashSet<Vec<usize>> = all.iter().cloned().collect();
        assert_eq!(distinct.len(), 10);
        assert!(
            all.iter()
                .all(|c| c.windows(2).all(|w| w[0] < w[1]) && c[2] < 5)
        );
        assert_eq!(
            Combinations::new(3, 0).collect::<Vec<_>>(),
            vec![Vec::<usize>::new()]
        );
        assert_eq!(Combinations::new(2, 3).count(), 0);
        assert_eq!(Combinations::new(4, 4).count(), 1);
    }

    #[test]
    fn a_fill_of_an_empty_fleet_puts_shard_i_on_rank_i() {
        let c = code(4, 5);
        let plan = plan_writes(c, &[Answer::Missing; 5]);
        assert_eq!(plan, (0..5).map(|r| (r, r as u8)).collect::<Vec<_>>());
    }

    #[test]
    fn an_index_held_twice_is_rewritten_once() {
        let c = code(4, 5);
        let answers = [
            shard(c, 0),
            shard(c, 0),
            shard(c, 2),
            shard(c, 3),
            shard(c, 4),
        ];
        assert!(wants_repair(c, &answers));
        assert_eq!(plan_writes(c, &answers), [(1, 1)]);
    }

    /// The layout of the 4-of-6 repair test: rank i holds index 5 - i.
    #[test]
    fn repairs_never_give_an_index_that_a_node_holds() {
        let c = code(4, 6);
        let mut answers: Vec<Answer> = (0..6).map(|r| shard(c, 5 - r as u8)).collect();
        answers[1] = Answer::Missing;
        assert_eq!(plan_writes(c, &answers), [(1, 4)]);
        // Whatever the read learnt, no index in the plan is held by a node that answered.
        for silent in [2, 3, 4, 5] {
            let mut partial = answers.clone();
            partial[silent] = Answer::NotAsked;
            for (rank, index) in plan_writes(c, &partial) {
                assert!(
                    !partial.contains(&shard(c, index)),
                    "rank {rank} given index {index} held elsewhere"
                );
            }
        }
    }

    #[test]
    fn a_silent_node_keeps_the_index_of_its_rank() {
        let c = code(4, 6);
        let answers = [
            shard(c, 0),
            shard(c, 1),
            shard(c, 2),
            shard(c, 4),
            Answer::Missing,
            Answer::Failed,
        ];
        // Index 4 is taken; 3 and 5 are free, and 5 is probably on the silent rank 5.
        assert_eq!(plan_writes(c, &answers), [(4, 3)]);
        let answers = [
            shard(c, 0),
            shard(c, 1),
            shard(c, 2),
            shard(c, 3),
            Answer::Missing,
            Answer::Failed,
        ];
        assert_eq!(plan_writes(c, &answers), [(4, 4)]);
    }

    #[test]
    fn shards_of_another_code_are_kept_while_anyone_may_read_them() {
        let ours = code(4, 6);
        let theirs = code(4, 5);
        // A 4-of-5 client's chunk read by a 4-of-6 client: repaired in its own code, which
        // has every index; the sixth node is not given a shard of either code.
        let mut answers: Vec<Answer> = (0..5).map(|r| shard(theirs, r as u8)).collect();
        answers.push(Answer::Missing);
        assert!(!wants_repair(theirs, &answers));
        assert!(plan_writes(theirs, &answers).is_empty());
        // A fill after a miss in our code goes around the two shards of theirs.
        let answers = [
            shard(theirs, 0),
            shard(theirs, 1),
            Answer::Missing,
            Answer::Missing,
            Answer::Missing,
            Answer::Missing,
        ];
        assert_eq!(
            plan_writes(ours, &answers),
            [(2, 2), (3, 3), (4, 4), (5, 5)]
        );
        // A code with more nodes than we asked may be readable on the nodes we did not ask.
        let wide = code(8, 10);
        let answers = [
            shard(wide, 0),
            shard(wide, 1),
            shard(wide, 2),
            Answer::Missing,
            Answer::Missing,
            Answer::Missing,
        ];
        assert_eq!(plan_writes(ours, &answers), [(3, 3), (4, 4), (5, 5)]);
    }

    #[test]
    fn shards_of_a_code_nobody_can_read_are_reclaimed_when_ours_needs_them() {
        let ours = code(4, 6);
        let old = Code {
            kind: CodecKind::ReedSolomon,
            ..ours
        };
        // Three shards of the older kind, the writer of which is gone: no reader can get
        // four, and ours cannot either without their nodes.
        let mut answers = vec![
            shard(old, 0),
            shard(old, 1),
            shard(old, 2),
            Answer::Missing,
            Answer::Missing,
            Answer::Missing,
        ];
        assert_eq!(
            plan_writes(ours, &answers),
            (0..6).map(|r| (r, r as u8)).collect::<Vec<_>>()
        );
        // With a node we did not hear from, the older kind might still be readable.
        answers[5] = Answer::Failed;
        assert_eq!(plan_writes(ours, &answers), [(3, 3), (4, 4)]);
    }
}
