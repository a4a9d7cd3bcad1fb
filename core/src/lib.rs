//! slapshot-core: formats and pure algorithms shared by the server, the client and the tools.
//!
//! Invariant: nothing in this crate performs I/O. Every function is deterministic in its
//! inputs, which is what lets the server, the client and the tests agree byte for byte.

pub mod shard_key;
pub mod units;

pub use shard_key::{ShardKey, ShardKeyError, MAX_SHARD_KEY_LEN};
pub use units::{ByteSize, HumanDuration, UnitParseError};
