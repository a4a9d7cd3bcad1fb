//! `slapshot-loadgen shards`: shard GETs and PUTs against one node or many, over
//! keep-alive connections (HTTP/1.1, or HTTP/2 with prior knowledge).
//!
//! Closed loop by default: C connections, each with one request in flight. With `--rate`,
//! an open loop: requests are due at fixed intervals whatever happened to the ones before,
//! and each one's latency is measured from when it was due, not from when a connection
//! came free to send it. A stall is then charged to every request queued behind it, which
//! is what a caller at that rate would have seen (no coordinated omission).

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use slapshot_core::{ByteSize, HumanDuration};

use crate::report::{Live, Recorder, Report, progress};

#[derive(Debug, Clone, clap::Args)]
pub struct ShardsArgs {
    /// A node to load: http://HOST:PORT (repeat for several; connections are spread over
    /// them). Any server that answers GET /v1/shards/KEY can be the target (nginx serving
    /// files under v1/shards/ for example).
    #[arg(long = "target", value_name = "URL", required = true)]
    pub targets: Vec<String>,
    /// Keys to spread requests over (lg-00000000 ...), chosen uniformly at random.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub keys: u64,
    /// Bytes per shard written by PUTs and --preload.
    #[arg(long, value_name = "BYTES", default_value = "128KiB")]
    pub size: ByteSize,
    /// Fraction of requests that are PUTs (the rest are GETs).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub put_fraction: f64,
    /// Connections (closed loop: requests in flight).
    #[arg(long, value_name = "C", default_value_t = 32)]
    pub connections: usize,
    /// How long to run.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        conflicts_with = "requests"
    )]
    pub duration: HumanDuration,
    /// Stop after this many requests instead.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// Open loop: requests per second, due at fixed intervals.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// PUT every key to every target first.
    #[arg(long)]
    pub preload: bool,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Bearer token file for nodes that require one.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A request without an answer after this long is an error.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub timeout: HumanDuration,
    /// Seed of the key and operation choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// A target node: where to connect and what to put in Host.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
}

impl Target {
    pub fn of(addr: SocketAddr) -> Self {
        Self {
            addr,
            authority: addr.to_string(),
        }
    }
}

fn parse_target(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?}: targets are http://HOST:PORT"))?;
    let authority = rest.trim_end_matches('/').to_owned();
    if authority.contains('/') {
        bail!("{url:?}: give the node's address only; the paths are /v1/shards/KEY");
    }
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to nothing"))?;
    Ok(Target { addr, authority })
}

/// One connection's sender.
pub enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

pub async fn connect(target: &Target, http2: bool) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection);
        Ok(Sender::Http1(sender))
    }
}

impl Sender {
    /// Waits until the connection can take a request; false if the server has closed it
    /// (an idle timeout, a keep-alive limit such as nginx's `keepalive_requests`): then a
    /// new connection is due, and no request has failed.
    pub async fn usable(&mut self) -> bool {
        match self {
            Sender::Http1(s) => s.ready().await.is_ok(),
            Sender::Http2(s) => s.ready().await.is_ok(),
        }
    }

    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Sender::Http1(s) => {
                s.ready().await?;
                s.send_request(request).await
            }
            Sender::Http2(s) => {
                s.ready().await?;
                s.send_request(request).await
            }
        }
    }
}

/// xorshift64*: small, fast and seedable; the choices need no more.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn key(i: u64) -> String {
    format!("lg-{i:08}")
}

/// What a request does.
#[derive(Debug, Clone, Copy)]
enum Op {
    Get(u64),
    Put(u64),
}

struct Shared {
    targets: Vec<Target>,
    body: Bytes,
    crc: HeaderValue,
    token: Option<HeaderValue>,
    timeout: Duration,
    http2: bool,
    live: Arc<Live>,
}

impl Shared {
    fn request(&self, target: &Target, op: Op) -> Request<Full<Bytes>> {
        let (method, k, body) = match op {
            Op::Get(k) => (Method::GET, k, Bytes::new()),
            Op::Put(k) => (Method::PUT, k, self.body.clone()),
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(format!("/v1/shards/{}", key(k)))
            .header(http::header::HOST, &target.authority);
        if method == Method::PUT {
            builder = builder
                .header(slapshot_core::CRC_HEADER, self.crc.clone())
                .header(http::header::CONTENT_LENGTH, body.len());
        }
        if let Some(token) = &self.token {
            builder = builder.header(http::header::AUTHORIZATION, token.clone());
        }
        builder.body(Full::new(body)).expect("a valid request")
    }

    /// One request on `sender` (reconnected first if needed), recorded with the latency
    /// since `due`.
    async fn issue(
        &self,
        sender: &mut Option<Sender>,
        target: &Target,
        op: Op,
        due: Instant,
        recorder: &mut Recorder,
    ) {
        let outcome = tokio::time::timeout(self.timeout, async {
            if let Some(open) = sender.as_mut()
                && !open.usable().await
            {
                *sender = None;
            }
            if sender.is_none() {
                *sender = Some(
                    connect(target, self.http2)
                        .await
                        .map_err(|e| format!("connect: {}", kind_of(&e)))?,
                );
            }
            let response = sender
                .as_mut()
                .expect("connected above")
                .send(self.request(target, op))
                .await
                .map_err(|e| format!("http: {}", hyper_kind(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("http: {}", hyper_kind(&e)))?
                .to_bytes();
            Ok::<_, String>((status, body.len() as u64))
        })
        .await;
        let latency = due.elapsed();
        let (ok, bytes) = match outcome {
            Ok(Ok((status, len))) => match (op, status) {
                (Op::Get(_), StatusCode::OK) => {
                    recorder.success(latency, len);
                    (true, len)
                }
                (Op::Put(_), StatusCode::CREATED | StatusCode::NO_CONTENT) => {
                    let len = self.body.len() as u64;
                    recorder.success(latency, len);
                    (true, len)
                }
                (_, status) => {
                    recorder.error(latency, format!("status {}", status.as_u16()));
                    (false, 0)
                }
            },
            Ok(Err(kind)) => {
                *sender = None;
                recorder.error(latency, kind);
                (false, 0)
            }
            Err(_) => {
                // The connection may be stuck mid-response: a new one for the next request.
                *sender = None;
                recorder.error(latency, "timeout");
                (false, 0)
            }
        };
        self.live.count(ok, bytes);
    }
}

fn kind_of(e: &anyhow::Error) -> String {
    match e.downcast_ref::<std::io::Error>() {
        Some(io) => format!("{:?}", io.kind()),
        None => e.to_string(),
    }
}

fn hyper_kind(e: &hyper::Error) -> &'static str {
    if e.is_canceled() {
        "cancelled"
    } else if e.is_closed() || e.is_incomplete_message() {
        "connection closed"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_parse() {
        "bad response"
    } else {
        "io"
    }
}

pub async fn run(args: ShardsArgs) -> anyhow::Result<Report> {
    if !(0.0..=1.0).contains(&args.put_fraction) {
        bail!("--put-fraction is between 0 and 1");
    }
    if args.connections == 0 || args.keys == 0 {
        bail!("--connections and --keys must be at least 1");
    }
    if let Some(rate) = args.rate {
        crate::pace::check_rate(rate, "--rate")?;
    }
    if args.timeout.0.is_zero() || args.duration.0.is_zero() || args.requests == Some(0) {
        bail!("--timeout, --duration and --requests must be more than zero");
    }
    let targets = args
        .targets
        .iter()
        .map(|t| parse_target(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.connections < targets.len() {
        bail!(
            "--connections {} would leave some of the {} targets without load: give at least one per target",
            args.connections,
            targets.len()
        );
    }
    let body = Bytes::from(crate::random_bytes(args.seed, args.size.0 as usize));
    let token = match &args.token_file {
        Some(path) => Some(
            HeaderValue::try_from(format!(
                "Bearer {}",
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .trim()
            ))
            .context("the token is not a valid header value")?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared {
        crc: HeaderValue::from(crc32fast::hash(&body)),
        body,
        token,
        targets,
        timeout: args.timeout.0,
        http2: args.http2,
        live: Arc::new(Live::default()),
    });
    if args.preload {
        preload(&shared, args.keys, args.connections).await?;
    }
    let _progress = if args.json {
        None
    } else {
        progress(shared.live.clone())
    };
    let started = Instant::now();
    let recorder = match args.rate {
        None => closed_loop(&shared, &args).await,
        Some(rate) => open_loop(&shared, &args, rate).await,
    };
    let elapsed = started.elapsed();
    let mut report = Report::new(&recorder, elapsed).with("connections", args.connections);
    if let Some(rate) = args.rate {
        report = report.with("offered_rate", rate);
    }
    Ok(report
        .with(
            "mode",
            if args.rate.is_some() {
                "open"
            } else {
                "closed"
            },
        )
        .with("protocol", if args.http2 { "http2" } else { "http1.1" }))
}

/// PUTs every key to every target, `connections` at a time: each connection of the run
/// talks to one target and asks it for any key.
async fn preload(shared: &Arc<Shared>, keys: u64, connections: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let targets = shared.targets.len() as u64;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (shared, next) = (shared.clone(), next.clone());
        workers.spawn(async move {
            let mut senders: Vec<Option<Sender>> = shared.targets.iter().map(|_| None).collect();
            let mut recorder = Recorder::default();
            loop {
                let job = next.fetch_add(1, Ordering::Relaxed);
                if job >= keys * targets {
                    break;
                }
                let t = (job % targets) as usize;
                shared
                    .issue(
                        &mut senders[t],
                        &shared.targets[t],
                        Op::Put(job / targets),
                        Instant::now(),
                        &mut recorder,
                    )
                    .await;
            }
            recorder
        });
    }
    let mut all = Recorder::default();
    while let Some(done) = workers.join_next().await {
        all.merge(&done?);
    }
    if !all.errors.is_empty() {
        bail!("preloading failed: {:?}", all.errors);
    }
    Ok(())
}

fn choose(rng: &mut Rng, keys: u64, put_fraction: f64) -> Op {
    let k = rng.below(keys);
    if put_fraction > 0.0 && rng.unit() < put_fraction {
        Op::Put(k)
    } else {
        Op::Get(k)
    }
}

async fn closed_loop(shared: &Arc<Shared>, args: &ShardsArgs) -> Recorder {
    let budget = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
    let deadline = Instant::now()
        + if args.requests.is_some() {
            Duration::from_secs(24 * 3600)
        } else {
            args.duration.0
        };
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..args.connections {
        let (shared, budget) = (shared.clone(), budget.clone());
        let (keys, put_fraction, seed) = (args.keys, args.put_fraction, args.seed);
        workers.spawn(async move {
            let target = shared.targets[c % shared.targets.len()].clone();
            let mut rng = Rng::new(seed.wrapping_add(c as u64 * 7919));
            let mut sender = None;
            let mut recorder = Recorder::default();
            while Instant::now() < deadline && take(&budget) {
                let op = choose(&mut rng, keys, put_fraction);
                shared
                    .issue(&mut sender, &target, op, Instant::now(), &mut recorder)
                    .await;
            }
            recorder
        });
    }
    collect(workers).await
}

fn take(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

async fn collect(mut workers: tokio::task::JoinSet<Recorder>) -> Recorder {
    let mut all = Recorder::default();
    while let Some(done) = workers.join_next().await {
        if let Ok(recorder) = done {
            all.merge(&recorder);
        }
    }
    all
}

/// Requests queued for one target in an open loop before the generator stops keeping its
/// backlog (tokio's channel allocates its blocks as they fill, not up front).
const TARGET_BACKLOG: usize = 1 << 22;

async fn open_loop(shared: &Arc<Shared>, args: &ShardsArgs, rate: f64) -> Recorder {
    let duration = (args.requests.is_none()).then_some(args.duration.0);
    let schedule_length = duration
        .unwrap_or_else(|| Duration::from_secs_f64(args.requests.unwrap_or(0) as f64 / rate));
    let mut schedule = crate::pace::paced(rate, args.requests, duration);
    // No request is sent later than one timeout after the schedule: requests due and still
    // unsent then (the target is too slow for the rate) are counted as errors from their
    // due time, rather than sent long after the run was meant to end. (One sent just
    // before may take a timeout more.)
    let deadline = Instant::now() + schedule_length + args.timeout.0;
    // Request i goes to target i mod the number of targets, through that target's own
    // queue: a slow target keeps its share of the schedule, and its requests wait for it
    // (charged from their due times), rather than moving to the targets that keep up.
    let targets = shared.targets.len();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..targets)
        .map(|_| {
            let (tx, rx) = tokio::sync::mpsc::channel::<(u64, Instant)>(TARGET_BACKLOG);
            (tx, SharedReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
        })
        .unzip();
    let dispatcher = tokio::spawn(async move {
        // A target millions of requests behind: the generator keeps no more of its backlog,
        // and says so under a kind of its own (the time charged is the run's end, the
        // least such a request would have waited had it been kept).
        let mut unsent = Recorder::default();
        while let Some((i, due)) = schedule.recv().await {
            let target = (i % targets as u64) as usize;
            if let Err(full) = senders[target].try_send((i, due)) {
                let (_, due) = full.into_inner();
                unsent.error(
                    deadline.saturating_duration_since(due),
                    "not sent (generator backlog full)",
                );
            }
        }
        unsent
    });
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..args.connections {
        let shared = shared.clone();
        let target_index = c % targets;
        let dues = receivers[target_index].clone();
        let (keys, put_fraction, seed) = (args.keys, args.put_fraction, args.seed);
        workers.spawn(async move {
            let target = shared.targets[target_index].clone();
            let mut sender = None;
            let mut recorder = Recorder::default();
            // The deadline is checked before each request, whether or not one is queued:
            // a backlog drains only until the run ends.
            while Instant::now() < deadline {
                let next = tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(deadline.into()) => None,
                    next = dues.recv() => next,
                };
                let Some((i, due)) = next else { break };
                // Each request's operation comes from its index, so a seed gives the same
                // sequence whichever connection sends it.
                let mut rng = Rng::new(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let op = choose(&mut rng, keys, put_fraction);
                shared
                    .issue(&mut sender, &target, op, due, &mut recorder)
                    .await;
            }
            recorder
        });
    }
    let mut recorder = collect(workers).await;
    if let Ok(unsent) = dispatcher.await {
        recorder.merge(&unsent);
    }
    for dues in &receivers {
        let mut queue = dues.0.lock().await;
        while let Ok((_, due)) = queue.try_recv() {
            recorder.error(due.elapsed(), "not sent");
        }
    }
    recorder
}

struct SharedReceiver<T>(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<T>>>);

impl<T> Clone for SharedReceiver<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> SharedReceiver<T> {
    async fn recv(&self) -> Option<T> {
        self.0.lock().await.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every GET with a small body after `each` (one at a time per
    /// connection), the very first one after `first` as well, and counts its answers.
    async fn test_server(first: Duration, each: Duration) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = answered.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (count, stalled) = (count.clone(), stalled.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut pending = Vec::new();
                    loop {
                        let n = match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            if !stalled.swap(true, Ordering::Relaxed) {
                                tokio::time::sleep(first).await;
                            }
                            tokio::time::sleep(each).await;
                            // Counted before the client can have the answer.
                            count.fetch_add(1, Ordering::Relaxed);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if socket.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, answered)
    }

    /// A server that stalls once, on its first request, for `stall`.
    async fn stalling_server(stall: Duration) -> SocketAddr {
        test_server(stall, Duration::ZERO).await.0
    }

    /// A server that answers every request after `delay`.
    async fn slow_server(delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
        test_server(Duration::ZERO, delay).await
    }

    /// A target too slow for the rate: the run still ends one timeout after the schedule,
    /// and what was due and never sent is counted as such, from its due time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_loop_ends_on_time_however_far_behind_the_target_is() {
        let (addr, _) = slow_server(Duration::from_millis(100)).await;
        let mut open = args(addr);
        open.rate = Some(200.0);
        open.duration = HumanDuration(Duration::from_secs(1));
        open.timeout = HumanDuration(Duration::from_millis(500));
        let report = run(open).await.unwrap();
        assert!(report.seconds < 2.5, "the run took {} s", report.seconds);
        assert_eq!(report.requests, 200, "every request due is reported");
        let unsent = report.errors_by_kind.get("not sent").copied().unwrap_or(0);
        assert!(
            unsent >= 150,
            "{unsent} not sent (the target answers 10 a second)"
        );
        // Unsent requests wait (at least) until the run ends: 0.5 to 1.5 s after their due
        // times.
        assert!(report.p50_us >= 500_000, "p50 {} us", report.p50_us);
    }

    /// With two targets, each gets its share of the schedule: a slow one keeps its
    /// requests (and their wait) rather than handing them to the fast one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_target_keeps_its_share_of_an_open_loop() {
        let (slow, slow_answered) = slow_server(Duration::from_millis(100)).await;
        let (fast, fast_answered) = slow_server(Duration::ZERO).await;
        let mut open = args(slow);
        open.targets.push(format!("http://{fast}"));
        open.connections = 2;
        open.rate = Some(200.0);
        open.duration = HumanDuration(Duration::from_secs(1));
        open.timeout = HumanDuration(Duration::from_secs(1));
        let report = run(open).await.unwrap();
        assert_eq!(report.requests, 200);
        assert_eq!(
            fast_answered.load(Ordering::Relaxed),
            100,
            "half the schedule"
        );
        // The slow one answers 10 a second for about two seconds; the rest of its half
        // waited and was never sent.
        let slow_answered = slow_answered.load(Ordering::Relaxed);
        assert!((10..=30).contains(&slow_answered), "{slow_answered}");
        let unsent = report.errors_by_kind.get("not sent").copied().unwrap_or(0);
        assert_eq!(unsent + slow_answered, 100);
        assert!(report.p90_us >= 1_000_000, "p90 {} us", report.p90_us);
    }

    fn args(addr: SocketAddr) -> ShardsArgs {
        ShardsArgs {
            targets: vec![format!("http://{addr}")],
            keys: 10,
            size: ByteSize(16),
            put_fraction: 0.0,
            connections: 1,
            duration: HumanDuration(Duration::from_millis(1000)),
            requests: None,
            rate: None,
            preload: false,
            http2: false,
            token_file: None,
            timeout: HumanDuration(Duration::from_secs(5)),
            seed: 1,
            json: true,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_open_loop_charges_a_stall_to_the_requests_queued_behind_it() {
        let addr = stalling_server(Duration::from_millis(500)).await;
        // 100 requests a second on one connection; the first answer takes 500 ms.
        let mut open = args(addr);
        open.rate = Some(100.0);
        open.requests = Some(100);
        let report = run(open).await.unwrap();
        assert_eq!(report.requests, 100);
        assert_eq!(report.requests, report.successes + report.errors);
        // About 50 requests were due during the stall: each waited for it, the later ones
        // less. A closed loop would have charged the stall to one request only.
        let slow = report
            .histogram_us
            .iter()
            .filter(|(us, _)| *us >= 250_000)
            .map(|(_, n)| n)
            .sum::<u64>();
        // 100 a second for one second: the run is paced, not sent all at once.
        assert!(
            report.seconds >= 0.95 && report.seconds < 3.0,
            "{}",
            report.seconds
        );
        assert!(
            (20..=60).contains(&slow),
            "{slow} requests were charged with the stall (about 50 were due during it)"
        );
        assert!(report.max_us >= 490_000);
        // Once the backlog has drained, requests are fast again: at least the last third
        // (due from 660 ms on) took under 100 ms.
        let fast = report
            .histogram_us
            .iter()
            .filter(|(us, _)| *us < 100_000)
            .map(|(_, n)| n)
            .sum::<u64>();
        assert!(fast >= 33, "only {fast} fast requests");

        let addr = stalling_server(Duration::from_millis(500)).await;
        let mut closed = args(addr);
        closed.requests = Some(100);
        let report = run(closed).await.unwrap();
        let slow = report
            .histogram_us
            .iter()
            .filter(|(us, _)| *us >= 250_000)
            .map(|(_, n)| n)
            .sum::<u64>();
        assert_eq!(slow, 1, "the closed loop charges the stall once");
    }
}
