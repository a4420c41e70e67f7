//! volfs: Docker data volumes served over FUSE from one embedded sled store.
//!
//! Layers, top to bottom: `api` (control protocol) and `plugin` (Docker's volume-plugin
//! protocol) over `volume` (registry of volumes and mounts), which drives `fs` (the FUSE
//! adapter, the only user of fuser), which calls the `vfs` seam, implemented over `store`
//! (the key layout) and `chunks` (segment files). `keeper` holds FUSE connections across
//! daemon restarts; `import` fills a volume from a directory or tar, `export` writes one out
//! as a tar; `snap` keeps snapshots; `fsck` checks and repairs a volume's keys, `scrub`
//! verifies its chunks online.
//! Errors are `error::FsError`.

pub mod api;
pub mod chunks;
pub mod error;
pub mod export;
pub mod fs;
pub mod fsck;
pub mod import;
pub mod keeper;
pub mod plugin;
pub mod scrub;
pub mod snap;
pub mod store;
pub mod units;
pub mod vfs;
pub mod volume;
