//! A fleet of real slapshot-server processes on loopback for the client's tests, and
//! origins that count what is asked of them.

#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use slapshot_client::{
    FleetClient, FleetConfig, Origin,
    config::{NodeConfig, ReadMode},
    origin::OriginError,
};
use slapshot_core::{ChunkName, SealedChunk};
use slapshot_testkit::TestNode;

pub struct TestFleet {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
}

impl TestFleet {
    /// `n` nodes of 128 MiB each, one runtime thread per node.
    pub fn start(n: usize) -> TestFleet {
        Self::start_with(n, &[])
    }

    /// The same, with extra flags for every node.
    pub fn start_with(n: usize, extra: &[&str]) -> TestFleet {
        let dir = tempfile::tempdir().unwrap();
        let nodes = (0..n)
            .map(|i| {
                let node_dir = dir.path().join(format!("node-{i}"));
                std::fs::create_dir_all(&node_dir).unwrap();
                TestNode::start(
                    &node_dir,
                    &[
                        "--capacity",
                        "128MiB",
                        "--region-size",
                        "8MiB",
                        "--threads",
                        "1",
                    ]
                    .into_iter()
                    .chain(extra.iter().copied())
                    .collect::<Vec<_>>(),
                )
            })
            .collect();
        TestFleet { dir, nodes }
    }

    pub fn origin_dir(&self) -> PathBuf {
        self.dir.path().join("origin")
    }

    /// The fleet file for these nodes, with a local origin.
    pub fn config(&self) -> FleetConfig {
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| NodeConfig {
                id: format!("node-{i}"),
                addr: node.addr.to_string(),
                weight: 1.0,
            })
            .collect();
        let mut config = FleetConfig::new(nodes);
        config.origin = Some(self.origin_dir().display().to_string());
        config
    }

    /// A client whose origin is the local directory, wrapped to count fetches.
    pub fn client_with(&self, config: FleetConfig) -> (FleetClient, Arc<CountingOrigin>) {
        let local = slapshot_client::open_origin(config.origin.as_deref().unwrap()).unwrap();
        let origin = Arc::new(CountingOrigin::new(local));
        let client = FleetClient::with_origin(config, Some(origin.clone())).unwrap();
        (client, origin)
    }

    pub fn client(&self) -> (FleetClient, Arc<CountingOrigin>) {
        self.client_with(self.config())
    }

    pub fn hedged_client(&self) -> (FleetClient, Arc<CountingOrigin>) {
        let mut config = self.config();
        config.read.mode = ReadMode::Hedged;
        self.client_with(config)
    }
}

/// An origin that counts gets, can be slowed down, and records the most gets it saw in
/// flight at once.
pub struct CountingOrigin {
    inner: Arc<dyn Origin>,
    pub gets: AtomicUsize,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    delay: std::sync::Mutex<Duration>,
}

impl CountingOrigin {
    pub fn new(inner: Arc<dyn Origin>) -> Self {
        Self {
            inner,
            gets: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            delay: std::sync::Mutex::new(Duration::ZERO),
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }
}

impl Origin for CountingOrigin {
    fn get<'a>(&'a self, name: &'a ChunkName) -> BoxFuture<'a, Result<Option<Bytes>, OriginError>> {
        Box::pin(async move {
            self.gets.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let result = self.inner.get(name).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            result
        })
    }

    fn put<'a>(&'a self, chunk: &'a SealedChunk) -> BoxFuture<'a, Result<bool, OriginError>> {
        self.inner.put(chunk)
    }

    fn get_object<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, OriginError>> {
        self.inner.get_object(key)
    }

    fn put_object<'a>(
        &'a self,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        self.inner.put_object(key, bytes)
    }

    fn list_objects<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, OriginError>> {
        self.inner.list_objects(prefix)
    }

    fn describe(&self) -> String {
        format!("counting({})", self.inner.describe())
    }
}

/// Random chunks: full 512 KiB ones and short last chunks of images.
pub fn random_chunks(seed: u64, count: usize) -> Vec<(ChunkName, Bytes)> {
    let mut rng = slapshot_testkit::Rng::new(seed);
    (0..count)
        .map(|i| {
            let len = match i % 4 {
                0 => slapshot_core::CHUNK_SIZE,
                1 => rng.range(1, 4096),
                _ => rng.range(4096, slapshot_core::CHUNK_SIZE),
            };
            let bytes = Bytes::from(rng.bytes(len));
            (ChunkName::of(&bytes), bytes)
        })
        .collect()
}

/// Polls `done` every 20 ms for up to 10 s.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestFleet {
    /// The index in `nodes` of the node with this id.
    pub fn index(id: &str) -> usize {
        id.trim_start_matches("node-").parse().unwrap()
    }

    /// A metric of every node summed (0 for a series a node does not show yet).
    pub fn metric_sum(&self, series: &str) -> f64 {
        self.nodes.iter().map(|n| metric_or_zero(n, series)).sum()
    }
}

/// A node's metric, or 0 if the node does not show that series (nodes leave out request
/// counters that are still zero).
pub fn metric_or_zero(node: &TestNode, series: &str) -> f64 {
    let text = node.client().get("/metrics").text();
    slapshot_core::prometheus::find_sample(&text, series).unwrap_or(0.0)
}

/// Shard PUTs the nodes acknowledged (created or replaced).
pub fn shard_puts(fleet: &TestFleet) -> f64 {
    fleet.metric_sum("slapshot_http_requests_total{method=\"PUT\",status=\"201\"}")
        + fleet.metric_sum("slapshot_http_requests_total{method=\"PUT\",status=\"204\"}")
}

/// A "node" whose shard path is broken: `/health` answers 200, every other request
/// `status` with an empty body, or with a header announcing `announced` bytes if given
/// (none are sent). The connection stays open (request bodies are read and discarded).
/// Returns its address; it runs until the runtime ends.
pub async fn broken_node(status: u16, announced: Option<u64>) -> std::net::SocketAddr {
    broken_node_with_probe(status, announced, None).await
}

/// Like `broken_node`, and if `probe` is given, a GET of the key no chunk has (what a
/// shallow probe asks) is answered with that status: a node whose index answers while
/// its device fails.
pub async fn broken_node_with_probe(
    status: u16,
    announced: Option<u64>,
    probe: Option<u16>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut health = false;
                    let mut probed = false;
                    loop {
                        let mut line = String::new();
                        match stream.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let line = line.trim_end().to_ascii_lowercase();
                        if line.is_empty() {
                            break;
                        }
                        health |= line.starts_with("get /health ");
                        probed |= line.starts_with(&format!(
                            "get /v1/shards/{} ",
                            slapshot_client::node::PROBE_KEY
                        ));
                        if let Some(value) = line.strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let reply = match (health, announced) {
                        (true, _) => "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n".to_owned(),
                        (false, _) if probed && probe.is_some() => format!(
                            "HTTP/1.1 {} Probe\r\ncontent-length: 0\r\n\r\n",
                            probe.unwrap()
                        ),
                        (false, Some(len)) => {
                            format!("HTTP/1.1 {status} Big\r\ncontent-length: {len}\r\n\r\n")
                        }
                        (false, None) => {
                            format!("HTTP/1.1 {status} Broken\r\ncontent-length: 0\r\n\r\n")
                        }
                    };
                    if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy in front of `target` that holds every read from the client for `delay` before
/// passing it on: a node that answers, slowly. Returns its address; it runs until the
/// runtime ends.
pub async fn slow_proxy(target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let micros = Arc::new(AtomicU64::new(delay.as_micros() as u64));
    slow_proxy_with(target, micros).await
}

/// Like `slow_proxy`, with a delay (in microseconds) the test can change while it runs.
pub async fn slow_proxy_with(
    target: std::net::SocketAddr,
    delay_micros: Arc<AtomicU64>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let delay_micros = delay_micros.clone();
            tokio::spawn(async move {
                let Ok(node) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = node.set_nodelay(true);
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut node_rx, mut node_tx) = node.into_split();
                let upstream = async move {
                    let mut buf = vec![0; 64 << 10];
                    loop {
                        let n = match client_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let delay = delay_micros.load(Ordering::Relaxed);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_micros(delay)).await;
                        }
                        if node_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = node_tx.shutdown().await;
                };
                let downstream = async move {
                    let _ = tokio::io::copy(&mut node_rx, &mut client_tx).await;
                    let _ = client_tx.shutdown().await;
                };
                tokio::join!(upstream, downstream);
            });
        }
    });
    addr
}
