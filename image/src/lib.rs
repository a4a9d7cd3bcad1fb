//! slapshot-image: OCI images to one deterministic, chunked, encrypted, deduplicated image.
//!
//! Reading sources (`source`), layers (`layer`, over the strict `tar` reader), applying
//! them into one tree (`tree`), laying the files out in chunks (`layout`), sealing and
//! storing those (`flatten`), and the manifest that describes the result (`manifest`,
//! sealed under a tenant key from `keys`). Reading an image back starts from
//! [`manifest::Manifest::decode`] and [`read::open_chunk`].

pub mod build;
pub mod digest;
pub mod flatten;
pub mod keys;
pub mod layer;
pub mod layout;
pub mod manifest;
pub mod read;
pub mod source;
pub mod tar;
pub mod tree;

pub use flatten::{ChunkSink, FlattenOptions, FlattenStats, Flattened, Mode, Progress, flatten};
pub use keys::{KeyFile, KeyProvider, TenantKey};
pub use manifest::{ImageId, Manifest};
pub use source::{ImageSource, SourceRef, open_source};
