//! slapshot-client: the thin client of a slapshot cache fleet.
//!
//! A chunk is erasure-coded into M shards placed on M nodes by rendezvous hashing. A read
//! asks all M nodes at once (or k, hedging the rest after a delay) and rebuilds the chunk
//! from the first k valid shards; the rebuilt bytes are checked against the chunk's name.
//! On a fleet miss the chunk comes from the origin (one fetch per chunk however many
//! readers want it, and a bounded number of fetches at once), and its shards are written
//! back to the fleet off the read's path. Nodes are plain GET/PUT stores.

pub mod cli;
pub mod config;
pub mod fleet;
pub mod hedge;
pub mod images;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod settings;

pub use config::FleetConfig;
pub use fleet::{ChunkError, ChunkSource, FleetClient, PutReport};
pub use origin::{Origin, open_origin, open_origin_with};
