//! Shard keys: the names under which a cache node stores shards.
//!
//! A key is 1 to 128 characters of `[A-Za-z0-9._-]`. The alphabet keeps keys safe in URL
//! paths without escaping, and the bound keeps the on-disk record header within one 4 KiB
//! block together with the start of the payload.

use std::fmt;

/// Header carrying the decimal crc32 (IEEE) of a shard's bytes, sent with a PUT (the node
/// refuses a body that does not match) and returned with a GET.
pub const CRC_HEADER: &str = "x-slapshot-crc32";

/// Longest key a node accepts, in bytes.
pub const MAX_SHARD_KEY_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardKeyError {
    #[error("shard key is empty")]
    Empty,
    #[error("shard key is {0} bytes long; the limit is {MAX_SHARD_KEY_LEN}")]
    TooLong(usize),
    #[error("shard key contains {0:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")]
    BadCharacter(char),
}

/// A validated shard key, borrowed from the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardKey<'a>(&'a str);

impl<'a> ShardKey<'a> {
    /// Checks `key` against the key rules.
    pub fn parse(key: &'a str) -> Result<Self, ShardKeyError> {
        if key.is_empty() {
            return Err(ShardKeyError::Empty);
        }
        if key.len() > MAX_SHARD_KEY_LEN {
            return Err(ShardKeyError::TooLong(key.len()));
        }
        if let Some(bad) = key.chars().find(|c| !is_key_char(*c)) {
            return Err(ShardKeyError::BadCharacter(bad));
        }
        Ok(Self(key))
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.0.as_bytes()
    }
}

impl fmt::Display for ShardKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for key in ["a", "chunk-0.shard_3", "ABCxyz019", &"k".repeat(128)] {
            assert_eq!(ShardKey::parse(key).unwrap().as_str(), key);
        }
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        assert_eq!(ShardKey::parse(""), Err(ShardKeyError::Empty));
        assert_eq!(
            ShardKey::parse(&"k".repeat(129)),
            Err(ShardKeyError::TooLong(129))
        );
        for (key, bad) in [
            ("a/b", '/'),
            ("a b", ' '),
            ("%2e", '%'),
            ("é", 'é'),
            ("a\0", '\0'),
        ] {
            assert_eq!(ShardKey::parse(key), Err(ShardKeyError::BadCharacter(bad)));
        }
    }
}
