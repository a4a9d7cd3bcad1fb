//! Reading a running agent's statistics: a Unix socket per mount (what `slapshot stats
//! MOUNTPOINT` reads) and, on request, a Prometheus endpoint over HTTP.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stats::Stats;

/// The stats socket of the agent serving `mountpoint`: named by a hash of the canonical
/// path, in the user's runtime directory.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_owned());
    let hash = blake3::hash(canonical.as_os_str().as_encoded_bytes());
    runtime_dir().join(format!("mount-{}.sock", &hash.to_hex()[..16]))
}

fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("slapshot"),
        // Root gets a directory no other user can create first.
        None if nix::unistd::geteuid().is_root() => PathBuf::from("/run/slapshot"),
        None => std::env::temp_dir().join(format!("slapshot-{}", nix::unistd::geteuid())),
    }
}

/// Creates the socket directory, or checks that an existing one is ours and private: in
/// a shared directory like /tmp, someone else could have made it first.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new()
        .recursive(false)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir.parent().unwrap_or(Path::new("/")))?;
            return std::fs::DirBuilder::new().mode(0o700).create(dir);
        }
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a private directory of this user",
            dir.display()
        )));
    }
    Ok(())
}

/// Serves the stats text to every connection on the mount's socket until dropped.
pub struct StatsSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl StatsSocket {
    pub fn start(mountpoint: &Path, stats: Arc<Stats>) -> std::io::Result<Self> {
        let path = socket_path(mountpoint);
        if let Some(dir) = path.parent() {
            // Owner-only: the statistics say which chunks a program read.
            private_dir(dir)?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let text = stats.render();
                // One short write per connection; a client that does not read is dropped
                // after a second.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream.write_all(text.as_bytes()).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            }
        });
        Ok(Self { path, task })
    }
}

impl Drop for StatsSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the stats text of the agent serving `mountpoint`.
pub fn read_stats(mountpoint: &Path) -> std::io::Result<String> {
    let path = socket_path(mountpoint);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "no slapshot agent serves {} (no socket at {}: {e})",
                mountpoint.display(),
                path.display()
            ),
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// A minimal Prometheus endpoint: any request on the listener gets the stats text. Request
/// heads are read up to 8 KiB within 5 seconds; the endpoint serves nothing else.
pub async fn serve_metrics(listener: tokio::net::TcpListener, stats: Arc<Stats>) {
    // Scrapers come one at a time; a few at once are served, the rest wait in the backlog.
    let permits = Arc::new(tokio::sync::Semaphore::new(8));
    while let Ok((mut stream, _)) = listener.accept().await {
        let stats = stats.clone();
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let mut head = vec![0u8; 8192];
            let mut filled = 0;
            let read_head = async {
                while filled < head.len() {
                    match stream.read(&mut head[filled..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => filled += n,
                    }
                    if head[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                        return true;
                    }
                }
                false
            };
            if !tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .unwrap_or(false)
            {
                return;
            }
            let body = stats.render();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                stream.write_all(response.as_bytes()),
            )
            .await;
        });
    }
}
