//! Hedged reads: when to send the extra requests, and how many may be sent.

use std::{collections::VecDeque, time::Duration};

/// Caps hedge requests at a fraction of reads: every read deposits `rate` tokens, every
/// hedge request spends one (a read that hedges two shards of a code with two parity
/// shards spends two). A fleet-wide slowdown therefore adds at most `rate` extra requests
/// per read, not a second copy of every request.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    capacity: f64,
}

impl TokenBucket {
    /// `capacity` bounds a burst of hedges after a quiet spell.
    pub fn new(rate: f64, capacity: f64) -> Self {
        Self {
            tokens: capacity.min(1.0),
            rate,
            capacity,
        }
    }

    pub fn deposit(&mut self) {
        self.tokens = (self.tokens + self.rate).min(self.capacity);
    }

    pub fn try_take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Recent latencies and their p95. The client keeps one of the time from a read's start to
/// its k-th valid shard: a read hedges when its k-th shard is later than that p95, which
/// is what "slow" means for a k-of-M read. One shard's p95 would fire whenever any of the
/// k shards is in its slowest 5%: on 1 - 0.95^k of reads, 19% for k = 4, not 5%.
#[derive(Debug)]
pub struct LatencyWindow {
    samples: VecDeque<Duration>,
    p95: Option<Duration>,
    since_update: usize,
}

/// Samples kept, and how often the p95 is recomputed from them.
const WINDOW: usize = 1024;
const RECOMPUTE_EVERY: usize = 64;
/// Samples needed before the p95 means anything.
const MIN_SAMPLES: usize = 32;

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            samples: VecDeque::with_capacity(WINDOW),
            p95: None,
            since_update: 0,
        }
    }
}

impl LatencyWindow {
    pub fn record(&mut self, latency: Duration) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(latency);
        self.since_update += 1;
        if self.since_update >= RECOMPUTE_EVERY
            || (self.p95.is_none() && self.samples.len() >= MIN_SAMPLES)
        {
            self.since_update = 0;
            let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
            sorted.sort_unstable();
            self.p95 = Some(sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)]);
        }
    }

    /// The p95 of recent samples, once there are enough of them.
    pub fn p95(&self) -> Option<Duration> {
        self.p95
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_configured_fraction() {
        let mut bucket = TokenBucket::new(0.05, 10.0);
        let mut hedges = 0;
        for _ in 0..10_000 {
            bucket.deposit();
            if bucket.try_take() {
                hedges += 1;
            }
        }
        assert!(
            (495..=505).contains(&hedges),
            "{hedges} hedges for 10,000 reads"
        );
    }

    #[test]
    fn p95_follows_the_samples() {
        let mut window = LatencyWindow::default();
        assert_eq!(window.p95(), None);
        for i in 0..1000u64 {
            window.record(Duration::from_micros(i % 100));
        }
        let p95 = window.p95().unwrap();
        assert!(
            (Duration::from_micros(93)..=Duration::from_micros(96)).contains(&p95),
            "{p95:?}"
        );
    }
}
