//! PUTs in flight, per key: those that have taken their sequence number and are not
//! committed (or abandoned) yet.
//!
//! A create-only PUT (`If-None-Match: *`) must not go ahead while another PUT of its key
//! is being written. That PUT would commit before or after the create, by their numbers:
//! before it, and the create would replace it; after it, and the create would have been
//! answered as made when a version it never saw was already arriving. So every PUT takes
//! its sequence number and registers here in one step under its key's index lock, and a
//! create is refused while its key is indexed or registered. Any version a create that
//! went ahead meets at commit took a higher number: it comes after the create, in the live
//! index and at recovery alike.

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
