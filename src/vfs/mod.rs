//! The seam between the FUSE adapter and the filesystem logic: POSIX operations on one
//! volume, in volfs's own types. [`SledFs`] implements it over the store; the FUSE adapter
//! (`crate::fs`) and future consumers (tar export, tests) only see [`FileSystem`].
//!
//! Permission checks on mode bits and ACLs are the kernel's (`default_permissions`); this
//! layer enforces what the kernel cannot know: names, emptiness, link counts, sizes.

pub mod acl;
mod sledfs;

pub use sledfs::SledFs;
#[cfg(test)]
pub(crate) use sledfs::test_volume;

use crate::error::FsResult;
pub use crate::store::{FileKind, Timestamp};

/// Inode number inside one volume.
pub type Ino = u64;

/// Longest name a directory entry may have, as on ext4.
pub const NAME_MAX: usize = 255;
/// Largest xattr value accepted, as on ext4 with large values off.
pub const XATTR_SIZE_MAX: usize = 65536;

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Ctx {
    /// The daemon itself acting as root (imports, tests).
    pub const ROOT: Ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

/// Attributes of an inode, as `stat` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits with setuid/setgid/sticky, no type bits.
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// 512-byte blocks actually stored.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub btime: Timestamp,
}

/// A time to set with `utimensat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timestamp),
}

/// The fields a `setattr` changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Timestamp>,
}

/// One directory entry; `cookie` is the position to resume after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: FileKind,
    pub name: Vec<u8>,
    pub cookie: u64,
}

/// `statfs` figures, in blocks of `bsize` bytes.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// What a volume holds: bytes stored (chunk bytes and symlink targets) and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

/// `renameat2` flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// `fallocate` modes (Linux `FALLOC_FL_*`).
pub mod falloc {
    pub const KEEP_SIZE: i32 = 0x01;
    pub const PUNCH_HOLE: i32 = 0x02;
    pub const ZERO_RANGE: i32 = 0x10;
}

/// POSIX operations on one volume.
pub trait FileSystem: Send + Sync + 'static {
    fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr>;
    fn getattr(&self, ino: Ino) -> FsResult<Attr>;
    fn setattr(&self, ctx: &Ctx, ino: Ino, set: &SetAttr) -> FsResult<Attr>;
    fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>>;
    /// Creates a regular file, FIFO, socket or device node. `mode` carries the type bits.
    fn mknod(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Attr>;
    fn mkdir(&self, ctx: &Ctx, parent: Ino, name: &[u8], mode: u32, umask: u32) -> FsResult<Attr>;
    fn symlink(&self, ctx: &Ctx, parent: Ino, name: &[u8], target: &[u8]) -> FsResult<Attr>;
    fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> FsResult<Attr>;
    fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()>;
    fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()>;
    fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()>;
    /// Counts an open handle: an unlinked inode lives until its last handle is released.
    fn open(&self, ino: Ino) -> FsResult<Attr>;
    fn release(&self, ino: Ino) -> FsResult<()>;
    /// The volume's only mount no longer references `ino` at all (no name, no open file).
    fn forget(&self, ino: Ino) -> FsResult<()>;
    /// Every inode number of the volume.
    fn inodes(&self) -> FsResult<Vec<Ino>>;
    fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>>;
    /// Writes `data`; `kill_suid` clears setuid/setgid as a write by a non-owner must.
    fn write(&self, ino: Ino, offset: u64, data: &[u8], kill_suid: bool) -> FsResult<u32>;
    /// Entries after `cookie` (0 = from the start, including `.` and `..`), at most `max`.
    fn readdir(&self, ino: Ino, cookie: u64, max: usize) -> FsResult<Vec<DirEntry>>;
    fn statfs(&self) -> FsResult<StatFs>;
    fn setxattr(&self, ctx: &Ctx, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> FsResult<()>;
    fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>>;
    /// Names, each followed by a NUL byte.
    fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>>;
    fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()>;
    fn fallocate(&self, ino: Ino, offset: u64, length: u64, mode: i32) -> FsResult<()>;
    /// `SEEK_DATA` / `SEEK_HOLE`.
    fn lseek(&self, ino: Ino, offset: u64, whence: i32) -> FsResult<u64>;
    /// Returns once everything acknowledged so far is durable.
    fn sync(&self) -> FsResult<()>;
}
