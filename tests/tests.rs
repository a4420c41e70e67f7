//! The one integration-test binary (Cargo.toml has `autotests = false`): every test file is a
//! module of it. Tests need root, /dev/fuse, the `acl` package (setfacl/getfacl), and for `docker`
//! Debian's `docker.io` and `busybox-static`,
//! for `export` GNU tar, bsdtar (`libarchive-tools`), `zstd` and `gzip`.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod util;
mod crash;
mod docker;
mod durability;
mod export;
mod faults;
mod fsck;
mod import;
mod integrity;
mod lifecycle;
mod multimount;
mod posix;
mod posix_attrs;
mod posix_concurrency;
mod posix_namespace;
mod posix_persist;
mod restart;
mod snapshots;
