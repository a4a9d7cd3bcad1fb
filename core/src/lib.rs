//! slapshot-core: formats and pure algorithms shared by the server, the client and the tools.
//!
//! Invariant: nothing in this crate performs I/O. Every function is deterministic in its
//! inputs, which is what lets the server, the client and the tests agree byte for byte.

pub mod chunk;
pub mod erasure;
pub mod placement;
pub mod prometheus;
pub mod shard_frame;
pub mod shard_key;
pub mod units;

pub use chunk::{CHUNK_SIZE, ChunkKey, ChunkName, Salt, SealedChunk};
pub use erasure::{CodeParams, CodecKind, ErasureCodec, codec_for, codec_with_kind};
pub use placement::{Member, Placement};
pub use shard_key::{CRC_HEADER, MAX_SHARD_KEY_LEN, ShardKey, ShardKeyError};
pub use units::{ByteSize, HumanDuration, UnitParseError};
