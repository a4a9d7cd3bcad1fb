//! PUTs in flight, per key: those that have taken their sequence number and are not
//! indexed (or abandoned) yet.
//!
//! A create-only PUT (`If-None-Match: *`) must not commit over a version of its key that
//! exists, nor over one that is being written: the other PUT may have taken a lower
//! sequence number and commit later, and then the live index (which would keep the other
//! version, committed first) and recovery (which keeps the highest number) would disagree
//! on which version won. So every PUT takes its sequence number and registers here in one
//! step under its key's index lock, and a create-only PUT is refused while its key is
//! indexed or registered. Then any version it can meet at commit took a higher number:
//! the live index and recovery agree that it comes after the create.

use std::{collections::HashMap, sync::Mutex};

use super::regions::lock;

/// Independently locked parts; one lock per PUT, held for a map update.
const PARTS: usize = 64;

pub struct Writing {
    parts: Box<[Mutex<HashMap<u64, u32>>]>,
}

impl Default for Writing {
    fn default() -> Self {
        Self {
            parts: (0..PARTS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// A PUT's registration; dropping it ends the PUT's window.
#[must_use = "dropping the registration ends it at once"]
pub struct Registration<'a> {
    writing: &'a Writing,
    hash: u64,
}

impl Writing {
    fn part(&self, hash: u64) -> &Mutex<HashMap<u64, u32>> {
        &self.parts[(hash >> 40) as usize % PARTS]
    }

    /// Registers a PUT of `hash`. Call it under the key's index lock, with the PUT's
    /// sequence number taken under that same lock.
    pub fn begin(&self, hash: u64) -> Registration<'_> {
        *lock(self.part(hash)).entry(hash).or_default() += 1;
        Registration {
            writing: self,
            hash,
        }
    }

    /// Whether a PUT of `hash` is in flight. Call it under the key's index lock.
    pub fn contains(&self, hash: u64) -> bool {
        lock(self.part(hash)).contains_key(&hash)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut part = lock(self.writing.part(self.hash));
        if let Some(count) = part.get_mut(&self.hash) {
            *count -= 1;
            if *count == 0 {
                part.remove(&self.hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_count_per_key() {
        let writing = Writing::default();
        let first = writing.begin(7);
        let second = writing.begin(7);
        assert!(writing.contains(7) && !writing.contains(8));
        drop(first);
        assert!(writing.contains(7));
        drop(second);
        assert!(!writing.contains(7));
    }
}
