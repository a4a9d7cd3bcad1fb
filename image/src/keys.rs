//! Tenant keys: the key a manifest's chunk-key table is encrypted under.
//!
//! A small trait so that a key service can stand in for the default, a local key file.

use std::{
    fmt,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use slapshot_core::chunk::{decode_hex32, encode_hex};

/// A 256-bit tenant key. Debug output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantKey(pub [u8; 32]);

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantKey({})", encode_hex(&self.id()))
    }
}

impl TenantKey {
    /// A public fingerprint of the key, stored in manifests so that a reader with the
    /// wrong key gets a clear error instead of an authentication failure.
    pub fn id(&self) -> [u8; 16] {
        let full = blake3::derive_key("slapshot 2026-11 tenant key id v1", &self.0);
        full[..16].try_into().expect("16 of 32 bytes")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// Where tenant keys come from.
pub trait KeyProvider: Send + Sync {
    /// The key to seal new manifests with, created if the provider can.
    fn sealing_key(&self) -> Result<TenantKey, KeyError>;
    /// The key to open manifests with; never created.
    fn opening_key(&self) -> Result<TenantKey, KeyError>;
    fn describe(&self) -> String;
}

/// A key in a local file: 64 hexadecimal digits and a newline, mode 0600, created on first
/// use by a command that seals.
#[derive(Debug, Clone)]
pub struct KeyFile {
    path: PathBuf,
}

impl KeyFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key in the file, or `None` if there is no file.
    pub fn read(&self) -> Result<Option<TenantKey>, KeyError> {
        let fail = |message: String| KeyError::File {
            path: self.path.clone(),
            message,
        };
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(fail(e.to_string())),
        };
        // Either case: the file may have been written by hand.
        let key = decode_hex32(&text.trim().to_ascii_lowercase())
            .ok_or_else(|| fail("does not hold a key (64 hexadecimal digits)".into()))?;
        Ok(Some(TenantKey(key)))
    }

    fn create(&self) -> Result<TenantKey, KeyError> {
        let fail = |message: String| KeyError::File {
            path: self.path.clone(),
            message,
        };
        let dir = match self.path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| fail(format!("no randomness: {e}")))?;
        // The key is written whole to a file of its own, then moved into place only if no
        // key file is there: two processes racing to create the key cannot both win (the
        // loser reads the winner's key), and no reader or crash ever sees the key file
        // empty or half written.
        let mut staged = tempfile::Builder::new()
            .prefix(".key-")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(|e| fail(e.to_string()))?;
        staged
            .write_all(format!("{}\n", encode_hex(&key)).as_bytes())
            .and_then(|()| staged.as_file().sync_all())
            .map_err(|e| fail(e.to_string()))?;
        // Renamed into place unless a file is there (renameat2 with RENAME_NOREPLACE, or a
        // link and an unlink where the filesystem lacks it); the staged file is removed
        // if the key was not taken from it.
        match staged.persist_noclobber(&self.path).map_err(|e| e.error) {
            Ok(_) => {
                if let Ok(dir) = std::fs::File::open(dir) {
                    // The new name is durable once its directory is.
                    dir.sync_all().map_err(|e| fail(e.to_string()))?;
                }
                Ok(TenantKey(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self
                .read()?
                .ok_or_else(|| fail("vanished while being created".into())),
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

impl KeyProvider for KeyFile {
    fn sealing_key(&self) -> Result<TenantKey, KeyError> {
        match self.read()? {
            Some(key) => Ok(key),
            None => self.create(),
        }
    }

    fn opening_key(&self) -> Result<TenantKey, KeyError> {
        self.read()?.ok_or_else(|| KeyError::File {
            path: self.path.clone(),
            message: "does not exist (images are opened with the key that flattened them)".into(),
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::new(dir.path().join("sub/tenant.key"));
        assert!(file.opening_key().is_err(), "never created by a reader");
        let key = file.sealing_key().unwrap();
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(file.sealing_key().unwrap(), key);
        assert_eq!(file.opening_key().unwrap(), key);
        std::fs::write(file.path(), "nonsense").unwrap();
        assert!(file.opening_key().is_err());
    }

    #[test]
    fn processes_racing_to_create_the_key_all_get_the_winners() {
        // Before the key was linked into place whole, a loser could read the winner's
        // file while it was still empty and fail with "does not hold a key".
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("tenant-{round}.key"));
            let barrier = std::sync::Barrier::new(6);
            let keys: Vec<TenantKey> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..6)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            KeyFile::new(path.clone()).sealing_key()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap().expect("every racer gets a key"))
                    .collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]), "one key for all");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "only the key file is left");
        }
    }
}
