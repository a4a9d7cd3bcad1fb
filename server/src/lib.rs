//! slapshot-server: the cache node of a slapshot fleet.
//!
//! A node is a plain GET/PUT store of erasure-coded shards: clients decide placement and
//! coding, the node keeps shards on flash (with a memory tier in front) and serves them
//! fast. See ARCHITECTURE.md for the map and the invariants.

pub mod budget;
pub mod config;
pub mod errors;
pub mod faults;
pub mod hooks;
pub mod http;
pub mod metrics;
pub mod node;
pub mod store;
