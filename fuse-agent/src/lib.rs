//! slapshot-fuse-agent: the worker side. An image's manifest is served as a read-only FUSE
//! filesystem whose reads load chunks through the worker's tiers (memory, disk) and the
//! remote ones (fleet, origin); `run` starts a program inside it.

pub mod agent;
pub mod cli;
pub mod control;
pub mod demo;
pub mod disk;
pub mod fs;
pub mod hostimage;
pub mod mount;
pub mod plain;
pub mod run;
pub mod stats;
pub mod tiers;
