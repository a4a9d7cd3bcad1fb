//! Human-friendly sizes ("512MiB", "8GiB") and durations ("250ms", "30s") for flags and
//! configuration files.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitParseError {
    #[error("empty value")]
    Empty,
    #[error("{0:?} does not start with a number")]
    NoNumber(String),
    #[error("unknown unit {unit:?} in {input:?}; {expected}")]
    UnknownUnit {
        input: String,
        unit: String,
        expected: &'static str,
    },
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// A number of bytes. Parses plain integers and integers or decimals with a unit:
/// `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (powers of 1024) and `KB`, `MB`, `GB`,
/// `TB` (powers of 1000). Units are case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub const fn bytes(self) -> u64 {
        self.0
    }

    pub const fn mib(n: u64) -> Self {
        Self(n * Self::MIB)
    }
}

const SIZE_UNITS: &str = "use B, KiB, MiB, GiB, TiB (or K, M, G, T), or KB, MB, GB, TB";

impl FromStr for ByteSize {
    type Err = UnitParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (number, unit) = split_number(input)?;
        let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(UnitParseError::UnknownUnit {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                    expected: SIZE_UNITS,
                });
            }
        };
        scale(number, multiplier, input).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if bytes >= size && bytes.is_multiple_of(size) {
                return write!(f, "{}{unit}", bytes / size);
            }
        }
        write!(f, "{bytes}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl de::Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte count or a size such as \"512MiB\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom("a size cannot be negative"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }
}

/// A duration. Parses a number with a unit: `ns`, `us`, `ms`, `s`, `m`, `h` (a bare number
/// is seconds); prints in the largest of `s`, `ms`, `us`, `ns` that keeps it exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

const DURATION_UNITS: &str = "use ns, us, ms, s, m or h";

impl FromStr for HumanDuration {
    type Err = UnitParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (number, unit) = split_number(input)?;
        let nanos_per_unit: u64 = match unit.to_ascii_lowercase().as_str() {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "" | "s" => 1_000_000_000,
            "m" | "min" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(UnitParseError::UnknownUnit {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                    expected: DURATION_UNITS,
                });
            }
        };
        scale(number, nanos_per_unit, input).map(|nanos| HumanDuration(Duration::from_nanos(nanos)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.as_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else if d.as_nanos().is_multiple_of(1_000) {
            write!(f, "{}us", d.as_micros())
        } else {
            // Not "0us" for 100 ns: a config written back must read as it was.
            write!(f, "{}ns", d.as_nanos())
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

impl de::Visitor<'_> for DurationVisitor {
    type Value = HumanDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of seconds or a duration such as \"250ms\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
        Ok(HumanDuration(Duration::from_secs(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
        u64::try_from(v)
            .map(|s| HumanDuration(Duration::from_secs(s)))
            .map_err(|_| E::custom("a duration cannot be negative"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
        v.parse().map_err(E::custom)
    }
}

/// Splits "12.5MiB" into ("12.5", "MiB"), allowing spaces between number and unit.
fn split_number(input: &str) -> Result<(&str, &str), UnitParseError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(UnitParseError::Empty);
    }
    let end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let number = &trimmed[..end];
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(UnitParseError::NoNumber(input.to_owned()));
    }
    Ok((number, trimmed[end..].trim_start()))
}

/// Multiplies a decimal string by `multiplier` exactly, rejecting overflow. Fractions are
/// truncated toward zero at the unit's resolution (1.5KiB is 1536 bytes).
fn scale(number: &str, multiplier: u64, input: &str) -> Result<u64, UnitParseError> {
    let overflow = || UnitParseError::Overflow(input.to_owned());
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| overflow())?
    };
    let total = whole.checked_mul(multiplier).ok_or_else(overflow)?;
    // Keep at most 18 fractional digits so that 10^digits fits in a u64; the product is
    // computed in u128 so that "1.5KiB" is exactly 1536 for binary multipliers.
    let fraction = &fraction[..fraction.len().min(18)];
    if fraction.is_empty() {
        return Ok(total);
    }
    let numerator: u128 = fraction.parse().map_err(|_| overflow())?;
    let denominator = 10u128.pow(fraction.len() as u32);
    let fractional =
        u64::try_from(numerator * u128::from(multiplier) / denominator).map_err(|_| overflow())?;
    total.checked_add(fractional).ok_or_else(overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        let cases = [
            ("4096", 4096),
            ("512MiB", 512 << 20),
            ("8GiB", 8 << 30),
            ("8 GiB", 8 << 30),
            ("4m", 4 << 20),
            ("1.5KiB", 1536),
            ("2GB", 2_000_000_000),
            ("1TiB", 1 << 40),
            ("0", 0),
        ];
        for (input, expected) in cases {
            assert_eq!(
                input.parse::<ByteSize>().unwrap(),
                ByteSize(expected),
                "{input}"
            );
        }
    }

    #[test]
    fn sizes_reject_garbage_with_a_reason() {
        assert!(matches!("".parse::<ByteSize>(), Err(UnitParseError::Empty)));
        assert!(matches!(
            "MiB".parse::<ByteSize>(),
            Err(UnitParseError::NoNumber(_))
        ));
        assert!(matches!(
            "12XB".parse::<ByteSize>(),
            Err(UnitParseError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "1.2.3M".parse::<ByteSize>(),
            Err(UnitParseError::NoNumber(_))
        ));
        assert!(matches!(
            "99999999999TiB".parse::<ByteSize>(),
            Err(UnitParseError::Overflow(_))
        ));
        assert!(matches!(
            "-1".parse::<ByteSize>(),
            Err(UnitParseError::NoNumber(_))
        ));
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        assert_eq!(ByteSize(3 << 30).to_string(), "3GiB");
    }

    #[test]
    fn durations_parse_common_units() {
        let cases = [
            ("30s", Duration::from_secs(30)),
            ("30", Duration::from_secs(30)),
            ("250ms", Duration::from_millis(250)),
            ("100us", Duration::from_micros(100)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("0.5s", Duration::from_millis(500)),
        ];
        for (input, expected) in cases {
            assert_eq!(
                input.parse::<HumanDuration>().unwrap().0,
                expected,
                "{input}"
            );
        }
        assert!("5 fortnights".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn display_round_trips_through_parse() {
        for d in ["250ms", "30s", "100us", "100ns", "1500ns"] {
            assert_eq!(d.parse::<HumanDuration>().unwrap().to_string(), d);
        }
        for (input, printed) in [("0.1us", "100ns"), ("1.5us", "1500ns"), ("1.5ms", "1500us")] {
            let parsed: HumanDuration = input.parse().unwrap();
            assert_eq!(parsed.to_string(), printed);
            assert_eq!(printed.parse::<HumanDuration>().unwrap(), parsed, "{input}");
        }
        assert_eq!(
            "512MiB"
                .parse::<ByteSize>()
                .unwrap()
                .to_string()
                .parse::<ByteSize>()
                .unwrap(),
            ByteSize(512 << 20)
        );
    }

    #[test]
    fn both_accept_numbers_and_strings_in_toml() {
        #[derive(Deserialize)]
        struct Settings {
            a: ByteSize,
            b: ByteSize,
            c: HumanDuration,
            d: HumanDuration,
        }
        let s: Settings = toml::from_str("a = 1024\nb = \"2MiB\"\nc = 5\nd = \"20ms\"").unwrap();
        assert_eq!(s.a, ByteSize(1024));
        assert_eq!(s.b, ByteSize(2 << 20));
        assert_eq!(s.c.0, Duration::from_secs(5));
        assert_eq!(s.d.0, Duration::from_millis(20));
    }
}
