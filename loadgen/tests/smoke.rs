//! Short runs of every `slapshot-loadgen` subcommand against real nodes: the JSON is
//! complete and consistent, and the experiments write their tables, JSON and plots.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Runs slapshot-loadgen to the end, or fails the test after two minutes (a run that
/// overran its bounds would otherwise hang the suite).
fn loadgen(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slapshot-loadgen"))
        .args(args)
        .env("SLAPSHOT_SERVER_BIN", slapshot_testkit::server_binary())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // SIGTERM first: an experiment then stops its fleet and removes its files.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            panic!("slapshot-loadgen {args:?} ran for more than 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "slapshot-loadgen {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn json(output: &Output) -> Value {
    let text = String::from_utf8(output.stdout.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object on stdout: {text}");
    serde_json::from_str(&text).unwrap()
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

/// Every field the issue names is there, the counts add up, the percentiles are in order
/// and the histogram holds every success.
fn check_report(report: &Value) {
    let requests = u(report, "requests");
    assert!(requests > 0, "{report}");
    assert_eq!(
        requests,
        u(report, "successes") + u(report, "errors"),
        "{report}"
    );
    let by_kind: u64 = report["errors_by_kind"]
        .as_object()
        .expect("errors_by_kind")
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(by_kind, u(report, "errors"), "{report}");
    let quantiles: Vec<u64> = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"]
        .iter()
        .map(|k| u(report, k))
        .collect();
    assert!(
        quantiles.windows(2).all(|w| w[0] <= w[1]),
        "percentiles out of order: {quantiles:?}"
    );
    for key in ["seconds", "requests_per_second"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
    let bytes_per_second = report["bytes_per_second"].as_f64().unwrap();
    assert_eq!(
        bytes_per_second > 0.0,
        u(report, "successes") > 0,
        "only answers carry bytes: {report}"
    );
    let recorded: u64 = report["histogram_us"]
        .as_array()
        .expect("histogram_us")
        .iter()
        .map(|pair| pair[1].as_u64().unwrap())
        .sum();
    assert_eq!(recorded, requests, "the histogram holds every request");
}

/// `slapshot fleet up` in the background, stopped with SIGTERM (its nodes with it) when
/// dropped, even after a failed assertion.
struct Fleet {
    up: Child,
    file: PathBuf,
}

impl Fleet {
    fn up(dir: &Path) -> Fleet {
        let mut up = Command::new(slapshot_testkit::slapshot_binary())
            .args(["fleet", "up", "--nodes", "5", "--capacity", "128MiB"])
            .arg("--server-arg=--region-size=8MiB")
            .arg("--server-arg=--fault-injection")
            .arg("--dir")
            .arg(dir)
            .env("SLAPSHOT_SERVER_BIN", slapshot_testkit::server_binary())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let file = dir.join("fleet.toml");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !file.exists() {
            if let Some(status) = up.try_wait().unwrap() {
                panic!("slapshot fleet up exited with {status}");
            }
            assert!(Instant::now() < deadline, "the fleet did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Fleet { up, file }
    }

    fn targets(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.file).unwrap();
        let fleet: toml::Table = text.parse().unwrap();
        fleet["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| format!("http://{}", n["addr"].as_str().unwrap()))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.up.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.up.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.up.kill();
        let _ = self.up.wait();
    }
}

#[test]
fn shards_and_chunks_report_complete_consistent_json() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::up(&dir.path().join("fleet"));
    let targets: Vec<String> = fleet
        .targets()
        .into_iter()
        .flat_map(|t| ["--target".to_owned(), t])
        .collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let targets = [&["shards"][..], &targets].concat();
    let common = ["--keys", "50", "--size", "64KiB", "--json"];

    // Closed loop with preload: every GET finds its key on every target.
    let args = [&targets[..], &common, &["--preload", "--requests", "2000"]].concat();
    let report = json(&loadgen(&args));
    check_report(&report);
    assert_eq!(u(&report, "requests"), 2000);
    assert_eq!(u(&report, "errors"), 0, "{report}");
    assert_eq!(u(&report, "bytes"), 2000 * 64 * 1024);
    assert_eq!(report["mode"], "closed");

    // Open loop, HTTP/2, a tenth PUTs, bounded by time.
    let args = [
        &targets[..],
        &common,
        &[
            "--rate",
            "1000",
            "--duration",
            "1s",
            "--http2",
            "--put-fraction",
            "0.1",
        ],
    ]
    .concat();
    let report = json(&loadgen(&args));
    check_report(&report);
    assert_eq!(report["mode"], "open");
    assert_eq!(report["protocol"], "http2");
    // 1,000 requests are due in one second; all of them are sent and counted.
    assert_eq!(u(&report, "requests"), 1000, "{report}");
    assert_eq!(u(&report, "errors"), 0, "{report}");

    // A node that holds none of the keys: every GET is an error of one kind, still
    // counted and timed.
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let empty = slapshot_testkit::TestNode::start(&dir.path().join("empty"), &[]);
    let report = json(&loadgen(&[
        "shards",
        "--target",
        &format!("http://{}", empty.addr),
        "--keys",
        "5",
        "--requests",
        "100",
        "--connections",
        "4",
        "--json",
    ]));
    check_report(&report);
    assert_eq!(u(&report, "errors"), 100, "{report}");
    assert_eq!(report["errors_by_kind"]["status 404"], 100, "{report}");
    assert_eq!(u(&report, "bytes"), 0);

    // Chunk reads through the thin client.
    let fleet_file = fleet.file.to_str().unwrap();
    let report = json(&loadgen(&[
        "chunks",
        "--fleet",
        fleet_file,
        "--chunks",
        "20",
        "--requests",
        "200",
        "--concurrency",
        "4",
        "--json",
    ]));
    check_report(&report);
    assert_eq!(u(&report, "requests"), 200);
    assert_eq!(u(&report, "errors"), 0, "{report}");
    assert_eq!(u(&report, "bytes"), 200 * 512 * 1024);
    let rebuilt = u(&report, "rebuilt_from_parity");
    assert!(rebuilt <= 200, "{report}");

    // The same, open loop: 200 reads due at 400 a second.
    let report = json(&loadgen(&[
        "chunks",
        "--fleet",
        fleet_file,
        "--chunks",
        "20",
        "--requests",
        "200",
        "--rate",
        "400",
        "--json",
    ]));
    check_report(&report);
    assert_eq!(report["mode"], "open");
    assert_eq!(u(&report, "requests"), 200);
    assert_eq!(u(&report, "errors"), 0, "{report}");
    let seconds = report["seconds"].as_f64().unwrap();
    assert!(
        seconds >= 0.49,
        "200 reads at 400/s take half a second: {seconds}"
    );
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A plot was written as SVG and PNG, and is not empty.
fn check_plot(out: &Path, stem: &str) {
    for ext in ["svg", "png"] {
        let path = out.join(format!("{stem}.{ext}"));
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(len > 1000, "{} has {len} bytes", path.display());
    }
    let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// Quantiles present (or "miss") are in order, and reads = hits + misses is at least the
/// misses.
fn check_quantiles(q: &Value) {
    let reads = u(q, "reads");
    assert!(reads > 0 && u(q, "misses") <= reads, "{q}");
    let present: Vec<u64> = ["p50_us", "p90_us", "p99_us", "p999_us"]
        .iter()
        .map_while(|k| q[k].as_u64())
        .collect();
    assert!(present.windows(2).all(|w| w[0] <= w[1]), "{q}");
}

#[test]
fn experiments_write_their_tables_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let server = slapshot_testkit::server_binary();
    let server = server.to_str().unwrap();

    let out = dir.path().join("tail");
    let output = loadgen(&[
        "experiment",
        "tail",
        "--out",
        out.to_str().unwrap(),
        "--server-bin",
        server,
        "--chunks",
        "20",
        "--reads",
        "200",
        "--rounds",
        "2",
        "--slow-fraction",
        "0.5",
        "--slow-delay",
        "fixed:200ms",
        "--rate",
        "1000",
    ]);
    let table = String::from_utf8(output.stdout).unwrap();
    assert_eq!(table, std::fs::read_to_string(out.join("tail.md")).unwrap());
    let tail = read_json(&out.join("tail.json"));
    for scenario in ["a-no-fault", "b-one-slow-node", "c-one-dead-node"] {
        for scheme in [
            "4-of-5 late binding",
            "4-of-4 (no redundancy)",
            "single copy",
            "hedged 4-of-5",
            "4-of-5 (thin client)",
        ] {
            let q = &tail[scenario][scheme];
            check_quantiles(q);
            assert_eq!(
                u(q, "reads"),
                200,
                "every scheme counts each read once, over all blocks: {q}"
            );
            assert!(table.contains(&format!("| {scenario} | {scheme} |")));
        }
        check_plot(&out, &format!("tail-{scenario}"));
        // Late binding (and the thin client) read every chunk even with a node dead.
        assert_eq!(u(&tail[scenario]["4-of-5 late binding"], "misses"), 0);
        assert_eq!(u(&tail[scenario]["4-of-5 (thin client)"], "misses"), 0);
    }
    // The slow node shows: half its answers take 200 ms, and 4-of-4 waits for it in 4
    // reads of 5, so its p90 and p99 are delayed ones (a no-op injector fails this).
    let slow = &tail["b-one-slow-node"]["4-of-4 (no redundancy)"];
    for q in ["p90_us", "p99_us"] {
        assert!(slow[q].as_u64().is_some_and(|v| v >= 190_000), "{slow}");
    }
    // The fault is off in both no-fault blocks, which alternate with the slow ones: were
    // it left on in one of them, 4-of-4 would wait 200 ms in about 20% of (a)'s reads, and
    // its p90 with them. (It takes a stall of the whole machine of over 100 ms to move
    // 10% of the reads past 100 ms without the fault.)
    let fault_free = &tail["a-no-fault"]["4-of-4 (no redundancy)"];
    assert!(
        fault_free["p90_us"].as_u64().is_some_and(|v| v < 100_000),
        "{fault_free}"
    );
    let blocks = tail["late_binding_p99_us_by_block"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    for block in blocks {
        for scenario in ["a-no-fault", "b-one-slow-node"] {
            assert!(block[scenario].as_u64().is_some(), "{block}");
        }
    }
    // With one node of five dead, 4-of-4 cannot read the chunks with a shard there.
    assert!(u(&tail["c-one-dead-node"]["4-of-4 (no redundancy)"], "misses") > 0);

    for fault in ["kill", "stop"] {
        let out = dir.path().join(format!("failover-{fault}"));
        loadgen(&[
            "experiment",
            "failover",
            "--out",
            out.to_str().unwrap(),
            "--server-bin",
            server,
            "--chunks",
            "20",
            "--phase",
            "500ms",
            "--rate",
            "200",
            "--fault",
            fault,
        ]);
        let failover = read_json(&out.join("failover.json"));
        let phases = failover["phases"].as_array().unwrap();
        // A baseline, then each of the five nodes down and back.
        assert_eq!(phases.len(), 11, "{failover}");
        let mut errors = 0;
        for phase in phases {
            assert_eq!(
                u(phase, "requests"),
                u(phase, "successes") + u(phase, "errors"),
                "{phase}"
            );
            errors += u(phase, "errors");
            let rate = phase["hit_rate"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&rate), "{phase}");
        }
        assert_eq!(errors, u(&failover, "errors"));
        assert_eq!(
            errors, 0,
            "no read fails while one node is down: {failover}"
        );
        check_plot(&out, "failover-hit-rate");
        check_plot(&out, "failover-reads");
        assert_eq!(
            failover["marks"].as_array().unwrap().len(),
            10,
            "{failover}"
        );
    }

    let out = dir.path().join("tiers");
    loadgen(&[
        "experiment",
        "tiers",
        "--out",
        out.to_str().unwrap(),
        "--server-bin",
        server,
        "--images",
        "4",
        "--image-size",
        "2MiB",
        "--base-size",
        "4MiB",
        "--workers",
        "2",
        "--starts",
        "30",
        "--start-fraction",
        "0.5",
        "--worker-memory",
        "1MiB",
        "--worker-disk",
        "4MiB",
    ]);
    let tiers = read_json(&out.join("tiers.json"));
    assert_eq!(u(&tiers, "failed_loads"), 0, "{tiers}");
    let shares: f64 = ["memory", "disk", "fleet", "origin"]
        .iter()
        .map(|t| tiers["tiers"][t]["share"].as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-9, "{tiers}");
    // Every chunk came from the origin once at least (the fleet starts empty), and
    // small worker caches force reads past memory.
    for tier in ["origin", "disk", "fleet"] {
        assert!(u(&tiers["tiers"][tier], "loads") > 0, "{tier}: {tiers}");
    }
}
