//! A byte flipped on the device turns the shard into a miss and is counted; it is never
//! served, whether the damage is found on read or during recovery.

use std::{fs::OpenOptions, os::unix::fs::FileExt, path::Path};

use slapshot_testkit::{Rng, TestNode};

/// Offset of `needle` in the store file.
fn find(store: &Path, needle: &[u8]) -> u64 {
    let data = std::fs::read(store).unwrap();
    data.windows(needle.len())
        .position(|w| w == needle)
        .expect("payload is on the device") as u64
}

fn flip_byte(store: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(store)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x40;
    file.write_all_at(&byte, offset).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn a_flipped_byte_is_a_404_and_a_counted_checksum_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "128MiB",
            "--region-size",
            "8MiB",
            "--memory",
            "0",
        ],
    );
    let store = dir.path().join("data/shards.slap");
    let mut rng = Rng::new(21);
    let shards: Vec<Vec<u8>> = (0..4).map(|_| rng.bytes(100_000)).collect();
    let mut client = node.client();
    for (i, data) in shards.iter().enumerate() {
        assert_eq!(client.put(&format!("/v1/shards/c{i}"), data).status, 201);
    }

    // Found on read, while the node runs.
    flip_byte(&store, find(&store, &shards[0][..64]) + 50_000);
    assert_eq!(client.get("/v1/shards/c0").status, 404);
    assert_eq!(
        node.metric("slapshot_checksum_failures_total{phase=\"read\"}"),
        1.0
    );
    assert_eq!(
        client.get("/v1/shards/c0").status,
        404,
        "a damaged shard stays gone"
    );
    assert_eq!(
        node.metric("slapshot_checksum_failures_total{phase=\"read\"}"),
        1.0
    );
    assert!(
        client.get("/v1/shards/c1").body == shards[1],
        "neighbours are unaffected"
    );

    // Found during recovery (a crash: the store is scanned): one payload byte and one
    // header byte (inside the key).
    drop(client);
    node.kill();
    let payload_at = find(&store, &shards[2][..64]);
    flip_byte(&store, payload_at + 99_999);
    let key_at = find(&store, &shards[3][..64]) - 1; // the last byte of the key "c3"
    flip_byte(&store, key_at);
    node.restart();
    assert_eq!(
        node.metric("slapshot_checksum_failures_total{phase=\"recovery\"}"),
        2.0
    );
    let mut client = node.client();
    assert_eq!(client.get("/v1/shards/c2").status, 404);
    assert_eq!(client.get("/v1/shards/c3").status, 404);
    assert_eq!(client.get("/v1/shards/c0").status, 404);
    assert!(client.get("/v1/shards/c1").body == shards[1]);
    assert_eq!(node.metric("slapshot_recovered_shards"), 1.0);

    // After a clean shutdown the index comes from the checkpoint, without a scan: damage
    // done meanwhile is found on the first read instead.
    drop(client);
    assert!(node.terminate().success());
    flip_byte(&store, find(&store, &shards[1][..64]) + 1_000);
    node.restart();
    assert_eq!(node.metric("slapshot_recovery_from_checkpoint"), 1.0);
    assert_eq!(node.client().get("/v1/shards/c1").status, 404);
    assert_eq!(
        node.metric("slapshot_checksum_failures_total{phase=\"read\"}"),
        1.0
    );
}

#[test]
fn a_damaged_shard_can_be_put_again() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "128MiB",
            "--region-size",
            "8MiB",
            "--memory",
            "0",
        ],
    );
    let store = dir.path().join("data/shards.slap");
    let data = Rng::new(22).bytes(20_000);
    let mut client = node.client();
    client.put("/v1/shards/again", &data);
    flip_byte(&store, find(&store, &data[..64]) + 10);
    assert_eq!(client.get("/v1/shards/again").status, 404);
    assert_eq!(client.put("/v1/shards/again", &data).status, 201);
    assert!(client.get("/v1/shards/again").body == data);
}
