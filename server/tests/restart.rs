//! Fast restart: a clean shutdown writes an index checkpoint that the next start loads
//! instead of scanning the device; a crash, a stale checkpoint, a damaged one, or a
//! shutdown with work left unfinished all fall back to the scan, with the same data.

use std::{collections::BTreeMap, path::Path};

use slapshot_testkit::{Rng, TestNode};

const FLAGS: [&str; 6] = [
    "--capacity",
    "256MiB",
    "--region-size",
    "8MiB",
    "--memory",
    "0",
];

fn start(dir: &Path) -> TestNode {
    TestNode::start(dir, &FLAGS)
}

fn from_checkpoint(node: &TestNode) -> bool {
    node.metric("slapshot_recovery_from_checkpoint") == 1.0
}

/// Writes shards, replaces some and deletes some; returns what should be served.
fn churn(node: &TestNode, seed: u64, expected: &mut BTreeMap<String, Option<Vec<u8>>>) {
    let mut client = node.client();
    let mut rng = Rng::new(seed);
    for i in 0..120 {
        let key = format!("s{seed}-{i}");
        let len = rng.range(1, 200_000);
        let data = rng.bytes(len);
        assert!(matches!(
            client.put(&format!("/v1/shards/{key}"), &data).status,
            201 | 204
        ));
        expected.insert(key, Some(data));
    }
    for i in (0..120).step_by(6) {
        let key = format!("s{seed}-{i}");
        assert_eq!(
            client
                .request("DELETE", &format!("/v1/shards/{key}"), &[], &[])
                .status,
            204
        );
        expected.insert(key, None);
    }
    for i in (1..120).step_by(6) {
        let key = format!("s{seed}-{i}");
        let data = rng.bytes(1000);
        assert_eq!(client.put(&format!("/v1/shards/{key}"), &data).status, 204);
        expected.insert(key, Some(data));
    }
}

fn assert_serves(node: &TestNode, expected: &BTreeMap<String, Option<Vec<u8>>>, when: &str) {
    let mut client = node.client();
    for (key, data) in expected {
        let got = client.get(&format!("/v1/shards/{key}"));
        match data {
            Some(data) => {
                assert_eq!(got.status, 200, "{when}: {key}");
                assert!(got.body == *data, "{when}: {key} has other bytes");
            }
            None => assert_eq!(got.status, 404, "{when}: deleted {key} came back"),
        }
    }
    let live = expected.values().filter(|d| d.is_some()).count();
    assert_eq!(node.metric("slapshot_flash_shards"), live as f64, "{when}");
}

#[test]
fn a_clean_shutdown_restarts_from_the_checkpoint_and_a_crash_scans() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path());
    let mut expected = BTreeMap::new();
    churn(&node, 1, &mut expected);

    assert!(node.terminate().success());
    let checkpoint = dir.path().join("data/index.ckpt");
    assert!(checkpoint.exists(), "no checkpoint after SIGTERM");
    node.restart();
    assert!(from_checkpoint(&node), "{}", node.log());
    assert!(!checkpoint.exists(), "a loaded checkpoint is removed");
    assert_serves(&node, &expected, "after SIGTERM");

    churn(&node, 2, &mut expected);
    node.kill();
    node.restart();
    assert!(!from_checkpoint(&node), "a crash must scan");
    assert_serves(&node, &expected, "after kill -9");
}

#[test]
fn stale_and_damaged_checkpoints_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("data/index.ckpt");
    let mut node = start(dir.path());
    let mut expected = BTreeMap::new();
    churn(&node, 3, &mut expected);
    assert!(node.terminate().success());
    let stale = std::fs::read(&checkpoint).unwrap();

    // A run after that checkpoint changes the store, then crashes; the old checkpoint is
    // put back, as a backup tool might.
    node.restart();
    churn(&node, 4, &mut expected);
    node.kill();
    std::fs::write(&checkpoint, &stale).unwrap();
    node.restart();
    assert!(!from_checkpoint(&node), "a stale checkpoint was used");
    assert_serves(&node, &expected, "after a stale checkpoint");

    // A damaged checkpoint of the current generation.
    assert!(node.terminate().success());
    let mut bytes = std::fs::read(&checkpoint).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&checkpoint, &bytes).unwrap();
    node.restart();
    assert!(!from_checkpoint(&node), "a damaged checkpoint was used");
    assert_serves(&node, &expected, "after a damaged checkpoint");
}

#[test]
fn no_checkpoint_when_shutdown_leaves_work_unfinished() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::start_with_env(
        dir.path(),
        &[
            "--capacity",
            "256MiB",
            "--region-size",
            "8MiB",
            "--shutdown-timeout",
            "1s",
        ],
        &[("SLAPSHOT_TEST_HOOKS", "put.after_write@slow=delay:10000")],
    );
    let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"PUT /v1/shards/slow HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello",
    )
    .unwrap();
    // The PUT is inside the node (its write done, stalled by the hook) before the signal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !node
        .log()
        .lines()
        .any(|l| l.contains("test hook fired") && l.contains("put.after_write"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the PUT never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    node.terminate();
    assert!(!dir.path().join("data/index.ckpt").exists());
    node.set_env(&[]);
    node.restart();
    assert!(!from_checkpoint(&node));
}

#[test]
fn lowering_the_shard_size_limit_keeps_the_shards_already_stored() {
    let dir = tempfile::tempdir().unwrap();
    let flags = |limit: &'static str| [&FLAGS[..], &["--max-shard-size", limit]].concat();
    let mut node = TestNode::start(dir.path(), &flags("1MiB"));
    let big = Rng::new(21).bytes(800_000);
    assert_eq!(node.client().put("/v1/shards/big", &big).status, 201);
    node.kill();
    // Restarted with a limit below the shard: recovered, and served, not dropped as
    // corrupt (which also zeroed it for good); new PUTs get the new limit.
    let node = TestNode::start(dir.path(), &flags("512KiB"));
    let mut client = node.client();
    let head = client.request("HEAD", "/v1/shards/big", &[], &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("800000"));
    let got = client.get("/v1/shards/big");
    assert_eq!(got.status, 200);
    assert!(got.body == big, "other bytes");
    assert_eq!(node.client().put("/v1/shards/another", &big).status, 413);
}
