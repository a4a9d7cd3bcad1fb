//! Rebuilding the index from the device at start-up.
//!
//! Every region is read whole (one region per thread at a time, as large sequential
//! O_DIRECT reads), every record's header and payload checksums are verified, and the
//! newest valid record of each key wins. Records that fail a checksum are counted and never
//! indexed. Older duplicates of a key (left when the node died between writing a new
//! version and invalidating the old one) are invalidated so that they cannot resurface
//! later. Regions are then ordered for eviction by the sequence number at which they were
//! opened, so FIFO order survives a restart.

use std::{
    collections::HashMap,
    os::unix::fs::FileExt,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use super::{
    Store, StoreError,
    aligned::AlignedBuf,
    format::{BLOCK_SIZE, RecordHeaderError, RegionHeader, RegionState, decode_record_header},
    index::{Entry, Location, key_hash},
};
use crate::metrics::RecoveryReport;

/// A valid record found on the device.
struct Found {
    hash: u64,
    seq: u64,
    entry: Entry,
}

/// What one region held.
struct ScannedRegion {
    region: u32,
    header: Option<RegionHeader>,
    records: Vec<Found>,
    checksum_failures: u64,
}

pub(super) fn recover(store: &Store, threads: usize) -> Result<RecoveryReport, StoreError> {
    let region_count = store.device.superblock.region_count;
    if store.device.formatted {
        for region in 0..region_count {
            store.regions.push_free(region);
        }
        return Ok(RecoveryReport::default());
    }
    // Quarantined regions are never read: what they hold must not come back.
    let in_service = |region: u32| !store.regions.get(region).is_quarantined();

    let next_region = AtomicU32::new(0);
    let scanned = Mutex::new(Vec::with_capacity(region_count as usize));
    std::thread::scope(|scope| {
        for _ in 0..threads.min(region_count as usize).max(1) {
            scope.spawn(|| {
                let mut buf = AlignedBuf::with_capacity(store.device.superblock.region_size as usize);
                loop {
                    let region = next_region.fetch_add(1, Ordering::Relaxed);
                    if region >= region_count {
                        break;
                    }
                    if !in_service(region) {
                        continue;
                    }
                    let result = scan_region(store, region, &mut buf).unwrap_or_else(|e| {
                        // An unreadable region holds nothing we can trust: it goes back to
                        // the free list, and if it cannot be written either it is taken
                        // out of service when first opened.
                        tracing::error!(region, error = %e, "cannot read region during recovery; treating it as empty");
                        ScannedRegion { region, header: None, records: Vec::new(), checksum_failures: 0 }
                    });
                    super::regions::lock(&scanned).push(result);
                }
            });
        }
    });
    let mut scanned = scanned.into_inner().unwrap_or_else(|p| p.into_inner());
    scanned.sort_by_key(|s| s.region);

    // The newest record of each key wins.
    let mut winners: HashMap<u64, (u64, Entry)> = HashMap::new();
    let mut losers = Vec::new();
    let mut max_seq = 0;
    let mut checksum_failures = 0;
    for region in &mut scanned {
        checksum_failures += region.checksum_failures;
        if let Some(header) = region.header {
            max_seq = max_seq.max(header.open_seq);
        }
        for found in region.records.drain(..) {
            max_seq = max_seq.max(found.seq);
            match winners.get_mut(&found.hash) {
                Some((seq, entry)) if *seq >= found.seq => losers.push(found.entry.location),
                Some(slot) => {
                    losers.push(slot.1.location);
                    *slot = (found.seq, found.entry);
                }
                None => {
                    winners.insert(found.hash, (found.seq, found.entry));
                }
            }
        }
    }
    // Older versions of a key stay on the device when the node died between writing a
    // new version and zeroing the old one; they would come back after a later DELETE.
    for location in &losers {
        if let Err(e) = invalidate_blocking(store, *location) {
            tracing::error!(region = location.region, error = %e, "cannot zero an old record at recovery");
            // A region that cannot forget is quarantined, or the store goes read-only.
            let _ = store.quarantine(location.region, "an old record could not be zeroed");
        }
    }
    if !losers.is_empty() && store.durability != super::Durability::None {
        store.device.file.sync_data()?;
    }

    let mut keys_by_region: Vec<Vec<u64>> = vec![Vec::new(); region_count as usize];
    let mut bytes_used = 0;
    for (hash, (_, entry)) in &winners {
        if !in_service(entry.location.region) {
            continue;
        }
        keys_by_region[entry.location.region as usize].push(*hash);
        bytes_used += entry.disk_bytes();
        store.index.lock(*hash).insert(*hash, *entry);
    }
    store.add_used(bytes_used);

    let mut sealed = Vec::new();
    for region in &scanned {
        let keys = std::mem::take(&mut keys_by_region[region.region as usize]);
        match region.header {
            Some(header) if header.state == RegionState::Live && !keys.is_empty() => {
                let meta = store.regions.get(region.region);
                meta.nonce.store(header.nonce, Ordering::Relaxed);
                meta.open_seq.store(header.open_seq, Ordering::Relaxed);
                meta.set_keys(keys);
                sealed.push((header.open_seq, region.region));
            }
            _ if !in_service(region.region) => {}
            _ => store.regions.push_free(region.region),
        }
    }
    sealed.sort_unstable();
    for (_, region) in sealed {
        store.regions.recovered_sealed(region);
    }
    store.seq.store(max_seq + 1, Ordering::Relaxed);

    Ok(RecoveryReport {
        shards: winners.len() as u64,
        checksum_failures,
        ..Default::default()
    })
}

fn scan_region(store: &Store, region: u32, buf: &mut AlignedBuf) -> std::io::Result<ScannedRegion> {
    let offset = store.device.region_offset(region);
    let store_id = store.device.superblock.store_id;
    let mut result = ScannedRegion {
        region,
        header: None,
        records: Vec::new(),
        checksum_failures: 0,
    };

    buf.resize_zeroed(BLOCK_SIZE);
    store
        .device
        .file
        .read_exact_at(buf.as_mut_slice(), offset)?;
    let Some(header) = RegionHeader::decode(buf.as_slice(), region, store_id) else {
        return Ok(result);
    };
    result.header = Some(header);
    if header.state != RegionState::Live {
        return Ok(result);
    }

    buf.resize_zeroed(store.device.superblock.region_size as usize);
    store
        .device
        .file
        .read_exact_at(buf.as_mut_slice(), offset)?;
    let data = buf.as_slice();
    let mut block = 1u32;
    while block < store.region_blocks {
        let start = block as usize * BLOCK_SIZE;
        match decode_record_header(&data[start..], header.nonce, store.record_payload_bound()) {
            Ok(record) => {
                let blocks = record.blocks();
                if block + blocks > store.region_blocks {
                    result.checksum_failures += 1;
                    block += 1;
                    continue;
                }
                let payload_start = start + record.header_len();
                let payload = &data[payload_start..payload_start + record.payload_len as usize];
                let key_ok = std::str::from_utf8(record.key)
                    .ok()
                    .is_some_and(|k| slapshot_core::ShardKey::parse(k).is_ok());
                if crc32fast::hash(payload) != record.payload_crc || !key_ok {
                    tracing::warn!(region, block, "dropping a record whose checksum fails");
                    result.checksum_failures += 1;
                } else {
                    result.records.push(Found {
                        hash: key_hash(record.key),
                        seq: record.seq,
                        entry: Entry {
                            location: Location { region, block },
                            payload_len: record.payload_len,
                            key_len: record.key.len() as u8,
                            hits: 0,
                            seq: record.seq,
                        },
                    });
                }
                block += blocks;
            }
            Err(RecordHeaderError::Corrupt) => {
                tracing::warn!(
                    region,
                    block,
                    "dropping a record whose header checksum fails"
                );
                result.checksum_failures += 1;
                block += 1;
            }
            Err(RecordHeaderError::NotARecord) => block += 1,
        }
    }
    Ok(result)
}

fn invalidate_blocking(store: &Store, location: Location) -> Result<(), StoreError> {
    let zeros = AlignedBuf::zeroed(BLOCK_SIZE);
    let offset =
        store.device.region_offset(location.region) + u64::from(location.block) * BLOCK_SIZE as u64;
    store.device.file.write_all_at(zeros.as_slice(), offset)?;
    Ok(())
}
