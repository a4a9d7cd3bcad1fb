//! `slapshot fleet up` and `slapshot fleet status`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use slapshot_core::{ByteSize, prometheus::find_sample};
use tokio::process::{Child, Command};

use crate::{FleetClient, FleetConfig, config::NodeConfig};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of nodes (at least M, the shards written per chunk).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub nodes: usize,
    /// Directory for the nodes' data and logs (DIR/node-I), the fleet file (DIR/fleet.toml)
    /// and the settings for image commands (DIR/slapshot.toml).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Node I listens on 127.0.0.1:(P + I) [default: free ports chosen by the system].
    #[arg(long, value_name = "P")]
    pub base_port: Option<u16>,
    /// Flash capacity of each node.
    #[arg(long, value_name = "BYTES", default_value = "1GiB")]
    pub capacity: ByteSize,
    /// Memory tier of each node [default: the node's default, 10% of capacity].
    #[arg(long, value_name = "BYTES")]
    pub memory: Option<ByteSize>,
    /// Runtime threads per node.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// k: shards a read needs.
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub data_shards: usize,
    /// M: shards written per chunk.
    #[arg(long, value_name = "M", default_value_t = 5)]
    pub total_shards: usize,
    /// Origin recorded in the fleet file [default: DIR/origin, a local directory].
    #[arg(long, value_name = "LOCATION")]
    pub origin: Option<String>,
    /// The slapshot-server binary [default: next to this binary, then on PATH].
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Extra flags passed to every node, e.g. --server-arg=--region-size=4MiB.
    #[arg(long = "server-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
}

impl UpArgs {
    /// The fleet a demo starts: `local`'s, with nodes of 256 MiB, several times what either
    /// demo stores, so that a demo needs little disk (each node writes out its capacity).
    pub fn demo(dir: PathBuf) -> Self {
        Self {
            capacity: ByteSize::mib(256),
            ..Self::local(dir)
        }
    }

    /// The small local fleet the experiments start: 5 one-thread nodes of 512 MiB under
    /// `dir`, 4-of-5, free ports, the server found as usual.
    pub fn local(dir: PathBuf) -> Self {
        Self {
            nodes: 5,
            dir,
            base_port: None,
            capacity: ByteSize(512 << 20),
            memory: None,
            threads: 1,
            data_shards: 4,
            total_shards: 5,
            origin: None,
            server_bin: None,
            server_args: Vec::new(),
        }
    }
}

/// Writes DIR/slapshot.toml for a local fleet: its nodes, the origin (DIR/origin unless
/// another was given), a tenant key file and a cache directory beside them, so that image
/// commands run with `--config DIR/slapshot.toml` (or from DIR) need no other flag.
fn write_settings(dir: &Path, fleet: &FleetConfig, origin: Option<&str>) -> anyhow::Result<()> {
    let mut fleet = fleet.clone();
    fleet.origin = None;
    fleet.origin_options = Default::default();
    let settings = crate::settings::Settings {
        origin: Some(origin.unwrap_or("origin").to_owned()),
        key_file: Some("tenant.key".into()),
        cache: crate::settings::CacheSettings {
            dir: Some("cache".into()),
            ..Default::default()
        },
        fleet: Some(fleet),
        ..Default::default()
    };
    let path = dir.join(crate::settings::FILE_NAME);
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, settings.to_toml())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How long nodes get to start, and to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

struct RunningNode {
    id: String,
    dir: PathBuf,
    child: Child,
    /// The server and its arguments, to start it again on the same address.
    server: PathBuf,
    args: Vec<String>,
}

impl RunningNode {
    fn spawn(server: &Path, dir: &Path, args: &[String]) -> anyhow::Result<Child> {
        let _ = std::fs::remove_file(dir.join("addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))?;
        let mut command = Command::new(server);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // kill_on_drop covers a fleet dropped in an orderly way; a `fleet up` or an
        // experiment that is itself killed (-9, or a fatal signal) must not leave its nodes
        // running either: the kernel kills them when the thread that started them exits.
        // That is a thread, not the process: a LocalFleet must start and restart nodes from
        // a thread that lives as long as the fleet (the main thread or a runtime worker, as
        // every caller does; never a spawn_blocking thread, which exits when idle).
        let parent = std::process::id();
        // SAFETY: between fork and exec, the closure only calls prctl(2) and getppid(2),
        // which are async-signal-safe, and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
                // The parent may have died before prctl: then nothing will signal us.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    return Err(std::io::Error::other("the fleet's process has exited"));
                }
                Ok(())
            });
        }
        command
            .spawn()
            .with_context(|| format!("cannot start {}", server.display()))
    }

    /// Waits for the node's address file: it is serving.
    async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<String> {
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.join("addr"))
                && !text.trim().is_empty()
            {
                return Ok(text.trim().to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} while starting; its log:\n{}",
                    self.id,
                    log_tail(&self.dir)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start within {START_TIMEOUT:?}; its log:\n{}",
                    self.id,
                    log_tail(&self.dir)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
        }
    }
}

/// Nodes started by this process, and the fleet file describing them.
pub struct LocalFleet {
    nodes: Vec<RunningNode>,
    pub config: FleetConfig,
    pub fleet_file: PathBuf,
}

impl LocalFleet {
    /// Starts the nodes, waits until they serve, and writes DIR/fleet.toml.
    pub async fn start(args: &UpArgs) -> anyhow::Result<LocalFleet> {
        let code = slapshot_core::CodeParams::new(args.data_shards, args.total_shards)?;
        if args.nodes < code.total() {
            bail!(
                "a {}-of-{} code needs at least {} nodes; --nodes is {}",
                code.data(),
                code.total(),
                code.total(),
                args.nodes
            );
        }
        let server = find_server_binary(args.server_bin.as_deref())?;
        std::fs::create_dir_all(&args.dir)
            .with_context(|| format!("cannot create {}", args.dir.display()))?;
        check_free_space(args)?;

        let mut nodes = Vec::with_capacity(args.nodes);
        let configs = match start_nodes(args, &server, &mut nodes).await {
            Ok(configs) => configs,
            Err(e) => {
                stop_nodes(&mut nodes).await;
                return Err(e);
            }
        };
        let mut config = FleetConfig::new(configs);
        config.data_shards = code.data();
        config.total_shards = code.total();
        // A relative --origin means what it means everywhere else, from the current
        // directory; the files record it absolute, since their readers resolve relative
        // paths from the files' own directory.
        let origin = match &args.origin {
            Some(origin) if !origin.contains("://") && Path::new(origin).is_relative() => Some(
                std::path::absolute(origin)
                    .with_context(|| format!("--origin {origin}"))?
                    .display()
                    .to_string(),
            ),
            other => other.clone(),
        };
        config.origin = Some(origin.clone().unwrap_or_else(|| "origin".into()));
        let fleet_file = args.dir.join("fleet.toml");
        let tmp = fleet_file.with_extension("toml.tmp");
        std::fs::write(&tmp, config.to_toml()).and_then(|()| std::fs::rename(&tmp, &fleet_file))?;
        // Read it back so that relative paths (the origin) resolve as any reader's would.
        let config = FleetConfig::load(&fleet_file)?;
        write_settings(&args.dir, &config, origin.as_deref())?;
        Ok(LocalFleet {
            nodes,
            config,
            fleet_file,
        })
    }

    /// kill -9 of one node, as a crash would.
    pub async fn kill_node(&mut self, index: usize) {
        let _ = self.nodes[index].child.kill().await;
    }

    /// Starts a stopped or killed node again, on the same address and data, and waits
    /// until it serves.
    pub async fn restart_node(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        if node.child.try_wait()?.is_none() {
            bail!("{} is still running", node.id);
        }
        node.child = RunningNode::spawn(&node.server, &node.dir, &node.args)?;
        node.wait_ready(Instant::now() + START_TIMEOUT).await?;
        Ok(())
    }

    /// SIGSTOP: the node keeps its sockets and answers nothing (a black hole).
    pub fn pause_node(&self, index: usize) {
        self.nodes[index].signal(Signal::SIGSTOP);
    }

    /// SIGCONT after `pause_node`.
    pub fn resume_node(&self, index: usize) {
        self.nodes[index].signal(Signal::SIGCONT);
    }

    /// The directory a node keeps its data and log in.
    pub fn node_dir(&self, index: usize) -> &Path {
        &self.nodes[index].dir
    }

    /// Stops every node cleanly (SIGTERM, then SIGKILL after a timeout).
    pub async fn stop(&mut self) {
        stop_nodes(&mut self.nodes).await;
    }
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut fleet = LocalFleet::start(&args).await?;
    let config = &fleet.config;
    println!(
        "fleet of {} nodes ({}-of-{}) is up; fleet file: {}",
        config.nodes.len(),
        config.data_shards,
        config.total_shards,
        fleet.fleet_file.display()
    );
    for node in &config.nodes {
        println!("  {}  http://{}", node.id, node.addr);
    }
    println!("press Ctrl-C (or send SIGTERM) to stop the fleet");

    let reason = wait_for_stop(&mut fleet.nodes).await;
    println!("{reason}: stopping the fleet");
    fleet.stop().await;
    println!("fleet stopped");
    Ok(())
}

async fn start_nodes(
    args: &UpArgs,
    server: &Path,
    nodes: &mut Vec<RunningNode>,
) -> anyhow::Result<Vec<NodeConfig>> {
    for i in 0..args.nodes {
        let id = format!("node-{i}");
        let dir = args.dir.join(&id);
        std::fs::create_dir_all(&dir)?;
        let addr_file = dir.join("addr");
        let port = match args.base_port {
            Some(base) => base
                .checked_add(u16::try_from(i)?)
                .ok_or_else(|| anyhow!("--base-port too high for {} nodes", args.nodes))?,
            None => 0,
        };
        let _ = std::fs::remove_file(dir.join("server.log"));
        let mut node_args: Vec<String> = vec![
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--capacity".into(),
            args.capacity.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--threads".into(),
            args.threads.to_string(),
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        if let Some(memory) = args.memory {
            node_args.extend(["--memory".into(), memory.to_string()]);
        }
        node_args.extend(args.server_args.iter().cloned());
        let child = RunningNode::spawn(server, &dir, &node_args)?;
        nodes.push(RunningNode {
            id,
            dir,
            child,
            server: server.to_owned(),
            args: node_args,
        });
    }

    let deadline = Instant::now() + START_TIMEOUT;
    let mut configs = Vec::with_capacity(nodes.len());
    for node in nodes.iter_mut() {
        let addr = node.wait_ready(deadline).await?;
        // A restart listens on the address the node was given.
        if let Some(listen) = node.args.iter().position(|a| a == "--listen") {
            node.args[listen + 1] = addr.clone();
        }
        configs.push(NodeConfig {
            id: node.id.clone(),
            addr,
            weight: 1.0,
        });
    }
    Ok(configs)
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    if log.trim().is_empty() {
        return "(empty: the node could not even report why; a full disk does that)".to_owned();
    }
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Refuses to start nodes whose store files cannot fit on DIR's filesystem.
///
/// Each node reserves and writes out its whole capacity when it formats. On a disk without
/// room that fails, and then the node's own log, on the same full disk, may stay empty: say
/// it here, with the numbers, before starting anything. Space a node's existing store
/// already holds counts as available to it.
fn check_free_space(args: &UpArgs) -> anyhow::Result<()> {
    let stat = nix::sys::statvfs::statvfs(&args.dir)
        .with_context(|| format!("cannot read the free space of {}", args.dir.display()))?;
    let available = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    let needed: u64 = (0..args.nodes)
        .map(|i| {
            let held = allocated_bytes(&args.dir.join(format!("node-{i}")).join("data"));
            args.capacity.bytes().saturating_sub(held)
        })
        .sum();
    if needed > available {
        bail!(
            "{} nodes of {} need {} more on {}, which has {} free; pass a smaller --capacity or another --dir",
            args.nodes,
            args.capacity,
            super::image::human(needed),
            args.dir.display(),
            super::image::human(available)
        );
    }
    Ok(())
}

/// Bytes allocated to the files directly in `dir` (0 if it does not exist).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.blocks() * 512)
        .sum()
}

/// Waits for Ctrl-C, SIGTERM, or a node exiting on its own.
async fn wait_for_stop(nodes: &mut [RunningNode]) -> String {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    let exited = async {
        loop {
            for node in nodes.iter_mut() {
                if let Ok(Some(status)) = node.child.try_wait() {
                    return format!(
                        "{} exited with {status} (log: {})",
                        node.id,
                        node.dir.join("server.log").display()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted".to_owned(),
        _ = sigterm.recv() => "terminated".to_owned(),
        reason = exited => reason,
    }
}

/// SIGTERM to every node, then up to STOP_TIMEOUT for them to drain and exit, then SIGKILL.
async fn stop_nodes(nodes: &mut [RunningNode]) {
    for node in nodes.iter() {
        if let Some(pid) = node.child.id() {
            let pid = Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            // A paused node (SIGSTOP) acts on SIGTERM only once continued.
            let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    for node in nodes.iter_mut() {
        match tokio::time::timeout_at(deadline, node.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("{} did not stop in time; killing it", node.id);
                let _ = node.child.kill().await;
            }
        }
    }
}

/// `--server-bin`, `$SLAPSHOT_SERVER_BIN`, the binary next to this one, or PATH.
fn find_server_binary(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = flag {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os("SLAPSHOT_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("slapshot-server")))
        && sibling.exists()
    {
        return Ok(sibling);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("slapshot-server"))
        .find(|candidate| candidate.exists());
    on_path.ok_or_else(|| anyhow!("cannot find slapshot-server next to this binary or on PATH; build it (cargo build -p slapshot-server) or pass --server-bin"))
}

pub async fn status(fleet: &super::FleetArgs) -> anyhow::Result<()> {
    if fleet.origin.is_some() {
        bail!("fleet status reads no chunks: --origin does not apply to it");
    }
    let config = fleet.load()?;
    let client = FleetClient::with_origin(config, None)?;
    let health = client.get_from_each_node("/health").await;
    let metrics = client.get_from_each_node("/metrics").await;
    println!(
        "{:<10} {:<22} {:<9} {:>8} {:>21} {:>10} {:>10} {:>8} {:>6}",
        "node",
        "address",
        "health",
        "shards",
        "flash used/capacity",
        "mem hits",
        "flash hits",
        "misses",
        "conns"
    );
    let mut healthy = 0;
    for ((id, addr, health), (_, _, metrics)) in health.into_iter().zip(metrics) {
        let state = match &health {
            Ok((200, _)) => {
                healthy += 1;
                "ok".to_owned()
            }
            Ok((503, _)) => "draining".to_owned(),
            Ok((status, _)) => format!("http {status}"),
            Err(e) => format!("down ({e})"),
        };
        let text = metrics.map(|(_, text)| text).unwrap_or_default();
        let value = |series: &str| {
            find_sample(&text, series).map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
        };
        let bytes = |series: &str| {
            find_sample(&text, series)
                .map_or_else(|| "-".to_owned(), |v| ByteSize(v as u64).to_string())
        };
        println!(
            "{:<10} {:<22} {:<9} {:>8} {:>21} {:>10} {:>10} {:>8} {:>6}",
            id,
            addr,
            state,
            value("slapshot_flash_shards"),
            format!(
                "{}/{}",
                bytes("slapshot_flash_bytes_used"),
                bytes("slapshot_flash_capacity_bytes")
            ),
            value("slapshot_cache_hits_total{tier=\"memory\"}"),
            value("slapshot_cache_hits_total{tier=\"flash\"}"),
            value("slapshot_cache_misses_total"),
            value("slapshot_http_connections_open"),
        );
    }
    println!("{healthy} of {} nodes healthy", client.config().nodes.len());
    if fleet.metrics {
        eprint!("{}", client.metrics().render());
    }
    if healthy < client.config().data_shards {
        bail!(
            "fewer healthy nodes than the {} a read needs",
            client.config().data_shards
        );
    }
    Ok(())
}
