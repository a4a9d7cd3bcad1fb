//! Races and crashes in the store's write paths, opened wide with the node's test hooks
//! (`SLAPSHOT_TEST_HOOKS`, see server/src/hooks.rs): requests cut off mid-write, two PUTs of
//! one key, PUT against DELETE, DELETE during reinsertion, failed zeroing and failed
//! retirement, each followed by kill -9 and a restart. What must hold: an acknowledged
//! DELETE stays deleted, the node serves the same version before and after a crash, and
//! every region is accounted for.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use slapshot_testkit::{Client, Rng, TestNode};

const HOOKS: &str = "SLAPSHOT_TEST_HOOKS";

/// A 64 MiB store of 4 MiB regions (15 of them) on one thread with no memory tier, so that
/// every GET reads flash and region counts are exact.
const SMALL: [&str; 10] = [
    "--capacity",
    "64MiB",
    "--region-size",
    "4MiB",
    "--max-shard-size",
    "1MiB",
    "--threads",
    "1",
    "--memory",
    "0",
];
const REGIONS: f64 = 15.0;

fn start(dir: &std::path::Path, extra: &[&str], hooks: &str) -> TestNode {
    let args: Vec<&str> = SMALL.iter().copied().chain(extra.iter().copied()).collect();
    TestNode::start_with_env(dir, &args, &[(HOOKS, hooks)])
}

fn region_gauge(node: &TestNode, state: &str) -> f64 {
    node.metric(&format!("slapshot_flash_regions{{state=\"{state}\"}}"))
}

/// Every region is free, open, sealed, being evicted, quarantined or broken.
fn assert_regions_add_up(node: &TestNode, when: &str) {
    let states = [
        "free",
        "open",
        "sealed",
        "evicting",
        "quarantined",
        "broken",
    ];
    let counts: Vec<f64> = states.iter().map(|s| region_gauge(node, s)).collect();
    assert_eq!(
        counts.iter().sum::<f64>(),
        REGIONS,
        "{when}: regions by state {states:?} = {counts:?}"
    );
}

/// Waits until the node logged that `hook` fired (the start-up line names hooks too, so
/// only the firing line counts).
fn wait_for_hook(node: &TestNode, hook: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !node
        .log()
        .lines()
        .any(|l| l.contains("test hook fired") && l.contains(hook))
    {
        assert!(
            Instant::now() < deadline,
            "hook {hook} never fired:\n{}",
            node.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn get(node: &TestNode, key: &str) -> (u16, Vec<u8>) {
    let response = node.client().get(&format!("/v1/shards/{key}"));
    (response.status, response.body)
}

fn put(client: &mut Client, key: &str, data: &[u8]) -> u16 {
    client.put(&format!("/v1/shards/{key}"), data).status
}

fn delete(node: &TestNode, key: &str) -> u16 {
    node.client()
        .request("DELETE", &format!("/v1/shards/{key}"), &[], &[])
        .status
}

/// Sends a PUT on a raw connection and returns it without reading the answer.
fn start_put(node: &TestNode, key: &str, data: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "PUT /v1/shards/{key} HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
        data.len()
    )
    .unwrap();
    stream.write_all(data).unwrap();
    stream
}

fn status_of(mut stream: TcpStream) -> Option<u16> {
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    reply.split_whitespace().nth(1).and_then(|s| s.parse().ok())
}

#[test]
fn puts_cut_off_mid_write_finish_and_lose_no_region() {
    let dir = tempfile::tempdir().unwrap();
    // The first PUT stalls between taking a free region and writing its header, then
    // between its write and its index entry; the second stalls after its write. The
    // watchdog (--io-timeout 1s) cuts both connections while they stall.
    let mut node = start(
        dir.path(),
        &["--io-timeout", "1s"],
        "region.before_header=delay:1500*1,put.after_write@cut-=delay:1500*2",
    );
    let data = Rng::new(1).bytes(128 * 1024);
    let first = start_put(&node, "cut-0", &data);
    let second = start_put(&node, "cut-1", &data);
    assert_eq!(status_of(first), None, "the watchdog cut the first PUT");
    assert_eq!(status_of(second), None, "the watchdog cut the second PUT");
    assert!(node.metric("slapshot_http_connection_timeouts_total{kind=\"io\"}") >= 2.0);

    // The store finished both PUTs although nobody waits for them any more.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&node, "cut-0").0 != 200 || get(&node, "cut-1").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "cut-off PUTs never completed:\n{}",
            node.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&node, "cut-0").1, data);
    assert_eq!(region_gauge(&node, "open"), 1.0);
    assert_regions_add_up(&node, "after the cut-off PUTs");

    // Eviction must get through the region the cut-off PUTs wrote to: a writer count
    // left behind would make it wait forever and PUTs fail with 507.
    let mut client = node.client();
    let mut rng = Rng::new(2);
    for i in 0..200 {
        assert_eq!(
            put(&mut client, &format!("fill-{i}"), &rng.bytes(512 * 1024)),
            201
        );
    }
    assert!(node.metric("slapshot_flash_evicted_regions_total") >= 5.0);
    assert_regions_add_up(&node, "after filling the store");

    node.kill();
    node.set_env(&[]);
    node.restart();
    assert_regions_add_up(&node, "after kill -9");
    assert_eq!(region_gauge(&node, "open"), 0.0);
    assert_eq!(
        node.metric("slapshot_checksum_failures_total{phase=\"recovery\"}"),
        0.0
    );
}

#[test]
fn a_delete_during_reinsertion_stays_deleted_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    // Eviction copies the hot shard, then stalls before pointing the index at the copy.
    let mut node = start(
        dir.path(),
        &["--reinsert-hits", "1"],
        "reinsert.after_copy@hot=delay:1500*1",
    );
    let mut client = node.client();
    let hot = Rng::new(3).bytes(100_000);
    assert_eq!(put(&mut client, "hot", &hot), 201);
    assert_eq!(get(&node, "hot"), (200, hot.clone()), "a read makes it hot");

    let mut rng = Rng::new(4);
    let mut i = 0;
    while !node.log().contains("test hook fired") {
        assert!(i < 400, "the hot shard's region was never evicted");
        assert_eq!(
            put(&mut client, &format!("fill-{i}"), &rng.bytes(512 * 1024)),
            201
        );
        i += 1;
    }
    wait_for_hook(&node, "reinsert.after_copy");
    // The copy is on the device and not indexed; the original is still indexed.
    let started = Instant::now();
    assert_eq!(delete(&node, "hot"), 204);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the DELETE did not wait for the copy to be dealt with ({:?})",
        started.elapsed()
    );
    node.kill();
    node.set_env(&[]);
    node.restart();
    assert_eq!(get(&node, "hot").0, 404, "the deleted shard came back");
    assert_regions_add_up(&node, "after kill -9");
}

#[test]
fn two_puts_of_one_key_agree_before_and_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    // The first PUT stalls after its write, so the second (a higher sequence number)
    // commits first; zeroing the record that lost then stalls, and the node is killed
    // meanwhile.
    let mut node = start(
        dir.path(),
        &[],
        "put.after_write@race=delay:800*1,invalidate@race=delay:5000*1",
    );
    let a = Rng::new(5).bytes(64 * 1024);
    let b = Rng::new(6).bytes(64 * 1024);
    let first = start_put(&node, "race", &a);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(put(&mut node.client(), "race", &b), 201);
    assert_eq!(status_of(first), Some(204), "the first PUT is answered too");
    wait_for_hook(&node, "invalidate");
    let before = get(&node, "race");
    assert_eq!(before.0, 200);
    assert!(before.1 == b, "the PUT that started last is the one served");
    node.kill();
    node.set_env(&[]);
    node.restart();
    let after = get(&node, "race");
    assert!(
        after == before,
        "the node served one version before the crash and another after"
    );
}

#[test]
fn a_delete_waits_for_the_replaced_version_and_stays_deleted() {
    let dir = tempfile::tempdir().unwrap();
    // A replacing PUT is answered before the old version is zeroed; zeroing it stalls.
    let mut node = start(dir.path(), &[], "invalidate@pd=delay:1500*1");
    let mut client = node.client();
    assert_eq!(put(&mut client, "pd", b"version one"), 201);
    assert_eq!(put(&mut client, "pd", b"version two"), 204);
    let started = Instant::now();
    assert_eq!(delete(&node, "pd"), 204);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the DELETE did not wait for the old version ({:?})",
        started.elapsed()
    );
    node.kill();
    node.set_env(&[]);
    node.restart();
    assert_eq!(get(&node, "pd").0, 404, "an old version came back");
}

#[test]
fn a_put_racing_a_delete_is_served_the_same_before_and_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path(), &[], "");
    assert_eq!(put(&mut node.client(), "pr", b"version one"), 201);
    // Only the second PUT of the key should stall: the hook goes in with a restart.
    assert!(node.terminate().success());
    node.set_env(&[(HOOKS, "put.after_write@pr=delay:800*1")]);
    node.restart();
    let late = start_put(&node, "pr", b"version two");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(delete(&node, "pr"), 204);
    assert!(matches!(status_of(late), Some(201 | 204)));
    let before = get(&node, "pr");
    assert_eq!(before, (200, b"version two".to_vec()), "{}", node.log());
    node.kill();
    node.set_env(&[]);
    node.restart();
    assert_eq!(get(&node, "pr"), before);
}

#[test]
fn a_record_that_cannot_be_zeroed_quarantines_its_region() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path(), &[], "invalidate@q=fail*1");
    let mut client = node.client();
    assert_eq!(put(&mut client, "q", b"version one"), 201);
    // Move the open region on, so that the next version lands elsewhere.
    let mut rng = Rng::new(7);
    for i in 0..40 {
        assert_eq!(
            put(&mut client, &format!("fill-{i}"), &rng.bytes(128 * 1024)),
            201
        );
    }
    // Zeroing version one fails: its region is quarantined instead.
    assert_eq!(put(&mut client, "q", b"version two"), 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    while region_gauge(&node, "quarantined") != 1.0 {
        assert!(Instant::now() < deadline, "nothing was quarantined");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&node, "q"), (200, b"version two".to_vec()));
    assert_eq!(delete(&node, "q"), 204);
    assert_eq!(node.metric("slapshot_flash_read_only"), 0.0);
    node.kill();
    node.set_env(&[]);
    node.restart();
    assert_eq!(get(&node, "q").0, 404, "version one came back");
    assert_eq!(
        region_gauge(&node, "quarantined"),
        1.0,
        "quarantine is durable"
    );
    assert_regions_add_up(&node, "after kill -9");
}

#[test]
fn a_region_whose_retirement_fails_never_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path(), &["--reinsert-hits", "0"], "retire=fail*1");
    let mut client = node.client();
    for i in 0..10 {
        assert_eq!(put(&mut client, &format!("old-{i}"), b"an old shard"), 201);
    }
    let mut rng = Rng::new(8);
    let mut i = 0;
    while node.metric("slapshot_flash_evicted_regions_total") < 1.0 {
        assert!(i < 400, "nothing was evicted");
        assert_eq!(
            put(&mut client, &format!("fill-{i}"), &rng.bytes(512 * 1024)),
            201
        );
        i += 1;
    }
    assert_eq!(region_gauge(&node, "quarantined"), 1.0);
    assert_eq!(get(&node, "old-0").0, 404, "evicted");
    assert_eq!(delete(&node, "old-0"), 404);
    node.kill();
    node.set_env(&[]);
    node.restart();
    for i in 0..10 {
        assert_eq!(get(&node, &format!("old-{i}")).0, 404, "old-{i} came back");
    }
    assert_eq!(region_gauge(&node, "quarantined"), 1.0);
    assert_regions_add_up(&node, "after kill -9");
}

#[test]
fn concurrent_puts_and_deletes_of_the_same_keys_agree_with_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "256MiB",
            "--region-size",
            "8MiB",
            "--memory",
            "0",
        ],
    );
    const KEYS: usize = 4;
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let addr = node.addr;
            thread::spawn(move || {
                let mut client = Client::connect(addr);
                let mut rng = Rng::new(100 + w);
                for op in 0..150 {
                    let key = format!("/v1/shards/same-{}", rng.range(0, KEYS - 1));
                    if rng.range(0, 3) == 0 {
                        let status = client.request("DELETE", &key, &[], &[]).status;
                        assert!(status == 204 || status == 404, "DELETE {key}: {status}");
                    } else {
                        let mut data = format!("worker {w} op {op} ").into_bytes();
                        let len = rng.range(1, 40_000);
                        data.extend(rng.bytes(len));
                        let status = client.put(&key, &data).status;
                        assert!(status == 201 || status == 204, "PUT {key}: {status}");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let before: Vec<_> = (0..KEYS)
        .map(|k| get(&node, &format!("same-{k}")))
        .collect();
    node.kill();
    node.restart();
    for (k, seen) in before.iter().enumerate() {
        assert!(
            get(&node, &format!("same-{k}")) == *seen,
            "same-{k} changed across kill -9 (was {})",
            seen.0
        );
    }
}
