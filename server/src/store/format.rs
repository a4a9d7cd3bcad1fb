//! The on-disk format of a shard store, as pure encode and decode functions.
//!
//! A store is one block device or one preallocated file:
//!
//! ```text
//! | superblock (4 KiB) | quarantine (4 KiB) | region 0 | region 1 | ... | region N-1 |
//! ```
//!
//! The quarantine block lists regions taken out of service because a write the store
//! relies on (zeroing a record, retiring the region) failed there: recovery never reads
//! them, so nothing they hold can come back.
//!
//! Every region starts with a one-block region header; records follow, each starting on a
//! block boundary. A record is a header (magic, header crc, region nonce, sequence, payload
//! length, payload crc, key) immediately followed by the payload, padded with zeros to the
//! next 4 KiB block so that the whole record is one aligned O_DIRECT write and one aligned
//! read. The region nonce ties a record to one incarnation of its region: when a region is
//! evicted its header gets a fresh nonce, so records left behind by the previous incarnation
//! can never be mistaken for live ones after a restart.
//!
//! All integers are little endian. Every header carries a crc32 (crc32fast, IEEE) so that a
//! torn or corrupted header is recognised rather than trusted.

/// The unit of O_DIRECT I/O and of record alignment. 4 KiB satisfies both 512-byte and
/// 4 KiB logical-sector devices.
pub const BLOCK_SIZE: usize = 4096;

const SUPERBLOCK_MAGIC: [u8; 8] = *b"SLAPSTOR";
const QUARANTINE_MAGIC: [u8; 8] = *b"SLAPQUAR";
const REGION_MAGIC: [u8; 8] = *b"SLAPREGN";
const RECORD_MAGIC: [u8; 4] = *b"SREC";

/// Bumped whenever the layout changes incompatibly. Version 2 added the quarantine block
/// and the superblock's generation.
pub const FORMAT_VERSION: u32 = 2;

/// Blocks before region 0: the superblock and the quarantine block.
pub const METADATA_BLOCKS: u64 = 2;

/// Regions one quarantine block can list: 4 KiB less its 24-byte header, 4 bytes each.
pub const MAX_QUARANTINED: usize = (BLOCK_SIZE - 24) / 4;

/// Fixed part of a record header: magic (4), header crc (4), nonce (8), seq (8),
/// payload length (4), payload crc (4), key length (1). The key follows.
pub const RECORD_FIXED_HEADER: usize = 33;

/// Rounds `n` up to a whole number of blocks.
pub const fn round_up_to_block(n: usize) -> usize {
    n.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// Bytes a record occupies before padding.
pub const fn record_header_len(key_len: usize) -> usize {
    RECORD_FIXED_HEADER + key_len
}

/// Blocks a record with this key length and payload length occupies on disk.
pub const fn record_blocks(key_len: usize, payload_len: usize) -> u32 {
    (round_up_to_block(record_header_len(key_len) + payload_len) / BLOCK_SIZE) as u32
}

/// The shape of a store, written in its superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub region_size: u64,
    pub region_count: u32,
    /// Random per format; region headers carry it so that a reformatted store never adopts
    /// regions of its predecessor.
    pub store_id: u64,
    /// Incremented (durably) every time a node opens the store for writing; an index
    /// checkpoint is valid only for the generation it was written in.
    pub generation: u64,
}

impl Superblock {
    pub fn encode(&self, block: &mut [u8]) {
        block[..BLOCK_SIZE].fill(0);
        block[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        block[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        block[16..24].copy_from_slice(&self.region_size.to_le_bytes());
        block[24..28].copy_from_slice(&self.region_count.to_le_bytes());
        block[32..40].copy_from_slice(&self.store_id.to_le_bytes());
        block[40..48].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32fast::hash(&block[0..48]);
        block[48..52].copy_from_slice(&crc.to_le_bytes());
    }

    /// `Ok(None)` when the block holds no superblock at all (a fresh device); an error
    /// when it holds one this build cannot use.
    pub fn decode(block: &[u8]) -> Result<Option<Self>, SuperblockError> {
        if block[0..8] != SUPERBLOCK_MAGIC {
            return Ok(None);
        }
        // The version comes before the checksum: version 1 put its checksum elsewhere.
        let version = le_u32(&block[8..12]);
        if version != FORMAT_VERSION {
            return Err(SuperblockError::Version(version));
        }
        if crc32fast::hash(&block[0..48]) != le_u32(&block[48..52]) {
            return Err(SuperblockError::Corrupt);
        }
        let block_size = le_u32(&block[12..16]);
        if block_size as usize != BLOCK_SIZE {
            return Err(SuperblockError::BlockSize(block_size));
        }
        Ok(Some(Self {
            region_size: le_u64(&block[16..24]),
            region_count: le_u32(&block[24..28]),
            store_id: le_u64(&block[32..40]),
            generation: le_u64(&block[40..48]),
        }))
    }
}

/// Encodes the list of quarantined regions of store `store_id` (at most `MAX_QUARANTINED`).
pub fn encode_quarantine(block: &mut [u8], store_id: u64, regions: &[u32]) {
    assert!(
        regions.len() <= MAX_QUARANTINED,
        "quarantine list overflows its block"
    );
    block[..BLOCK_SIZE].fill(0);
    block[0..8].copy_from_slice(&QUARANTINE_MAGIC);
    block[8..16].copy_from_slice(&store_id.to_le_bytes());
    block[16..20].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, region) in regions.iter().enumerate() {
        block[24 + 4 * i..28 + 4 * i].copy_from_slice(&region.to_le_bytes());
    }
    let end = 24 + 4 * regions.len();
    let crc = crc32fast::hash(&[&block[0..20], &block[24..end]].concat());
    block[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// The quarantined regions of store `store_id`: empty for a block of zeros (nothing was
/// ever quarantined), an error for a block that is damaged or belongs to another store,
/// because then the store cannot tell which regions must not be read.
pub fn decode_quarantine(block: &[u8], store_id: u64) -> Result<Vec<u32>, SuperblockError> {
    if block[0..BLOCK_SIZE].iter().all(|&b| b == 0) {
        return Ok(Vec::new());
    }
    let count = le_u32(&block[16..20]) as usize;
    if block[0..8] != QUARANTINE_MAGIC
        || le_u64(&block[8..16]) != store_id
        || count > MAX_QUARANTINED
    {
        return Err(SuperblockError::Quarantine);
    }
    let end = 24 + 4 * count;
    if crc32fast::hash(&[&block[0..20], &block[24..end]].concat()) != le_u32(&block[20..24]) {
        return Err(SuperblockError::Quarantine);
    }
    Ok((0..count).map(|i| le_u32(&block[24 + 4 * i..])).collect())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("the superblock checksum does not match")]
    Corrupt,
    #[error("the store uses format version {0}; this build reads version {FORMAT_VERSION}")]
    Version(u32),
    #[error("the store uses {0}-byte blocks; this build uses {BLOCK_SIZE}")]
    BlockSize(u32),
    #[error("the quarantine block is damaged")]
    Quarantine,
}

/// Whether a region holds records of its current incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionState {
    /// Opened for appends; its records are live if their nonce matches.
    Live = 1,
    /// Evicted: nothing in it is live.
    Retired = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionHeader {
    pub region: u32,
    pub state: RegionState,
    pub nonce: u64,
    /// Sequence number when the region was opened; orders regions for FIFO eviction after
    /// a restart.
    pub open_seq: u64,
    pub store_id: u64,
}

impl RegionHeader {
    pub fn encode(&self, block: &mut [u8]) {
        block[..BLOCK_SIZE].fill(0);
        block[0..8].copy_from_slice(&REGION_MAGIC);
        block[8..12].copy_from_slice(&self.region.to_le_bytes());
        block[12..16].copy_from_slice(&(self.state as u32).to_le_bytes());
        block[16..24].copy_from_slice(&self.nonce.to_le_bytes());
        block[24..32].copy_from_slice(&self.open_seq.to_le_bytes());
        block[32..40].copy_from_slice(&self.store_id.to_le_bytes());
        let crc = crc32fast::hash(&block[0..40]);
        block[40..44].copy_from_slice(&crc.to_le_bytes());
    }

    /// The header of `region` in this store, or `None` if the block holds anything else
    /// (zeros, garbage, another store's header, a torn write).
    pub fn decode(block: &[u8], region: u32, store_id: u64) -> Option<Self> {
        if block[0..8] != REGION_MAGIC || crc32fast::hash(&block[0..40]) != le_u32(&block[40..44]) {
            return None;
        }
        let state = match le_u32(&block[12..16]) {
            1 => RegionState::Live,
            2 => RegionState::Retired,
            _ => return None,
        };
        let header = Self {
            region: le_u32(&block[8..12]),
            state,
            nonce: le_u64(&block[16..24]),
            open_seq: le_u64(&block[24..32]),
            store_id: le_u64(&block[32..40]),
        };
        (header.region == region && header.store_id == store_id).then_some(header)
    }
}

/// The decoded header of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader<'a> {
    pub seq: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
    pub key: &'a [u8],
}

impl RecordHeader<'_> {
    pub fn header_len(&self) -> usize {
        record_header_len(self.key.len())
    }

    pub fn blocks(&self) -> u32 {
        record_blocks(self.key.len(), self.payload_len as usize)
    }
}

/// Why a block does not start a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordHeaderError {
    /// No record starts here (zeros, a hole left by a write that never completed, an
    /// invalidated record, or payload bytes).
    NotARecord,
    /// A record of this region's incarnation starts here but its header is damaged.
    Corrupt,
}

/// Writes a record header for `key` into the first bytes of `buf`.
pub fn encode_record_header(
    buf: &mut [u8],
    nonce: u64,
    seq: u64,
    key: &[u8],
    payload_len: u32,
    payload_crc: u32,
) {
    let header_len = record_header_len(key.len());
    buf[0..4].copy_from_slice(&RECORD_MAGIC);
    buf[8..16].copy_from_slice(&nonce.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    buf[24..28].copy_from_slice(&payload_len.to_le_bytes());
    buf[28..32].copy_from_slice(&payload_crc.to_le_bytes());
    buf[32] = key.len() as u8;
    buf[33..header_len].copy_from_slice(key);
    let crc = crc32fast::hash(&buf[8..header_len]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the record header at the start of `buf` (at least one block), accepting only
/// records written under `nonce`. A header whose magic and nonce match but whose checksum
/// does not is `Corrupt`; anything else is `NotARecord`.
pub fn decode_record_header(
    buf: &[u8],
    nonce: u64,
    max_payload: u64,
) -> Result<RecordHeader<'_>, RecordHeaderError> {
    if buf.len() < RECORD_FIXED_HEADER || buf[0..4] != RECORD_MAGIC || le_u64(&buf[8..16]) != nonce
    {
        return Err(RecordHeaderError::NotARecord);
    }
    let key_len = usize::from(buf[32]);
    let header_len = record_header_len(key_len);
    if key_len == 0 || key_len > slapshot_core::MAX_SHARD_KEY_LEN || buf.len() < header_len {
        return Err(RecordHeaderError::Corrupt);
    }
    if crc32fast::hash(&buf[8..header_len]) != le_u32(&buf[4..8]) {
        return Err(RecordHeaderError::Corrupt);
    }
    let payload_len = le_u32(&buf[24..28]);
    if u64::from(payload_len) > max_payload {
        return Err(RecordHeaderError::Corrupt);
    }
    Ok(RecordHeader {
        seq: le_u64(&buf[16..24]),
        payload_len,
        payload_crc: le_u32(&buf[28..32]),
        key: &buf[33..header_len],
    })
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = Superblock {
            region_size: 16 << 20,
            region_count: 63,
            store_id: 0xfeed,
            generation: 5,
        };
        let mut block = vec![0u8; BLOCK_SIZE];
        assert_eq!(Superblock::decode(&block), Ok(None));
        sb.encode(&mut block);
        assert_eq!(Superblock::decode(&block), Ok(Some(sb)));
        block[20] ^= 1;
        assert_eq!(Superblock::decode(&block), Err(SuperblockError::Corrupt));
    }

    #[test]
    fn quarantine_round_trips_and_detects_damage() {
        let mut block = vec![0u8; BLOCK_SIZE];
        assert_eq!(decode_quarantine(&block, 9), Ok(vec![]));
        encode_quarantine(&mut block, 9, &[3, 17, 4000]);
        assert_eq!(decode_quarantine(&block, 9), Ok(vec![3, 17, 4000]));
        assert_eq!(
            decode_quarantine(&block, 8),
            Err(SuperblockError::Quarantine),
            "another store"
        );
        block[28] ^= 1;
        assert_eq!(
            decode_quarantine(&block, 9),
            Err(SuperblockError::Quarantine)
        );
    }

    #[test]
    fn region_header_belongs_to_one_region_of_one_store() {
        let h = RegionHeader {
            region: 7,
            state: RegionState::Live,
            nonce: 42,
            open_seq: 9,
            store_id: 1,
        };
        let mut block = vec![0u8; BLOCK_SIZE];
        h.encode(&mut block);
        assert_eq!(RegionHeader::decode(&block, 7, 1), Some(h));
        assert_eq!(
            RegionHeader::decode(&block, 8, 1),
            None,
            "another region's slot"
        );
        assert_eq!(RegionHeader::decode(&block, 7, 2), None, "another store");
        block[17] ^= 0x80;
        assert_eq!(RegionHeader::decode(&block, 7, 1), None);
    }

    #[test]
    fn record_header_round_trips() {
        let mut buf = vec![0u8; BLOCK_SIZE];
        encode_record_header(&mut buf, 5, 77, b"chunk.0", 1000, 0xabcd);
        let h = decode_record_header(&buf, 5, 1 << 20).unwrap();
        assert_eq!(
            (h.seq, h.payload_len, h.payload_crc, h.key),
            (77, 1000, 0xabcd, &b"chunk.0"[..])
        );
        assert_eq!(h.header_len(), 40);
        assert_eq!(h.blocks(), 1);
    }

    #[test]
    fn record_from_another_incarnation_is_not_a_record() {
        let mut buf = vec![0u8; BLOCK_SIZE];
        encode_record_header(&mut buf, 5, 1, b"k", 10, 0);
        assert_eq!(
            decode_record_header(&buf, 6, 1 << 20),
            Err(RecordHeaderError::NotARecord)
        );
        assert_eq!(
            decode_record_header(&[0u8; BLOCK_SIZE], 5, 1 << 20),
            Err(RecordHeaderError::NotARecord)
        );
    }

    #[test]
    fn damaged_record_header_is_corrupt() {
        let mut buf = vec![0u8; BLOCK_SIZE];
        encode_record_header(&mut buf, 5, 1, b"key", 10, 0);
        buf[34] ^= 1; // inside the key
        assert_eq!(
            decode_record_header(&buf, 5, 1 << 20),
            Err(RecordHeaderError::Corrupt)
        );
        encode_record_header(&mut buf, 5, 1, b"key", 10, 0);
        assert_eq!(
            decode_record_header(&buf, 5, 9),
            Err(RecordHeaderError::Corrupt),
            "payload beyond the limit"
        );
    }

    proptest::proptest! {
        /// Whatever a device returns, the decoders never panic.
        #[test]
        fn decoders_never_panic_on_arbitrary_blocks(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), BLOCK_SIZE..=BLOCK_SIZE),
            nonce in proptest::prelude::any::<u64>(),
        ) {
            let _ = Superblock::decode(&bytes);
            let _ = RegionHeader::decode(&bytes, 3, nonce);
            if let Ok(header) = decode_record_header(&bytes, nonce, 1 << 20) {
                proptest::prop_assert!(header.key.len() <= slapshot_core::MAX_SHARD_KEY_LEN);
                proptest::prop_assert!(header.payload_len <= 1 << 20);
            }
        }

        /// A valid record header with its magic and nonce in place decodes, and any single
        /// damaged byte after the magic and nonce is caught as corrupt.
        #[test]
        fn damaged_record_headers_are_corrupt(at in 4usize..40, flip in 1u8..=255) {
            let mut buf = vec![0u8; BLOCK_SIZE];
            encode_record_header(&mut buf, 5, 9, b"chunk.key", 100, 7);
            let at = if (8..16).contains(&at) { at + 8 } else { at };
            buf[at] ^= flip;
            proptest::prop_assert!(decode_record_header(&buf, 5, 1 << 20).is_err());
        }
    }

    /// Flips bytes of `buf` at `flips` (positions taken modulo `window`) and returns the
    /// positions whose bytes really changed (two flips of one byte may cancel).
    fn mutate(
        buf: &mut [u8],
        window: usize,
        flips: &[(proptest::sample::Index, u8)],
    ) -> Vec<usize> {
        let original = buf.to_vec();
        for (at, flip) in flips {
            buf[at.index(window)] ^= flip;
        }
        (0..buf.len()).filter(|&i| buf[i] != original[i]).collect()
    }

    fn flips() -> impl proptest::strategy::Strategy<Value = Vec<(proptest::sample::Index, u8)>> {
        proptest::collection::vec(
            (
                proptest::prelude::any::<proptest::sample::Index>(),
                1u8..=255,
            ),
            1..4,
        )
    }

    // Inputs that get past the magic number: valid encodings of random values, then
    // damaged bytes (mostly inside the header) or fields rewritten under a fresh checksum.
    // The decoders must never panic, must give back exactly what was encoded, and must
    // accept a damaged encoding only when no byte they cover changed.
    proptest::proptest! {
        #[test]
        fn record_headers_round_trip_and_reject_damage_consistently(
            nonce in proptest::prelude::any::<u64>(),
            seq in proptest::prelude::any::<u64>(),
            key in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..=slapshot_core::MAX_SHARD_KEY_LEN),
            payload_len in 0u32..=(1 << 20),
            payload_crc in proptest::prelude::any::<u32>(),
            flips in flips(),
        ) {
            let mut buf = vec![0u8; BLOCK_SIZE];
            encode_record_header(&mut buf, nonce, seq, &key, payload_len, payload_crc);
            let original = RecordHeader { seq, payload_len, payload_crc, key: &key };
            proptest::prop_assert_eq!(decode_record_header(&buf, nonce, 1 << 20), Ok(original));
            // A short buffer holding the whole header decodes the same; one that cuts it
            // does not.
            let header_len = record_header_len(key.len());
            proptest::prop_assert_eq!(decode_record_header(&buf[..header_len], nonce, 1 << 20), Ok(original));
            proptest::prop_assert!(decode_record_header(&buf[..header_len - 1], nonce, 1 << 20).is_err());
            if payload_len > 0 {
                proptest::prop_assert_eq!(
                    decode_record_header(&buf, nonce, u64::from(payload_len) - 1),
                    Err(RecordHeaderError::Corrupt)
                );
            }

            let mut damaged = buf.clone();
            let changed = mutate(&mut damaged, header_len + 16, &flips);
            let result = decode_record_header(&damaged, nonce, 1 << 20);
            let in_magic_or_nonce = changed.iter().any(|&i| i < 4 || (8..16).contains(&i));
            if changed.iter().all(|&i| i >= header_len) {
                proptest::prop_assert_eq!(result, Ok(original));
            } else if in_magic_or_nonce {
                proptest::prop_assert_eq!(result, Err(RecordHeaderError::NotARecord));
            } else {
                proptest::prop_assert_eq!(result, Err(RecordHeaderError::Corrupt));
            }
        }

        /// Fields no encoder writes, under a checksum that matches: rejected, not trusted.
        #[test]
        fn record_headers_with_impossible_fields_are_corrupt(
            nonce in proptest::prelude::any::<u64>(),
            key_len in (slapshot_core::MAX_SHARD_KEY_LEN + 1)..=255,
            payload_len in proptest::prelude::any::<u32>(),
        ) {
            let mut buf = vec![0u8; BLOCK_SIZE];
            encode_record_header(&mut buf, nonce, 1, &vec![b'k'; key_len], 0, 0);
            proptest::prop_assert_eq!(decode_record_header(&buf, nonce, 1 << 20), Err(RecordHeaderError::Corrupt));
            // A zero-length key under a valid checksum.
            encode_record_header(&mut buf, nonce, 1, b"", 0, 0);
            proptest::prop_assert_eq!(decode_record_header(&buf, nonce, 1 << 20), Err(RecordHeaderError::Corrupt));
            encode_record_header(&mut buf, nonce, 1, b"k", payload_len, 0);
            let max = 1 << 20;
            proptest::prop_assert_eq!(
                decode_record_header(&buf, nonce, max).is_ok(),
                u64::from(payload_len) <= max
            );
        }

        #[test]
        fn superblocks_round_trip_and_reject_damage_consistently(
            region_size in proptest::prelude::any::<u64>(),
            region_count in proptest::prelude::any::<u32>(),
            store_id in proptest::prelude::any::<u64>(),
            generation in proptest::prelude::any::<u64>(),
            flips in flips(),
        ) {
            let sb = Superblock { region_size, region_count, store_id, generation };
            let mut block = vec![0u8; BLOCK_SIZE];
            sb.encode(&mut block);
            proptest::prop_assert_eq!(Superblock::decode(&block), Ok(Some(sb)));
            let changed = mutate(&mut block, 64, &flips);
            let result = Superblock::decode(&block);
            if changed.iter().all(|&i| i >= 52) {
                proptest::prop_assert_eq!(result, Ok(Some(sb)));
            } else if changed.iter().any(|&i| i < 8) {
                proptest::prop_assert_eq!(result, Ok(None), "no magic: a fresh device");
            } else {
                proptest::prop_assert!(result.is_err(), "{:?}", result);
            }
        }

        #[test]
        fn region_headers_round_trip_and_reject_damage_consistently(
            region in proptest::prelude::any::<u32>(),
            retired in proptest::prelude::any::<bool>(),
            nonce in proptest::prelude::any::<u64>(),
            open_seq in proptest::prelude::any::<u64>(),
            store_id in proptest::prelude::any::<u64>(),
            state in 0u32..8,
            flips in flips(),
        ) {
            let header = RegionHeader {
                region,
                state: if retired { RegionState::Retired } else { RegionState::Live },
                nonce,
                open_seq,
                store_id,
            };
            let mut block = vec![0u8; BLOCK_SIZE];
            header.encode(&mut block);
            proptest::prop_assert_eq!(RegionHeader::decode(&block, region, store_id), Some(header));
            proptest::prop_assert_eq!(RegionHeader::decode(&block, region ^ 1, store_id), None);
            proptest::prop_assert_eq!(RegionHeader::decode(&block, region, store_id ^ 1), None);
            let mut damaged = block.clone();
            let changed = mutate(&mut damaged, 56, &flips);
            let intact = changed.iter().all(|&i| i >= 44);
            proptest::prop_assert_eq!(
                RegionHeader::decode(&damaged, region, store_id),
                intact.then_some(header)
            );
            // A state no encoder writes, under a fresh checksum.
            block[12..16].copy_from_slice(&state.to_le_bytes());
            let crc = crc32fast::hash(&block[0..40]);
            block[40..44].copy_from_slice(&crc.to_le_bytes());
            proptest::prop_assert_eq!(
                RegionHeader::decode(&block, region, store_id).is_some(),
                state == 1 || state == 2
            );
        }

        #[test]
        fn quarantine_lists_round_trip_and_reject_damage_consistently(
            store_id in proptest::prelude::any::<u64>(),
            regions in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..64),
            flips in flips(),
        ) {
            let mut block = vec![0u8; BLOCK_SIZE];
            encode_quarantine(&mut block, store_id, &regions);
            proptest::prop_assert_eq!(decode_quarantine(&block, store_id), Ok(regions.clone()));
            proptest::prop_assert!(decode_quarantine(&block, store_id ^ 1).is_err());
            let end = 24 + 4 * regions.len();
            let changed = mutate(&mut block, end + 16, &flips);
            let result = decode_quarantine(&block, store_id);
            if changed.iter().all(|&i| i >= end) {
                proptest::prop_assert_eq!(result, Ok(regions));
            } else {
                proptest::prop_assert_eq!(result, Err(SuperblockError::Quarantine));
            }
        }
    }

    #[test]
    fn record_sizes_round_to_blocks() {
        assert_eq!(record_blocks(10, 0), 1);
        assert_eq!(record_blocks(10, BLOCK_SIZE - RECORD_FIXED_HEADER - 10), 1);
        assert_eq!(record_blocks(10, BLOCK_SIZE - RECORD_FIXED_HEADER - 9), 2);
        assert_eq!(record_blocks(64, 128 * 1024), 33);
    }
}
