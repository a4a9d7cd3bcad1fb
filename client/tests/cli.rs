//! The `slapshot` command line: a fleet brought up with `fleet up`, used with `chunk put`,
//! `chunk get` and `fleet status`, and stopped with SIGTERM.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// The `slapshot` binary (built by `cargo test --workspace`, or here if missing).
fn slapshot_bin() -> std::path::PathBuf {
    slapshot_testkit::slapshot_binary()
}

fn slapshot(args: &[&str]) -> Output {
    Command::new(slapshot_bin()).args(args).output().unwrap()
}

fn wait_for(path: &Path, up: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Some(status) = up.try_wait().unwrap() {
            panic!("slapshot fleet up exited with {status}");
        }
        assert!(Instant::now() < deadline, "the fleet did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fleet_up_serves_chunks_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let fleet_dir = dir.path().join("fleet");
    let up = Command::new(slapshot_bin())
        .args([
            "fleet",
            "up",
            "--nodes",
            "5",
            "--capacity",
            "128MiB",
            "--server-arg=--region-size=8MiB",
            // Relative to the current directory, as every --origin is.
            "--origin",
            "my-origin",
            "--dir",
        ])
        .arg(&fleet_dir)
        .current_dir(dir.path())
        .env("SLAPSHOT_SERVER_BIN", slapshot_testkit::server_binary())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // A failed assertion must not leave the fleet running (it would hold the test
    // harness's output open, and its nodes would outlive the run).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = KillOnDrop(up);
    let up = &mut guard.0;
    let fleet_file = fleet_dir.join("fleet.toml");
    wait_for(&fleet_file, up);
    let fleet = fleet_file.to_str().unwrap();
    // Recorded absolute: the files' readers resolve relative paths from the files' directory.
    let origin = dir.path().join("my-origin");
    for file in ["fleet.toml", "slapshot.toml"] {
        let text = std::fs::read_to_string(fleet_dir.join(file)).unwrap();
        assert!(
            text.contains(&format!("origin = \"{}\"", origin.display())),
            "{file}: {text}"
        );
    }

    let data = slapshot_testkit::Rng::new(51).bytes(512 * 1024);
    let file = dir.path().join("chunk");
    std::fs::write(&file, &data).unwrap();
    let put = slapshot(&["chunk", "put", "--fleet", fleet, file.to_str().unwrap()]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let name = String::from_utf8(put.stdout).unwrap().trim().to_owned();
    assert_eq!(name, slapshot_core::ChunkName::of(&data).to_hex());

    let get = slapshot(&["chunk", "get", "--fleet", fleet, &name]);
    assert!(get.status.success());
    assert!(get.stdout == data);
    let out = dir.path().join("out");
    assert!(
        slapshot(&[
            "chunk",
            "get",
            "--fleet",
            fleet,
            &name,
            "-o",
            out.to_str().unwrap()
        ])
        .status
        .success()
    );
    assert!(std::fs::read(&out).unwrap() == data);

    // Settings from flags override the fleet file; client metrics on request.
    let hedged = slapshot(&[
        "chunk",
        "get",
        "--fleet",
        fleet,
        &name,
        "--read-mode",
        "hedged",
        "--hedge-delay",
        "1s",
        "--metrics",
    ]);
    assert!(hedged.status.success());
    assert!(hedged.stdout == data);
    let metrics = String::from_utf8_lossy(&hedged.stderr);
    assert!(
        metrics.contains("slapshot_client_chunk_reads_total{outcome=\"fleet_hit\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("slapshot_client_hedges_sent_total 0"),
        "{metrics}"
    );
    let bad_mode = slapshot(&[
        "chunk",
        "get",
        "--fleet",
        fleet,
        &name,
        "--read-mode",
        "sometimes",
    ]);
    assert!(String::from_utf8_lossy(&bad_mode.stderr).contains("--read-mode is all or hedged"));

    // Several chunks in one process: to a directory, concurrently, with a latency summary;
    // to stdout in the order named.
    let mut names = vec![name.clone()];
    for seed in 52..55 {
        let data = slapshot_testkit::Rng::new(seed).bytes(100_000 + seed as usize);
        let file = dir.path().join(format!("chunk-{seed}"));
        std::fs::write(&file, &data).unwrap();
        let put = slapshot(&["chunk", "put", "--fleet", fleet, file.to_str().unwrap()]);
        assert!(put.status.success());
        names.push(String::from_utf8(put.stdout).unwrap().trim().to_owned());
    }
    let out_dir = dir.path().join("chunks");
    let mut args = vec![
        "chunk",
        "get",
        "--fleet",
        fleet,
        "--metrics",
        "--concurrency",
        "3",
    ];
    args.extend(names.iter().map(String::as_str));
    args.extend(["--out-dir", out_dir.to_str().unwrap()]);
    let many = slapshot(&args);
    let stderr = String::from_utf8_lossy(&many.stderr);
    assert!(many.status.success(), "{stderr}");
    assert!(many.stdout.is_empty());
    for name in &names {
        let bytes = std::fs::read(out_dir.join(name)).unwrap();
        assert_eq!(slapshot_core::ChunkName::of(&bytes).to_hex(), *name);
    }
    assert!(stderr.contains("chunk reads: 4 in"), "{stderr}");
    assert!(stderr.contains("read latency ms: p50"), "{stderr}");
    assert!(
        stderr.contains("slapshot_client_chunk_reads_total{outcome=\"fleet_hit\"} 4"),
        "{stderr}"
    );
    let both = slapshot(&["chunk", "get", "--fleet", fleet, &names[2], &names[1]]);
    assert!(both.status.success());
    let expected = [
        std::fs::read(out_dir.join(&names[2])).unwrap(),
        std::fs::read(out_dir.join(&names[1])).unwrap(),
    ]
    .concat();
    assert!(
        both.stdout == expected,
        "stdout holds the chunks in the order named"
    );
    let one_file = slapshot(&[
        "chunk", "get", "--fleet", fleet, &names[1], &names[2], "-o", "x",
    ]);
    assert!(!one_file.status.success());
    assert!(String::from_utf8_lossy(&one_file.stderr).contains("use --out-dir"));
    // A chunk that is nowhere: the others are still written, and the run fails.
    let absent = "0".repeat(64);
    let partial_dir = dir.path().join("partial");
    let partial = slapshot(&[
        "chunk",
        "get",
        "--fleet",
        fleet,
        &names[1],
        &absent,
        &names[3],
        "--out-dir",
        partial_dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&partial.stderr);
    assert!(!partial.status.success());
    assert!(
        stderr.contains("1 of 3 chunks could not be read"),
        "{stderr}"
    );
    assert!(partial_dir.join(&names[1]).exists() && partial_dir.join(&names[3]).exists());
    assert!(!partial_dir.join(&absent).exists());

    let status = slapshot(&["fleet", "status", "--fleet", fleet, "--metrics"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("5 of 5 nodes healthy"), "{text}");
    // --metrics prints the client's own, as for the chunk commands.
    let metrics = String::from_utf8_lossy(&status.stderr);
    assert!(metrics.contains("# TYPE slapshot_client_"), "{metrics}");

    // Bad input gets a clear message and a failing exit status.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![0u8; 512 * 1024 + 1]).unwrap();
    let too_big = slapshot(&["chunk", "put", "--fleet", fleet, big.to_str().unwrap()]);
    assert!(!too_big.status.success());
    assert!(String::from_utf8_lossy(&too_big.stderr).contains("a chunk is at most"));
    let bad_name = slapshot(&["chunk", "get", "--fleet", fleet, "xyz"]);
    assert!(String::from_utf8_lossy(&bad_name.stderr).contains("64 hexadecimal digits"));
    let absent = slapshot(&["chunk", "get", "--fleet", fleet, &"0".repeat(64)]);
    assert!(!absent.status.success());
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("is in neither the fleet nor the origin")
    );

    // SIGTERM stops the fleet cleanly, nodes included.
    let addrs: Vec<String> = (0..5)
        .map(|i| std::fs::read_to_string(fleet_dir.join(format!("node-{i}/addr"))).unwrap())
        .collect();
    assert!(
        Command::new("kill")
            .args(["-TERM", &up.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "fleet up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    for addr in addrs {
        assert!(
            std::net::TcpStream::connect(addr.trim()).is_err(),
            "node at {addr} still listens"
        );
    }
    let after = slapshot(&["fleet", "status", "--fleet", fleet]);
    assert!(!after.status.success(), "status of a stopped fleet fails");
}

/// Warnings to a pipe or a file are plain text: colour codes are for terminals.
#[test]
fn log_lines_off_a_terminal_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("dead.toml");
    // Five nodes on ports nothing listens on any more: every node is marked down, with a
    // warning.
    let closed: Vec<u16> = (0..5)
        .map(|_| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        })
        .collect();
    let nodes: String = closed
        .iter()
        .enumerate()
        .map(|(i, port)| format!("[[nodes]]\nid = \"n{i}\"\naddr = \"127.0.0.1:{port}\"\n"))
        .collect();
    std::fs::write(&fleet, nodes).unwrap();
    let name = "0".repeat(64);
    let output = Command::new(slapshot_bin())
        .args(["chunk", "get", "--log", "warn", "--fleet"])
        .arg(&fleet)
        .arg(&name)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

#[test]
fn fleet_up_refuses_fewer_nodes_than_the_code_needs() {
    let dir = tempfile::tempdir().unwrap();
    let output = slapshot(&[
        "fleet",
        "up",
        "--nodes",
        "3",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs at least 5 nodes"));
}

/// Nodes write out their whole capacity when they format; a fleet that cannot fit says so
/// with the numbers before it starts any node, instead of nodes dying on a full disk (whose
/// logs, on that same disk, may then stay empty).
#[test]
fn fleet_up_refuses_a_capacity_the_disk_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(slapshot_bin())
        .args([
            "fleet",
            "up",
            "--nodes",
            "5",
            "--capacity",
            "4000TiB",
            "--dir",
        ])
        .arg(dir.path())
        .env("SLAPSHOT_SERVER_BIN", slapshot_testkit::server_binary())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("5 nodes of 4000TiB need") && stderr.contains("free"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("node-0").exists(),
        "a node was started: {stderr}"
    );
}

/// The demo runs, and leaves nothing behind in the temporary directory: neither its own
/// files nor those of an earlier demo that was killed. A directory of a live process stays.
#[test]
fn the_demo_runs_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let killed_demo = tmp.path().join(format!("slapshot-demo-{}", gone.id()));
    let live_demo = tmp
        .path()
        .join(format!("slapshot-demo-{}", std::process::id()));
    for dir in [&killed_demo, &live_demo] {
        std::fs::create_dir_all(dir.join("node-0")).unwrap();
        std::fs::write(dir.join("node-0/server.log"), "left behind").unwrap();
    }
    let output = Command::new(slapshot_bin())
        .args(["demo", "--chunks", "--chunk-count", "24"])
        .env("TMPDIR", tmp.path())
        .env("SLAPSHOT_SERVER_BIN", slapshot_testkit::server_binary())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("every chunk read matched its name"),
        "{stdout}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, vec![live_demo]);
}

/// Every cause of an error is printed once: an error that shows its cause in its message
/// does not also return it as its source (which `{:#}` would print again).
#[test]
fn errors_print_each_cause_once() {
    let name = "0".repeat(64);
    let output = slapshot(&["chunk", "get", "--fleet", "/nonexistent.toml", &name]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    assert!(stderr.contains("cannot read /nonexistent.toml"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("fleet.toml");
    std::fs::write(&bad, "data-shards = \"four\"\n").unwrap();
    let output = slapshot(&["chunk", "get", "--fleet", bad.to_str().unwrap(), &name]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("{}: ", bad.display())), "{stderr}");
    assert_eq!(stderr.matches("invalid type").count(), 1, "{stderr}");
    // A settings file is not called a fleet file.
    let settings = dir.path().join("slapshot.toml");
    std::fs::write(&settings, "orign = \"o\"\n").unwrap();
    let output = slapshot(&["images", "--config", settings.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}: ", settings.display())) && stderr.contains("orign"),
        "{stderr}"
    );
    assert!(!stderr.contains("fleet file"), "{stderr}");

    // Flags a command would ignore are refused, not ignored.
    let output = slapshot(&["run", "x", "--files", "1GiB", "--", "true"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("--files is for `slapshot mount`"),
        "{stderr}"
    );
    let output = slapshot(&["fleet", "status", "--fleet", "f.toml", "--origin", "o"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--origin does not apply"));
    let output = slapshot(&["demo", "--concurrency", "4"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--chunks"));

    let origin = dir.path().join("origin");
    let output = slapshot(&[
        "flatten",
        "docker-archive:/nonexistent.tar",
        "--origin",
        origin.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read /nonexistent.tar"), "{stderr}");
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
}
