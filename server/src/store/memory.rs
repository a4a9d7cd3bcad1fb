//! The memory tier: hot shards held in RAM in front of flash.
//!
//! quick_cache implements a CLOCK-Pro style policy (hot and cold queues plus ghost
//! entries), which, like the LRU-k the paper uses, keeps items that were read more than
//! once and lets a scan of one-off reads pass through the cold queue without flushing them.

use bytes::Bytes;
use quick_cache::{Weighter, sync::Cache};

use super::format::{record_header_len, round_up_to_block};

/// A shard held in memory. `data` is a slice of the block-aligned buffer it was written
/// from or read into, which it keeps alive whole, so the tier weighs each entry by that
/// buffer's allocation (`alloc`), not by the payload: `--memory` bounds what the tier
/// really holds.
#[derive(Clone)]
pub struct MemShard {
    pub data: Bytes,
    pub crc: u32,
    /// `data` lives in a spliceable (mmapped) buffer.
    pub zero_copy: bool,
    /// Bytes allocated for the buffer `data` points into.
    pub alloc: usize,
}

/// Bytes each entry costs besides its buffer: the key's own allocation, the `Bytes`
/// handle and the buffer's owner box, and quick_cache's slot and hash table share.
/// Measured roughly (a heap profile is not worth it); an underestimate by tens of bytes
/// per 128 KiB shard is noise.
const ENTRY_OVERHEAD: u64 = 160;

#[derive(Clone)]
struct ShardWeighter;

impl Weighter<Box<str>, MemShard> for ShardWeighter {
    fn weight(&self, key: &Box<str>, shard: &MemShard) -> u64 {
        let buffer = shard.alloc.max(round_up_to_block(
            record_header_len(key.len()) + shard.data.len(),
        ));
        buffer as u64 + key.len() as u64 + ENTRY_OVERHEAD
    }
}

pub struct MemoryTier {
    cache: Option<Cache<Box<str>, MemShard, ShardWeighter>>,
    capacity: u64,
}

/// A guess at the average shard size, used only to size the cache's tables up front:
/// 512 KiB chunks cut 4-of-5 give 128 KiB shards.
const TYPICAL_SHARD: u64 = 128 * 1024;

impl MemoryTier {
    /// A tier of `capacity` bytes; zero disables it.
    pub fn new(capacity: u64) -> Self {
        let cache = (capacity > 0).then(|| {
            let items = usize::try_from(capacity / TYPICAL_SHARD)
                .unwrap_or(usize::MAX)
                .max(16);
            Cache::with_weighter(items, capacity, ShardWeighter)
        });
        Self { cache, capacity }
    }

    /// False when `--memory 0` turned the tier off.
    pub fn is_enabled(&self) -> bool {
        self.cache.is_some()
    }

    pub fn get(&self, key: &str) -> Option<MemShard> {
        self.cache.as_ref()?.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.cache.as_ref().is_some_and(|c| c.contains_key(key))
    }

    pub fn insert(&self, key: &str, shard: MemShard) {
        if let Some(cache) = &self.cache {
            cache.insert(key.into(), shard);
        }
    }

    /// Removes the key; true if it was present.
    pub fn remove(&self, key: &str) -> bool {
        self.cache.as_ref().is_some_and(|c| c.remove(key).is_some())
    }

    pub fn bytes_used(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.weight())
    }

    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_capacity() {
        let tier = MemoryTier::new(1 << 20);
        for i in 0..100 {
            tier.insert(
                &format!("k{i}"),
                MemShard {
                    data: Bytes::from(vec![i as u8; 60_000]),
                    crc: 0,
                    zero_copy: false,
                    alloc: 60_000,
                },
            );
        }
        assert!(tier.bytes_used() <= 1 << 20);
        assert!(tier.len() < 100);
    }

    #[test]
    fn entries_weigh_their_whole_buffer() {
        let tier = MemoryTier::new(1 << 20);
        // A 4 KiB payload that keeps a 512 KiB buffer alive counts as 512 KiB.
        for i in 0..4 {
            tier.insert(
                &format!("k{i}"),
                MemShard {
                    data: Bytes::from(vec![0u8; 4096]),
                    crc: 0,
                    zero_copy: false,
                    alloc: 512 << 10,
                },
            );
        }
        assert!(
            tier.len() <= 2,
            "{} entries of 512 KiB in 1 MiB",
            tier.len()
        );
        assert!(tier.bytes_used() <= 1 << 20);
    }

    #[test]
    fn disabled_tier_holds_nothing() {
        let tier = MemoryTier::new(0);
        tier.insert(
            "k",
            MemShard {
                data: Bytes::from_static(b"x"),
                crc: 0,
                zero_copy: false,
                alloc: 1,
            },
        );
        assert!(tier.get("k").is_none());
        assert!(!tier.remove("k"));
    }
}
