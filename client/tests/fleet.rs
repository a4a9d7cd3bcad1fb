//! The thin client against a fleet of real slapshot-server processes on loopback.

mod support;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use slapshot_client::{ChunkError, metrics::get};
use slapshot_core::{
    ChunkName, CodeParams, SealedChunk,
    shard_frame::{self, ShardHeader},
};
use support::{TestFleet, eventually, random_chunks};

/// Stores chunks in the origin and across the fleet, as `slapshot chunk put` does.
async fn put_everywhere(client: &slapshot_client::FleetClient, chunks: &[(ChunkName, Bytes)]) {
    for (_, bytes) in chunks {
        client
            .origin()
            .unwrap()
            .put(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap();
        let report = client
            .put_chunk(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap();
        assert_eq!(report.written, 5);
    }
}

/// Reads `reads` chunks (cycling through `chunks`), `concurrency` at a time, checking
/// each; returns how many were read.
async fn read_concurrently(
    client: &slapshot_client::FleetClient,
    chunks: &[(ChunkName, Bytes)],
    reads: usize,
    concurrency: usize,
) -> usize {
    use futures::StreamExt;
    futures::stream::iter(0..reads)
        .map(|i| {
            let client = client.clone();
            let (name, bytes) = chunks[i % chunks.len()].clone();
            async move { assert_eq!(client.get_chunk(&name).await.unwrap().to_bytes(), bytes) }
        })
        .buffer_unordered(concurrency)
        .count()
        .await
}

/// Waits until `requests` shard requests have ended, whatever their outcome (those that
/// reads left behind end in their own tasks).
async fn every_request_ended(client: &slapshot_client::FleetClient, requests: u64) {
    let m = client.metrics();
    eventually("every request to end", || {
        get(&m.shards_ok) + get(&m.shards_timed_out) + get(&m.shards_absent) + get(&m.shards_failed)
            >= requests
    })
    .await;
}

async fn read_all(client: &slapshot_client::FleetClient, chunks: &[(ChunkName, Bytes)]) {
    for (name, bytes) in chunks {
        let got = client
            .get_chunk(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&got.to_bytes(), bytes, "{name} came back with other bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_round_trip_including_short_last_chunks() {
    let fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(1, 24);
    put_everywhere(&client, &chunks).await;
    read_all(&client, &chunks).await;
    let m = client.metrics();
    assert_eq!(get(&m.fleet_hits), 24);
    assert_eq!(get(&m.corrupt_shards), 0);
    assert_eq!(origin.gets(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_costs_nothing_and_the_origin_is_never_asked() {
    let mut fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(2, 40);
    put_everywhere(&client, &chunks).await;
    fleet.nodes[2].kill();
    read_all(&client, &chunks).await;
    read_all(&client, &chunks).await;
    let m = client.metrics();
    assert_eq!(origin.gets(), 0, "the origin was asked");
    assert_eq!(get(&m.fleet_hits), 80);
    assert!(
        get(&m.degraded_rebuilds) > 0,
        "some chunks had a data shard on the dead node"
    );
    assert_eq!(get(&m.nodes_down), 1);
    assert!(!client.node_health()[2].1);
}

/// A stopped node (SIGSTOP: it keeps its sockets and answers nothing) costs neither read
/// mode its timeout: constant-work reads never wait for it, and hedged reads ask around it
/// after the hedge delay. The shard timeout is long here, so that only hedging, not the
/// timeout, can make the hedged reads fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_read_around_within_the_timeouts() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_secs(3));
    let (client, origin) = fleet.client_with(config.clone());
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    // Every read may hedge: this test is about reading around, the budget has its own.
    config.read.hedge_budget = 1.0;
    let (hedged, _) = fleet.client_with(config);
    let chunks = random_chunks(3, 20);
    put_everywhere(&client, &chunks).await;
    fleet.nodes[1].pause();
    let stopped_first = chunks
        .iter()
        .filter(|(name, _)| client.placement(name)[..4].contains(&"node-1"))
        .count();
    assert!(
        stopped_first > 0,
        "some chunk has a data shard on the stopped node"
    );
    for reader in [&client, &hedged] {
        for (name, bytes) in &chunks {
            let started = Instant::now();
            assert_eq!(&reader.get_chunk(name).await.unwrap().to_bytes(), bytes);
            let took = started.elapsed();
            // Well under the 3 s shard timeout: read around, not waited out.
            assert!(took < Duration::from_secs(2), "a read took {took:?}");
        }
    }
    fleet.nodes[1].resume();
    assert_eq!(origin.gets(), 0);
    // The hedged reads were fast because they hedged, not because requests timed out.
    assert!(get(&hedged.metrics().hedges_sent) > 0);
}

/// Late binding cancels the slowest requests of every read, so a black-holed node's
/// requests are always the cancelled ones: they must still time out and count, or a
/// constant-work reader never notices the node. Both modes mark it down, skip it, and
/// take it back once it answers the probe again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_marked_down_in_both_read_modes() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_millis(300));
    let (all, origin) = fleet.client_with(config.clone());
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    let (hedged, _) = fleet.client_with(config);
    let chunks = random_chunks(13, 12);
    put_everywhere(&all, &chunks).await;
    fleet.nodes[3].pause();
    for reader in [&all, &hedged] {
        read_all(reader, &chunks).await;
        eventually("the stopped node marked down", || {
            !reader.node_health()[3].1
        })
        .await;
        assert_eq!(get(&reader.metrics().nodes_down), 1);
        // Down: reads no longer ask it, once the requests sent before have timed out
        // (the count stops moving for more than twice the shard timeout).
        let mut timed_out = get(&reader.metrics().shards_timed_out);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let now = get(&reader.metrics().shards_timed_out);
            if now == timed_out {
                break;
            }
            assert!(Instant::now() < deadline, "requests kept timing out");
            timed_out = now;
        }
        read_all(reader, &chunks).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(get(&reader.metrics().shards_timed_out), timed_out);
    }
    fleet.nodes[3].resume();
    for reader in [&all, &hedged] {
        eventually("the node taken back", || reader.node_health()[3].1).await;
    }
    assert_eq!(origin.gets(), 0);
}

/// A node that answers every shard request with 500 is of no use: down, and kept down by
/// probes of the shard path, though its /health says 200. The same for a node whose index
/// answers (404 for a key no chunk has) while its reads of real shards fail: probes ask
/// for the shard that failed, so it stays down instead of coming back for two failed
/// reads after every probe (probes come every 50-100 ms at first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_reads_fail_is_marked_down_and_kept_down_by_probes() {
    let fleet = TestFleet::start(5);
    let chunks = random_chunks(14, 12);
    let (direct, origin) = fleet.client();
    put_everywhere(&direct, &chunks).await;
    for probe in [None, Some(404)] {
        let mut config = fleet.config();
        config.nodes[2].addr = support::broken_node_with_probe(500, None, probe)
            .await
            .to_string();
        let (client, _) = fleet.client_with(config);
        read_all(&client, &chunks).await;
        eventually("the broken node marked down", || !client.node_health()[2].1).await;
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            read_all(&client, &chunks).await;
        }
        assert!(
            !client.node_health()[2].1,
            "{probe:?}: a probe took it back"
        );
        // After three failed probes of the failed key, every other probe asks for one no
        // chunk has, so that one bad key cannot keep a node down: the trial that follows
        // sends it back down at its first read. Shallow probes alone took it back four
        // times here.
        assert!(get(&client.metrics().node_recoveries) <= 1, "{probe:?}");
    }
    assert_eq!(origin.gets(), 0);
}

/// With no hedge delay configured, the trigger is learnt: the p95 of recent k-th
/// arrivals. After a warm-up on a quick fleet, one node turns slow (200 ms per request):
/// reads that ask it among their first k hedge after about the learnt p95 and rebuild
/// from parity, rather than wait for it; and the trigger stays near what it learnt
/// instead of climbing with every hedged read. Then the whole fleet turns slow (20 ms per
/// request): hedges no longer make reads quick, and the trigger rises with the fleet
/// instead of hedging every read at the old p95.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hedge_trigger_is_learnt_and_does_not_drift() {
    use std::sync::atomic::AtomicU64;
    let fleet = TestFleet::start(5);
    let chunks = random_chunks(46, 60);
    let (writer, origin) = fleet.client();
    put_everywhere(&writer, &chunks).await;
    let delays: Vec<Arc<AtomicU64>> = (0..5).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let delay = delays[0].clone();
    let mut config = fleet.config();
    for (node, delay) in delays.iter().enumerate() {
        config.nodes[node].addr = support::slow_proxy_with(fleet.nodes[node].addr, delay.clone())
            .await
            .to_string();
    }
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    config.read.hedge_delay = None;
    config.read.hedge_budget = 1.0;
    let (client, _) = fleet.client_with(config);
    for _ in 0..4 {
        read_all(&client, &chunks).await;
    }
    let learnt = client.hedge_delay();
    assert!(
        learnt < Duration::from_millis(50),
        "learnt {learnt:?} on a quick fleet"
    );
    let m = client.metrics();
    let degraded = get(&m.degraded_rebuilds);
    delay.store(200_000, Ordering::Relaxed);
    let slow_first: Vec<_> = chunks
        .iter()
        .filter(|(name, _)| client.placement(name)[..4].contains(&"node-0"))
        .cloned()
        .collect();
    assert!(slow_first.len() >= 20, "{} chunks", slow_first.len());
    for _ in 0..10 {
        read_all(&client, &slow_first).await;
    }
    let reads = 10 * slow_first.len() as u64;
    // Each read that did not wait for the slow node rebuilt from the parity shard of the
    // fifth node. A few may have waited (a hiccup longer than the trigger elsewhere).
    let rebuilt = get(&m.degraded_rebuilds) - degraded;
    assert!(
        rebuilt * 10 >= reads * 9,
        "{rebuilt} of {reads} reads hedged around the slow node"
    );
    let now = client.hedge_delay();
    assert!(
        now <= learnt * 2 + Duration::from_millis(5),
        "the trigger drifted from {learnt:?} to {now:?}"
    );
    // The whole fleet slow: the trigger follows it up.
    for delay in &delays {
        delay.store(20_000, Ordering::Relaxed);
    }
    for _ in 0..3 {
        read_all(&client, &chunks).await;
    }
    let risen = client.hedge_delay();
    assert!(
        risen >= Duration::from_millis(15),
        "the trigger stayed at {risen:?} on a fleet where every request takes 20 ms"
    );
    for delay in &delays {
        delay.store(0, Ordering::Relaxed);
    }
    assert_eq!(origin.gets(), 0);
}

/// The budget counts hedge requests, not reads that hedge: with a 4-of-6 code a read that
/// hedges both spare nodes spends two tokens. Two slow nodes (every request held 30 ms by
/// a proxy) and a 2 ms hedge delay make most reads want a hedge, and the reads that ask
/// both slow nodes first want two; the bucket (one token to start, 5% of a token per
/// read) lets through at most 1 + 0.05 x 240 = 13 requests (counting reads, twice that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_are_sent_and_stay_within_their_budget() {
    let fleet = TestFleet::start(6);
    let mut config = fleet.config();
    config.data_shards = 4;
    config.total_shards = 6;
    let (direct, _) = fleet.client_with(config.clone());
    let chunks = random_chunks(4, 60);
    for (_, bytes) in &chunks {
        let sealed = SealedChunk::assume_sealed(bytes.clone());
        direct.origin().unwrap().put(&sealed).await.unwrap();
        assert_eq!(direct.put_chunk(&sealed).await.unwrap().written, 6);
    }
    for slow in [0, 1] {
        config.nodes[slow].addr =
            support::slow_proxy(fleet.nodes[slow].addr, Duration::from_millis(30))
                .await
                .to_string();
    }
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    config.read.hedge_delay = Some(slapshot_core::HumanDuration(Duration::from_millis(2)));
    let (hedged, origin) = fleet.client_with(config);
    let slow_first = chunks
        .iter()
        .filter(|(name, _)| hedged.placement(name)[..4].contains(&"node-0"))
        .count();
    assert!(
        slow_first >= 20,
        "{slow_first} of 60 chunks ask the slow node first"
    );
    let both_first = chunks
        .iter()
        .filter(|(name, _)| {
            let first = &hedged.placement(name)[..4];
            first.contains(&"node-0") && first.contains(&"node-1")
        })
        .count();
    assert!(
        both_first >= 10,
        "{both_first} of 60 chunks ask both slow nodes first"
    );
    for _ in 0..4 {
        read_all(&hedged, &chunks).await;
    }
    let m = hedged.metrics();
    let (sent, refused) = (get(&m.hedges_sent), get(&m.hedges_refused));
    assert!(sent >= 1, "no hedge was sent ({refused} refused)");
    assert!(sent <= 13, "{sent} hedge requests for 240 reads");
    assert!(refused > 0, "the budget never had to refuse a hedge");
    assert_eq!(origin.gets(), 0);
    // Each hedge is one request: the GETs are k per read, plus the hedges, plus at most
    // one replacement per request that brought no shard (an error or a timeout under
    // this test's load), once the slow requests have ended.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fruitless = get(&m.shards_absent) + get(&m.shards_failed) + get(&m.shards_timed_out);
    let requests = get(&m.shards_ok) + fruitless;
    assert!(
        (240 * 4 + sent..=240 * 4 + sent + fruitless).contains(&requests),
        "{requests} shard requests, {sent} hedges, {fruitless} without a shard"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_shards_are_read_around() {
    let fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(5, 8);
    put_everywhere(&client, &chunks).await;

    // A shard replaced on its node by a frame with a flipped payload byte: the node serves
    // it (its own checksums are of what it was given) and the client must catch it.
    let (name, _) = &chunks[0];
    let holder = client.placement(name)[0].to_owned();
    let node = &fleet.nodes[holder.trim_start_matches("node-").parse::<usize>().unwrap()];
    let mut raw = node.client();
    let stored = raw.get(&format!("/v1/shards/{name}")).body;
    let mut damaged = stored.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert_eq!(raw.put(&format!("/v1/shards/{name}"), &damaged).status, 204);

    // A shard whose header names an impossible code (XOR, the 4-of-5 shard's codec, with
    // a 3-of-5 code, which has two parity shards) under a crc that matches: refused, absent.
    let (other, _) = &chunks[1];
    let holder = client.placement(other)[1].to_owned();
    let node = &fleet.nodes[holder.trim_start_matches("node-").parse::<usize>().unwrap()];
    let mut raw = node.client();
    let (header, payload) = {
        let bytes = raw.get(&format!("/v1/shards/{other}")).body;
        let (h, p) = shard_frame::parse(&bytes).unwrap();
        (h, p.to_vec())
    };
    let foreign_code = CodeParams::new(3, 5).unwrap();
    let foreign = ShardHeader {
        params: foreign_code,
        ..header
    };
    let mut foreign_payload = payload.clone();
    foreign_payload.resize(foreign_code.shard_len(header.chunk_len as usize), 0);
    let reframed = shard_frame::frame(&foreign, &foreign_payload);
    assert_eq!(
        raw.put(&format!("/v1/shards/{other}"), &reframed).status,
        204
    );

    // Constant-work reads may finish before the damaged shards arrive; a hedged reader
    // (with hedging itself out of the way) asks exactly the holders of shards 0..k first,
    // so it has to read the damaged shards, reject them, and rebuild from parity.
    let mut config = fleet.config();
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    config.read.hedge_delay = Some(slapshot_core::HumanDuration(Duration::from_secs(10)));
    let (reader, _) = fleet.client_with(config);
    read_all(&reader, &chunks).await;
    read_all(&client, &chunks).await;
    assert_eq!(origin.gets(), 0);
    let m = reader.metrics();
    assert_eq!(get(&m.corrupt_shards), 2);
    assert_eq!(get(&m.degraded_rebuilds), 2);
    // Read repair put valid shards back in place of the damaged ones: the damaged node
    // holds shard 0 again, byte for byte as it was first written.
    eventually("read repair", || get(&m.fill_shards_written) == 2).await;
    let holder = client.placement(name)[0].to_owned();
    let node = &fleet.nodes[holder.trim_start_matches("node-").parse::<usize>().unwrap()];
    assert_eq!(
        node.client().get(&format!("/v1/shards/{name}")).body,
        stored
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_gives_the_chunk_another_length_is_repaired() {
    let fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(7, 1);
    put_everywhere(&client, &chunks).await;
    // The parity shard, reframed under a valid crc as the same code for a chunk one byte
    // longer: a well-formed frame that no true shard of this chunk can be.
    let (name, _) = &chunks[0];
    let holder = client.placement(name)[4].to_owned();
    let node = &fleet.nodes[holder.trim_start_matches("node-").parse::<usize>().unwrap()];
    let mut raw = node.client();
    let stored = raw.get(&format!("/v1/shards/{name}")).body;
    let (header, payload) = shard_frame::parse(&stored).unwrap();
    assert_eq!(header.index, 4);
    let longer = ShardHeader {
        chunk_len: header.chunk_len + 1,
        ..header
    };
    let mut lie = payload.to_vec();
    lie.resize(longer.params.shard_len(longer.chunk_len as usize), 0);
    let lie = shard_frame::frame(&longer, &lie);
    assert_eq!(raw.put(&format!("/v1/shards/{name}"), &lie).status, 204);

    // Reads are served from the four data shards. A late-binding read asks all five and
    // hears the parity shard before its fourth data shard now and then: such a read sees
    // the lie and has it rewritten. (At most 500 reads; about one in five hears it.)
    let m = client.metrics();
    for _ in 0..500 {
        client.get_chunk(name).await.unwrap();
        if get(&m.corrupt_shards) > 0 {
            break;
        }
    }
    assert!(get(&m.corrupt_shards) > 0, "no read heard the lie");
    eventually("read repair", || get(&m.fill_shards_written) >= 1).await;
    assert_eq!(raw.get(&format!("/v1/shards/{name}")).body, stored);
    // Repaired for good: later reads find nothing to repair.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = get(&m.fill_shards_written);
    for _ in 0..20 {
        client.get_chunk(name).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(&m.fill_shards_written),
        written,
        "repaired, then left alone"
    );
    assert_eq!(origin.gets(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_down_fall_back_to_the_origin_and_fill_what_they_can() {
    let mut fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(6, 12);
    // Only in the origin: the fleet starts cold.
    for (_, bytes) in &chunks {
        client
            .origin()
            .unwrap()
            .put(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap();
    }
    fleet.nodes[0].kill();
    fleet.nodes[3].kill();
    read_all(&client, &chunks).await;
    let m = client.metrics().clone();
    assert_eq!(origin.gets(), 12);
    assert_eq!(get(&m.origin_fills), 12);
    // Every chunk's fill wrote its shards to the three live nodes.
    eventually("fills", || get(&m.fill_shards_written) == 36).await;

    // Three shards are not enough: reads still go to the origin (and fill again).
    read_all(&client, &chunks).await;
    assert_eq!(origin.gets(), 24);

    // The nodes come back (empty data survives, they were killed before any write); the
    // client notices, the next reads fill their shards, and then the fleet serves alone.
    fleet.nodes[0].restart();
    fleet.nodes[3].restart();
    eventually("nodes marked up", || get(&m.nodes_down) == 0).await;
    read_all(&client, &chunks).await;
    eventually("second fills", || get(&m.fill_shards_written) == 36 + 24).await;
    let before = origin.gets();
    read_all(&client, &chunks).await;
    assert_eq!(origin.gets(), before, "the fleet serves every chunk again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_origin_fetch() {
    let fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(7, 1);
    let (name, bytes) = chunks[0].clone();
    client
        .origin()
        .unwrap()
        .put(&SealedChunk::assume_sealed(bytes.clone()))
        .await
        .unwrap();
    origin.set_delay(Duration::from_millis(300));
    let readers: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get_chunk(&name).await })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap().unwrap().to_bytes(), bytes);
    }
    assert_eq!(origin.gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_fetches_are_limited_in_concurrency() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.max_origin_fetches = 2;
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(8, 10);
    for (_, bytes) in &chunks {
        client
            .origin()
            .unwrap()
            .put(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap();
    }
    origin.set_delay(Duration::from_millis(100));
    let readers: Vec<_> = chunks
        .iter()
        .map(|(name, _)| {
            let (client, name) = (client.clone(), *name);
            tokio::spawn(async move { client.get_chunk(&name).await })
        })
        .collect();
    for (reader, (_, bytes)) in readers.into_iter().zip(&chunks) {
        assert_eq!(&reader.await.unwrap().unwrap().to_bytes(), bytes);
    }
    assert_eq!(origin.gets(), 10);
    assert_eq!(origin.max_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_nowhere_is_a_clear_error() {
    let fleet = TestFleet::start(5);
    let (client, _) = fleet.client();
    let name = ChunkName::of(b"never stored");
    assert!(matches!(
        client.get_chunk(&name).await,
        Err(ChunkError::NotFound { .. })
    ));
    let mut config = fleet.config();
    config.origin = None;
    let no_origin = slapshot_client::FleetClient::with_origin(config, None).unwrap();
    assert!(matches!(
        no_origin.get_chunk(&name).await,
        Err(ChunkError::FleetMiss {
            have: 0,
            need: 4,
            ..
        })
    ));
    assert_eq!(get(&no_origin.metrics().failures), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_origin_copy_is_refused() {
    let fleet = TestFleet::start(5);
    let (client, _) = fleet.client();
    let name = ChunkName::of(b"the real bytes");
    // Plant other bytes under the name, as a corrupted origin object would be.
    let hex = name.to_hex();
    let path = fleet.origin_dir().join("chunks").join(&hex[..2]);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join(&hex), b"other bytes").unwrap();
    assert!(matches!(
        client.get_chunk(&name).await,
        Err(ChunkError::CorruptOrigin { .. })
    ));
    let _ = Arc::clone(client.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_a_nodes_data_file_is_read_around() {
    let mut fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(9, 4);
    put_everywhere(&client, &chunks).await;
    let (name, bytes) = &chunks[0];
    // The node holding shard 0: flip one byte of that shard in its store file, then
    // restart it so that nothing is served from its memory tier.
    let holder: usize = client.placement(name)[0]
        .trim_start_matches("node-")
        .parse()
        .unwrap();
    let stored = fleet.nodes[holder]
        .client()
        .get(&format!("/v1/shards/{name}"))
        .body;
    let store_file = fleet
        .dir
        .path()
        .join(format!("node-{holder}/data/shards.slap"));
    let image = std::fs::read(&store_file).unwrap();
    let at = image
        .windows(64)
        .position(|w| w == &stored[100..164])
        .expect("the shard is on the device");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&store_file)
            .unwrap();
        file.write_all_at(&[image[at] ^ 0x01], at as u64).unwrap();
        file.sync_all().unwrap();
    }
    fleet.nodes[holder].kill();
    fleet.nodes[holder].restart();
    assert_eq!(
        fleet.nodes[holder]
            .client()
            .get(&format!("/v1/shards/{name}"))
            .status,
        404,
        "the node drops the damaged shard"
    );

    let mut config = fleet.config();
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    config.read.hedge_delay = Some(slapshot_core::HumanDuration(Duration::from_secs(10)));
    let (reader, _) = fleet.client_with(config);
    assert_eq!(&reader.get_chunk(name).await.unwrap().to_bytes(), bytes);
    assert_eq!(get(&reader.metrics().degraded_rebuilds), 1);
    assert_eq!(origin.gets(), 0);
}

/// A code with two parity shards writes GF(2^8) frames and reads around two dead nodes;
/// shards framed by the codec it replaced (kind ReedSolomon, GF(2^16)) are still read, by
/// their own kind, without the origin. Decoding those with the new codec would give bytes
/// that fail the name check, which the origin count below would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_of_6_fleet_reads_its_gf256_shards_and_older_reed_solomon_ones() {
    use slapshot_core::{
        CodecKind, ErasureCodec,
        erasure::{Gf256Codec, ReedSolomonCodec},
    };

    let mut fleet = TestFleet::start(6);
    let mut config = fleet.config();
    config.data_shards = 4;
    config.total_shards = 6;
    let code = CodeParams::new(4, 6).unwrap();
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(12, 16);
    let node_of = |id: &str| id.trim_start_matches("node-").parse::<usize>().unwrap();
    let (new, old) = chunks.split_at(8);
    for (_, bytes) in &chunks {
        let sealed = SealedChunk::assume_sealed(bytes.clone());
        client.origin().unwrap().put(&sealed).await.unwrap();
    }
    for (_, bytes) in new {
        let sealed = SealedChunk::assume_sealed(bytes.clone());
        assert_eq!(client.put_chunk(&sealed).await.unwrap().written, 6);
    }
    // The older chunks as the client wrote them before the GF(2^8) codec: shard i of the
    // GF(2^16) code, framed as kind 1, on the node of rank i.
    for (name, bytes) in old {
        let shards = ReedSolomonCodec::new(code).encode(bytes).unwrap();
        for (rank, node) in client.placement(name).into_iter().enumerate() {
            let header = ShardHeader {
                codec: CodecKind::ReedSolomon,
                ..ShardHeader::new(name, code, rank as u8, bytes.len() as u32)
            };
            let frame = shard_frame::frame(&header, &shards[rank]);
            let mut raw = fleet.nodes[node_of(node)].client();
            // 201: these keys are new on the node.
            assert_eq!(raw.put(&format!("/v1/shards/{name}"), &frame).status, 201);
        }
    }
    // What the client wrote is the new kind, and the same bytes the codec makes alone.
    let (name, bytes) = &new[0];
    let holder = node_of(client.placement(name)[5]);
    let stored = fleet.nodes[holder]
        .client()
        .get(&format!("/v1/shards/{name}"))
        .body;
    let (header, payload) = shard_frame::parse(&stored).unwrap();
    assert_eq!((header.codec, header.index), (CodecKind::Gf256, 5));
    assert_eq!(payload, Gf256Codec::new(code).encode(bytes).unwrap()[5]);

    let dead = [1, 4];
    for &i in &dead {
        fleet.nodes[i].kill();
    }
    // The test reaches the decoders: some chunk of each kind lost a data shard.
    let lost_data = |set: &[(ChunkName, Bytes)]| {
        set.iter()
            .filter(|(name, _)| {
                client.placement(name)[..4]
                    .iter()
                    .any(|id| dead.contains(&node_of(id)))
            })
            .count()
    };
    assert!(lost_data(new) > 0 && lost_data(old) > 0);
    read_all(&client, &chunks).await;
    read_all(&client, &chunks).await;
    let m = client.metrics();
    assert_eq!(origin.gets(), 0, "the origin was asked");
    assert_eq!(get(&m.corrupt_shards), 0);
    assert_eq!(get(&m.fleet_hits), 32);
    assert!(get(&m.degraded_rebuilds) >= 2 * (lost_data(new) + lost_data(old)) as u64);
}

/// Stores chunks in the origin only: the fleet starts cold.
async fn put_in_origin(client: &slapshot_client::FleetClient, chunks: &[(ChunkName, Bytes)]) {
    for (_, bytes) in chunks {
        client
            .origin()
            .unwrap()
            .put(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap();
    }
}

/// A reader that gives up (a timeout, a FUSE interrupt) while its chunk is fetched from
/// the origin must not keep the origin permit: with one permit, a read of another chunk
/// would otherwise wait for ever. The abandoned fetch finishes in the client's own task,
/// and its fill lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_origin_fetch_leaves_no_permit_behind() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.max_origin_fetches = 1;
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(15, 2);
    put_in_origin(&client, &chunks).await;
    origin.set_delay(Duration::from_millis(300));
    let (first, second) = (&chunks[0], &chunks[1]);
    let cancelled = tokio::time::timeout(Duration::from_millis(100), client.get_chunk(&first.0));
    assert!(
        cancelled.await.is_err(),
        "the first read was meant to time out"
    );
    let read = tokio::time::timeout(Duration::from_secs(5), client.get_chunk(&second.0))
        .await
        .expect("a read of another chunk finished");
    assert_eq!(read.unwrap().to_bytes(), second.1);
    // The cancelled chunk's fetch went on and filled the fleet: it is read from there.
    let m = client.metrics().clone();
    eventually("both fills", || get(&m.fill_shards_written) == 10).await;
    assert_eq!(origin.gets(), 2);
    assert_eq!(
        client.get_chunk(&first.0).await.unwrap().to_bytes(),
        first.1
    );
    assert_eq!(origin.gets(), 2);
}

/// An origin fetch that timed out is not handed to the next reader: that one fetches
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_origin_fetch_is_not_inherited() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.timeouts.origin = slapshot_core::HumanDuration(Duration::from_millis(100));
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(16, 1);
    put_in_origin(&client, &chunks).await;
    origin.set_delay(Duration::from_millis(300));
    assert!(matches!(
        client.get_chunk(&chunks[0].0).await,
        Err(ChunkError::OriginTimeout { .. })
    ));
    origin.set_delay(Duration::ZERO);
    assert_eq!(
        client.get_chunk(&chunks[0].0).await.unwrap().to_bytes(),
        chunks[0].1
    );
    assert_eq!(origin.gets(), 2);
}

/// 32 readers miss the same chunk at once: one origin fetch, and one fill of M shards, not
/// one fill per reader (160 PUTs before fills ran in the fetch's own task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_misses_write_m_shards() {
    let fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(17, 1);
    put_in_origin(&client, &chunks).await;
    let (name, bytes) = chunks[0].clone();
    origin.set_delay(Duration::from_millis(300));
    let readers: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get_chunk(&name).await })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap().unwrap().to_bytes(), bytes);
    }
    let m = client.metrics().clone();
    eventually("the fill", || get(&m.fill_shards_written) == 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(support::shard_puts(&fleet), 5.0);
    assert_eq!(get(&m.fill_shards_written), 5);
    assert_eq!(origin.gets(), 1);
}

/// A node holds, under a chunk's name, a valid frame of another chunk: same code, same
/// length (it would decode into wrong bytes) or another length (it would make the correct
/// shards look inconsistent if it came first). The name tag gives it away: counted,
/// repaired, and the read comes from the other shards, not the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_valid_frame_is_detected_counted_and_repaired() {
    let fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let chunks = random_chunks(18, 8);
    put_everywhere(&client, &chunks).await;
    // (victim, intruder, rank of the victim's node that gets the intruder's shard)
    let cases = [(0, 4, 0), (1, 2, 1)];
    for &(victim, intruder, rank) in &cases {
        let (victim, _) = &chunks[victim];
        let (intruder, intruder_bytes) = &chunks[intruder];
        if victim == &chunks[0].0 {
            assert_eq!(intruder_bytes.len(), chunks[0].1.len(), "same length");
        } else {
            assert_ne!(intruder_bytes.len(), chunks[1].1.len(), "another length");
        }
        let holder = TestFleet::index(client.placement(intruder)[0]);
        let frame = fleet.nodes[holder]
            .client()
            .get(&format!("/v1/shards/{intruder}"))
            .body;
        assert!(shard_frame::parse(&frame).is_ok());
        let target = TestFleet::index(client.placement(victim)[rank]);
        let mut raw = fleet.nodes[target].client();
        assert_eq!(raw.put(&format!("/v1/shards/{victim}"), &frame).status, 204);
    }
    // A hedged reader with hedging out of the way asks exactly the first k nodes, so the
    // foreign shards are among the first answers.
    let mut config = fleet.config();
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    config.read.hedge_delay = Some(slapshot_core::HumanDuration(Duration::from_secs(10)));
    let (reader, _) = fleet.client_with(config);
    read_all(&reader, &chunks).await;
    assert_eq!(origin.gets(), 0, "the origin was asked");
    let m = reader.metrics();
    assert_eq!(get(&m.foreign_shards), 2);
    assert_eq!(get(&m.corrupt_shards), 2);
    eventually("the repairs", || get(&m.fill_shards_written) == 2).await;
    for &(victim, _, rank) in &cases {
        let (victim, _) = &chunks[victim];
        let target = TestFleet::index(client.placement(victim)[rank]);
        let body = fleet.nodes[target]
            .client()
            .get(&format!("/v1/shards/{victim}"))
            .body;
        let (header, _) = shard_frame::parse(&body).unwrap();
        assert!(header.may_belong_to(victim));
        assert_eq!(header.index as usize, rank);
    }
    read_all(&client, &chunks).await;
    assert_eq!(origin.gets(), 0);
}

/// A node holds a shard whose frame is valid and names the right chunk, but whose payload
/// is other bytes (a flipped bit that a buggy node re-checksummed, or a hostile node).
/// When it is among the first k shards, the chunk still comes from the fleet: the read
/// asks for more shards and rebuilds from a combination without the liar, and the repair
/// compares every shard with what its index holds and rewrites only the liars. Hedged
/// readers with hedging out of the way ask exactly the first k ranks, so the liars are
/// always among the first answers. Covered: the XOR code (4-of-5) and the GF(2^8) code
/// (4-of-6, 8-of-10) with one liar and with two (two liars among ten shards are left out
/// within the read's budget of decodes, whatever order the shards come in), a liar that
/// claims the index an honest node holds, and a reader in the default mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_shard_that_comes_first_never_costs_the_correct_ones() {
    use slapshot_client::config::ReadMode;
    struct Case {
        mode: ReadMode,
        code: (usize, usize),
        /// (rank that lies, index its lie claims)
        liars: &'static [(usize, usize)],
        /// A lie is found only once k shards failed together: the counts allowed.
        lying_reads: &'static [u64],
    }
    let cases = [
        Case {
            mode: ReadMode::Hedged,
            code: (4, 5),
            liars: &[(0, 0)],
            lying_reads: &[1],
        },
        Case {
            mode: ReadMode::Hedged,
            code: (4, 6),
            liars: &[(0, 0)],
            lying_reads: &[1],
        },
        Case {
            mode: ReadMode::Hedged,
            code: (4, 6),
            liars: &[(1, 1), (2, 2)],
            lying_reads: &[1],
        },
        Case {
            mode: ReadMode::Hedged,
            code: (8, 10),
            liars: &[(0, 0), (1, 1)],
            lying_reads: &[1],
        },
        // Rank 0 claims index 1, which rank 1 holds too: the honest copy is kept. Whether
        // a decode fails first depends on which copy came first.
        Case {
            mode: ReadMode::Hedged,
            code: (4, 5),
            liars: &[(0, 1)],
            lying_reads: &[0, 1],
        },
        Case {
            mode: ReadMode::All,
            code: (4, 5),
            liars: &[(2, 2)],
            lying_reads: &[1],
        },
    ];
    let fleet = TestFleet::start(10);
    for (seed, case) in cases.iter().enumerate() {
        let (data, total) = case.code;
        let config = |mode| {
            let mut config = fleet.config();
            config.data_shards = data;
            config.total_shards = total;
            config.read.mode = mode;
            config.read.hedge_delay = Some(slapshot_core::HumanDuration(Duration::from_secs(10)));
            config
        };
        let (client, origin) = fleet.client_with(config(case.mode));
        let chunks = random_chunks(40 + seed as u64, 1);
        put_in_origin(&client, &chunks).await;
        let (name, bytes) = &chunks[0];
        let report = client
            .put_chunk(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap();
        assert_eq!(report.written, total);
        let ranked: Vec<usize> = client
            .placement(name)
            .into_iter()
            .map(TestFleet::index)
            .collect();
        let path = format!("/v1/shards/{name}");
        let mut truth = Vec::new();
        for &(rank, claimed) in case.liars {
            let own = fleet.nodes[ranked[rank]].client().get(&path).body;
            let claimed_body = fleet.nodes[ranked[claimed]].client().get(&path).body;
            let (header, payload) = shard_frame::parse(&claimed_body).unwrap();
            let mut lie = payload.to_vec();
            lie[payload.len() / 2] ^= 0x40;
            let framed = shard_frame::frame(&header, &lie);
            assert!(
                shard_frame::parse(&framed).is_ok(),
                "the lie is well framed"
            );
            let mut raw = fleet.nodes[ranked[rank]].client();
            assert_eq!(raw.put(&path, &framed).status, 204);
            truth.push((rank, own));
        }
        let puts_before = support::shard_puts(&fleet);

        let got = client.get_chunk(name).await.unwrap().to_bytes();
        assert_eq!(&got, bytes);
        let m = client.metrics();
        let what = format!(
            "{:?} {data}-of-{total}, liars (rank, index) {:?}",
            case.mode, case.liars
        );
        assert_eq!(origin.gets(), 0, "{what}: the origin was asked");
        assert_eq!(get(&m.fleet_hits), 1, "{what}");
        if case.mode == ReadMode::All {
            // Whether the liar came among the first k is up to the scheduler; if it came
            // last, the read did not need it and nothing is repaired.
            continue;
        }
        assert!(
            case.lying_reads.contains(&get(&m.lying_reads)),
            "{what}: {} lying reads",
            get(&m.lying_reads)
        );
        let liars = case.liars.len() as u64;
        eventually("the repair", || get(&m.fill_shards_written) == liars).await;
        assert_eq!(get(&m.corrupt_shards), liars, "{what}");
        // Only the liars were rewritten, each with the shard of its own rank.
        assert_eq!(
            support::shard_puts(&fleet) - puts_before,
            liars as f64,
            "{what}: correct shards were rewritten"
        );
        for (rank, body) in truth {
            let now = fleet.nodes[ranked[rank]].client().get(&path).body;
            assert_eq!(now, body, "{what}: rank {rank} was not repaired");
        }
        // A reader in the default mode reads the repaired chunk without a lie.
        let (plain, plain_origin) = fleet.client_with(config(ReadMode::All));
        assert_eq!(&plain.get_chunk(name).await.unwrap().to_bytes(), bytes);
        assert_eq!(get(&plain.metrics().lying_reads), 0, "{what}");
        assert_eq!(plain_origin.gets(), 0);
    }
}

/// A node that takes its time to answer (here: never, within the test) holds only its own
/// request slots. Every read in the default mode asks all five nodes and finishes with the
/// other four, leaving its request to the slow node behind; with one bound shared by all
/// nodes, the slow node's leftovers filled it after about a thousand reads and every later
/// read waited for a slot that never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_holds_only_its_own_request_slots() {
    const READS: usize = 1500;
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.connections.max_per_node = 2;
    // Slow, not failing: no timeout marks it down while the test runs.
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_secs(120));
    config.nodes[4].addr = support::slow_proxy(fleet.nodes[4].addr, Duration::from_secs(120))
        .await
        .to_string();
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(41, 10);
    let (writer, _) = fleet.client();
    put_everywhere(&writer, &chunks).await;
    let reads = read_concurrently(&client, &chunks, READS, 64);
    let done = tokio::time::timeout(Duration::from_secs(60), reads).await;
    assert_eq!(
        done.ok(),
        Some(READS),
        "reads waited behind the slow node's requests"
    );
    assert_eq!(get(&client.metrics().fleet_hits), READS as u64);
    assert_eq!(origin.gets(), 0);
}

/// A cold miss goes to the origin as soon as the answers still to come cannot make up k
/// shards: four 404s out of five leave at most one, so the slowest node's answer (here
/// one that never comes within the test) is not waited for. Before, a cold read waited
/// for every node it asked, and a slow node made every miss as slow as itself. The fill
/// waits for the slow node a while, then writes to the four nodes that answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_miss_does_not_wait_for_the_slowest_node() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_secs(120));
    config.nodes[2].addr = support::slow_proxy(fleet.nodes[2].addr, Duration::from_secs(120))
        .await
        .to_string();
    for mode in [
        slapshot_client::config::ReadMode::All,
        slapshot_client::config::ReadMode::Hedged,
    ] {
        config.read.mode = mode;
        let (client, origin) = fleet.client_with(config.clone());
        let chunks = random_chunks(42 + mode as u64, 4);
        put_in_origin(&client, &chunks).await;
        let reads = async {
            for (name, bytes) in &chunks {
                assert_eq!(&client.get_chunk(name).await.unwrap().to_bytes(), bytes);
            }
        };
        tokio::time::timeout(Duration::from_secs(60), reads)
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: a cold read waited for the slow node"));
        assert_eq!(origin.gets(), chunks.len(), "{mode:?}");
        let m = client.metrics();
        assert_eq!(get(&m.origin_fills), chunks.len() as u64);
        // The fills wait a while for the slow node, then write to the four others.
        eventually("the fills", || {
            get(&m.fill_shards_written) == 4 * chunks.len() as u64
        })
        .await;
    }
}

/// Readers queue for origin permits no longer than the origin timeout: with one permit
/// and an origin that never answers in time, twenty cold reads of different chunks each
/// end within a few timeouts, not one after another (twenty timeouts for the last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_an_origin_permit_is_bounded() {
    const READS: usize = 20;
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.max_origin_fetches = 1;
    config.timeouts.origin = slapshot_core::HumanDuration(Duration::from_millis(500));
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(43, READS);
    put_in_origin(&client, &chunks).await;
    origin.set_delay(Duration::from_secs(60));
    let started = Instant::now();
    let readers: Vec<_> = chunks
        .iter()
        .map(|(name, _)| {
            let (client, name) = (client.clone(), *name);
            tokio::spawn(async move { client.get_chunk(&name).await })
        })
        .collect();
    for reader in readers {
        let result = reader.await.unwrap();
        assert!(
            matches!(result, Err(ChunkError::OriginTimeout { .. })),
            "{result:?}"
        );
    }
    // Twenty timeouts in a row would be 10 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the reads took {took:?}");
}

/// A request that times out while it waits for one of the client's own connections to a
/// node was never sent: it says nothing of the node. Here one node has a single
/// connection and answers each request in 100 ms; forty concurrent reads queue behind it
/// for longer than the shard timeout. Before, those queued timeouts marked a healthy node
/// down; now they are counted but leave its health alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_never_got_a_connection_do_not_mark_a_node_down() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.connections.max_per_node = 1;
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_secs(1));
    config.nodes[0].addr = support::slow_proxy(fleet.nodes[0].addr, Duration::from_millis(100))
        .await
        .to_string();
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(44, 40);
    let (writer, _) = fleet.client();
    put_everywhere(&writer, &chunks).await;
    let reads = read_concurrently(&client, &chunks, chunks.len(), 40).await;
    assert_eq!(reads, chunks.len());
    // The requests queued for the slow node end too (each within its clocks).
    every_request_ended(&client, 5 * chunks.len() as u64).await;
    let m = client.metrics();
    assert!(
        get(&m.shards_timed_out) > 0,
        "no request waited past the timeout"
    );
    assert_eq!(get(&m.nodes_down), 0, "a node that answers was marked down");
    assert!(client.node_health()[0].1);
    assert_eq!(origin.gets(), 0);
}

/// Over HTTP/2 one connection carries every request to a node, which serves 64 streams at
/// once. Here a node answers every shard request 600 ms late and a hundred reads ask it at
/// once: the 36 beyond its streams wait for one on the client's clock, then have a full
/// shard timeout (1 s) of their own. Before, they queued inside hyper's connection on the
/// node's clock, timed out at 1 s though the node would have answered at 1.2 s, and
/// marked it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_requests_waiting_for_a_stream_do_not_mark_a_node_down() {
    const READS: usize = 100;
    let fleet = TestFleet::start_with(5, &["--fault-injection"]);
    let chunks = random_chunks(47, READS);
    let (writer, origin) = fleet.client();
    put_everywhere(&writer, &chunks).await;
    let set = fleet.nodes[0].client().request(
        "PUT",
        "/admin/faults",
        &[],
        b"delay-fraction=1\ndelay=fixed:600ms\n",
    );
    assert_eq!(set.status, 200, "{}", set.text());
    let mut config = fleet.config();
    config.connections.http2 = true;
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_secs(1));
    let (client, _) = fleet.client_with(config);
    assert_eq!(
        read_concurrently(&client, &chunks, READS, READS).await,
        READS
    );
    every_request_ended(&client, 5 * READS as u64).await;
    let m = client.metrics();
    assert_eq!(get(&m.nodes_down), 0, "a node that answers was marked down");
    assert_eq!(get(&m.shards_timed_out), 0);
    assert_eq!(origin.gets(), 0);
}

/// With two or more parity shards a repair must pick the index no node holds, which the
/// read alone does not know: a hedged read hears from k + 1 nodes of 6. Shards here are
/// laid out in reverse (rank i holds index 5 - i, as a placement change can leave them),
/// rank 1 loses its shard, and the read does not ask rank 5, which holds index 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairs_of_a_4_of_6_chunk_give_distinct_indices() {
    use slapshot_core::codec_for;

    let fleet = TestFleet::start(6);
    let mut config = fleet.config();
    config.data_shards = 4;
    config.total_shards = 6;
    config.read.mode = slapshot_client::config::ReadMode::Hedged;
    config.read.hedge_delay = Some(slapshot_core::HumanDuration(Duration::from_secs(10)));
    let code = CodeParams::new(4, 6).unwrap();
    let (client, origin) = fleet.client_with(config);
    let chunks = random_chunks(19, 1);
    put_in_origin(&client, &chunks).await;
    let (name, bytes) = &chunks[0];
    let shards = codec_for(code).encode(bytes).unwrap();
    let ranked: Vec<usize> = client
        .placement(name)
        .into_iter()
        .map(TestFleet::index)
        .collect();
    for (rank, &node) in ranked.iter().enumerate() {
        let index = 5 - rank;
        let header = ShardHeader::new(name, code, index as u8, bytes.len() as u32);
        let frame = shard_frame::frame(&header, &shards[index]);
        let mut raw = fleet.nodes[node].client();
        assert_eq!(raw.put(&format!("/v1/shards/{name}"), &frame).status, 201);
    }
    let mut raw = fleet.nodes[ranked[1]].client();
    assert_eq!(
        raw.request("DELETE", &format!("/v1/shards/{name}"), &[], &[])
            .status,
        204
    );
    assert_eq!(&client.get_chunk(name).await.unwrap().to_bytes(), bytes);
    let m = client.metrics();
    eventually("the repair", || get(&m.fill_shards_written) == 1).await;
    let mut indices: Vec<u8> = ranked
        .iter()
        .map(|&node| {
            let body = fleet.nodes[node]
                .client()
                .get(&format!("/v1/shards/{name}"))
                .body;
            shard_frame::parse(&body).unwrap().0.index
        })
        .collect();
    indices.sort_unstable();
    assert_eq!(indices, [0, 1, 2, 3, 4, 5], "two nodes hold the same index");
    assert_eq!(origin.gets(), 0);
}

/// Late binding cancels the slowest requests of every read; HTTP/1.1 closes a connection
/// whose response is dropped half read, which opened a connection per read or so. Over
/// 10,000 warm reads, 8 at a time, in constant-work mode, each node accepts no more
/// connections than the pool allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_persist_over_ten_thousand_reads() {
    const POOL: usize = 8;
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.connections.max_per_node = POOL;
    // A timed-out request has to close its connection (its response may still come); with
    // the test's own load on two cores, 500 ms is reachable, so timeouts are out of the way.
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_secs(10));
    let (client, origin) = fleet.client_with(config);
    let chunks: Vec<(ChunkName, Bytes)> = {
        let mut rng = slapshot_testkit::Rng::new(20);
        (0..100)
            .map(|_| {
                let len = rng.range(1000, 8000);
                let bytes = Bytes::from(rng.bytes(len));
                (ChunkName::of(&bytes), bytes)
            })
            .collect()
    };
    put_everywhere(&client, &chunks).await;
    let accepted = "slapshot_http_connections_accepted_total";
    let before: Vec<f64> = fleet.nodes.iter().map(|n| n.metric(accepted)).collect();
    let chunks = Arc::new(chunks);
    let readers: Vec<_> = (0..8)
        .map(|reader| {
            let (client, chunks) = (client.clone(), chunks.clone());
            tokio::spawn(async move {
                for i in 0..1250 {
                    let (name, bytes) = &chunks[(reader * 1250 + i) % chunks.len()];
                    assert_eq!(&client.get_chunk(name).await.unwrap().to_bytes(), bytes);
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    // Each metric scrape is a connection of its own: one per node after `before`.
    let m = client.metrics();
    for (i, node) in fleet.nodes.iter().enumerate() {
        let opened = node.metric(accepted) - before[i] - 1.0;
        assert!(
            opened <= POOL as f64,
            "node {i} accepted {opened} connections for 10,000 reads (pool {POOL})\n{}",
            m.render()
        );
    }
    assert_eq!(get(&m.fleet_hits), 10_000);
    assert!(
        get(&m.drained_responses) > 0,
        "late binding cancelled nothing?"
    );
    assert_eq!(origin.gets(), 0);
}

/// During a rollout clients with different codes share the fleet: each reads the other's
/// chunks with the frames' own parameters, and neither rewrites the other's shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_codes_side_by_side() {
    let fleet = TestFleet::start(6);
    let (old, origin) = fleet.client(); // 4-of-5, XOR
    let mut config = fleet.config();
    config.data_shards = 4;
    config.total_shards = 6; // GF(2^8)
    let (new, _) = fleet.client_with(config);
    let chunks = random_chunks(21, 16);
    put_in_origin(&old, &chunks).await;
    let (mine, theirs) = chunks.split_at(8);
    for (writer, set, m) in [(&old, mine, 5), (&new, theirs, 6)] {
        for (_, bytes) in set {
            let sealed = SealedChunk::assume_sealed(bytes.clone());
            assert_eq!(writer.put_chunk(&sealed).await.unwrap().written, m);
        }
    }
    let puts = support::shard_puts(&fleet);
    assert_eq!(puts, 8.0 * 5.0 + 8.0 * 6.0);
    for _ in 0..2 {
        read_all(&old, &chunks).await;
        read_all(&new, &chunks).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        origin.gets(),
        0,
        "a chunk of the other code was fetched again"
    );
    assert_eq!(support::shard_puts(&fleet), puts, "shards were rewritten");
    for client in [&old, &new] {
        let m = client.metrics();
        assert_eq!(get(&m.corrupt_shards), 0);
        assert!(get(&m.other_code_shards) > 0);
        assert_eq!(get(&m.fleet_hits), 32);
    }

    // A shard of each code is lost, on the first node of both placements, and the client
    // of the other code reads the chunk: it repairs the loss in the chunk's own code, and
    // overwrites no valid shard of either code. The 4-of-5 reader does not ask the sixth
    // node of a 4-of-6 chunk, so it must not give away the index that node holds.
    let frames = |name: &ChunkName| -> Vec<Option<(usize, usize, u8)>> {
        fleet
            .nodes
            .iter()
            .map(|node| {
                let got = node.client().get(&format!("/v1/shards/{name}"));
                (got.status == 200).then(|| {
                    let (header, _) = shard_frame::parse(&got.body).unwrap();
                    (header.params.data(), header.params.total(), header.index)
                })
            })
            .collect()
    };
    for (reader, (name, bytes)) in [(&new, &mine[0]), (&old, &theirs[0])] {
        let before = frames(name);
        let node = TestFleet::index(old.placement(name)[0]);
        let mut raw = fleet.nodes[node].client();
        assert_eq!(
            raw.request("DELETE", &format!("/v1/shards/{name}"), &[], &[])
                .status,
            204
        );
        read_until_repaired(reader, name, bytes, 1).await;
        let after = frames(name);
        assert_eq!(
            after, before,
            "{name}: the repair did not restore what was lost"
        );
    }
    // The same, with the 4-of-6 chunk's first and sixth shards swapped (as a placement
    // change leaves them): the lost index is 5, and index 0 is on the node the 4-of-5
    // reader never asks when it reads. Giving the lost node index 0, its rank's, would
    // make two copies of index 0 and leave index 5 nowhere.
    let (name, bytes) = &theirs[1];
    let ranked: Vec<usize> = new
        .placement(name)
        .into_iter()
        .map(TestFleet::index)
        .collect();
    let code = CodeParams::new(4, 6).unwrap();
    let shards = slapshot_core::codec_for(code).encode(bytes).unwrap();
    for (node, index) in [(ranked[0], 5u8), (ranked[5], 0u8)] {
        let header = ShardHeader::new(name, code, index, bytes.len() as u32);
        let frame = shard_frame::frame(&header, &shards[usize::from(index)]);
        let mut raw = fleet.nodes[node].client();
        assert_eq!(raw.put(&format!("/v1/shards/{name}"), &frame).status, 204);
    }
    let mut raw = fleet.nodes[ranked[0]].client();
    assert_eq!(
        raw.request("DELETE", &format!("/v1/shards/{name}"), &[], &[])
            .status,
        204
    );
    read_until_repaired(&old, name, bytes, 1).await;
    let mut indices: Vec<u8> = frames(name)
        .into_iter()
        .map(|f| f.expect("every node holds a shard").2)
        .collect();
    indices.sort_unstable();
    assert_eq!(indices, [0, 1, 2, 3, 4, 5], "two nodes hold the same index");
    assert_eq!(origin.gets(), 0);
}

/// A fill writes only where nodes said 404, and only if they still hold nothing when the
/// write arrives: a shard another client of another code wrote there in between is kept.
/// The node holds the fill's PUT (before its check) until the other client has written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_never_overwrites_a_shard_written_after_its_read() {
    let mut fleet = TestFleet::start(6);
    let (old, origin) = fleet.client(); // 4-of-5, XOR
    let chunks = random_chunks(31, 1);
    put_in_origin(&old, &chunks).await;
    let (name, bytes) = &chunks[0];
    let first = TestFleet::index(old.placement(name)[0]);
    let node = &mut fleet.nodes[first];
    node.terminate();
    node.set_env(&[(
        "SLAPSHOT_TEST_HOOKS",
        &format!("put.before_check@{name}=delay:5000*1"),
    )]);
    node.restart();
    let mut config = fleet.config();
    config.total_shards = 6; // 4-of-6, GF(2^8)
    let (new, _) = fleet.client_with(config);

    assert_eq!(&old.get_chunk(name).await.unwrap().to_bytes(), bytes);
    assert_eq!(origin.gets(), 1);
    let held = &fleet.nodes[first];
    eventually("the fill's PUT held by the node", || {
        held.log().contains("test hook fired")
    })
    .await;
    // The fill's other writes are in: only the held one is left to race.
    let others: Vec<usize> = old.placement(name)[1..]
        .iter()
        .map(|id| TestFleet::index(id))
        .collect();
    eventually("the fill's other writes", || {
        others.iter().all(|&i| {
            fleet.nodes[i]
                .client()
                .get(&format!("/v1/shards/{name}"))
                .status
                == 200
        })
    })
    .await;
    let m = old.metrics();
    let sealed = SealedChunk::assume_sealed(bytes.clone());
    assert_eq!(new.put_chunk(&sealed).await.unwrap().written, 6);
    assert!(
        get(&m.fill_shards_written) + get(&m.fill_shards_taken) < 5,
        "the held write ended before the other client wrote: the test proves nothing"
    );
    eventually("the fill's end", || {
        get(&m.fill_shards_written) + get(&m.fill_shards_taken) == 5
    })
    .await;
    assert_eq!(get(&m.fill_shards_taken), 1);
    let got = held.client().get(&format!("/v1/shards/{name}"));
    assert_eq!(got.status, 200);
    let (header, _) = shard_frame::parse(&got.body).unwrap();
    assert_eq!(
        (header.params.data(), header.params.total()),
        (4, 6),
        "the fill overwrote the other code's shard"
    );
}

/// Reads a chunk until reads' repairs have written `shards` shards. A read decides on a
/// repair from the answers it has when it ends, so a 404 that comes after the k-th shard
/// is acted on by a later read.
async fn read_until_repaired(
    client: &slapshot_client::FleetClient,
    name: &ChunkName,
    bytes: &Bytes,
    shards: u64,
) {
    let m = client.metrics();
    let written = get(&m.fill_shards_written);
    for _ in 0..20 {
        assert_eq!(&client.get_chunk(name).await.unwrap().to_bytes(), bytes);
        let deadline = Instant::now() + Duration::from_secs(3);
        while get(&m.fill_shards_written) < written + shards && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if get(&m.fill_shards_written) >= written + shards {
            return;
        }
    }
    panic!("{name}: twenty reads and no repair");
}

/// Fills and repairs are bounded in number and in bytes; what does not fit is dropped and
/// counted, and the chunk is filled by a later read. Four cold chunks are read at once
/// with room for one fill (a slow node makes it last 200 ms): one fill, three dropped.
/// A fill larger than the byte bound is dropped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_beyond_its_bounds_is_dropped_and_counted() {
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.background.max_tasks = 1;
    config.timeouts.shard = slapshot_core::HumanDuration(Duration::from_secs(3));
    config.nodes[4].addr = support::slow_proxy(fleet.nodes[4].addr, Duration::from_millis(200))
        .await
        .to_string();
    let (client, origin) = fleet.client_with(config);
    let small: Vec<(ChunkName, Bytes)> = {
        let mut rng = slapshot_testkit::Rng::new(22);
        (0..4)
            .map(|_| {
                let bytes = Bytes::from(rng.bytes(4000));
                (ChunkName::of(&bytes), bytes)
            })
            .collect()
    };
    put_in_origin(&client, &small).await;
    origin.set_delay(Duration::from_millis(100));
    let readers: Vec<_> = small
        .iter()
        .map(|(name, _)| {
            let (client, name) = (client.clone(), *name);
            tokio::spawn(async move { client.get_chunk(&name).await })
        })
        .collect();
    for (reader, (_, bytes)) in readers.into_iter().zip(&small) {
        assert_eq!(&reader.await.unwrap().unwrap().to_bytes(), bytes);
    }
    let m = client.metrics().clone();
    eventually("three fills dropped", || {
        get(&m.background_dropped_full) == 3
    })
    .await;
    eventually("one fill", || get(&m.background_tasks) == 0).await;
    assert_eq!(get(&m.fill_shards_written), 5);
    // Read one at a time, each after the last one's fill has ended: the three others
    // fill.
    for chunk in &small {
        let (gets, written) = (origin.gets(), get(&m.fill_shards_written));
        read_all(&client, std::slice::from_ref(chunk)).await;
        if origin.gets() > gets {
            eventually("the fill", || get(&m.fill_shards_written) == written + 5).await;
        }
    }
    assert_eq!(get(&m.fill_shards_written), 20);
    assert_eq!(get(&m.background_dropped_full), 3);
    assert_eq!(origin.gets(), 4 + 3);

    // A whole chunk's fill holds the chunk and five 128 KiB shards: more than 1 MiB.
    let mut config = fleet.config();
    config.background.max_bytes = slapshot_core::ByteSize::mib(1);
    let (tight, _) = fleet.client_with(config);
    let big = random_chunks(23, 1);
    assert_eq!(big[0].1.len(), slapshot_core::CHUNK_SIZE);
    put_in_origin(&tight, &big).await;
    read_all(&tight, &big).await;
    // The reader has its chunk before the flight asks for room to fill.
    let m = tight.metrics().clone();
    eventually("the fill dropped", || get(&m.background_dropped_full) == 1).await;
    assert_eq!(get(&tight.metrics().fill_shards_written), 0);
}

/// A node that announces a body larger than any shard is not read from: the request fails
/// at the header (nothing is buffered), counts against the node, and the read goes on
/// with the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_larger_than_any_shard_is_refused_unread() {
    let fleet = TestFleet::start(5);
    let chunks = random_chunks(24, 8);
    let (direct, origin) = fleet.client();
    put_everywhere(&direct, &chunks).await;
    let mut config = fleet.config();
    config.nodes[1].addr = support::broken_node(200, Some(1 << 40)).await.to_string();
    let (client, _) = fleet.client_with(config);
    read_all(&client, &chunks).await;
    assert_eq!(origin.gets(), 0);
    let m = client.metrics();
    assert!(get(&m.shards_failed) > 0);
    eventually("the node marked down", || !client.node_health()[1].1).await;
}
