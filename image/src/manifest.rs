//! The manifest: the flattened tree, the chunk table, and the chunk keys.
//!
//! ```text
//! 0   "SLSHIMG\0"          magic
//! 8   u16 version (1)      u16 reserved (0)
//! 12  [16] tenant key id   which key the key table is sealed under
//! 28  u64 body length once decompressed
//! 36  u32 body length
//! 40  body                 zstd(level 19) of the tree and the chunk table (varints)
//! ..  [12] nonce           AES-256-GCM nonce
//! ..  keys                 AES-256-GCM(32 bytes per chunk) + 16-byte tag,
//!                          with everything before the nonce as associated data
//! ```
//! Integers are little endian. The GCM tag authenticates the whole manifest under the
//! tenant key; the image id, BLAKE3 of all its bytes, names it.
//!
//! Determinism: the same tree gives byte-identical manifests. The GCM nonce cannot be
//! random then; it is a keyed BLAKE3 hash of the manifest's plaintext (a synthetic IV), so
//! two different key tables never share a nonce, and the same one always encrypts the same
//! way (which reveals only that two manifests are equal, which their ids already do).
//! zstd's output is fixed for a given level and library version; Cargo.lock pins it.

use std::fmt;

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, Payload},
};
use slapshot_core::{ChunkKey, ChunkName};

use crate::{keys::TenantKey, source::RuntimeConfig, tree::Meta};

const MAGIC: [u8; 8] = *b"SLSHIMG\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 40;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// The body of a manifest for a 16 GiB image is a few MiB; 1 GiB stops a bomb.
const MAX_BODY: u64 = 1 << 30;
/// zstd level: manifests are written once and read by every worker, so spend the time.
const ZSTD_LEVEL: i32 = 19;
/// Extents whose chunk is all zeros point here; nothing is stored for them.
pub const ZERO_CHUNK: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a slapshot manifest")]
    BadMagic,
    #[error("manifest version {0} is not supported by this build")]
    Version(u16),
    #[error("the manifest was sealed with tenant key {expected}, not with the key given ({given})")]
    WrongKey { expected: String, given: String },
    #[error("the manifest failed authentication: it was altered or damaged")]
    Authentication,
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error(
        "the manifest's file tree and chunk table take {bytes} bytes, more than the {limit} a manifest may have"
    )]
    TooLarge { bytes: u64, limit: u64 },
}

/// A manifest's id: BLAKE3 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(pub [u8; 32]);

impl ImageId {
    pub fn of(manifest: &[u8]) -> Self {
        Self(*blake3::hash(manifest).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        slapshot_core::chunk::encode_hex(&self.0)
    }

    /// An id as a user may type it: 64 hexadecimal digits, in either case.
    pub fn parse(text: &str) -> Option<Self> {
        slapshot_core::chunk::decode_hex32(&text.to_ascii_lowercase()).map(Self)
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({self})")
    }
}

/// `len` bytes at `offset` in chunk `chunk` (or zeros, for [`ZERO_CHUNK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub chunk: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeKind {
    /// Children sorted by name, with their inode index.
    Dir(Vec<(Vec<u8>, u32)>),
    File {
        size: u64,
        extents: Vec<Extent>,
    },
    Symlink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub meta: Meta,
    pub nlink: u32,
    pub kind: InodeKind,
}

impl Inode {
    /// The size `stat` reports: file bytes, or a symlink's target length.
    pub fn size(&self) -> u64 {
        match &self.kind {
            InodeKind::File { size, .. } => *size,
            InodeKind::Symlink(target) => target.len() as u64,
            _ => 0,
        }
    }

    /// The file type bits of st_mode.
    pub fn type_bits(&self) -> u32 {
        match self.kind {
            InodeKind::Dir(_) => 0o040000,
            InodeKind::File { .. } => 0o100000,
            InodeKind::Symlink(_) => 0o120000,
            InodeKind::CharDevice(..) => 0o020000,
            InodeKind::BlockDevice(..) => 0o060000,
            InodeKind::Fifo => 0o010000,
        }
    }
}

/// A stored chunk: its name and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub name: ChunkName,
    pub len: u32,
}

/// A decoded manifest. Inode 0 is the root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub config: RuntimeConfig,
    pub chunk_size: u32,
    pub inodes: Vec<Inode>,
    pub chunks: Vec<ChunkRef>,
    /// Parallel to `chunks`.
    pub keys: Vec<ChunkKey>,
}

impl Manifest {
    /// The inode at `path` (`/`-separated, leading `/` optional), without following
    /// symlinks.
    pub fn lookup(&self, path: &str) -> Option<u32> {
        let mut ino = 0u32;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            ino = self.child(ino, part.as_bytes())?;
        }
        Some(ino)
    }

    /// A directory's child by name.
    pub fn child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let InodeKind::Dir(children) = &self.inodes.get(dir as usize)?.kind else {
            return None;
        };
        children
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|i| children[i].1)
    }

    /// Bytes of all regular files, each inode once.
    pub fn file_bytes(&self) -> u64 {
        self.inodes
            .iter()
            .map(|i| match i.kind {
                InodeKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// Encodes and seals the manifest under `key`: CPU-heavy for a large image (zstd at
    /// level 19), so not on an async runtime's thread. A manifest whose body is larger than
    /// any reader accepts (1 GiB) is refused here, not written and found unreadable later.
    pub fn encode(&self, key: &TenantKey) -> Result<Vec<u8>, ManifestError> {
        self.encode_within(key, MAX_BODY)
    }

    fn encode_within(&self, key: &TenantKey, limit: u64) -> Result<Vec<u8>, ManifestError> {
        let body = self.encode_body();
        if body.len() as u64 > limit {
            return Err(ManifestError::TooLarge {
                bytes: body.len() as u64,
                limit,
            });
        }
        let compressed = zstd::bulk::compress(&body, ZSTD_LEVEL).expect("zstd compresses memory");
        let mut out = Vec::with_capacity(HEADER_LEN + compressed.len() + 64 * self.keys.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&key.id());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(
            &u32::try_from(compressed.len())
                .expect("a body of at most 1 GiB compresses to under 4 GiB")
                .to_le_bytes(),
        );
        out.extend_from_slice(&compressed);
        let mut plain_keys = Vec::with_capacity(32 * self.keys.len());
        for k in &self.keys {
            plain_keys.extend_from_slice(&k.0);
        }
        let nonce = synthetic_nonce(key, &out, &plain_keys);
        let sealed = cipher(key)
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: &plain_keys,
                    aad: &out,
                },
            )
            .expect("AES-GCM encrypts any message under 64 GiB");
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The id of the tenant key a manifest says it was sealed under, from its header alone
    /// (not authenticated: `decode` checks it against the key before trusting anything).
    pub fn sealing_key_id(bytes: &[u8]) -> Result<[u8; 16], ManifestError> {
        if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        Ok(bytes[12..28].try_into().expect("16 bytes"))
    }

    /// Checks and decodes a manifest sealed under `key`.
    pub fn decode(bytes: &[u8], key: &TenantKey) -> Result<Self, ManifestError> {
        let malformed = |what: &str| ManifestError::Malformed(what.to_owned());
        let key_id = Self::sealing_key_id(bytes)?;
        if key_id != key.id() {
            return Err(ManifestError::WrongKey {
                expected: slapshot_core::chunk::encode_hex(&key_id),
                given: slapshot_core::chunk::encode_hex(&key.id()),
            });
        }
        let plain_len = u64::from_le_bytes(bytes[28..36].try_into().expect("8 bytes"));
        let body_len = u32::from_le_bytes(bytes[36..40].try_into().expect("4 bytes")) as usize;
        let body_end = HEADER_LEN
            .checked_add(body_len)
            .filter(|&end| end + NONCE_LEN + TAG_LEN <= bytes.len())
            .ok_or_else(|| malformed("the body runs past the end"))?;
        let nonce: [u8; NONCE_LEN] = bytes[body_end..body_end + NONCE_LEN]
            .try_into()
            .expect("12 bytes");
        let sealed = &bytes[body_end + NONCE_LEN..];
        if !(sealed.len() - TAG_LEN).is_multiple_of(32) {
            return Err(malformed("the key table is not a whole number of keys"));
        }
        let plain_keys = cipher(key)
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: sealed,
                    aad: &bytes[..body_end],
                },
            )
            .map_err(|_| ManifestError::Authentication)?;
        // Authenticated from here on: what follows guards against our own bugs and old or
        // future writers, not against forgery.
        if plain_len > MAX_BODY {
            return Err(malformed("a body over 1 GiB"));
        }
        let body = zstd::bulk::decompress(&bytes[HEADER_LEN..body_end], plain_len as usize)
            .map_err(|e| ManifestError::Malformed(format!("body: {e}")))?;
        if body.len() as u64 != plain_len {
            return Err(malformed("the body's length is not the one recorded"));
        }
        let keys: Vec<ChunkKey> = plain_keys
            .chunks_exact(32)
            .map(|k| ChunkKey(k.try_into().expect("32 bytes")))
            .collect();
        Self::decode_body(&body, keys)
    }

    /// The body, column by column so that zstd finds the runs: all kinds, then all modes,
    /// and so on. Values are coded against what is expected (the next inode number, the
    /// previous file's chunk and offset, a full chunk), so that most of them are zero.
    /// Link counts are not stored: they follow from the directories.
    fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        let c = &self.config;
        for list in [&c.env, &c.entrypoint, &c.cmd] {
            w.varint(list.len() as u64);
            for s in list {
                w.bytes(s.as_bytes());
            }
        }
        w.bytes(c.working_dir.as_bytes());
        w.bytes(c.user.as_bytes());
        w.varint(u64::from(self.chunk_size));
        w.varint(self.inodes.len() as u64);
        for inode in &self.inodes {
            w.u8(kind_byte(&inode.kind));
        }
        for inode in &self.inodes {
            w.varint(u64::from(inode.meta.mode));
        }
        for inode in &self.inodes {
            w.varint(u64::from(inode.meta.uid));
        }
        for inode in &self.inodes {
            w.varint(u64::from(inode.meta.gid));
        }
        let mut previous = 0i64;
        for inode in &self.inodes {
            w.varint(zigzag(inode.meta.mtime.wrapping_sub(previous)));
            previous = inode.meta.mtime;
        }
        for inode in &self.inodes {
            w.varint(u64::from(inode.meta.mtime_nanos));
        }
        for inode in &self.inodes {
            w.varint(inode.meta.xattrs.len() as u64);
            for (name, value) in &inode.meta.xattrs {
                w.bytes(name);
                w.bytes(value);
            }
        }
        // Directories: names front-coded against the previous sibling, inode numbers
        // against the one after the previous child.
        let mut expected_ino = 1u32;
        for inode in &self.inodes {
            if let InodeKind::Dir(children) = &inode.kind {
                w.varint(children.len() as u64);
                let mut previous: &[u8] = &[];
                for (name, ino) in children {
                    let shared = previous
                        .iter()
                        .zip(name)
                        .take_while(|(a, b)| a == b)
                        .count();
                    w.varint(shared as u64);
                    w.bytes(&name[shared..]);
                    w.varint(zigzag(i64::from(*ino) - i64::from(expected_ino)));
                    expected_ino = ino.wrapping_add(1);
                    previous = name;
                }
            }
        }
        // Files: extents against the previous extent (the next bytes of the same chunk) and
        // lengths against what is left of the file, up to a chunk.
        let mut previous_chunk = 0u64;
        let mut previous_end = 0u64;
        for inode in &self.inodes {
            match &inode.kind {
                InodeKind::File { size, extents } => {
                    w.varint(*size);
                    w.varint(extents.len() as u64);
                    let mut left = *size;
                    for e in extents {
                        // 0 is the zero chunk, so that stored chunks start at 1.
                        let chunk = if e.chunk == ZERO_CHUNK {
                            0
                        } else {
                            u64::from(e.chunk) + 1
                        };
                        let expected_offset = if chunk == previous_chunk {
                            previous_end
                        } else {
                            0
                        };
                        w.varint(zigzag(chunk as i64 - previous_chunk as i64));
                        w.varint(zigzag(i64::from(e.offset) - expected_offset as i64));
                        let expected_len = left.min(u64::from(self.chunk_size));
                        w.varint(zigzag(i64::from(e.len) - expected_len as i64));
                        left = left.saturating_sub(u64::from(e.len));
                        previous_chunk = chunk;
                        previous_end = u64::from(e.offset) + u64::from(e.len);
                    }
                }
                InodeKind::Symlink(target) => w.bytes(target),
                InodeKind::CharDevice(major, minor) | InodeKind::BlockDevice(major, minor) => {
                    w.varint(u64::from(*major));
                    w.varint(u64::from(*minor));
                }
                InodeKind::Dir(_) | InodeKind::Fifo => {}
            }
        }
        w.varint(self.chunks.len() as u64);
        for chunk in &self.chunks {
            w.varint(zigzag(i64::from(chunk.len) - i64::from(self.chunk_size)));
        }
        for chunk in &self.chunks {
            w.out.extend_from_slice(&chunk.name.0);
        }
        w.out
    }

    fn decode_body(body: &[u8], keys: Vec<ChunkKey>) -> Result<Self, ManifestError> {
        let mut r = Reader {
            bytes: body,
            pos: 0,
        };
        let mut lists = Vec::new();
        for _ in 0..3 {
            let n = r.count(1)?;
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                list.push(r.string()?);
            }
            lists.push(list);
        }
        let config = RuntimeConfig {
            cmd: lists.pop().expect("three lists"),
            entrypoint: lists.pop().expect("three lists"),
            env: lists.pop().expect("three lists"),
            working_dir: r.string()?,
            user: r.string()?,
        };
        let chunk_size = r.u32()?;
        // Each inode takes at least six bytes: kind, mode, uid, gid, mtime, nanos, xattrs.
        let count = r.count(7)?;
        if count == 0 {
            return Err(ManifestError::Malformed("no root directory".into()));
        }
        let kinds = r.take(count)?.to_vec();
        let mut metas: Vec<Meta> = (0..count).map(|_| Meta::default()).collect();
        for m in &mut metas {
            m.mode = r.u32()?;
        }
        for m in &mut metas {
            m.uid = r.u32()?;
        }
        for m in &mut metas {
            m.gid = r.u32()?;
        }
        let mut previous = 0i64;
        for m in &mut metas {
            m.mtime = previous.wrapping_add(unzigzag(r.varint()?));
            previous = m.mtime;
        }
        for m in &mut metas {
            m.mtime_nanos = r.u32()?;
        }
        for m in &mut metas {
            let n = r.count(2)?;
            m.xattrs.reserve(n);
            for _ in 0..n {
                m.xattrs.push((r.bytes()?.to_vec(), r.bytes()?.to_vec()));
            }
        }
        let mut expected_ino = 1i64;
        let mut kinds_decoded: Vec<Option<InodeKind>> = Vec::with_capacity(count);
        for &kind in &kinds {
            if kind != 0 {
                kinds_decoded.push(None);
                continue;
            }
            let n = r.count(3)?;
            let mut children: Vec<(Vec<u8>, u32)> = Vec::with_capacity(n);
            for _ in 0..n {
                let shared = r.varint()? as usize;
                let previous = children.last().map_or(&[][..], |(name, _)| name.as_slice());
                if shared > previous.len() {
                    return Err(r.err("a name sharing more than its sibling has"));
                }
                let mut name = previous[..shared].to_vec();
                name.extend_from_slice(r.bytes()?);
                let ino = expected_ino.wrapping_add(unzigzag(r.varint()?));
                let ino = u32::try_from(ino).map_err(|_| r.err("an inode number"))?;
                expected_ino = i64::from(ino) + 1;
                children.push((name, ino));
            }
            kinds_decoded.push(Some(InodeKind::Dir(children)));
        }
        let mut previous_chunk = 0i64;
        let mut previous_end = 0i64;
        for (slot, &kind) in kinds_decoded.iter_mut().zip(&kinds) {
            let decoded = match kind {
                0 => continue,
                1 => {
                    let size = r.varint()?;
                    let n = r.count(3)?;
                    let mut extents = Vec::with_capacity(n);
                    let mut left = size;
                    for _ in 0..n {
                        let chunk = previous_chunk.wrapping_add(unzigzag(r.varint()?));
                        let expected_offset = if chunk == previous_chunk {
                            previous_end
                        } else {
                            0
                        };
                        let offset = expected_offset.wrapping_add(unzigzag(r.varint()?));
                        let expected_len = left.min(u64::from(chunk_size)) as i64;
                        let len = expected_len.wrapping_add(unzigzag(r.varint()?));
                        let (Ok(offset), Ok(len)) = (u32::try_from(offset), u32::try_from(len))
                        else {
                            return Err(r.err("an extent out of range"));
                        };
                        let index = match chunk {
                            0 => ZERO_CHUNK,
                            c => u32::try_from(c - 1)
                                .ok()
                                .filter(|&c| c != ZERO_CHUNK)
                                .ok_or_else(|| r.err("a chunk index"))?,
                        };
                        extents.push(Extent {
                            chunk: index,
                            offset,
                            len,
                        });
                        left = left.saturating_sub(u64::from(len));
                        previous_chunk = chunk;
                        previous_end = i64::from(offset) + i64::from(len);
                    }
                    InodeKind::File { size, extents }
                }
                2 => InodeKind::Symlink(r.bytes()?.to_vec()),
                3 => InodeKind::CharDevice(r.u32()?, r.u32()?),
                4 => InodeKind::BlockDevice(r.u32()?, r.u32()?),
                5 => InodeKind::Fifo,
                other => return Err(ManifestError::Malformed(format!("inode kind {other}"))),
            };
            *slot = Some(decoded);
        }
        let chunk_count = r.count(33)?;
        let mut lens = Vec::with_capacity(chunk_count);
        for _ in 0..chunk_count {
            let len = i64::from(chunk_size).wrapping_add(unzigzag(r.varint()?));
            lens.push(u32::try_from(len).map_err(|_| r.err("a chunk length"))?);
        }
        let mut chunks = Vec::with_capacity(chunk_count);
        for len in lens {
            let name = r.take(32)?;
            chunks.push(ChunkRef {
                name: ChunkName(name.try_into().expect("32 bytes")),
                len,
            });
        }
        if r.pos != body.len() {
            return Err(ManifestError::Malformed(
                "bytes after the chunk table".into(),
            ));
        }
        if keys.len() != chunks.len() {
            return Err(ManifestError::Malformed(format!(
                "{} keys for {} chunks",
                keys.len(),
                chunks.len()
            )));
        }
        let mut inodes: Vec<Inode> = metas
            .into_iter()
            .zip(kinds_decoded)
            .map(|(meta, kind)| Inode {
                meta,
                nlink: 0,
                kind: kind.expect("every kind decoded above"),
            })
            .collect();
        count_links(&mut inodes)?;
        let manifest = Self {
            config,
            chunk_size,
            inodes,
            chunks,
            keys,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the references inside a decoded manifest, so that readers can index without
    /// bounds failures.
    fn validate(&self) -> Result<(), ManifestError> {
        let bad = |what: String| Err(ManifestError::Malformed(what));
        if !matches!(self.inodes[0].kind, InodeKind::Dir(_)) {
            return bad("the root is not a directory".into());
        }
        let n = self.inodes.len() as u64;
        // Each chunk once: a name is the hash of the sealed bytes, so one name with two
        // lengths or keys is a lie, and readers key their caches by name and key (a
        // second entry's longer length would read past the end of the cached chunk).
        let mut distinct = std::collections::HashSet::with_capacity(self.chunks.len());
        for (i, chunk) in self.chunks.iter().enumerate() {
            if !distinct.insert(chunk.name) {
                return bad(format!("chunk {i} repeats an earlier chunk's name"));
            }
        }
        // The directories form a tree: every inode but the root is reached, every
        // directory through exactly one name (readers walk it without cycle checks).
        let mut names = vec![0u32; self.inodes.len()];
        for inode in &self.inodes {
            if let InodeKind::Dir(children) = &inode.kind {
                for (_, child) in children {
                    if let Some(count) = names.get_mut(*child as usize) {
                        *count = count.saturating_add(1);
                    }
                }
            }
        }
        let mut reached = vec![false; self.inodes.len()];
        reached[0] = true;
        let mut stack = vec![0u32];
        while let Some(dir) = stack.pop() {
            if let InodeKind::Dir(children) = &self.inodes[dir as usize].kind {
                for (_, child) in children {
                    let child = *child as usize;
                    if child < reached.len() && !reached[child] {
                        reached[child] = true;
                        if matches!(self.inodes[child].kind, InodeKind::Dir(_)) {
                            stack.push(child as u32);
                        }
                    }
                }
            }
        }
        for (i, inode) in self.inodes.iter().enumerate() {
            if !reached[i] {
                return bad(format!("inode {i} is in no directory"));
            }
            if matches!(inode.kind, InodeKind::Dir(_)) && i != 0 && names[i] != 1 {
                return bad(format!("directory {i} has {} names", names[i]));
            }
            if inode.meta.mtime_nanos >= 1_000_000_000 || inode.meta.mode > 0o7777 {
                return bad(format!("inode {i} has an impossible time or mode"));
            }
            match &inode.kind {
                InodeKind::Dir(children) => {
                    for pair in children.windows(2) {
                        if pair[0].0 >= pair[1].0 {
                            return bad(format!("directory {i} is not sorted"));
                        }
                    }
                    for (name, ino) in children {
                        if u64::from(*ino) >= n || *ino == 0 {
                            return bad(format!("directory {i} points at inode {ino}"));
                        }
                        if name.is_empty()
                            || name.contains(&b'/')
                            || name.contains(&0)
                            || name == b"."
                            || name == b".."
                        {
                            return bad(format!("directory {i} has a bad name"));
                        }
                    }
                }
                InodeKind::File { size, extents } => {
                    let mut total = 0u64;
                    for e in extents {
                        total += u64::from(e.len);
                        if e.chunk != ZERO_CHUNK {
                            let Some(chunk) = self.chunks.get(e.chunk as usize) else {
                                return bad(format!("file {i} points at chunk {}", e.chunk));
                            };
                            if u64::from(e.offset) + u64::from(e.len) > u64::from(chunk.len)
                                || chunk.len > self.chunk_size
                            {
                                return bad(format!("file {i} reads past a chunk's end"));
                            }
                        }
                    }
                    if total != *size {
                        return bad(format!("file {i}'s extents do not add up to its size"));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn kind_byte(kind: &InodeKind) -> u8 {
    match kind {
        InodeKind::Dir(_) => 0,
        InodeKind::File { .. } => 1,
        InodeKind::Symlink(_) => 2,
        InodeKind::CharDevice(..) => 3,
        InodeKind::BlockDevice(..) => 4,
        InodeKind::Fifo => 5,
    }
}

/// Link counts from the directories: a directory has its name, its `.` and each
/// subdirectory's `..`; anything else one per name.
fn count_links(inodes: &mut [Inode]) -> Result<(), ManifestError> {
    let n = inodes.len();
    let mut links = vec![0u32; n];
    links[0] = 2;
    for i in 0..n {
        if let InodeKind::Dir(children) = &inodes[i].kind {
            for (_, child) in children {
                let child = *child as usize;
                if child == 0 || child >= n {
                    return Err(ManifestError::Malformed(format!(
                        "directory {i} points at inode {child}"
                    )));
                }
                if matches!(inodes[child].kind, InodeKind::Dir(_)) {
                    links[i] = links[i].saturating_add(1);
                    links[child] = links[child].saturating_add(2);
                } else {
                    links[child] = links[child].saturating_add(1);
                }
            }
        }
    }
    for (inode, count) in inodes.iter_mut().zip(links) {
        inode.nlink = count;
    }
    Ok(())
}

fn cipher(key: &TenantKey) -> Aes256Gcm {
    let k = blake3::derive_key("slapshot 2026-11 manifest key table v1", &key.0);
    Aes256Gcm::new(&k.into())
}

fn synthetic_nonce(key: &TenantKey, header_and_body: &[u8], plain_keys: &[u8]) -> [u8; NONCE_LEN] {
    let k = blake3::derive_key("slapshot 2026-11 manifest nonce v1", &key.0);
    let mut hasher = blake3::Hasher::new_keyed(&k);
    hasher.update(header_and_body);
    hasher.update(plain_keys);
    hasher.finalize().as_bytes()[..NONCE_LEN]
        .try_into()
        .expect("12 bytes")
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[derive(Default)]
struct Writer {
    out: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.out.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.out.extend_from_slice(b);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> ManifestError {
        ManifestError::Malformed(format!("{what} at byte {}", self.pos))
    }

    fn u8(&mut self) -> Result<u8, ManifestError> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or_else(|| self.err("end of body"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, ManifestError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("an overlong varint"))
    }

    fn u32(&mut self) -> Result<u32, ManifestError> {
        let v = self.varint()?;
        u32::try_from(v).map_err(|_| self.err("a number over 32 bits"))
    }

    /// A count of items each at least `min_bytes` long: bounded by what is left, so that a
    /// bad count cannot make us allocate more than the body's size.
    fn count(&mut self, min_bytes: usize) -> Result<usize, ManifestError> {
        let n = self.varint()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            return Err(self.err("a count larger than the body"));
        }
        Ok(n as usize)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err("end of body"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn bytes(&mut self) -> Result<&'a [u8], ManifestError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| self.err("a length"))?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, ManifestError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("a string that is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_parse_in_either_case_and_print_in_lower() {
        let id = ImageId([0xab; 32]);
        for text in [id.to_hex(), id.to_hex().to_uppercase()] {
            assert_eq!(ImageId::parse(&text), Some(id), "{text}");
        }
        assert_eq!(ImageId::parse(&format!("+{}", &id.to_hex()[1..])), None);
        assert_eq!(ImageId::parse("python"), None);
    }

    pub(crate) fn sample() -> Manifest {
        let meta = |mode| Meta {
            mode,
            uid: 1000,
            gid: 1000,
            mtime: -5,
            mtime_nanos: 7,
            xattrs: vec![(b"user.x".to_vec(), vec![0, 1, 2])],
        };
        Manifest {
            config: RuntimeConfig {
                env: vec!["PATH=/bin".into()],
                entrypoint: vec![],
                cmd: vec!["/bin/sh".into()],
                working_dir: "/".into(),
                user: String::new(),
            },
            chunk_size: 512 * 1024,
            inodes: vec![
                Inode {
                    meta: meta(0o755),
                    nlink: 2,
                    kind: InodeKind::Dir(vec![
                        (b"a".to_vec(), 1),
                        (b"b".to_vec(), 2),
                        (b"hard".to_vec(), 1),
                    ]),
                },
                Inode {
                    meta: meta(0o4755),
                    nlink: 2,
                    kind: InodeKind::File {
                        size: 150,
                        extents: vec![
                            Extent {
                                chunk: 0,
                                offset: 10,
                                len: 100,
                            },
                            Extent {
                                chunk: ZERO_CHUNK,
                                offset: 0,
                                len: 50,
                            },
                        ],
                    },
                },
                Inode {
                    meta: meta(0o777),
                    nlink: 1,
                    kind: InodeKind::Symlink(b"a".to_vec()),
                },
            ],
            chunks: vec![ChunkRef {
                name: ChunkName([9; 32]),
                len: 200,
            }],
            keys: vec![ChunkKey([3; 32])],
        }
    }

    #[test]
    fn round_trip_and_determinism() {
        let key = TenantKey([1; 32]);
        let m = sample();
        let bytes = m.encode(&key).unwrap();
        assert_eq!(bytes, m.encode(&key).unwrap(), "byte-identical");
        assert_eq!(Manifest::decode(&bytes, &key).unwrap(), m);
        assert_eq!(m.lookup("/a"), Some(1));
        assert_eq!(m.lookup("hard"), Some(1));
        assert_eq!(m.lookup("/nope"), None);
        // The key table is not in the clear.
        assert!(!bytes.windows(32).any(|w| w == [3; 32]));
    }

    #[test]
    fn a_body_larger_than_readers_accept_is_refused_at_encoding() {
        let key = TenantKey([1; 32]);
        let m = sample();
        let body = m.encode_body().len() as u64;
        assert!(m.encode_within(&key, body).is_ok());
        assert!(matches!(
            m.encode_within(&key, body - 1),
            Err(ManifestError::TooLarge { bytes, limit }) if bytes == body && limit == body - 1
        ));
    }

    #[test]
    fn tampering_and_wrong_keys_are_refused() {
        let key = TenantKey([1; 32]);
        let bytes = sample().encode(&key).unwrap();
        assert!(matches!(
            Manifest::decode(&bytes, &TenantKey([2; 32])),
            Err(ManifestError::WrongKey { .. })
        ));
        for i in [0, 9, 30, 45, bytes.len() - 20, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Manifest::decode(&bad, &key).is_err(), "byte {i} flipped");
        }
        for len in [0, 10, 40, bytes.len() - 1] {
            assert!(Manifest::decode(&bytes[..len], &key).is_err());
        }
    }

    #[test]
    fn a_chunk_named_twice_is_refused() {
        let key = TenantKey([1; 32]);
        let mut m = sample();
        assert!(!m.chunks.is_empty());
        let mut twin = m.chunks[0];
        twin.len += 1;
        m.chunks.push(twin);
        m.keys.push(m.keys[0].clone());
        assert!(matches!(
            Manifest::decode(&m.encode(&key).unwrap(), &key),
            Err(ManifestError::Malformed(message)) if message.contains("repeats")
        ));
    }

    #[test]
    fn bad_references_are_caught_after_authentication() {
        let key = TenantKey([1; 32]);
        let mut m = sample();
        if let InodeKind::File { extents, .. } = &mut m.inodes[1].kind {
            extents[0].chunk = 5;
        }
        assert!(matches!(
            Manifest::decode(&m.encode(&key).unwrap(), &key),
            Err(ManifestError::Malformed(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

        /// The body parser meets damaged input only after authentication (so only from a
        /// key holder or our own bug), but it must never panic or allocate without bound:
        /// flipped and cut bodies of a real manifest give errors or a manifest that passes
        /// validation.
        #[test]
        fn damaged_bodies_never_panic(
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), 1u8..=255), 1..6),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            truncate in proptest::prelude::any::<bool>(),
        ) {
            let m = sample();
            let mut body = m.encode_body();
            let keys = m.keys.clone();
            proptest::prop_assert_eq!(Manifest::decode_body(&body, keys.clone()).unwrap(), m);
            for (at, mask) in flips {
                let i = at.index(body.len());
                body[i] ^= mask;
            }
            if truncate {
                body.truncate(cut.index(body.len()));
            }
            if let Ok(decoded) = Manifest::decode_body(&body, keys) {
                proptest::prop_assert!(decoded.validate().is_ok());
            }
        }
    }
}
