//! The in-memory index: key hash to record location.
//!
//! Keys are indexed by their 64-bit xxh3 hash, not stored: an entry is 16 bytes plus the
//! hash and the table's own overhead (about 40 bytes per shard in all), and the full key is
//! checked against the record header on every read, so a hash collision costs a miss,
//! never wrong bytes. The table is split into independently locked shards so that the
//! runtime threads rarely contend; a lock is never held across an await.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Mutex, MutexGuard},
};

/// Number of independently locked parts; a power of two well above the core count.
const INDEX_SHARDS: usize = 256;

/// Where a record lives on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub region: u32,
    /// Offset inside the region, in blocks (block 0 is the region header).
    pub block: u32,
}

/// What the index knows about one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub location: Location,
    pub payload_len: u32,
    pub key_len: u8,
    /// Reads since the record was written or last reinserted, saturating.
    pub hits: u8,
    /// The record's sequence number. Two PUTs of one key commit in this order whatever
    /// order their writes finish in, so that the index always agrees with recovery, which
    /// keeps the highest.
    pub seq: u64,
}

impl Entry {
    pub fn blocks(&self) -> u32 {
        super::format::record_blocks(usize::from(self.key_len), self.payload_len as usize)
    }

    pub fn disk_bytes(&self) -> u64 {
        u64::from(self.blocks()) * super::format::BLOCK_SIZE as u64
    }
}

pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Keys are already uniformly distributed hashes; hashing them again is wasted work.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("the index only hashes u64 keys");
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub type IndexMap = HashMap<u64, Entry, BuildHasherDefault<IdentityHasher>>;

pub struct Index {
    shards: Box<[Mutex<IndexMap>]>,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    pub fn new() -> Self {
        Self {
            shards: (0..INDEX_SHARDS)
                .map(|_| Mutex::new(IndexMap::default()))
                .collect(),
        }
    }

    /// Locks the part of the index that holds `hash`.
    pub fn lock(&self, hash: u64) -> MutexGuard<'_, IndexMap> {
        // Bits 24..32 pick the shard. hashbrown places entries by the low bits and tags
        // them with the top 7 bits, so both must keep varying inside one shard; the middle
        // bits are constant per shard only beyond 2^24 buckets per shard.
        let shard = (hash >> 24) as usize % INDEX_SHARDS;
        super::regions::lock(&self.shards[shard])
    }

    /// The independently locked parts, for a checkpoint of the whole index.
    pub fn shards(&self) -> &[Mutex<IndexMap>] {
        &self.shards
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| super::regions::lock(s).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_stays_small() {
        // 8 bytes of location, 6 of length and counters, 8 of sequence number.
        assert!(std::mem::size_of::<Entry>() <= 24);
        assert!(std::mem::size_of::<(u64, Entry)>() <= 32);
    }

    #[test]
    fn lookups_go_to_the_same_shard() {
        let index = Index::new();
        let hash = key_hash(b"chunk-1");
        let entry = Entry {
            location: Location {
                region: 1,
                block: 2,
            },
            payload_len: 3,
            key_len: 7,
            hits: 0,
            seq: 1,
        };
        index.lock(hash).insert(hash, entry);
        assert_eq!(index.lock(hash).get(&hash), Some(&entry));
        assert_eq!(index.len(), 1);
    }
}
