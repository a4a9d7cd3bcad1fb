//! OCI content digests (`sha256:<hex>`) and a reader that checks one as it streams.

use std::{
    fmt,
    io::{self, Read},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use sha2::{Digest as _, Sha256};

/// A SHA-256 content digest, the only algorithm OCI registries and tools use in practice.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        slapshot_core::chunk::encode_hex(&self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a digest this tool supports (sha256:<64 hex digits>)")]
pub struct DigestError(pub String);

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DigestError(s.to_owned());
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

/// Passes bytes through while hashing them; at the end of the stream it fails with
/// `InvalidData` unless exactly `expected_len` bytes (when known) with the expected digest
/// went by. Nothing downstream can mistake a damaged blob for a complete one: the error
/// arrives in place of the end of the stream.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: Digest,
    expected_len: Option<u64>,
    seen: u64,
    what: String,
    verified: Arc<AtomicBool>,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, expected_len: Option<u64>, what: String) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            expected,
            expected_len,
            seen: 0,
            what,
            verified: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True once the whole stream has been read and matched.
    pub fn verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    /// A flag that turns true once the whole stream has been read and matched, for a
    /// caller that hands the reader to a decoder and can no longer ask it.
    pub fn verified_flag(&self) -> Arc<AtomicBool> {
        self.verified.clone()
    }

    fn fail(&self, message: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {message}", self.what),
        )
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
            self.seen += n as u64;
            if self.expected_len.is_some_and(|len| self.seen > len) {
                return Err(self.fail(format!(
                    "more than the {} bytes its descriptor gives",
                    self.expected_len.unwrap_or_default()
                )));
            }
            return Ok(n);
        }
        if self.verified() || buf.is_empty() {
            return Ok(0);
        }
        if let Some(len) = self.expected_len
            && self.seen != len
        {
            return Err(self.fail(format!(
                "{} bytes, its descriptor says {len} (truncated?)",
                self.seen
            )));
        }
        let got = Digest(self.hasher.clone().finalize().into());
        if got != self.expected {
            return Err(self.fail(format!(
                "digest mismatch: expected {}, got {got}",
                self.expected
            )));
        }
        self.verified.store(true, Ordering::Release);
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"");
        let text = d.to_string();
        assert_eq!(
            text,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(text.parse::<Digest>().unwrap(), d);
        assert!("sha512:00".parse::<Digest>().is_err());
        assert!("sha256:zz".parse::<Digest>().is_err());
    }

    #[test]
    fn verification_happens_at_the_end_of_the_stream() {
        let data = b"hello world".to_vec();
        let good = Digest::of(&data);
        let mut out = Vec::new();
        let mut r = VerifyingReader::new(&data[..], good, Some(11), "blob".into());
        r.read_to_end(&mut out).unwrap();
        assert!(r.verified());

        let mut r = VerifyingReader::new(&data[..], Digest::of(b"x"), None, "blob".into());
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");

        let mut r = VerifyingReader::new(&data[..5], good, Some(11), "blob".into());
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");

        let mut r = VerifyingReader::new(&data[..], good, Some(5), "blob".into());
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }
}
