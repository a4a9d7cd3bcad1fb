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

    /// True if `parts`, one after the other, are the chunk this name stands for: the same
    /// hash as [`ChunkName::matches`] over their concatenation, without making it.
    pub fn matches_parts(&self, parts: &[Bytes]) -> bool {
        let mut hasher = blake3::Hasher::new();
        for part in parts {
            hasher.update(part);
        }
        hasher.finalize() == blake3::Hash::from_bytes(self.0)
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
        decode_hex32(s)
            .map(Self)
            .ok_or_else(|| ChunkNameError(s.to_owned()))
    }
}

/// Bytes as lowercase hexadecimal digits, the spelling `decode_hex32` reads.
pub fn encode_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// 32 bytes from exactly 64 lowercase hexadecimal digits: the one spelling `to_hex` (and
/// every name on disk or in a URL) uses. Uppercase digits and signs, which
/// `u8::from_str_radix` would take, are refused, so that no two texts name one value (a
/// file named in another spelling would be indexed under a name whose path is not its own).
pub fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
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
    cipher(key).apply_keystream(data);
}

/// The chunk's cipher: AES-256-CTR under its own key, with a zero IV (each key encrypts
/// one plaintext only).
fn cipher(key: &ChunkKey) -> Aes256Ctr {
    Aes256Ctr::new(&key.0.into(), &[0u8; 16].into())
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
    /// The stored bytes, in order: one buffer, or the data shards a fleet read received,
    /// left where they arrived (joining them would copy the whole chunk once more, only for
    /// the reader to copy it again as it decrypts).
    parts: Vec<Bytes>,
}

impl SealedChunk {
    /// Bytes read from a store under `name`, accepted only if they are that chunk.
    pub fn verified(name: ChunkName, bytes: Bytes) -> Result<Self, NameMismatch> {
        Self::verified_parts(name, vec![bytes])
    }

    /// Like [`SealedChunk::verified`], for a chunk received in parts (the data shards of a
    /// fleet read), which are kept as they are: none is copied.
    pub fn verified_parts(name: ChunkName, parts: Vec<Bytes>) -> Result<Self, NameMismatch> {
        if !name.matches_parts(&parts) {
            return Err(NameMismatch(name));
        }
        Ok(Self::from_parts(name, parts))
    }

    /// The one place a `SealedChunk` is put together: empty parts are dropped, so that an
    /// empty chunk has no parts however it was made.
    fn from_parts(name: ChunkName, mut parts: Vec<Bytes>) -> Self {
        parts.retain(|part| !part.is_empty());
        Self { name, parts }
    }

    /// Takes `bytes` as the stored form of a chunk without encrypting them: the caller
    /// vouches that they are already sealed, or that they are meant to be stored in the
    /// clear (`slapshot chunk put`, tests of the fleet itself).
    pub fn assume_sealed(bytes: Bytes) -> Self {
        Self::from_parts(ChunkName::of(&bytes), vec![bytes])
    }

    pub fn name(&self) -> &ChunkName {
        &self.name
    }

    /// The stored (encrypted) bytes, in order, without copying them.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The same chunk copied into one buffer of its own size. Bytes received over HTTP
    /// (a fleet read's shards, an origin's body) may be slices of the client's receive
    /// buffers, each of which stays allocated whole (up to about 400 KiB) while a slice of
    /// it lives: a chunk held beyond its read (queued for the disk tier, kept by a caller)
    /// is compacted first, so that what it holds is bounded by its own length.
    pub fn compact(&self) -> Self {
        Self::from_parts(self.name, vec![self.joined()])
    }

    /// The stored (encrypted) bytes in one buffer: shared if the chunk is one part, else
    /// copied together (a chunk read from the fleet is its data shards).
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            _ => self.joined(),
        }
    }

    /// The parts copied into one new buffer.
    fn joined(&self) -> Bytes {
        let mut joined = Vec::with_capacity(self.len());
        for part in &self.parts {
            joined.extend_from_slice(part);
        }
        Bytes::from(joined)
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// Encrypts `plaintext` (in place: no copy) under its convergent key; returns the sealed
/// chunk and the key that opens it, which belongs in the manifest's key table.
pub fn seal(salt: &Salt, mut plaintext: Vec<u8>) -> (SealedChunk, ChunkKey) {
    let key = chunk_key(salt, &plaintext);
    apply_keystream(&key, &mut plaintext);
    let name = ChunkName::of(&plaintext);
    (
        SealedChunk::from_parts(name, vec![Bytes::from(plaintext)]),
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

/// Decrypts bytes already verified against their name (a [`SealedChunk`]): one copy, each
/// part decrypted as it lands, while it is still in cache.
pub fn open(chunk: &SealedChunk, key: &ChunkKey) -> Vec<u8> {
    let mut cipher = cipher(key);
    let mut plaintext = Vec::with_capacity(chunk.len());
    for part in &chunk.parts {
        let at = plaintext.len();
        plaintext.extend_from_slice(part);
        cipher.apply_keystream(&mut plaintext[at..]);
    }
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
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert_ne!(a.to_bytes()[..], plaintext[..]);
        assert!(a.name().matches(&a.to_bytes()));
        let mut opened = a.to_bytes().to_vec();
        open_in_place(a.name(), &key, &mut opened).unwrap();
        assert_eq!(opened, plaintext);
        assert_eq!(open(&a, &key), plaintext);
    }

    /// A chunk received in parts (a fleet read's data shards) is the same chunk as its
    /// concatenation, wherever the cuts fall: it verifies, opens to the same plaintext and
    /// joins to the same bytes; parts out of order, or one changed, are refused.
    #[test]
    fn a_chunk_in_parts_is_its_concatenation() {
        let plaintext: Vec<u8> = (0..CHUNK_SIZE + 777).map(|i| (i * 7 % 253) as u8).collect();
        let (whole, key) = seal(&Salt::new(b"parts"), plaintext.clone());
        let bytes = whole.to_bytes();
        let expected_plain = open(&whole, &key);
        assert_eq!(expected_plain, plaintext);
        let mut reordered = 0;
        // Cuts at shard sizes, off a BLAKE3 chunk boundary, an empty part, a one-byte part.
        for cuts in [
            vec![131_072, 262_144, 393_216],
            vec![1, 1_000, 1_000, 300_001],
            vec![64, 100_000],
            vec![bytes.len()],
        ] {
            let mut parts = Vec::new();
            let mut at = 0;
            for cut in cuts {
                parts.push(bytes.slice(at..cut));
                at = cut;
            }
            parts.push(bytes.slice(at..));
            let sealed = SealedChunk::verified_parts(*whole.name(), parts.clone()).unwrap();
            assert_eq!(sealed.len(), bytes.len());
            assert_eq!(sealed.to_bytes(), bytes);
            assert_eq!(open(&sealed, &key), plaintext);
            // Compacted: one buffer of its own, sharing none of the parts' buffers.
            let compact = sealed.compact();
            assert_eq!((compact.parts().len(), compact.len()), (1, bytes.len()));
            assert_eq!(compact.to_bytes(), bytes);
            assert!(!std::ptr::eq(compact.parts()[0].as_ptr(), bytes.as_ptr()));
            let last = parts.len() - 1;
            parts.swap(0, last);
            if parts.concat() != bytes {
                assert!(SealedChunk::verified_parts(*whole.name(), parts).is_err());
                reordered += 1;
            }
        }
        assert_eq!(
            reordered, 3,
            "every cut but the whole one reorders the bytes"
        );
        let mut changed = vec![bytes.slice(..1000), bytes.slice(1000..)];
        let mut last = changed[1].to_vec();
        last[5] ^= 1;
        changed[1] = Bytes::from(last);
        assert!(SealedChunk::verified_parts(*whole.name(), changed).is_err());
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
        let mut bytes = sealed.to_bytes().to_vec();
        bytes[0] ^= 1;
        assert_eq!(
            open_in_place(sealed.name(), &key, &mut bytes),
            Err(NameMismatch(*sealed.name()))
        );
        assert!(SealedChunk::verified(*sealed.name(), Bytes::from(bytes)).is_err());
        assert!(SealedChunk::verified(*sealed.name(), sealed.to_bytes()).is_ok());
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
        // One spelling only: what to_hex writes.
        let hex = name.to_hex();
        assert!(hex.to_uppercase().parse::<ChunkName>().is_err());
        let signed = format!("+{}", &hex[1..]);
        assert!(signed.parse::<ChunkName>().is_err(), "{signed}");
        assert!(format!("{}é", &hex[..62]).parse::<ChunkName>().is_err());
        for text in ["0".repeat(64), "f".repeat(64), hex.clone()] {
            let parsed: ChunkName = text.parse().unwrap();
            assert_eq!(parsed.to_hex(), text);
        }
    }
}
