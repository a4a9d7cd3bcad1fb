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

async fn read_all(client: &slapshot_client::FleetClient, chunks: &[(ChunkName, Bytes)]) {
    for (name, bytes) in chunks {
        let got = client
            .get_chunk(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&got, bytes, "{name} came back with other bytes");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_read_around_within_the_timeouts() {
    let fleet = TestFleet::start(5);
    let (client, origin) = fleet.client();
    let (hedged, _) = fleet.hedged_client();
    let chunks = random_chunks(3, 20);
    put_everywhere(&client, &chunks).await;
    fleet.nodes[1].pause();
    let shard_timeout = client.config().timeouts.shard.0;
    for reader in [&client, &hedged] {
        for (name, bytes) in &chunks {
            let started = Instant::now();
            assert_eq!(&reader.get_chunk(name).await.unwrap(), bytes);
            let took = started.elapsed();
            assert!(
                took < shard_timeout + Duration::from_millis(500),
                "a read took {took:?}"
            );
        }
    }
    fleet.nodes[1].resume();
    assert_eq!(origin.gets(), 0);
    // Constant work never waited for the stopped node; hedged reads asked around it.
    assert!(get(&hedged.metrics().hedges_sent) + get(&hedged.metrics().shards_timed_out) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_stay_within_their_budget() {
    let fleet = TestFleet::start(5);
    let (hedged, _) = fleet.hedged_client();
    let chunks = random_chunks(4, 60);
    put_everywhere(&hedged, &chunks).await;
    // A stopped node among the first k of most chunks makes nearly every read want a hedge.
    fleet.nodes[0].pause();
    read_all(&hedged, &chunks).await;
    fleet.nodes[0].resume();
    let sent = get(&hedged.metrics().hedges_sent);
    // 5% of 60 reads plus the initial token; each hedge asks one remaining node here.
    assert!(sent <= 4, "{sent} hedges for 60 reads");
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

    // A shard whose frame is valid but belongs to another code: wrong header, absent.
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
    // Read repair put valid shards back in place of the damaged ones.
    eventually("read repair", || get(&m.fill_shards_written) == 2).await;
    let repaired = shard_frame::parse(
        &fleet
            .nodes
            .iter()
            .map(|n| n.client().get(&format!("/v1/shards/{name}")))
            .find(|r| {
                r.status == 200 && shard_frame::parse(&r.body).is_ok_and(|(h, _)| h.index == 0)
            })
            .expect("shard 0 is back")
            .body,
    )
    .map(|(h, _)| h.index);
    assert_eq!(repaired, Ok(0));
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
        assert_eq!(reader.await.unwrap().unwrap(), bytes);
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
        assert_eq!(&reader.await.unwrap().unwrap(), bytes);
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
    assert_eq!(&reader.get_chunk(name).await.unwrap(), bytes);
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
