//! The index checkpoint: a clean shutdown writes the index and the region table to a file,
//! so that the next start costs O(index) instead of a read of the whole device.
//!
//! A checkpoint is used only if it describes the store exactly as it is:
//! - it belongs to this store (store id) and this shape (region size and count);
//! - it was written in the store's previous generation: every start bumps the superblock's
//!   generation, durably, before it writes anything, so a checkpoint left by any earlier
//!   run, or by a run that went on writing after a checkpoint was copied back, is stale;
//! - its checksums match (a torn or damaged file is ignored);
//! - every region it calls live still has that header on the device (same nonce): one
//!   4 KiB read per live region, a cheap cross-check against a file restored from
//!   elsewhere.
//!
//! Anything else, or a crash (which writes no checkpoint), falls back to the full scan.
//! The file is removed once loaded: the run that loaded it writes its own at its end.
//!
//! A checkpoint is written only when the store is quiet: every owned task finished, no
//! eviction running, and no record waiting to be zeroed (`settling`). Otherwise a record
//! the index no longer points at, still waiting to be zeroed, could be forgotten by the
//! restart and come back after a later delete; the scan at the next start zeroes such
//! leftovers instead.
//!
//! Layout, little endian: a 64-byte header (magic, version, header crc, store id,
//! generation, next sequence number, region count, region size in blocks, entry count,
//! body crc), then one 20-byte record per region (state, nonce, open sequence number), then
//! one 32-byte record per index entry (key hash, region, block, payload length, key length,
//! hits, sequence number).

use std::{
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::atomic::Ordering,
};

use super::{
    Store,
    format::{BLOCK_SIZE, RegionHeader, RegionState},
    index::{Entry, Location},
    regions::lock,
};

const MAGIC: [u8; 8] = *b"SLAPCKPT";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const REGION_RECORD: usize = 20;
const ENTRY_RECORD: usize = 32;

/// Region states in a checkpoint.
const FREE: u8 = 0;
const LIVE: u8 = 1;
const OUT_OF_SERVICE: u8 = 2;

/// Why a checkpoint was not used (logged, then the store is scanned).
#[derive(Debug, thiserror::Error)]
pub enum Stale {
    #[error("no checkpoint")]
    Missing,
    #[error("cannot read the checkpoint: {0}")]
    Read(std::io::Error),
    #[error("the checkpoint is damaged ({0})")]
    Damaged(&'static str),
    #[error("the checkpoint belongs to another store or shape")]
    OtherStore,
    #[error("the checkpoint is from generation {found}, the store was last opened in {expected}")]
    Generation { found: u64, expected: u64 },
    #[error("region {0} no longer has the header the checkpoint recorded")]
    RegionChanged(u32),
}

/// Writes the checkpoint of a quiet store to `path` (via a temporary file, synced and
/// renamed, then the directory synced).
pub fn write(store: &Store, path: &Path) -> std::io::Result<()> {
    let region_count = store.device.superblock.region_count;
    let mut body = Vec::with_capacity(
        region_count as usize * REGION_RECORD + store.index.len() * ENTRY_RECORD,
    );
    let mut live = vec![false; region_count as usize];
    let mut entries = 0u64;
    let mut entry_bytes = Vec::new();
    for shard in store.index.shards() {
        for (hash, entry) in lock(shard).iter() {
            live[entry.location.region as usize] = true;
            entries += 1;
            entry_bytes.extend_from_slice(&hash.to_le_bytes());
            entry_bytes.extend_from_slice(&entry.location.region.to_le_bytes());
            entry_bytes.extend_from_slice(&entry.location.block.to_le_bytes());
            entry_bytes.extend_from_slice(&entry.payload_len.to_le_bytes());
            entry_bytes.push(entry.key_len);
            entry_bytes.push(entry.hits);
            entry_bytes.extend_from_slice(&[0, 0]);
            entry_bytes.extend_from_slice(&entry.seq.to_le_bytes());
        }
    }
    for region in 0..region_count {
        let meta = store.regions.get(region);
        let state = if meta.is_quarantined() {
            OUT_OF_SERVICE
        } else if live[region as usize] {
            LIVE
        } else {
            FREE
        };
        body.push(state);
        body.extend_from_slice(&[0, 0, 0]);
        body.extend_from_slice(&meta.nonce.load(Ordering::Acquire).to_le_bytes());
        body.extend_from_slice(&meta.open_seq.load(Ordering::Acquire).to_le_bytes());
    }
    body.extend_from_slice(&entry_bytes);

    let sb = &store.device.superblock;
    let mut header = [0u8; HEADER];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&sb.store_id.to_le_bytes());
    header[24..32].copy_from_slice(&sb.generation.to_le_bytes());
    header[32..40].copy_from_slice(&store.seq.load(Ordering::Acquire).to_le_bytes());
    header[40..44].copy_from_slice(&region_count.to_le_bytes());
    header[44..48].copy_from_slice(&(store.region_blocks).to_le_bytes());
    header[48..56].copy_from_slice(&entries.to_le_bytes());
    header[56..60].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let crc = crc32fast::hash(&header[16..]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());

    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&header)?;
    file.write_all(&body)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What a valid checkpoint holds.
pub struct Loaded {
    pub next_seq: u64,
    /// Per region: Some((nonce, open_seq)) if it holds live records.
    pub regions: Vec<Option<(u64, u64)>>,
    pub entries: Vec<(u64, Entry)>,
}

/// Reads and checks the checkpoint at `path` against the store as opened.
pub fn load(store: &Store, path: &Path) -> Result<Loaded, Stale> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Stale::Missing),
        Err(e) => return Err(Stale::Read(e)),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(Stale::Read)?;
    let loaded = decode(
        &bytes,
        store.device.superblock.store_id,
        store.device.previous_generation,
        store.device.superblock.region_count,
        store.region_blocks,
    )?;
    // Cross-check every live region's header on the device.
    let mut block = super::aligned::AlignedBuf::zeroed(BLOCK_SIZE);
    for (region, state) in loaded.regions.iter().enumerate() {
        let Some((nonce, _)) = state else {
            continue;
        };
        let region = region as u32;
        store
            .device
            .file
            .read_exact_at(block.as_mut_slice(), store.device.region_offset(region))
            .map_err(Stale::Read)?;
        match RegionHeader::decode(block.as_slice(), region, store.device.superblock.store_id) {
            Some(h) if h.state == RegionState::Live && h.nonce == *nonce => {}
            _ => return Err(Stale::RegionChanged(region)),
        }
    }
    Ok(loaded)
}

fn decode(
    bytes: &[u8],
    store_id: u64,
    expected_generation: u64,
    region_count: u32,
    region_blocks: u32,
) -> Result<Loaded, Stale> {
    if bytes.len() < HEADER || bytes[0..8] != MAGIC {
        return Err(Stale::Damaged("no checkpoint header"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(8) != VERSION || crc32fast::hash(&bytes[16..HEADER]) != u32_at(12) {
        return Err(Stale::Damaged("header checksum"));
    }
    if u64_at(16) != store_id || u32_at(40) != region_count || u32_at(44) != region_blocks {
        return Err(Stale::OtherStore);
    }
    if u64_at(24) != expected_generation {
        return Err(Stale::Generation {
            found: u64_at(24),
            expected: expected_generation,
        });
    }
    let entries = u64_at(48);
    let body = &bytes[HEADER..];
    let expected_len = (region_count as u64)
        .checked_mul(REGION_RECORD as u64)
        .and_then(|r| entries.checked_mul(ENTRY_RECORD as u64)?.checked_add(r));
    if expected_len != Some(body.len() as u64) {
        return Err(Stale::Damaged("length"));
    }
    if crc32fast::hash(body) != u32_at(56) {
        return Err(Stale::Damaged("body checksum"));
    }
    let next_seq = u64_at(32);
    let field32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let field64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let (region_bytes, entry_bytes) = body.split_at(region_count as usize * REGION_RECORD);
    let regions: Vec<_> = region_bytes
        .chunks_exact(REGION_RECORD)
        .map(|r| (r[0] == LIVE).then(|| (field64(r, 4), field64(r, 12))))
        .collect();
    let mut out = Vec::with_capacity(entries as usize);
    for e in entry_bytes.chunks_exact(ENTRY_RECORD) {
        let entry = Entry {
            location: Location {
                region: field32(e, 8),
                block: field32(e, 12),
            },
            payload_len: field32(e, 16),
            key_len: e[20],
            hits: e[21],
            seq: field64(e, 24),
        };
        let sane = entry.location.region < region_count
            && regions[entry.location.region as usize].is_some()
            && entry.location.block >= 1
            && entry.key_len > 0
            && entry.location.block.saturating_add(entry.blocks()) <= region_blocks;
        if !sane {
            return Err(Stale::Damaged("an entry outside its region"));
        }
        out.push((field64(e, 0), entry));
    }
    Ok(Loaded {
        next_seq,
        regions,
        entries: out,
    })
}

/// Removes a checkpoint once it has been loaded (or found stale).
pub fn discard(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the checkpoint");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(generation: u64) -> Vec<u8> {
        // Two regions (the second live) and one entry, laid out as `write` does.
        let mut body = Vec::new();
        for (state, nonce) in [(FREE, 0u64), (LIVE, 77)] {
            body.push(state);
            body.extend_from_slice(&[0, 0, 0]);
            body.extend_from_slice(&nonce.to_le_bytes());
            body.extend_from_slice(&5u64.to_le_bytes());
        }
        body.extend_from_slice(&42u64.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&1000u32.to_le_bytes());
        body.extend_from_slice(&[7, 2, 0, 0]);
        body.extend_from_slice(&9u64.to_le_bytes());
        let mut header = [0u8; HEADER];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&3u64.to_le_bytes());
        header[24..32].copy_from_slice(&generation.to_le_bytes());
        header[32..40].copy_from_slice(&100u64.to_le_bytes());
        header[40..44].copy_from_slice(&2u32.to_le_bytes());
        header[44..48].copy_from_slice(&16u32.to_le_bytes());
        header[48..56].copy_from_slice(&1u64.to_le_bytes());
        header[56..60].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let crc = crc32fast::hash(&header[16..]);
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        [&header[..], &body].concat()
    }

    #[test]
    fn a_current_checkpoint_decodes() {
        let loaded = decode(&encoded(4), 3, 4, 2, 16).unwrap();
        assert_eq!(loaded.next_seq, 100);
        assert_eq!(loaded.regions, vec![None, Some((77, 5))]);
        assert_eq!(loaded.entries.len(), 1);
        assert_eq!(loaded.entries[0].0, 42);
        assert_eq!(loaded.entries[0].1.seq, 9);
    }

    #[test]
    fn stale_other_and_damaged_checkpoints_are_refused() {
        assert!(matches!(
            decode(&encoded(4), 3, 5, 2, 16),
            Err(Stale::Generation { .. })
        ));
        assert!(matches!(
            decode(&encoded(4), 8, 4, 2, 16),
            Err(Stale::OtherStore)
        ));
        assert!(matches!(
            decode(&encoded(4), 3, 4, 3, 16),
            Err(Stale::OtherStore)
        ));
        let bytes = encoded(4);
        for at in [0, 13, 30, HEADER + 5, bytes.len() - 3] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(decode(&damaged, 3, 4, 2, 16).is_err(), "byte {at}");
        }
        assert!(
            decode(&bytes[..bytes.len() - 1], 3, 4, 2, 16).is_err(),
            "torn"
        );
    }
}
