//! Chunk identity and convergent encryption.
//!
//! A chunk's key is derived from its plaintext, so identical plaintexts under the same salt
//! give identical ciphertexts and deduplicate, while nobody without the plaintext (or the
//! manifest's key table) can read a chunk. Because each key encrypts exactly one plaintext,
//! AES-256-CTR with a zero IV is safe. A chunk is named by the SHA-256 of its ciphertext,
//! so anyone holding the name can verify the bytes without the key.
//!
//! The key is SHA-256(len(salt) as u32 LE || salt || plaintext). The length prefix is our
//! addition to the paper's SHA-256(salt || plaintext): without it, salts of different
//! lengths could make two different plaintexts hash to the same key ("ab" + "c..." and
//! "a" + "bc..."), and a CTR key used on two plaintexts leaks their XOR.

use std::{fmt, str::FromStr};

use aes::cipher::{KeyIvInit, StreamCipher};
use sha2::{Digest, Sha256};

/// Images are cut into chunks of this size; the last chunk of an image may be shorter.
pub const CHUNK_SIZE: usize = 512 * 1024;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// The name of a chunk: SHA-256 of its stored bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkName(pub [u8; 32]);

impl ChunkName {
    /// The name of `bytes` as stored.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// True if `bytes` are the chunk this name stands for.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        Self::of(bytes) == *self
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ChunkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkName({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a chunk name is 64 hexadecimal digits, not {0:?}")]
pub struct ChunkNameError(String);

impl FromStr for ChunkName {
    type Err = ChunkNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ChunkNameError(s.to_owned());
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

/// The key a chunk is encrypted under. Its Debug output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkKey(pub [u8; 32]);

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

/// The convergent key of `plaintext` under `salt`.
pub fn chunk_key(salt: &[u8], plaintext: &[u8]) -> ChunkKey {
    let salt_len = u32::try_from(salt.len()).expect("a salt is short");
    let mut hasher = Sha256::new();
    hasher.update(salt_len.to_le_bytes());
    hasher.update(salt);
    hasher.update(plaintext);
    ChunkKey(hasher.finalize().into())
}

/// Applies AES-256-CTR with a zero IV; encryption and decryption are the same operation.
fn apply_keystream(key: &ChunkKey, data: &mut [u8]) {
    let mut cipher = Aes256Ctr::new(&key.0.into(), &[0u8; 16].into());
    cipher.apply_keystream(data);
}

/// Encrypts `data` in place and returns the chunk's name and key.
pub fn seal_in_place(salt: &[u8], data: &mut [u8]) -> (ChunkName, ChunkKey) {
    let key = chunk_key(salt, data);
    apply_keystream(&key, data);
    (ChunkName::of(data), key)
}

/// A sealed chunk: what the origin and the fleet store, and what a manifest points at.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    pub name: ChunkName,
    pub key: ChunkKey,
    pub ciphertext: Vec<u8>,
}

pub fn seal(salt: &[u8], plaintext: &[u8]) -> SealedChunk {
    let mut ciphertext = plaintext.to_vec();
    let (name, key) = seal_in_place(salt, &mut ciphertext);
    SealedChunk {
        name,
        key,
        ciphertext,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk bytes do not match the name {0}")]
pub struct NameMismatch(pub ChunkName);

/// Checks `ciphertext` against `name`, then decrypts it in place.
pub fn open_in_place(
    name: &ChunkName,
    key: &ChunkKey,
    ciphertext: &mut [u8],
) -> Result<(), NameMismatch> {
    if !name.matches(ciphertext) {
        return Err(NameMismatch(*name));
    }
    apply_keystream(key, ciphertext);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_is_deterministic_and_reversible() {
        let plaintext: Vec<u8> = (0..CHUNK_SIZE).map(|i| (i % 251) as u8).collect();
        let a = seal(b"epoch-1", &plaintext);
        let b = seal(b"epoch-1", &plaintext);
        assert_eq!(a.name, b.name);
        assert_eq!(a.ciphertext, b.ciphertext);
        assert_ne!(a.ciphertext, plaintext);
        assert!(a.name.matches(&a.ciphertext));
        let mut opened = a.ciphertext.clone();
        open_in_place(&a.name, &a.key, &mut opened).unwrap();
        assert_eq!(opened, plaintext);
    }

    #[test]
    fn salts_separate_names() {
        let plaintext = b"the same bytes";
        assert_ne!(
            seal(b"epoch-1", plaintext).name,
            seal(b"epoch-2", plaintext).name
        );
    }

    #[test]
    fn salt_boundaries_cannot_collide() {
        // Without the length prefix these two would share a key.
        assert_ne!(chunk_key(b"ab", b"cdef"), chunk_key(b"a", b"bcdef"));
    }

    #[test]
    fn tampered_ciphertext_is_refused() {
        let sealed = seal(b"s", b"payload");
        let mut bytes = sealed.ciphertext.clone();
        bytes[0] ^= 1;
        assert_eq!(
            open_in_place(&sealed.name, &sealed.key, &mut bytes),
            Err(NameMismatch(sealed.name))
        );
    }

    #[test]
    fn known_answer() {
        // SHA-256 of the empty string names the empty chunk.
        assert_eq!(
            ChunkName::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // The key of the empty plaintext under the empty salt is SHA-256 of four zero
        // bytes (the salt length), as `printf '\0\0\0\0' | sha256sum` says.
        let key = chunk_key(b"", b"");
        assert_eq!(
            ChunkName(key.0).to_hex(),
            "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
        );
        // Its AES-256-CTR keystream with a zero IV, from OpenSSL:
        // `head -c 32 /dev/zero | openssl enc -aes-256-ctr -K <key> -iv 0 -nosalt | xxd -p`.
        let mut zeros = [0u8; 32];
        apply_keystream(&key, &mut zeros);
        assert_eq!(
            ChunkName(zeros).to_hex(),
            "0dfab3d3f75477fab80e3ecf2da48a38a8177ddb5f2478a07de7303dfe2cc10a"
        );
    }

    #[test]
    fn names_parse_from_hex() {
        let name = ChunkName::of(b"x");
        assert_eq!(name.to_hex().parse::<ChunkName>().unwrap(), name);
        assert!("zz".parse::<ChunkName>().is_err());
        assert!("g".repeat(64).parse::<ChunkName>().is_err());
    }
}
