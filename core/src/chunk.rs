//! Chunk identity and convergent encryption.
//!
//! A chunk's key is derived from its plaintext, so identical plaintexts under the same salt
//! give identical ciphertexts and deduplicate, while nobody without the plaintext (or the
//! manifest's key table) can read a chunk. Because each key encrypts exactly one plaintext,
//! AES-256-CTR with a zero IV is safe. A chunk is named by the BLAKE3 hash of its
//! ciphertext, so anyone holding the name can verify the bytes without the key.
//!
//! The key is BLAKE3's keyed hash of the plaintext, under a key that BLAKE3's `derive_key`
//! makes from the salt with a context string of our own. A keyed hash has no length
//! extension, and a derived key is a function of the whole salt, so two salts never meet in
//! the middle of one hash input (which `H(salt || plaintext)` allows: "ab" + "c..." and
//! "a" + "bc..." hash the same bytes, and a CTR key used on two plaintexts leaks their XOR).
//!
//! Why BLAKE3 rather than the paper's SHA-256: every read verifies a chunk against its
//! name, and sealing hashes each chunk twice. On this project's machines BLAKE3 hashes a
//! 512 KiB buffer about 5x faster than SHA-256 with SHA-NI (docs/PERFORMANCE.md), which at
//! 100 Gbit/s is the difference between about one core and about six spent on verification.

use std::{fmt, str::FromStr};

use aes::cipher::{KeyIvInit, StreamCipher};
use bytes::Bytes;

/// Images are cut into chunks of this size; the last chunk of an image may be shorter.
pub const CHUNK_SIZE: usize = 512 * 1024;

/// The context string of BLAKE3's `derive_key` that turns a salt into a hashing key. Changing
/// it changes every chunk's key and name, so it carries a version.
const SALT_KEY_CONTEXT: &str = "slapshot 2026-11 chunk key v1";

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// The name of a chunk: BLAKE3 of its stored bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkName(pub [u8; 32]);

impl ChunkName {
    /// The name of `bytes` as stored.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// True if `bytes` are the chunk this name stands for. The comparison is BLAKE3's
    /// constant-time one.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        blake3::hash(bytes) == blake3::Hash::from_bytes(self.0)
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

/// A salt, turned once into the key that convergent chunk keys are hashed under. Build it
/// once per image, not once per chunk.
#[derive(Clone)]
pub struct Salt {
    hashing_key: [u8; 32],
}

impl Salt {
    pub fn new(salt: &[u8]) -> Self {
        Self {
            hashing_key: blake3::derive_key(SALT_KEY_CONTEXT, salt),
        }
    }
}

impl fmt::Debug for Salt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Salt(..)")
    }
}

/// The convergent key of `plaintext` under `salt`.
pub fn chunk_key(salt: &Salt, plaintext: &[u8]) -> ChunkKey {
    ChunkKey(*blake3::keyed_hash(&salt.hashing_key, plaintext).as_bytes())
}

/// Applies AES-256-CTR with a zero IV; encryption and decryption are the same operation.
fn apply_keystream(key: &ChunkKey, data: &mut [u8]) {
    let mut cipher = Aes256Ctr::new(&key.0.into(), &[0u8; 16].into());
    cipher.apply_keystream(data);
}

/// Bytes that may be written to a node or the origin: a chunk's stored form and its name.
///
/// The write paths of the client and the origin take this type and nothing else, and it is
/// only made by [`seal`] (encrypting a plaintext), by [`SealedChunk::verified`] (bytes read
/// back from a store, checked against their name), or by the deliberately named
/// [`SealedChunk::assume_sealed`] for low-level tools. Plaintext cannot reach a store by
/// mistake.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    name: ChunkName,
    bytes: Bytes,
}

impl SealedChunk {
    /// Bytes read from a store under `name`, accepted only if they are that chunk.
    pub fn verified(name: ChunkName, bytes: Bytes) -> Result<Self, NameMismatch> {
        if name.matches(&bytes) {
            Ok(Self { name, bytes })
        } else {
            Err(NameMismatch(name))
        }
    }

    /// Takes `bytes` as the stored form of a chunk without encrypting them: the caller
    /// vouches that they are already sealed, or that they are meant to be stored in the
    /// clear (`slapshot chunk put`, tests of the fleet itself).
    pub fn assume_sealed(bytes: Bytes) -> Self {
        Self {
            name: ChunkName::of(&bytes),
            bytes,
        }
    }

    pub fn name(&self) -> &ChunkName {
        &self.name
    }

    /// The stored (encrypted) bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Encrypts `plaintext` (in place: no copy) under its convergent key; returns the sealed
/// chunk and the key that opens it, which belongs in the manifest's key table.
pub fn seal(salt: &Salt, mut plaintext: Vec<u8>) -> (SealedChunk, ChunkKey) {
    let key = chunk_key(salt, &plaintext);
    apply_keystream(&key, &mut plaintext);
    let name = ChunkName::of(&plaintext);
    (
        SealedChunk {
            name,
            bytes: Bytes::from(plaintext),
        },
        key,
    )
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

/// Decrypts bytes already verified against their name (a [`SealedChunk`]).
pub fn open(chunk: &SealedChunk, key: &ChunkKey) -> Vec<u8> {
    let mut plaintext = chunk.bytes.to_vec();
    apply_keystream(key, &mut plaintext);
    plaintext
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_is_deterministic_and_reversible() {
        let plaintext: Vec<u8> = (0..CHUNK_SIZE).map(|i| (i % 251) as u8).collect();
        let salt = Salt::new(b"epoch-1");
        let (a, key) = seal(&salt, plaintext.clone());
        let (b, _) = seal(&salt, plaintext.clone());
        assert_eq!(a.name(), b.name());
        assert_eq!(a.bytes(), b.bytes());
        assert_ne!(a.bytes()[..], plaintext[..]);
        assert!(a.name().matches(a.bytes()));
        let mut opened = a.bytes().to_vec();
        open_in_place(a.name(), &key, &mut opened).unwrap();
        assert_eq!(opened, plaintext);
        assert_eq!(open(&a, &key), plaintext);
    }

    #[test]
    fn salts_separate_names() {
        let plaintext = b"the same bytes".to_vec();
        assert_ne!(
            seal(&Salt::new(b"epoch-1"), plaintext.clone()).0.name(),
            seal(&Salt::new(b"epoch-2"), plaintext).0.name()
        );
    }

    #[test]
    fn salt_boundaries_cannot_collide() {
        // With H(salt || plaintext) these two would share a key.
        assert_ne!(
            chunk_key(&Salt::new(b"ab"), b"cdef"),
            chunk_key(&Salt::new(b"a"), b"bcdef")
        );
    }

    #[test]
    fn tampered_ciphertext_is_refused() {
        let (sealed, key) = seal(&Salt::new(b"s"), b"payload".to_vec());
        let mut bytes = sealed.bytes().to_vec();
        bytes[0] ^= 1;
        assert_eq!(
            open_in_place(sealed.name(), &key, &mut bytes),
            Err(NameMismatch(*sealed.name()))
        );
        assert!(SealedChunk::verified(*sealed.name(), Bytes::from(bytes)).is_err());
        assert!(SealedChunk::verified(*sealed.name(), sealed.bytes().clone()).is_ok());
    }

    #[test]
    fn known_answer() {
        // Every figure below comes from the Python `blake3` package (an independent
        // implementation), so a change of hash, context or key layout fails here:
        //   blake3.blake3(b"").hexdigest()
        assert_eq!(
            ChunkName::of(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        //   k = blake3.blake3(b"", derive_key_context=CONTEXT).digest()
        //   blake3.blake3(b"", key=k).hexdigest()
        let key = chunk_key(&Salt::new(b""), b"");
        assert_eq!(
            ChunkName(key.0).to_hex(),
            "1dd1718602bb9fbba843578824ad17ceeb363405c8c13490f16149d1620e6c9c"
        );
        //   k = blake3.blake3(b"epoch-1", derive_key_context=CONTEXT).digest()
        //   blake3.blake3(b"hello", key=k).hexdigest()
        let key = chunk_key(&Salt::new(b"epoch-1"), b"hello");
        assert_eq!(
            ChunkName(key.0).to_hex(),
            "1af6b485f650ba3598ec19748d3bee75a870d75ceeec93f7ac0717b4eae688bb"
        );
        // The AES-256-CTR keystream with a zero IV, checked against OpenSSL:
        // `head -c 32 /dev/zero | openssl enc -aes-256-ctr -K <key> -iv 0 -nosalt | xxd -p`
        // with the SHA-256 of four zero bytes as the key.
        let key = ChunkKey(hex_bytes(
            "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119",
        ));
        let mut zeros = [0u8; 32];
        apply_keystream(&key, &mut zeros);
        assert_eq!(
            ChunkName(zeros).to_hex(),
            "0dfab3d3f75477fab80e3ecf2da48a38a8177ddb5f2478a07de7303dfe2cc10a"
        );
    }

    fn hex_bytes(hex: &str) -> [u8; 32] {
        hex.parse::<ChunkName>().unwrap().0
    }

    #[test]
    fn names_parse_from_hex() {
        let name = ChunkName::of(b"x");
        assert_eq!(name.to_hex().parse::<ChunkName>().unwrap(), name);
        assert!("zz".parse::<ChunkName>().is_err());
        assert!("g".repeat(64).parse::<ChunkName>().is_err());
    }
}
