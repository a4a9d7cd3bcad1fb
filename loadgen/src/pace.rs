//! Open-loop pacing: due times at a fixed rate, produced on a thread of its own.
//!
//! The schedule sleeps with the OS's high-resolution timer, not the runtime's timer wheel,
//! which ticks in milliseconds: its lateness would be charged to every request measured
//! from its due time, or would bunch arrivals that should be evenly spaced.

use std::time::{Duration, Instant};

/// Due times queued before the schedule itself waits for the consumer. Latency measured
/// from the due time still counts everything queued.
pub const QUEUE: usize = 65_536;

/// Rates the schedule keeps: one request in 1,000 s to 100 million a second.
pub const RATES: std::ops::RangeInclusive<f64> = 1e-3..=1e8;

/// A clear error for a rate outside `RATES` (NaN included).
pub fn check_rate(rate: f64, flag: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        RATES.contains(&rate),
        "{flag} must be between {} and {} per second, not {rate}",
        RATES.start(),
        RATES.end()
    );
    Ok(())
}

/// Due times `1 / rate` apart from now: `count` of them, or as many as fall within
/// `duration`, whichever ends first. The schedule stops early when the receiver is dropped.
/// Panics on a rate outside `RATES` (callers check with `check_rate`).
pub fn paced(
    rate: f64,
    count: Option<u64>,
    duration: Option<Duration>,
) -> tokio::sync::mpsc::Receiver<(u64, Instant)> {
    assert!(RATES.contains(&rate), "a rate within {RATES:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    std::thread::spawn(move || {
        // The default timer slack (50 us) would make every sleep that much late, and the
        // lateness would be charged to the request.
        let _ = nix::sys::prctl::set_timerslack(1);
        let start = Instant::now();
        for i in 0..count.unwrap_or(u64::MAX) {
            // From i / rate, not i times a rounded interval: the error does not accumulate,
            // and a huge rate cannot round the interval to zero and never reach the end.
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if duration.is_some_and(|d| due >= start + d) {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.blocking_send((i, due)).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn due_times_are_evenly_spaced_and_bounded() {
        let mut rx = paced(1000.0, Some(50), None);
        let mut dues = Vec::new();
        while let Some((i, due)) = rx.recv().await {
            assert_eq!(i, dues.len() as u64);
            dues.push(due);
        }
        assert_eq!(dues.len(), 50);
        for pair in dues.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(1));
        }
        let mut rx = paced(1000.0, None, Some(Duration::from_millis(20)));
        let mut n = 0;
        while rx.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 20);
    }
}
