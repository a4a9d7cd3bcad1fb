//! The node-wide budget for request-body memory.
//!
//! Every byte a request body may occupy in the node is reserved here before it is
//! allocated, and before the client is invited to send it (`100 Continue`): an HTTP/1.1
//! PUT reserves its record buffer (the declared length, or what a chunked body has grown
//! to), a connection whose read buffer grows past its first few KiB reserves the growth,
//! and an HTTP/2 connection reserves its receive window, the most its peer may send
//! before the node reads it. A request that does not fit gets a 503 and its connection is
//! closed, so the node's memory stays within `--memory` plus this budget however many
//! clients announce large bodies and send nothing.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

#[derive(Debug)]
pub struct BodyBudget {
    limit: u64,
    used: AtomicU64,
    /// The part of `used` held by HTTP/2 receive windows.
    windows: AtomicU64,
    refused: AtomicU64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            windows: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Reserves an HTTP/2 connection's receive window, for the connection's lifetime.
    /// Windows together hold at most half the budget: a window is taken when the preface
    /// arrives, before any request or token, so connections that send nothing else must
    /// not be able to take what the bodies of real requests need.
    pub fn try_take_window(self: &Arc<Self>, bytes: u64) -> Option<WindowPermit> {
        let cap = self.limit / 2;
        let within_cap = self
            .windows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= cap)
            })
            .is_ok();
        if !within_cap {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match self.try_take(bytes) {
            Some(body) => Some(WindowPermit { body }),
            None => {
                self.windows.fetch_sub(bytes, Ordering::AcqRel);
                None
            }
        }
    }

    /// Reserves `bytes`, or counts a refusal and returns `None`.
    pub fn try_take(self: &Arc<Self>, bytes: u64) -> Option<BodyPermit> {
        if self.reserve(bytes) {
            Some(BodyPermit {
                budget: self.clone(),
                bytes,
            })
        } else {
            None
        }
    }

    fn reserve(&self, bytes: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok();
        if !taken {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Requests and connections turned away because the budget was spent.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Bytes reserved from the budget, given back when dropped.
#[derive(Debug)]
pub struct BodyPermit {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl BodyPermit {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Raises the reservation to `total` bytes; false (and unchanged) if the budget
    /// cannot cover the difference.
    pub fn grow_to(&mut self, total: u64) -> bool {
        if total <= self.bytes {
            return true;
        }
        if self.budget.reserve(total - self.bytes) {
            self.bytes = total;
            true
        } else {
            false
        }
    }

    /// Gives back everything above `total` bytes.
    pub fn shrink_to(&mut self, total: u64) {
        if total < self.bytes {
            self.budget
                .used
                .fetch_sub(self.bytes - total, Ordering::AcqRel);
            self.bytes = total;
        }
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// An HTTP/2 receive window reserved from the budget, given back when dropped.
#[derive(Debug)]
pub struct WindowPermit {
    body: BodyPermit,
}

impl Drop for WindowPermit {
    fn drop(&mut self) {
        self.body
            .budget
            .windows
            .fetch_sub(self.body.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_limit_and_come_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.try_take(60).unwrap();
        assert!(budget.try_take(50).is_none());
        assert_eq!(budget.refused(), 1);
        assert!(!a.grow_to(101));
        assert!(a.grow_to(90));
        assert_eq!(budget.used(), 90);
        a.shrink_to(10);
        let b = budget.try_take(90).unwrap();
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn windows_take_at_most_half_the_budget() {
        let budget = BodyBudget::new(100);
        let a = budget.try_take_window(30).unwrap();
        assert!(budget.try_take_window(30).is_none(), "past half");
        assert_eq!(budget.refused(), 1);
        // Bodies keep the other half and more.
        let body = budget.try_take(70).unwrap();
        assert_eq!(budget.used(), 100);
        drop(body);
        // A window that fits the half but not the whole budget is refused too, and
        // leaves no trace in the windows' share.
        let body = budget.try_take(60).unwrap();
        assert!(budget.try_take_window(20).is_none());
        drop(body);
        let b = budget.try_take_window(20).unwrap();
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_take_window(50).is_some());
    }
}
