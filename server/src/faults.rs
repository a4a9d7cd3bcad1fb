//! The fault injector for experiments: off unless the node starts with `--fault-injection`,
//! which enables `/admin/faults`:
//!
//! - `GET /admin/faults`: the current settings;
//! - `PUT /admin/faults` with lines of `key=value` (keys left out keep their value):
//!   `delay-fraction=0.1` (share of shard requests delayed), `delay=exponential:10ms`
//!   (or `uniform:5ms:50ms`, `fixed:20ms`), `error-rate=0.01` (share answered 503),
//!   `stall=true` (shard requests get no answer at all, as from a black-holed node);
//! - `DELETE /admin/faults`: no faults.
//!
//! Faults apply to shard requests only (after their method and token checks): /health,
//! /metrics and the admin endpoint answer as usual, so that an experiment can still see and
//! steer a "slow" node. A stalled request carries on once the stall is lifted (it looks every
//! 10 ms); one that outlasts the node's I/O timeout loses its connection, and stalled
//! connections count toward `--max-connections` like any other.
//!
//! Limits, for experiment design: delays are slept on the runtime's timer, which has
//! millisecond resolution, so delays under a few milliseconds are not drawn faithfully; and
//! every shard request reads the settings under one mutex, which costs nothing measurable at
//! one thread per node (the experiments' fleets) and was not tuned for more.

use std::{str::FromStr, sync::Mutex, time::Duration};

use slapshot_core::HumanDuration;

/// How long an injected delay lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Delay {
    Fixed(Duration),
    Uniform(Duration, Duration),
    /// Exponentially distributed with this mean.
    Exponential(Duration),
}

impl FromStr for Delay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let d = |v: &str| -> Result<Duration, String> {
            v.parse::<HumanDuration>()
                .map(|h| h.0)
                .map_err(|e| format!("{v:?}: {e}"))
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["fixed", v] => Ok(Self::Fixed(d(v)?)),
            ["exponential", mean] => Ok(Self::Exponential(d(mean)?)),
            ["uniform", lo, hi] => {
                let (lo, hi) = (d(lo)?, d(hi)?);
                if lo > hi {
                    return Err(format!("uniform:{lo:?}:{hi:?} has min above max"));
                }
                Ok(Self::Uniform(lo, hi))
            }
            _ => Err(format!(
                "{s:?} is not a delay: use fixed:D, uniform:MIN:MAX or exponential:MEAN"
            )),
        }
    }
}

impl std::fmt::Display for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(d) => write!(f, "fixed:{}us", d.as_micros()),
            Self::Uniform(lo, hi) => write!(f, "uniform:{}us:{}us", lo.as_micros(), hi.as_micros()),
            Self::Exponential(m) => write!(f, "exponential:{}us", m.as_micros()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultSettings {
    pub delay_fraction: f64,
    pub delay: Delay,
    pub error_rate: f64,
    pub stall: bool,
}

impl Default for FaultSettings {
    fn default() -> Self {
        Self {
            delay_fraction: 0.0,
            delay: Delay::Fixed(Duration::ZERO),
            error_rate: 0.0,
            stall: false,
        }
    }
}

impl FaultSettings {
    /// Applies `key=value` lines on top of these settings.
    pub fn update(&self, text: &str) -> Result<Self, String> {
        let mut next = self.clone();
        let fraction = |v: &str, key: &str| -> Result<f64, String> {
            match v.parse::<f64>() {
                Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
                _ => Err(format!("{key}={v}: a fraction between 0 and 1")),
            }
        };
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("{line:?}: expected key=value"))?;
            let value = value.trim();
            match key.trim() {
                "delay-fraction" => next.delay_fraction = fraction(value, "delay-fraction")?,
                "delay" => next.delay = value.parse()?,
                "error-rate" => next.error_rate = fraction(value, "error-rate")?,
                "stall" => {
                    next.stall = value
                        .parse()
                        .map_err(|_| format!("stall={value}: true or false"))?
                }
                other => return Err(format!("unknown setting {other:?}")),
            }
        }
        Ok(next)
    }

    pub fn render(&self) -> String {
        format!(
            "delay-fraction={}\ndelay={}\nerror-rate={}\nstall={}\n",
            self.delay_fraction, self.delay, self.error_rate, self.stall
        )
    }
}

/// What a shard request meets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    Delay(Duration),
    Error,
    Stall,
}

/// The node's injector: settings shared by every runtime thread.
#[derive(Debug, Default)]
pub struct Faults {
    settings: Mutex<FaultSettings>,
}

impl Faults {
    pub fn settings(&self) -> FaultSettings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set(&self, settings: FaultSettings) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// Draws the fault for one shard request.
    pub fn draw(&self) -> Fault {
        let s = self.settings();
        if s.stall {
            return Fault::Stall;
        }
        if s.error_rate > 0.0 && unit() < s.error_rate {
            return Fault::Error;
        }
        if s.delay_fraction > 0.0 && unit() < s.delay_fraction {
            let delay = match s.delay {
                Delay::Fixed(d) => d,
                Delay::Uniform(lo, hi) => lo + (hi - lo).mul_f64(unit()),
                Delay::Exponential(mean) => mean.mul_f64(-(1.0 - unit()).ln()),
            };
            return Fault::Delay(delay);
        }
        Fault::None
    }
}

/// A uniform draw in [0, 1) from a per-thread xorshift generator.
fn unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9E37_79B9, |d| d.as_nanos() as u64)
                | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_render_and_draw() {
        let s = FaultSettings::default()
            .update("delay-fraction=1\ndelay=uniform:1ms:3ms\nerror-rate=0\n")
            .unwrap();
        assert_eq!(
            s.delay,
            Delay::Uniform(Duration::from_millis(1), Duration::from_millis(3))
        );
        let round = FaultSettings::default().update(&s.render()).unwrap();
        assert_eq!(round, s);
        let faults = Faults::default();
        faults.set(s);
        for _ in 0..100 {
            match faults.draw() {
                Fault::Delay(d) => {
                    assert!((Duration::from_millis(1)..=Duration::from_millis(3)).contains(&d))
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(FaultSettings::default().update("delay-fraction=2").is_err());
        assert!(FaultSettings::default().update("bogus=1").is_err());
        assert!("uniform:5ms:1ms".parse::<Delay>().is_err());
        let errors = Faults::default();
        errors.set(FaultSettings::default().update("error-rate=1").unwrap());
        assert_eq!(errors.draw(), Fault::Error);
        errors.set(FaultSettings::default().update("stall=true").unwrap());
        assert_eq!(errors.draw(), Fault::Stall);
    }
}
