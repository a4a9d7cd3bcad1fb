//! A fleet of real slapshot-server processes on loopback for the client's tests, and
//! origins that count what is asked of them.

#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
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
                    ],
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
