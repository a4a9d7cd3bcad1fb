//! Acknowledged shards survive a graceful restart and a kill -9; deletes and replacements
//! stay in effect across restarts.

use std::{collections::BTreeMap, sync::Arc, thread};

use slapshot_testkit::{Rng, TestNode, crc32};

/// 1,000 shards of 1 KiB to 512 KiB, as the issue asks: about 256 MiB in all.
const SHARDS: usize = 1000;
const WRITERS: usize = 4;

fn random_shards(seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut rng = Rng::new(seed);
    (0..SHARDS)
        .map(|i| {
            let len = rng.range(1024, 512 * 1024);
            (format!("shard-{seed}-{i:04}"), rng.bytes(len))
        })
        .collect()
}

/// PUTs every shard from several connections at once, so that both runtime threads write.
fn put_all(node: &TestNode, shards: &Arc<BTreeMap<String, Vec<u8>>>) {
    let keys: Vec<String> = shards.keys().cloned().collect();
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let shards = shards.clone();
            let keys: Vec<String> = keys.iter().skip(w).step_by(WRITERS).cloned().collect();
            let addr = node.addr;
            thread::spawn(move || {
                let mut client = slapshot_testkit::Client::connect(addr);
                for key in keys {
                    let crc = crc32(&shards[&key]).to_string();
                    let response = client.request(
                        "PUT",
                        &format!("/v1/shards/{key}"),
                        &[("x-slapshot-crc32", &crc)],
                        &shards[&key],
                    );
                    assert_eq!(response.status, 201, "PUT {key}");
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
}

fn assert_all_served(node: &TestNode, shards: &BTreeMap<String, Vec<u8>>, when: &str) {
    let mut client = node.client();
    for (key, data) in shards {
        let response = client.get(&format!("/v1/shards/{key}"));
        assert_eq!(response.status, 200, "{when}: GET {key}\n{}", node.log());
        assert!(
            response.body == *data,
            "{when}: {key} came back with other bytes"
        );
    }
}

#[test]
fn a_thousand_shards_survive_sigterm_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    // The memory tier is off so that every GET before a restart is also served from flash.
    let mut node = TestNode::start(dir.path(), &["--capacity", "1GiB", "--memory", "0"]);
    let shards = Arc::new(random_shards(7));
    put_all(&node, &shards);
    assert_all_served(&node, &shards, "before restart");

    assert!(node.terminate().success(), "graceful exit\n{}", node.log());
    node.restart();
    assert_eq!(node.metric("slapshot_recovered_shards"), SHARDS as f64);
    assert_eq!(
        node.metric("slapshot_checksum_failures_total{phase=\"recovery\"}"),
        0.0
    );
    assert_all_served(&node, &shards, "after SIGTERM");

    // A second batch, then no chance to shut down cleanly.
    let more = Arc::new(random_shards(8));
    put_all(&node, &more);
    node.kill();
    node.restart();
    assert_eq!(
        node.metric("slapshot_recovered_shards"),
        (2 * SHARDS) as f64
    );
    assert_all_served(&node, &shards, "after kill -9");
    assert_all_served(&node, &more, "after kill -9");
}

#[test]
fn deletes_and_replacements_hold_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::start(
        dir.path(),
        &["--capacity", "256MiB", "--region-size", "8MiB"],
    );
    let mut client = node.client();
    for i in 0..20 {
        assert_eq!(
            client
                .put(
                    &format!("/v1/shards/k{i}"),
                    format!("version one of {i}").as_bytes()
                )
                .status,
            201
        );
    }
    for i in 0..10 {
        assert_eq!(
            client
                .request("DELETE", &format!("/v1/shards/k{i}"), &[], &[])
                .status,
            204
        );
    }
    for i in 10..20 {
        assert_eq!(
            client
                .put(
                    &format!("/v1/shards/k{i}"),
                    format!("version two of {i}").as_bytes()
                )
                .status,
            204
        );
    }
    drop(client);
    node.kill();
    node.restart();
    let mut client = node.client();
    for i in 0..10 {
        assert_eq!(
            client.get(&format!("/v1/shards/k{i}")).status,
            404,
            "deleted k{i} came back"
        );
    }
    for i in 10..20 {
        assert_eq!(
            client.get(&format!("/v1/shards/k{i}")).text(),
            format!("version two of {i}")
        );
    }
    assert_eq!(node.metric("slapshot_recovered_shards"), 10.0);
}

#[test]
fn graceful_shutdown_finishes_a_request_in_flight() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "256MiB",
            "--region-size",
            "8MiB",
            "--drain-grace",
            "3s",
        ],
    );
    let data = Rng::new(9).bytes(200_000);
    let mut uploader = node.client();
    let stream = uploader.stream();
    write!(
        stream,
        "PUT /v1/shards/in-flight HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
        data.len()
    )
    .unwrap();
    stream.write_all(&data[..100_000]).unwrap();
    stream.flush().unwrap();
    // The node is receiving the body (its budget is taken): the request is in flight.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.metric("slapshot_http_body_memory_bytes") == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    node.signal("TERM");
    // While draining (the grace lasts 3 s), the node still serves but reports itself
    // unhealthy once it has seen the signal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while node.client().get("/health").status != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "a draining node still says it is healthy"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    uploader.stream().write_all(&data[100_000..]).unwrap();
    let response = uploader
        .read_response(false)
        .expect("the in-flight PUT is answered");
    assert_eq!(response.status, 201);
    assert!(node.wait(std::time::Duration::from_secs(30)).success());

    node.restart();
    assert!(node.client().get("/v1/shards/in-flight").body == data);
}

/// Every acknowledged PUT and DELETE waited for a flush (group commit by default), and the
/// store file holds no unwritten extents, whose first write would need a journal commit to
/// be durable; `--durability none` flushes nothing.
#[test]
fn acknowledgements_wait_for_flushes_and_the_store_file_is_written_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::start(
        dir.path(),
        &["--capacity", "256MiB", "--region-size", "8MiB"],
    );
    let mut client = node.client();
    let data = Rng::new(3).bytes(100_000);
    for i in 0..10 {
        assert_eq!(client.put(&format!("/v1/shards/f{i}"), &data).status, 201);
    }
    for i in 0..5 {
        let response = client.request("DELETE", &format!("/v1/shards/f{i}"), &[], &[]);
        assert_eq!(response.status, 204);
    }
    // One request at a time: nothing to share a flush with.
    assert_eq!(node.metric("slapshot_flash_flush_waiters_total"), 15.0);
    assert_eq!(node.metric("slapshot_flash_flushes_total"), 15.0);

    if let Ok(output) = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(dir.path().join("data/shards.slap"))
        .output()
    {
        let extents = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{extents}");
        assert!(
            !extents.contains("unwritten"),
            "the store file has unwritten extents:\n{extents}"
        );
    } else {
        eprintln!("filefrag (e2fsprogs) is not installed: extents not checked");
    }
    node.kill();

    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "256MiB",
            "--region-size",
            "8MiB",
            "--durability",
            "none",
        ],
    );
    let mut client = node.client();
    for i in 0..10 {
        assert_eq!(client.put(&format!("/v1/shards/f{i}"), &data).status, 201);
    }
    assert_eq!(node.metric("slapshot_flash_flushes_total"), 0.0);
}
