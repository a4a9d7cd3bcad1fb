//! Records that are on the device but must not be recovered, per key, until they are
//! gone for good.
//!
//! A key can have records on the device that its index entry does not point at: the old
//! version a PUT replaced (zeroed after the PUT is acknowledged, since the new version's
//! higher sequence number already wins at recovery), a PUT that lost to a newer PUT of the
//! same key, a copy that eviction wrote for a shard deleted meanwhile, and every record of a
//! region being evicted until its retired header is durable. None of them matters while
//! the key exists, because a newer record wins at recovery. They matter to a DELETE: once it
//! is acknowledged, none may come back. So each such record is registered here, under the
//! index lock of its key, before the lock is released, and a DELETE waits until every
//! record registered before it looked at the key has been zeroed (or its region retired or
//! quarantined) before it flushes and answers.
//!
//! Tickets make the wait finite: a DELETE waits only for registrations older than itself,
//! never for ones that keep arriving after it.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use super::regions::lock;

/// Independently locked parts; registrations are rare next to reads, so a few suffice.
const PARTS: usize = 64;

/// Key hash to the tickets of its records still to settle.
type Part = Mutex<HashMap<u64, Vec<u64>>>;

pub struct Settling {
    next: AtomicU64,
    parts: Box<[Part]>,
}

impl Default for Settling {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            parts: (0..PARTS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

/// A registration; it must be given back with `release` once the record is gone.
#[must_use = "a registration must be released, or deletes of the key wait forever"]
#[derive(Debug)]
pub struct Ticket {
    hash: u64,
    id: u64,
}

impl Settling {
    fn part(&self, hash: u64) -> &Part {
        &self.parts[(hash >> 32) as usize % PARTS]
    }

    /// Registers a record of `hash` that is not gone yet. Call it under the key's index lock.
    pub fn register(&self, hash: u64) -> Ticket {
        let id = self.next.fetch_add(1, Ordering::AcqRel);
        lock(self.part(hash)).entry(hash).or_default().push(id);
        Ticket { hash, id }
    }

    pub fn release(&self, ticket: Ticket) {
        let mut part = lock(self.part(ticket.hash));
        if let Some(ids) = part.get_mut(&ticket.hash) {
            ids.retain(|&id| id != ticket.id);
            if ids.is_empty() {
                part.remove(&ticket.hash);
            }
        }
    }

    /// The bound a DELETE waits up to: read it under the key's index lock.
    pub fn bound(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    fn pending_before(&self, hash: u64, bound: u64) -> bool {
        lock(self.part(hash))
            .get(&hash)
            .is_some_and(|ids| ids.iter().any(|&id| id < bound))
    }

    /// Waits until every record of `hash` registered before `bound` is gone. Each is one
    /// device write away (or one eviction), so a short poll is cheaper than wake-ups.
    pub async fn wait(&self, hash: u64, bound: u64) {
        while self.pending_before(hash, bound) {
            monoio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Keys with records still to settle (a gauge; zero when the store is quiet).
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| lock(p).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_only_for_older_registrations() {
        let settling = Settling::default();
        let old = settling.register(7);
        let bound = settling.bound();
        let newer = settling.register(7);
        assert!(settling.pending_before(7, bound));
        settling.release(old);
        assert!(
            !settling.pending_before(7, bound),
            "the newer one is not waited for"
        );
        assert!(!settling.pending_before(8, u64::MAX));
        settling.release(newer);
        assert_eq!(settling.len(), 0);
    }
}
