//! Command-line flags and the optional TOML file, resolved into one `ServerConfig`.
//!
//! Every option can come from a flag or from the file given with `--config` (same names,
//! without the dashes); a flag wins over the file, the file over the default.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;
use slapshot_core::{ByteSize, HumanDuration};

use crate::store::{
    Durability, StoreConfig,
    device::{DeviceOptions, DirectIo, StoreTarget},
};

const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
const DEFAULT_DATA_DIR_CAPACITY: ByteSize = ByteSize(1 << 30);
/// Regions of tens of MiB amortise the region header and the eviction bookkeeping while
/// keeping the unit of eviction a small fraction of any realistic device.
const DEFAULT_REGION_SIZE: ByteSize = ByteSize(16 << 20);
const DEFAULT_MAX_SHARD: ByteSize = ByteSize(4 << 20);
/// Room for 256 bodies of the largest default shard (4 MiB) at once, or 8,000 shards of a
/// 4-of-5 coded 512 KiB chunk; a node receives a few hundred at a time under full load.
const DEFAULT_BODY_MEMORY: ByteSize = ByteSize(1 << 30);
/// 64 KiB/s: a 4 MiB shard then may take a minute past the grace period, far slower
/// than any healthy client in a data centre, yet a trickle of a byte a second is cut.
const DEFAULT_MIN_BODY_RATE: ByteSize = ByteSize(64 << 10);
/// The index checkpoint's name inside `--data-dir`.
const CHECKPOINT_FILE_NAME: &str = "index.ckpt";
/// The memory tier defaults to 10% of flash, the ratio the paper's AZ cache runs with.
pub const DEFAULT_MEMORY_PERCENT: u64 = 10;

#[derive(Debug, Default, Parser, Deserialize)]
#[command(
    name = "slapshot-server",
    version,
    about = "slapshot cache node: stores erasure-coded shards on flash and serves them over HTTP",
    long_about = "slapshot cache node: stores erasure-coded shards on flash and serves them over HTTP.\n\n\
        API: PUT, GET, HEAD and DELETE /v1/shards/{key}; GET /health; GET /metrics (Prometheus).\n\
        One runtime thread per core, each with its own SO_REUSEPORT listener and its own\n\
        open flash region; shards are written and read with O_DIRECT through io_uring.\n\n\
        Every option may also be set in a TOML file given with --config, using the flag's\n\
        name without the leading dashes (for example: capacity = \"8GiB\"). Flags win.",
    after_help = "Example: slapshot-server --data-dir /var/lib/slapshot --capacity 64GiB --listen 0.0.0.0:7070 --token-file /etc/slapshot/token"
)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// TOML file with any of the options below.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:7070]. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Runtime threads, one per core, each with its own listener [default: all cores].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Directory holding the preallocated store file.
    #[arg(long, value_name = "DIR", conflicts_with = "device")]
    pub data_dir: Option<PathBuf>,

    /// Raw block device used as the store (all of it unless --capacity is given).
    #[arg(long, value_name = "PATH")]
    pub device: Option<PathBuf>,

    /// Flash to use, e.g. 512MiB or 8GiB [default with --data-dir: 1GiB].
    #[arg(long, value_name = "BYTES")]
    pub capacity: Option<ByteSize>,

    /// Memory tier for hot shards; 0 disables it [default: 10% of capacity].
    #[arg(long, value_name = "BYTES")]
    pub memory: Option<ByteSize>,

    /// Flash region size, the unit of allocation and eviction [default: 16MiB].
    #[arg(long, value_name = "BYTES")]
    pub region_size: Option<ByteSize>,

    /// Largest shard a PUT may carry; larger bodies get 413 [default: 4MiB].
    #[arg(long, value_name = "BYTES")]
    pub max_shard_size: Option<ByteSize>,

    /// Bypass the page cache with O_DIRECT: auto falls back to buffered I/O where the
    /// filesystem cannot do it [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub direct_io: Option<DirectIo>,

    /// Reads since a shard was written that earn it a rewrite instead of eviction when its
    /// region is reclaimed; 0 makes eviction plain FIFO [default: 1].
    #[arg(long, value_name = "N")]
    pub reinsert_hits: Option<u8>,

    /// Erase an existing store whose capacity or region size differ, instead of refusing
    /// to start.
    #[arg(long)]
    pub reformat: bool,

    /// Where a clean shutdown writes the index checkpoint that makes the next start fast
    /// [default: index.ckpt in --data-dir; none with --device].
    #[arg(long, value_name = "FILE")]
    pub checkpoint_file: Option<PathBuf>,

    /// When a PUT or DELETE is acknowledged: group (after a group-committed fdatasync
    /// shared by the writes that completed before it), dsync (every write is an O_DSYNC
    /// write, FUA where the device has it), or none (a pure cache: acknowledged once the
    /// device accepted the write, lost on power failure) [default: group].
    #[arg(long, value_enum, value_name = "MODE")]
    pub durability: Option<Durability>,

    /// File holding a bearer token; PUT and DELETE then need "Authorization: Bearer TOKEN".
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Require the token for GET and HEAD too.
    #[arg(long)]
    pub auth_reads: bool,

    /// Enable the fault injector for experiments: /admin/faults then sets delays, errors
    /// and stalls on shard requests. Off by default; never on a production node.
    #[arg(long)]
    pub fault_injection: bool,
    /// Serve PUT and DELETE without a token on an address other than loopback. Without
    /// it, a node listening beyond loopback refuses to start unless --token-file is given
    /// (like Redis's protected mode).
    #[arg(long, conflicts_with = "token_file")]
    pub no_auth: bool,

    /// Open connections beyond which new ones get 503 and are closed [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Memory all request bodies in flight may take together: PUT buffers, grown read
    /// buffers, and each HTTP/2 connection's 1 MiB receive window (HTTP/2 windows together
    /// take at most half, so under 2MiB no HTTP/2 connection is accepted). A request that
    /// does not fit gets 503 and its connection is closed [default: 1GiB].
    #[arg(long, value_name = "BYTES")]
    pub max_body_memory: Option<ByteSize>,

    /// Bytes per second a request body must average once it has been arriving for
    /// --header-timeout; slower uploads are cut. 0 turns the check off [default: 64KiB].
    #[arg(long, value_name = "BYTES")]
    pub min_body_rate: Option<ByteSize>,

    /// Time a client may take to send a request's headers once it started [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub header_timeout: Option<HumanDuration>,

    /// Time a keep-alive connection may sit idle between requests [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<HumanDuration>,

    /// Time a request may go without reading or writing a byte [default: 30s].
    #[arg(long, value_name = "DURATION")]
    pub io_timeout: Option<HumanDuration>,

    /// After SIGTERM, keep serving with /health at 503 for this long before closing the
    /// listeners, so that clients and balancers notice [default: 0s].
    #[arg(long, value_name = "DURATION")]
    pub drain_grace: Option<HumanDuration>,

    /// After the listeners close, time allowed for in-flight requests [default: 30s].
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<HumanDuration>,

    /// Write the listening address (host:port) to this file once the node serves.
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,

    /// HTTP/1.1 engine: native (io_uring sockets, zero-copy GETs from memory) or hyper.
    /// HTTP/2 is always served by hyper [default: native].
    #[arg(long, value_enum, value_name = "ENGINE")]
    pub http1: Option<Http1Engine>,

    /// Copy reply bodies into sockets instead of splicing shards' pages into them (the
    /// native engine splices large GET bodies served from mmapped buffers by default).
    #[arg(long)]
    pub no_zero_copy: bool,

    /// Pin each runtime thread to its own CPU: auto pins when --threads equals the number
    /// of CPUs (a dedicated machine), and not when nodes share a host [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub pin_threads: Option<PinThreads>,

    /// Log filter, e.g. "info" or "slapshot_server=debug" [default: info, or RUST_LOG].
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

impl Options {
    /// Fills every option not given on the command line from `file`.
    fn or(self, file: Options) -> Options {
        Options {
            config: self.config,
            listen: self.listen.or(file.listen),
            threads: self.threads.or(file.threads),
            data_dir: self.data_dir.or(file.data_dir),
            device: self.device.or(file.device),
            capacity: self.capacity.or(file.capacity),
            memory: self.memory.or(file.memory),
            region_size: self.region_size.or(file.region_size),
            max_shard_size: self.max_shard_size.or(file.max_shard_size),
            direct_io: self.direct_io.or(file.direct_io),
            reinsert_hits: self.reinsert_hits.or(file.reinsert_hits),
            reformat: self.reformat || file.reformat,
            checkpoint_file: self.checkpoint_file.or(file.checkpoint_file),
            durability: self.durability.or(file.durability),
            token_file: self.token_file.or(file.token_file),
            auth_reads: self.auth_reads || file.auth_reads,
            fault_injection: self.fault_injection || file.fault_injection,
            no_auth: self.no_auth || file.no_auth,
            max_connections: self.max_connections.or(file.max_connections),
            max_body_memory: self.max_body_memory.or(file.max_body_memory),
            min_body_rate: self.min_body_rate.or(file.min_body_rate),
            header_timeout: self.header_timeout.or(file.header_timeout),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            io_timeout: self.io_timeout.or(file.io_timeout),
            drain_grace: self.drain_grace.or(file.drain_grace),
            shutdown_timeout: self.shutdown_timeout.or(file.shutdown_timeout),
            addr_file: self.addr_file.or(file.addr_file),
            pin_threads: self.pin_threads.or(file.pin_threads),
            http1: self.http1.or(file.http1),
            no_zero_copy: self.no_zero_copy || file.no_zero_copy,
            log: self.log.or(file.log),
        }
    }
}

/// Whether runtime threads are pinned to CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinThreads {
    #[default]
    Auto,
    On,
    Off,
}

impl PinThreads {
    pub fn resolve(self, threads: usize) -> bool {
        match self {
            PinThreads::On => true,
            PinThreads::Off => false,
            PinThreads::Auto => {
                std::thread::available_parallelism().is_ok_and(|cpus| cpus.get() == threads)
            }
        }
    }
}

/// Which code serves HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http1Engine {
    #[default]
    Native,
    Hyper,
}

/// HTTP behaviour of the node.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub http1: Http1Engine,
    /// Splice large GET bodies from spliceable buffers instead of copying them.
    pub zero_copy: bool,
    pub max_connections: usize,
    /// See `budget`.
    pub max_body_memory: u64,
    /// Bytes per second; 0 for no minimum.
    pub min_body_rate: u64,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub io_timeout: Duration,
    pub token: Option<String>,
    pub auth_reads: bool,
    /// `/admin/faults` is served (see `faults`).
    pub fault_injection: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub store: StoreConfig,
    pub http: HttpConfig,
    pub drain_grace: Duration,
    pub shutdown_timeout: Duration,
    pub addr_file: Option<PathBuf>,
    pub pin_threads: PinThreads,
    pub log: Option<String>,
}

impl ServerConfig {
    /// Reads the config file (if any) and applies defaults.
    pub fn resolve(flags: Options) -> anyhow::Result<Self> {
        let options = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                let file: Options = toml::from_str(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?;
                flags.or(file)
            }
            None => flags,
        };

        let target = match (options.data_dir, options.device) {
            (Some(dir), None) => StoreTarget::DataDir(dir),
            (None, Some(device)) => StoreTarget::Device(device),
            (Some(_), Some(_)) => bail!("give either --data-dir or --device, not both"),
            (None, None) => bail!("where should shards live? give --data-dir DIR or --device PATH"),
        };
        let capacity = match (&target, options.capacity) {
            (_, Some(c)) => Some(c.bytes()),
            (StoreTarget::DataDir(_), None) => Some(DEFAULT_DATA_DIR_CAPACITY.bytes()),
            (StoreTarget::Device(_), None) => None,
        };
        let threads = match options.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        // For a raw device without --capacity the memory default is taken from the
        // device size once it is known; 10% of a guess would be wrong.
        let memory = options
            .memory
            .map(ByteSize::bytes)
            .or_else(|| capacity.map(|c| c / 100 * DEFAULT_MEMORY_PERCENT));
        let token = match &options.token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read token file {}", path.display()))?;
                let token = token.trim().to_owned();
                if token.is_empty() {
                    bail!("token file {} is empty", path.display());
                }
                Some(token)
            }
            None => None,
        };
        if options.auth_reads && token.is_none() {
            bail!("--auth-reads needs --token-file");
        }
        let listen = options
            .listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"));
        if options.no_auth && token.is_some() {
            bail!("give either --token-file or --no-auth, not both");
        }
        // Protected by default: anyone who can reach a node that takes writes without a
        // token can delete its shards or fill it with garbage.
        if !listen.ip().is_loopback() && token.is_none() && !options.no_auth {
            bail!(
                "refusing to listen on {listen} without a token: anyone who can reach it could \
                 write and delete shards; give --token-file FILE, or --no-auth if that is meant"
            );
        }

        let checkpoint = match (&options.checkpoint_file, &target) {
            (Some(path), _) => Some(path.clone()),
            (None, StoreTarget::DataDir(dir)) => Some(dir.join(CHECKPOINT_FILE_NAME)),
            (None, StoreTarget::Device(_)) => None,
        };
        let duration = |d: Option<HumanDuration>, default: u64| {
            d.map_or(Duration::from_secs(default), |d| d.0)
        };
        Ok(Self {
            listen,
            threads,
            store: StoreConfig {
                device: DeviceOptions {
                    target,
                    capacity,
                    region_size: options.region_size.unwrap_or(DEFAULT_REGION_SIZE).bytes(),
                    direct_io: options.direct_io.unwrap_or_default(),
                    reformat: options.reformat,
                    durability: options.durability.unwrap_or_default(),
                },
                memory_bytes: memory,
                max_shard_size: options.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD).bytes(),
                reinsert_hits: options.reinsert_hits.unwrap_or(1),
                threads,
                checkpoint,
            },
            http: HttpConfig {
                http1: options.http1.unwrap_or_default(),
                zero_copy: !options.no_zero_copy,
                max_connections: options.max_connections.unwrap_or(10_000),
                max_body_memory: options
                    .max_body_memory
                    .unwrap_or(DEFAULT_BODY_MEMORY)
                    .bytes(),
                min_body_rate: options
                    .min_body_rate
                    .unwrap_or(DEFAULT_MIN_BODY_RATE)
                    .bytes(),
                header_timeout: duration(options.header_timeout, 10),
                idle_timeout: duration(options.idle_timeout, 60),
                io_timeout: duration(options.io_timeout, 30),
                token,
                auth_reads: options.auth_reads,
                fault_injection: options.fault_injection,
            },
            drain_grace: duration(options.drain_grace, 0),
            shutdown_timeout: duration(options.shutdown_timeout, 30),
            addr_file: options.addr_file,
            pin_threads: options.pin_threads.unwrap_or_default(),
            log: options.log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let mut argv = vec!["slapshot-server"];
        argv.extend_from_slice(args);
        ServerConfig::resolve(Options::try_parse_from(argv)?)
    }

    #[test]
    fn defaults_follow_the_documentation() {
        let config = parse(&["--data-dir", "/tmp/x"]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:7070".parse().unwrap());
        assert_eq!(config.store.device.capacity, Some(1 << 30));
        assert_eq!(config.store.memory_bytes, Some((1 << 30) / 100 * 10));
        assert_eq!(config.store.max_shard_size, 4 << 20);
        assert_eq!(config.http.header_timeout, Duration::from_secs(10));
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "data-dir = \"/srv\"\ncapacity = \"8GiB\"\nthreads = 3\nidle-timeout = \"5s\"\n",
        )
        .unwrap();
        let config = parse(&["--config", path.to_str().unwrap(), "--threads", "2"]).unwrap();
        assert_eq!(config.threads, 2);
        assert_eq!(config.store.device.capacity, Some(8 << 30));
        assert_eq!(
            config.store.device.target,
            StoreTarget::DataDir("/srv".into())
        );
        assert_eq!(config.http.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "data-dir = \"/srv\"\ncapacty = \"8GiB\"\n").unwrap();
        let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(format!("{err:#}").contains("capacty"), "{err:#}");
    }

    #[test]
    fn beyond_loopback_a_token_or_no_auth_is_required() {
        let err = parse(&["--data-dir", "/x", "--listen", "0.0.0.0:7070"]).unwrap_err();
        assert!(format!("{err:#}").contains("--no-auth"), "{err:#}");
        let err = parse(&["--data-dir", "/x", "--listen", "10.1.2.3:7070"]).unwrap_err();
        assert!(format!("{err:#}").contains("--token-file"), "{err:#}");
        assert!(parse(&["--data-dir", "/x", "--listen", "0.0.0.0:7070", "--no-auth"]).is_ok());
        assert!(parse(&["--data-dir", "/x", "--listen", "[::1]:7070"]).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "secret\n").unwrap();
        let config = parse(&[
            "--data-dir",
            "/x",
            "--listen",
            "0.0.0.0:7070",
            "--token-file",
            token.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(config.http.token.as_deref(), Some("secret"));
    }

    #[test]
    fn a_store_location_is_required() {
        let err = parse(&[]).unwrap_err();
        assert!(err.to_string().contains("--data-dir"));
    }
}
