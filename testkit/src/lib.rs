//! Test support shared by the workspace's end-to-end tests: start the real
//! `slapshot-server` binary on a loopback port, talk HTTP/1.1 to it over plain sockets (so
//! that tests can also send broken requests), and make deterministic test data.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The `slapshot-server` binary to test: `$SLAPSHOT_SERVER_BIN` if set, else the one in
/// the same target directory as the running test. `cargo test --workspace` builds it
/// before any test runs; when it is missing (a single package's tests), it is built here.
pub fn server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| locate_binary("slapshot-server", "slapshot-server", "SLAPSHOT_SERVER_BIN"))
        .clone()
}

/// The `slapshot` command-line binary, found like `server_binary` (`$SLAPSHOT_BIN`
/// overrides).
pub fn slapshot_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| locate_binary("slapshot", "slapshot", "SLAPSHOT_BIN"))
        .clone()
}

/// A port for a test node, outside Linux's default ephemeral range (32768-60999).
///
/// Nodes restart on the port they had, as real nodes do, and listen with SO_REUSEPORT. A
/// port handed out by the kernel for port 0 could meanwhile have gone to another test's
/// node, and the two would then share connections; a port from below that range is never
/// handed out for port 0. A bind without SO_REUSEPORT checks that nobody listens there.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test processes that run at once start at different places.
    let start = (std::process::id() % 400) * 30;
    for _ in 0..COUNT {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + COUNT);
}

/// Finds a workspace binary next to the running test executable (target/PROFILE/deps/..),
/// building its package with cargo if it is not there.
pub fn locate_binary(name: &str, package: &str, env_override: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_override) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/PROFILE/deps/TEST");
    let binary = profile_dir.join(name);
    if !binary.exists() {
        let release = profile_dir.file_name().is_some_and(|p| p == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", package]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success() && binary.exists(),
            "cannot build {name} ({})",
            binary.display()
        );
    }
    binary
}

/// A running node with its data and log under one directory.
pub struct TestNode {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl TestNode {
    /// Starts a node storing under `dir/data` (unless `extra` names a `--device`), with
    /// `extra` flags added.
    pub fn start(dir: &Path, extra: &[&str]) -> TestNode {
        Self::start_with_env(dir, extra, &[])
    }

    /// Like `start`, with environment variables for the node (for example the server's
    /// test hooks, `SLAPSHOT_TEST_HOOKS`). Restarts keep them unless `set_env` changes them.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> TestNode {
        let mut args: Vec<String> = Vec::new();
        if !extra.contains(&"--listen") {
            args.extend(["--listen".into(), format!("127.0.0.1:{}", free_port())]);
        }
        if !extra.contains(&"--threads") {
            args.extend(["--threads".into(), "2".into()]);
        }
        if !extra.contains(&"--device") {
            args.extend(["--data-dir".into(), dir.join("data").display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node = TestNode {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_owned(),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        node.launch();
        node
    }

    fn launch(&mut self) {
        let addr_file = self.dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = Command::new(server_binary())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--addr-file")
            .arg(&addr_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start slapshot-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && let Ok(addr) = text.trim().parse()
            {
                self.addr = addr;
                // A restart listens on the same port, as a real node would.
                if let Some(listen) = self.args.iter().position(|a| a == "--listen") {
                    self.args[listen + 1] = addr.to_string();
                }
                self.wait_until_serving(deadline);
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "slapshot-server exited with {status} during start-up:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "slapshot-server did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks `/health` on fresh connections until one answers. A node writes its address
    /// file once it accepts; twice in CI (with other builds loading the machine) the first
    /// request after a restart met a closed connection. Tests should not trip on that, but
    /// it is reported here, with the node's log, rather than hidden.
    fn wait_until_serving(&self, deadline: Instant) {
        for attempt in 1.. {
            let answered = TcpStream::connect(self.addr).ok().and_then(|stream| {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .ok()?;
                let mut client = Client {
                    reader: BufReader::new(stream),
                    addr: self.addr,
                };
                let head = "GET /health HTTP/1.1\r\nhost: test\r\n\r\n";
                client.reader.get_mut().write_all(head.as_bytes()).ok()?;
                client.read_response(false)
            });
            if answered.is_some() {
                if attempt > 1 {
                    eprintln!(
                        "testkit: node at {} answered only on attempt {attempt}; its log:\n{}",
                        self.addr,
                        self.log()
                    );
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slapshot-server at {} does not answer /health:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(60))
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "slapshot-server did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGSTOP: the node keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Sends SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Replaces the environment variables given to the node at its next (re)start.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Starts the node again with the same flags and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the node first");
        self.launch();
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Current value of a metric line (name plus labels, exactly as exposed).
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.client().get("/metrics").text();
        text.lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 client on one connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    pub addr: SocketAddr,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            reader: BufReader::new(stream),
            addr,
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if method == "PUT" || !body.is_empty() {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        // A server may answer (413, 401) and close before reading the whole body; the
        // answer is still there to read.
        let written = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body));
        match self.read_response(method == "HEAD") {
            Some(response) => response,
            None => panic!("no response to {method} {path} (write: {written:?})"),
        }
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, &[], &[])
    }

    pub fn put(&mut self, path: &str, body: &[u8]) -> Response {
        self.request("PUT", path, &[], body)
    }

    /// Reads one response; `None` if the server closed the connection first.
    pub fn read_response(&mut self, head_only: bool) -> Option<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).ok()?;
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            let (name, value) = trimmed.split_once(':')?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if !head_only {
            let len: usize = response
                .header("content-length")
                .map_or(0, |v| v.parse().unwrap());
            response.body = vec![0; len];
            self.reader.read_exact(&mut response.body).ok()?;
        }
        Some(response)
    }
}

/// Deterministic pseudo-random bytes (splitmix64), so failures can be reproduced.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}
