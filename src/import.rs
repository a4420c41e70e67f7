//! Initialising a new volume from a host directory or a tar archive
//! (`volfs create NAME --opt from=PATH`), as Docker copies an image's content into a new
//! volume: file types, modes (with setuid, setgid and sticky), owners, atime and mtime with
//! nanoseconds, xattrs, symlinks, hard links and holes are kept.
//!
//! Everything goes through the [`FileSystem`] seam as root, so the result is exactly what a
//! client could have built through a mount. Per inode the order is: create it, write its
//! data, chown, set its xattrs, then chmod and set its times. Chown comes before the mode so
//! that sledfs's chown semantics (it clears setuid, and setgid with group-exec, as Linux
//! does) cannot strip bits the source has; xattrs come after chown and data because a
//! POSIX filesystem drops `security.capability` on both; the mode comes after the access ACL
//! so the two end up agreeing with the source. Directories get their metadata only once
//! everything below them exists (post-order): creating a child changes a directory's mtime,
//! and a default ACL or setgid bit set early would be inherited by children whose own
//! metadata says otherwise.
//!
//! Directory source: the tree is copied like `cp -a` does it: symlinks are copied, never
//! followed (except `from=` itself when it is a symlink to a directory), mount points below
//! the source are crossed, hard links are recognised by `(st_dev, st_ino)`, unix sockets
//! are skipped (counted in [`ImportStats::others`]). Holes are found with
//! `SEEK_DATA`/`SEEK_HOLE` and only data ranges are written; in any source a block of
//! [`crate::store::CHUNK_SIZE`] zero bytes is not written either, so it stays a hole. The
//! source is read with `O_NOATIME` where allowed, so importing does not touch its atimes
//! (reading a symlink still may: the kernel has no `O_NOATIME` for `readlink`).
//!
//! Tar source (`from=` a tar file, or any stream with [`import_archive`], which `volfs import`
//! uses): plain, gzip or zstd, detected by magic bytes, read strictly in order (a stream
//! need not be seekable). GNU, ustar, PAX and v7 formats; GNU long names and PAX
//! `path`/`linkpath`/`size`; PAX `mtime`/`atime` with fractions (without an atime the mtime
//! is used); numeric `uid`/`gid` (user and group names are ignored); `SCHILY.xattr.*`
//! xattrs; `SCHILY.acl.access`/`.default` text ACLs (GNU tar `--acls`) when no binary
//! `system.posix_acl_*` xattr is given; GNU sparse files in the old GNU format and in PAX
//! formats 0.0, 0.1 and 1.0 (holes are skipped, never read through). The framing (headers,
//! checksums, sizes, padding) is read here, not by the `tar` crate, whose header type is
//! only used to decode fields.
//!
//! Archives are not trusted. An entry is refused, with an error naming it (quoted, escaped)
//! and the reason, when: its path is absolute, has a `..` component, is empty, holds a NUL
//! byte, has a component over NAME_MAX (255 bytes) or is PATH_MAX (4096 bytes, NUL
//! included) or longer; its path goes through a symlink (symlinks in the volume are never
//! followed); it is a hard link whose target is not an earlier non-directory entry of the
//! archive (so also one that is absolute or has `..`); it repeats the path of an earlier
//! entry, or conflicts with it (a file where a directory was, a directory where a file
//! was); its header checksum is wrong; its size (a size field, a PAX `size`, a sparse real
//! size) is beyond 2^63 - 1 or beyond what the volume can hold (its quota, else the disk
//! holding the store); a PAX record's length runs past its header; an extension header
//! (PAX header, GNU long name) is over [`MAX_EXTENSION`] bytes or all of one entry's headers
//! over [`MAX_HEADERS`]; the archive is truncated (inside a header, inside data, or without
//! its end-of-archive block). A `./` prefix is fine, as is one `./` entry, which gives the
//! import root its mode, owner and times. A directory entry for a directory created earlier
//! as a missing parent is not a repeat (archives may list a directory after its children);
//! missing parents are created `0755 root:root`.
//!
//! On error the volume is left partly filled: the caller discards it (a new volume is
//! never registered; see `Registry::import` and `create` with `from=`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fmt::Display;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::Whence;
use serde::{Deserialize, Serialize};

use crate::error::FsError;
use crate::store::{CHUNK_SIZE, ROOT_INO};
use crate::vfs::{Ctx, FileKind, FileSystem, Ino, SetAttr, SetTime, SledFs, Timestamp};

/// What an import created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportStats {
    /// Regular files created (hard links excluded).
    pub files: u64,
    /// Directories created, the root excluded.
    pub dirs: u64,
    pub symlinks: u64,
    /// Extra names given to an already imported inode.
    pub hardlinks: u64,
    /// FIFOs and device nodes created, plus unix sockets skipped.
    pub others: u64,
    /// File data bytes written (holes and all-zero blocks are not written).
    pub bytes: u64,
}

/// Largest PAX header (`x`, `g`) or GNU long name or link (`L`, `K`) accepted.
pub const MAX_EXTENSION: u64 = 1 << 20;
/// Largest total of one entry's headers: extension headers, old GNU sparse extension
/// blocks, a PAX 1.0 sparse map.
pub const MAX_HEADERS: u64 = 4 << 20;
/// Linux's PATH_MAX, terminating NUL included: a path holds at most 4095 bytes.
const PATH_MAX: usize = 4096;
/// Linux's NAME_MAX: the longest name of one path component.
const NAME_MAX: usize = 255;
/// Largest file size (a file offset is an `off_t`).
const FILE_MAX: u64 = i64::MAX as u64;

/// Copies the tree at `source` (a directory, or a tar file: plain, gzip or zstd, detected by
/// magic bytes) into the empty volume served by `fs`, as root (Ctx uid 0 gid 0). The volume
/// root takes the source root's mode, owner and times (for a tar: those of its "./" entry
/// if present). See the module documentation for what is kept and what is refused.
pub fn import(fs: &SledFs, source: &Path) -> Result<ImportStats, String> {
    let from = source.display().to_string();
    let prefix = format!("from={from}: ");
    let md = std::fs::metadata(source).map_err(|e| format!("from={from}: cannot read it: {e}"))?;
    check_empty(fs, ROOT_INO)
        .map_err(|e| format!("{prefix}{e}; content can only be imported into a new volume"))?;
    let mut imp = Importer::new(fs, ROOT_INO, prefix);
    if md.is_dir() {
        let root = std::fs::canonicalize(source)
            .map_err(|e| format!("from={from}: cannot resolve the directory: {e}"))?;
        imp.copy_dir(&root)?;
    } else if md.is_file() {
        let mut file =
            File::open(source).map_err(|e| format!("from={from}: cannot open it: {e}"))?;
        let reader = imp.open_archive(&mut file)?;
        imp.copy_tar(reader)?;
    } else {
        return Err(not_dir_or_tar(&format!("from={from}: ")));
    }
    Ok(imp.stats)
}

/// Copies a tar archive read from `source` (plain, gzip or zstd, detected by magic bytes;
/// read in order, never seeked) into the empty directory `dir` of `fs` (the volume root, or
/// a staging directory), as root. The archive's `./` entry, if any, gives `dir` its mode,
/// owner and times. Refusals name the entry and the reason (see the module documentation);
/// on error `dir` is left partly filled and the caller discards it.
pub fn import_archive(fs: &SledFs, dir: Ino, source: &mut dyn Read) -> Result<ImportStats, String> {
    check_empty(fs, dir)?;
    let mut imp = Importer::new(fs, dir, String::new());
    let reader = imp.open_archive(source)?;
    imp.copy_tar(reader)?;
    Ok(imp.stats)
}

/// Whether directory `dir` has no entries (`.` and `..` aside).
pub fn is_empty_dir(fs: &SledFs, dir: Ino) -> Result<bool, String> {
    // Cookies 1 and 2 are "." and "..".
    fs.readdir(dir, 2, 1)
        .map(|entries| entries.is_empty())
        .map_err(|e| format!("listing the volume root: {e}"))
}

fn check_empty(fs: &SledFs, dir: Ino) -> Result<(), String> {
    if is_empty_dir(fs, dir)? {
        Ok(())
    } else {
        Err("the volume is not empty".into())
    }
}

/// What the volume can hold at most: its quota, else the size of the disk holding the
/// store. No entry's data may be larger.
fn capacity(fs: &SledFs) -> u64 {
    let disk = nix::sys::statvfs::statvfs(fs.store_dir().as_path())
        .map(|st| st.blocks().saturating_mul(st.fragment_size()))
        .unwrap_or(FILE_MAX);
    fs.limit().unwrap_or(disk).min(disk).min(FILE_MAX)
}

const ROOT: Ctx = Ctx::ROOT;

/// Largest single `write` into the volume.
const WRITE_MAX: usize = 1 << 20;

/// The refusal of a source that is neither a directory nor a tar archive.
fn not_dir_or_tar(prefix: &str) -> String {
    if prefix.is_empty() {
        "the input is not a tar archive (expected a tar archive: plain, gzip or zstd)".into()
    } else {
        format!(
            "{prefix}not a directory or tar file (expected a directory, .tar, .tar.gz or .tar.zst)"
        )
    }
}

/// An entry path for messages, quoted: UTF-8 as is, quotes, backslashes and control
/// characters escaped, other bytes as `\xNN`; a very long path is cut in the middle.
fn quote(b: &[u8]) -> String {
    const HEAD: usize = 160;
    const TAIL: usize = 60;
    let mut s = String::from("\"");
    if b.len() > HEAD + TAIL + 40 {
        escape_into(&mut s, &b[..HEAD]);
        s.push_str(&format!("…[{} bytes in all]…", b.len()));
        escape_into(&mut s, &b[b.len() - TAIL..]);
    } else {
        escape_into(&mut s, b);
    }
    s.push('"');
    s
}

fn escape_into(s: &mut String, b: &[u8]) {
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' | '\\' => {
                    s.push('\\');
                    s.push(c);
                }
                c if c.is_control() => s.extend(c.escape_default()),
                c => s.push(c),
            }
        }
        for x in chunk.invalid() {
            s.push_str(&format!("\\x{x:02x}"));
        }
    }
}

/// How messages name a tar entry.
fn entry_name(path: &[u8]) -> String {
    format!("archive entry {}", quote(path))
}

/// A name for messages: lossy UTF-8 with control characters escaped.
fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

fn show_path(p: &Path) -> String {
    show(p.as_os_str().as_bytes())
}

/// A hint to follow a filesystem error in a message, where one helps.
fn hint(e: &FsError) -> &'static str {
    match e {
        FsError::NoSpace => " (the disk holding the volfs store is full)",
        FsError::NameTooLong => " (volfs names are limited to 255 bytes)",
        FsError::TooBig => " (xattr values are limited to 64 KiB)",
        _ => "",
    }
}

/// Name/value pairs: xattrs, PAX records.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Metadata applied to an inode once its content is in place.
#[derive(Debug, Clone)]
struct Meta {
    perm: u32,
    uid: u32,
    gid: u32,
    atime: Timestamp,
    mtime: Timestamp,
    xattrs: Pairs,
}

/// xattr namespaces sledfs stores.
fn xattr_supported(name: &[u8]) -> bool {
    [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|ns| name.starts_with(ns))
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// A directory being copied (directory source): its children are created before its
/// metadata is applied.
struct Frame {
    path: PathBuf,
    ino: Ino,
    id: (u64, u64),
    meta: Meta,
    names: std::vec::IntoIter<Vec<u8>>,
}

/// A directory whose metadata is applied at the end (tar source).
struct PendingDir {
    name: String,
    meta: Meta,
}

struct Importer<'a> {
    fs: &'a SledFs,
    /// Where the import goes: the volume root or a staging directory.
    root: Ino,
    /// Starts every message: `from=PATH: ` for `from=`, empty for a stream.
    prefix: String,
    /// Largest data size an entry may have (see [`capacity`]).
    capacity: u64,
    stats: ImportStats,
    buf: Vec<u8>,
}

impl<'a> Importer<'a> {
    fn new(fs: &'a SledFs, root: Ino, prefix: String) -> Importer<'a> {
        Importer {
            fs,
            root,
            prefix,
            capacity: capacity(fs),
            stats: ImportStats::default(),
            buf: vec![0u8; WRITE_MAX],
        }
    }
}

impl Importer<'_> {
    fn fail(&self, name: &str, what: &str, e: impl Display) -> String {
        format!("{}{name}: {what}: {e}", self.prefix)
    }

    fn fs_fail(&self, name: &str, what: &str, e: &FsError) -> String {
        format!("{}{name}: {what}: {e}{}", self.prefix, hint(e))
    }

    /// An entry refused: `name` is `archive entry "PATH"`.
    fn refuse(&self, name: &str, reason: impl Display) -> String {
        format!("{}{name}: {reason}", self.prefix)
    }

    /// chown, xattrs, then mode and times (see the module documentation for why).
    fn apply_meta(&self, ino: Ino, kind: FileKind, meta: &Meta, name: &str) -> Result<(), String> {
        let own = SetAttr {
            uid: Some(meta.uid),
            gid: Some(meta.gid),
            ..SetAttr::default()
        };
        self.fs
            .setattr(&ROOT, ino, &own)
            .map_err(|e| self.fs_fail(name, "setting its owner", &e))?;
        for (xname, value) in &meta.xattrs {
            if !xattr_supported(xname) {
                tracing::warn!(
                    prefix = %self.prefix,
                    "{name}: xattr {} skipped: volfs stores only user.*, trusted.*, security.* and POSIX ACLs",
                    show(xname)
                );
                continue;
            }
            self.fs
                .setxattr(&ROOT, ino, xname, value, 0)
                .map_err(|e| self.fs_fail(name, &format!("setting xattr {}", show(xname)), &e))?;
        }
        let rest = SetAttr {
            // A symlink's mode is always 0777 and cannot be changed.
            mode: (kind != FileKind::Symlink).then_some(meta.perm & 0o7777),
            atime: Some(SetTime::At(meta.atime)),
            mtime: Some(SetTime::At(meta.mtime)),
            ..SetAttr::default()
        };
        self.fs
            .setattr(&ROOT, ino, &rest)
            .map_err(|e| self.fs_fail(name, "setting its mode and times", &e))?;
        Ok(())
    }

    fn set_size(&self, ino: Ino, size: u64, name: &str) -> Result<(), String> {
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        self.fs
            .setattr(&ROOT, ino, &set)
            .map_err(|e| self.fs_fail(name, "setting its size", &e))?;
        Ok(())
    }

    /// Copies up to `limit` bytes (or to EOF) from `reader` into `ino` at `offset`; returns
    /// the number of bytes read.
    fn copy_stream(
        &mut self,
        ino: Ino,
        reader: &mut dyn Read,
        offset: u64,
        limit: Option<u64>,
        name: &str,
    ) -> Result<u64, String> {
        let mut done = 0u64;
        loop {
            let want = match limit {
                Some(l) => (l - done).min(WRITE_MAX as u64) as usize,
                None => WRITE_MAX,
            };
            if want == 0 {
                break;
            }
            let n = read_full(reader, &mut self.buf[..want])
                .map_err(|e| self.fail(name, "reading its data (is the archive truncated?)", e))?;
            if n == 0 {
                break;
            }
            let written = write_nonzero(self.fs, ino, offset + done, &self.buf[..n])
                .map_err(|e| self.fs_fail(name, "writing its data", &e))?;
            self.stats.bytes += written;
            done += n as u64;
            if n < want {
                break;
            }
        }
        Ok(done)
    }

    // ---- directory source ----

    fn copy_dir(&mut self, root: &Path) -> Result<(), String> {
        let root_name = show_path(root);
        let md = std::fs::symlink_metadata(root).map_err(|e| self.fail(&root_name, "lstat", e))?;
        let meta = self.host_meta(root, &md)?;
        let names = list_dir(root).map_err(|e| self.fail(&root_name, "listing it", e))?;
        let mut stack = vec![Frame {
            path: root.to_path_buf(),
            ino: ROOT_INO,
            id: (md.dev(), md.ino()),
            meta,
            names: names.into_iter(),
        }];
        let mut links: HashMap<(u64, u64), Ino> = HashMap::new();
        while let Some(top) = stack.last_mut() {
            let Some(child) = top.names.next() else {
                if let Some(done) = stack.pop() {
                    let name = show_path(&done.path);
                    self.apply_meta(done.ino, FileKind::Directory, &done.meta, &name)?;
                }
                continue;
            };
            let parent = top.ino;
            let path = top.path.join(OsStr::from_bytes(&child));
            if let Some(frame) = self.dir_child(parent, &path, &child, &stack, &mut links)? {
                stack.push(frame);
            }
        }
        Ok(())
    }

    /// Copies one directory entry; returns the frame of a new directory to descend into.
    fn dir_child(
        &mut self,
        parent: Ino,
        path: &Path,
        leaf: &[u8],
        stack: &[Frame],
        links: &mut HashMap<(u64, u64), Ino>,
    ) -> Result<Option<Frame>, String> {
        let name = show_path(path);
        let md = match std::fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(prefix = %self.prefix, "{name}: removed while importing, skipped");
                return Ok(None);
            }
            Err(e) => return Err(self.fail(&name, "lstat", e)),
        };
        let kind = FileKind::from_mode(md.mode())
            .ok_or_else(|| self.fail(&name, "lstat", "unknown file type"))?;
        let id = (md.dev(), md.ino());
        match kind {
            FileKind::Socket => {
                tracing::info!(prefix = %self.prefix, "{name}: unix socket skipped");
                self.stats.others += 1;
                return Ok(None);
            }
            FileKind::Directory => {
                if stack.iter().any(|f| f.id == id) {
                    return Err(self.fail(
                        &name,
                        "copying it",
                        "directory loop: it is one of its own ancestors (a bind mount?)",
                    ));
                }
                let meta = self.host_meta(path, &md)?;
                let names = list_dir(path).map_err(|e| self.fail(&name, "listing it", e))?;
                let a = self
                    .fs
                    .mkdir(&ROOT, parent, leaf, 0o700, 0)
                    .map_err(|e| self.fs_fail(&name, "creating the directory", &e))?;
                self.stats.dirs += 1;
                return Ok(Some(Frame {
                    path: path.to_path_buf(),
                    ino: a.ino,
                    id,
                    meta,
                    names: names.into_iter(),
                }));
            }
            _ => {}
        }
        if md.nlink() > 1 {
            if let Some(&target) = links.get(&id) {
                self.fs
                    .link(target, parent, leaf)
                    .map_err(|e| self.fs_fail(&name, "creating the hard link", &e))?;
                self.stats.hardlinks += 1;
                return Ok(None);
            }
        }
        let meta = self.host_meta(path, &md)?;
        let ino = match kind {
            FileKind::Regular => {
                let a = self
                    .fs
                    .mknod(&ROOT, parent, leaf, libc::S_IFREG | 0o600, 0, 0)
                    .map_err(|e| self.fs_fail(&name, "creating the file", &e))?;
                self.stats.files += 1;
                self.copy_host_file(a.ino, path, &md, &name)?;
                a.ino
            }
            FileKind::Symlink => {
                let target =
                    std::fs::read_link(path).map_err(|e| self.fail(&name, "readlink", e))?;
                let a = self
                    .fs
                    .symlink(&ROOT, parent, leaf, target.as_os_str().as_bytes())
                    .map_err(|e| self.fs_fail(&name, "creating the symlink", &e))?;
                self.stats.symlinks += 1;
                a.ino
            }
            _ => {
                let rdev = if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                    let (major, minor) = (
                        nix::sys::stat::major(md.rdev()),
                        nix::sys::stat::minor(md.rdev()),
                    );
                    encode_rdev(major, minor).ok_or_else(|| {
                        self.fail(
                            &name,
                            "creating the device node",
                            format!(
                                "device {major}:{minor} does not fit FUSE's 32-bit device numbers"
                            ),
                        )
                    })?
                } else {
                    0
                };
                let a = self
                    .fs
                    .mknod(&ROOT, parent, leaf, kind.type_bits() | 0o600, 0, rdev)
                    .map_err(|e| self.fs_fail(&name, "creating the node", &e))?;
                self.stats.others += 1;
                a.ino
            }
        };
        self.apply_meta(ino, kind, &meta, &name)?;
        if md.nlink() > 1 {
            links.insert(id, ino);
        }
        Ok(None)
    }

    fn host_meta(&self, path: &Path, md: &Metadata) -> Result<Meta, String> {
        Ok(Meta {
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            atime: timestamp(md.atime(), md.atime_nsec()),
            mtime: timestamp(md.mtime(), md.mtime_nsec()),
            xattrs: host_xattrs(path)
                .map_err(|e| self.fail(&show_path(path), "reading its xattrs", e))?,
        })
    }

    /// Copies the data ranges of a host file (holes stay holes), then sets its size.
    fn copy_host_file(
        &mut self,
        ino: Ino,
        path: &Path,
        md: &Metadata,
        name: &str,
    ) -> Result<(), String> {
        let file = open_noatime(path).map_err(|e| self.fail(name, "opening it", e))?;
        let fmd = file.metadata().map_err(|e| self.fail(name, "fstat", e))?;
        if fmd.dev() != md.dev() || fmd.ino() != md.ino() || !fmd.is_file() {
            return Err(self.fail(
                name,
                "opening it",
                "it was replaced while importing; try again",
            ));
        }
        let size = md.size();
        let fd = file.as_raw_fd();
        let mut pos = 0u64;
        'ranges: while pos < size {
            let data = match nix::unistd::lseek(fd, pos as i64, Whence::SeekData) {
                Ok(o) => o as u64,
                Err(Errno::ENXIO) => break,
                Err(Errno::EINVAL | Errno::EOPNOTSUPP) => pos,
                Err(e) => return Err(self.fail(name, "SEEK_DATA", e)),
            };
            if data >= size {
                break;
            }
            let mut hole = match nix::unistd::lseek(fd, data as i64, Whence::SeekHole) {
                Ok(o) => (o as u64).min(size),
                Err(Errno::ENXIO | Errno::EINVAL | Errno::EOPNOTSUPP) => size,
                Err(e) => return Err(self.fail(name, "SEEK_HOLE", e)),
            };
            if hole <= data {
                hole = size;
            }
            let mut off = data;
            while off < hole {
                let want = (hole - off).min(WRITE_MAX as u64) as usize;
                let n = read_full_at(&file, &mut self.buf[..want], off)
                    .map_err(|e| self.fail(name, "reading it", e))?;
                if n == 0 {
                    // The file shrank while we read it.
                    break 'ranges;
                }
                let written = write_nonzero(self.fs, ino, off, &self.buf[..n])
                    .map_err(|e| self.fs_fail(name, "writing its data", &e))?;
                self.stats.bytes += written;
                off += n as u64;
            }
            pos = hole;
        }
        self.set_size(ino, size, name)
    }

    // ---- tar source ----

    /// Detects the compression by magic bytes and checks that a plain stream is a tar.
    fn open_archive<'r>(&self, source: &'r mut dyn Read) -> Result<Box<dyn Read + 'r>, String> {
        let mut head = vec![0u8; 512];
        let n = read_full(source, &mut head)
            .map_err(|e| format!("{}reading the archive: {e}", self.prefix))?;
        if n == 0 {
            return Err(format!("{}the archive is empty (no input)", self.prefix));
        }
        head.truncate(n);
        let rest = io::Cursor::new(head.clone()).chain(source);
        if head.starts_with(&[0x1f, 0x8b]) {
            return Ok(Box::new(flate2::read::MultiGzDecoder::new(rest)));
        }
        if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let d = zstd::stream::read::Decoder::new(rest)
                .map_err(|e| format!("{}starting zstd decompression: {e}", self.prefix))?;
            return Ok(Box::new(d));
        }
        if head.starts_with(b"BZh") || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            return Err(format!(
                "{}bzip2 and xz archives are not supported: decompress it, or recompress it with gzip or zstd",
                self.prefix
            ));
        }
        if looks_like_tar(&head) {
            return Ok(Box::new(rest));
        }
        Err(not_dir_or_tar(&self.prefix))
    }

    /// A framing error, naming the entry when its path is known.
    fn frame_fail(&self, e: FrameError) -> String {
        match e.path {
            Some(p) if !p.is_empty() => format!(
                "{}{} (header at byte {}): {}",
                self.prefix,
                entry_name(&p),
                e.at,
                e.reason
            ),
            _ => format!(
                "{}archive header at byte {}: {}",
                self.prefix, e.at, e.reason
            ),
        }
    }

    fn copy_tar(&mut self, reader: Box<dyn Read + '_>) -> Result<(), String> {
        let mut tar = TarReader {
            inner: reader,
            pos: 0,
            capacity: self.capacity,
        };
        let mut dirs: BTreeMap<Ino, PendingDir> = BTreeMap::new();
        while let Some(m) = tar.next_member().map_err(|e| self.frame_fail(e))? {
            let mut data = Data {
                tar: &mut tar,
                left: m.size,
            };
            self.tar_entry(&m, &mut data, &mut dirs)?;
            let left = data.left;
            tar.skip_data(left, m.size)
                .map_err(|e| self.refuse(&entry_name(&m.path), e))?;
        }
        // The rest (GNU tar pads to a 10 KiB record) is read so that a compressed stream's
        // own checksum is verified.
        tar.drain().map_err(|e| {
            format!(
                "{}reading what follows the end of the archive: {e} (is the compressed stream corrupt?)",
                self.prefix
            )
        })?;
        for (ino, d) in &dirs {
            self.apply_meta(*ino, FileKind::Directory, &d.meta, &d.name)?;
        }
        Ok(())
    }

    fn tar_entry(
        &mut self,
        m: &Member,
        data: &mut Data<'_, '_>,
        dirs: &mut BTreeMap<Ino, PendingDir>,
    ) -> Result<(), String> {
        use tar::EntryType as T;
        let etype = m.header.entry_type();
        let mut path = m.path.clone();
        let regular = matches!(etype, T::Regular | T::Continuous | T::GNUSparse);
        let sparse = match &m.old_sparse {
            Some((segments, real_size)) => Some(SparseInfo {
                name: None,
                real_size: *real_size,
                segments: segments.clone(),
                map_in_data: false,
            }),
            None if regular => sparse_info(&m.ext.pax)
                .map_err(|e| self.refuse(&entry_name(&path), format!("its sparse map: {e}")))?,
            None => None,
        };
        if let Some(n) = sparse.as_ref().and_then(|s| s.name.clone()) {
            path = n;
        }
        let name = entry_name(&path);
        if let Some(s) = &sparse {
            if s.real_size > FILE_MAX {
                return Err(self.refuse(
                    &name,
                    format!(
                        "its sparse real size {} is absurd (beyond 2^63 - 1 bytes)",
                        s.real_size
                    ),
                ));
            }
        }
        let comps = components(&path).map_err(|e| self.refuse(&name, e))?;
        // A v7 directory is a regular entry whose name ends in '/'; GNU incremental archives
        // have dumpdir ('D') entries, whose data (a listing) is not needed.
        let is_dir =
            etype == T::Directory || etype.as_byte() == b'D' || (regular && path.ends_with(b"/"));
        let meta = self.tar_meta(&m.header, &m.ext.pax, &name)?;

        let Some((leaf, parents)) = comps.split_last() else {
            if !is_dir {
                return Err(self.refuse(&name, "names the import root but is not a directory"));
            }
            if dirs.contains_key(&self.root) {
                return Err(self.refuse(
                    &name,
                    "duplicate entry: the archive lists its root (\"./\") twice",
                ));
            }
            dirs.insert(self.root, PendingDir { name, meta });
            return Ok(());
        };
        let parent = self.tar_parent(parents, &name)?;
        if is_dir {
            let ino = match self.claim(parent, leaf, true, &name, dirs)? {
                Some(implicit) => implicit,
                None => {
                    let a = self
                        .fs
                        .mkdir(&ROOT, parent, leaf, 0o700, 0)
                        .map_err(|e| self.fs_fail(&name, "creating the directory", &e))?;
                    self.stats.dirs += 1;
                    a.ino
                }
            };
            dirs.insert(ino, PendingDir { name, meta });
            return Ok(());
        }
        self.claim(parent, leaf, false, &name, dirs)?;
        match etype {
            T::Link => {
                let target = m.ext.link_name(&m.header);
                let target_ino = self.link_target(&target, &name)?;
                self.fs
                    .link(target_ino, parent, leaf)
                    .map_err(|e| self.fs_fail(&name, "creating the hard link", &e))?;
                self.stats.hardlinks += 1;
            }
            T::Symlink => {
                let target = m.ext.link_name(&m.header);
                if target.is_empty() {
                    return Err(self.refuse(&name, "symlink with an empty target"));
                }
                if target.contains(&0) {
                    return Err(self.refuse(&name, "its symlink target holds a NUL byte"));
                }
                if target.len() >= PATH_MAX {
                    return Err(self.refuse(
                        &name,
                        format!(
                            "its symlink target of {} bytes is too long (PATH_MAX is {PATH_MAX} bytes, NUL included)",
                            target.len()
                        ),
                    ));
                }
                let a = self
                    .fs
                    .symlink(&ROOT, parent, leaf, &target)
                    .map_err(|e| self.fs_fail(&name, "creating the symlink", &e))?;
                self.stats.symlinks += 1;
                self.apply_meta(a.ino, FileKind::Symlink, &meta, &name)?;
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let a = self
                    .fs
                    .mknod(&ROOT, parent, leaf, libc::S_IFREG | 0o600, 0, 0)
                    .map_err(|e| self.fs_fail(&name, "creating the file", &e))?;
                self.stats.files += 1;
                let size = match sparse {
                    None => {
                        let want = m.size;
                        let got = self.copy_stream(a.ino, data, 0, None, &name)?;
                        if got != want {
                            return Err(self.refuse(
                                &name,
                                format!(
                                    "the archive ends after {got} of its {want} bytes of data (truncated?)"
                                ),
                            ));
                        }
                        want
                    }
                    Some(s) => self.tar_sparse_data(a.ino, data, m.size, s, &name)?,
                };
                self.set_size(a.ino, size, &name)?;
                self.apply_meta(a.ino, FileKind::Regular, &meta, &name)?;
            }
            T::Char | T::Block | T::Fifo => {
                let (kind, rdev) = match etype {
                    T::Fifo => (FileKind::Fifo, 0),
                    _ => {
                        let h = &m.header;
                        let major = h.device_major().ok().flatten().unwrap_or(0);
                        let minor = h.device_minor().ok().flatten().unwrap_or(0);
                        let rdev = encode_rdev(major.into(), minor.into()).ok_or_else(|| {
                            self.fail(
                                &name,
                                "creating the device node",
                                format!("device {major}:{minor} does not fit FUSE's 32-bit device numbers"),
                            )
                        })?;
                        let kind = if etype == T::Char {
                            FileKind::CharDevice
                        } else {
                            FileKind::BlockDevice
                        };
                        (kind, rdev)
                    }
                };
                let a = self
                    .fs
                    .mknod(&ROOT, parent, leaf, kind.type_bits() | 0o600, 0, rdev)
                    .map_err(|e| self.fs_fail(&name, "creating the node", &e))?;
                self.stats.others += 1;
                self.apply_meta(a.ino, kind, &meta, &name)?;
            }
            other => {
                return Err(self.refuse(
                    &name,
                    format!(
                        "unsupported tar entry type '{}'",
                        (other.as_byte() as char).escape_debug()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn tar_meta(
        &self,
        h: &tar::Header,
        pax: &[(Vec<u8>, Vec<u8>)],
        name: &str,
    ) -> Result<Meta, String> {
        let bad = |what: &str, e: &dyn Display| self.fail(name, &format!("reading its {what}"), e);
        let perm = h.mode().map_err(|e| bad("mode", &e))? & 0o7777;
        let id = |key: &str, header: io::Result<u64>| -> Result<u64, String> {
            match pax.iter().rev().find(|(k, _)| k == key.as_bytes()) {
                Some((_, v)) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        bad(
                            &format!("PAX {key}"),
                            &format!("'{}' is not a number", show(v)),
                        )
                    }),
                None => header.map_err(|e| bad(key, &e)),
            }
        };
        let uid = id("uid", h.uid())?;
        let gid = id("gid", h.gid())?;
        let uid = u32::try_from(uid).map_err(|_| bad("uid", &format!("{uid} is out of range")))?;
        let gid = u32::try_from(gid).map_err(|_| bad("gid", &format!("{gid} is out of range")))?;
        let pax_time = |key: &[u8]| -> Result<Option<Timestamp>, String> {
            match pax.iter().rev().find(|(k, _)| k == key) {
                None => Ok(None),
                Some((_, v)) => parse_pax_time(v).map(Some).ok_or_else(|| {
                    bad(
                        &format!("PAX {}", show(key)),
                        &format!("'{}' is not a time", show(v)),
                    )
                }),
            }
        };
        let mtime = match pax_time(b"mtime")? {
            Some(t) => t,
            None => Timestamp {
                secs: i64::try_from(h.mtime().map_err(|e| bad("mtime", &e))?).unwrap_or(i64::MAX),
                nsecs: 0,
            },
        };
        let gnu_atime = h
            .as_gnu()
            .and_then(|g| g.atime().ok())
            .filter(|t| *t != 0)
            .map(|t| Timestamp {
                secs: i64::try_from(t).unwrap_or(i64::MAX),
                nsecs: 0,
            });
        let atime = pax_time(b"atime")?.or(gnu_atime).unwrap_or(mtime);
        let mut xattrs: Pairs = Vec::new();
        for (k, v) in pax {
            if let Some(x) = k.strip_prefix(b"SCHILY.xattr.") {
                xattrs.retain(|(n, _)| n != x);
                xattrs.push((x.to_vec(), v.clone()));
            }
        }
        for (key, xname) in [
            (&b"SCHILY.acl.access"[..], &b"system.posix_acl_access"[..]),
            (b"SCHILY.acl.default", b"system.posix_acl_default"),
        ] {
            let Some((_, text)) = pax.iter().rev().find(|(k, _)| k == key) else {
                continue;
            };
            if text.is_empty() || xattrs.iter().any(|(n, _)| n == xname) {
                continue;
            }
            let value = acl_from_text(text).map_err(|e| bad(&show(key), &e))?;
            xattrs.push((xname.to_vec(), value));
        }
        Ok(Meta {
            perm,
            uid,
            gid,
            atime,
            mtime,
            xattrs,
        })
    }

    /// The directory `comps` below the import root, missing ones made `0755 root:root`.
    fn tar_parent(&mut self, comps: &[&[u8]], name: &str) -> Result<Ino, String> {
        self.tar_dirs(comps, name, "its path", true)?
            .ok_or_else(|| self.refuse(name, "its directory is missing"))
    }

    /// Walks (and with `create`, makes) the directories `comps` below the import root,
    /// never through a symlink; `None` if one is missing and `create` is false. `whose`
    /// says what the path is, for messages.
    fn tar_dirs(
        &mut self,
        comps: &[&[u8]],
        name: &str,
        whose: &str,
        create: bool,
    ) -> Result<Option<Ino>, String> {
        let mut cur = self.root;
        for (i, c) in comps.iter().enumerate() {
            let prefix = || quote(&comps[..=i].join(&b'/'));
            match self.fs.lookup(cur, c) {
                Ok(a) if a.kind == FileKind::Directory => cur = a.ino,
                Ok(a) if a.kind == FileKind::Symlink => {
                    return Err(self.refuse(
                        name,
                        format!(
                            "{whose} goes through the symlink {} (an archive entry may not pass through a symlink)",
                            prefix()
                        ),
                    ));
                }
                Ok(_) => {
                    return Err(self.refuse(
                        name,
                        format!(
                            "{whose} goes through {}, which an earlier entry made a file, not a directory",
                            prefix()
                        ),
                    ));
                }
                Err(FsError::NotFound) if create => {
                    let a = self.fs.mkdir(&ROOT, cur, c, 0o755, 0).map_err(|e| {
                        self.fs_fail(name, &format!("creating its parent {}", prefix()), &e)
                    })?;
                    self.stats.dirs += 1;
                    cur = a.ino;
                }
                Err(FsError::NotFound) => return Ok(None),
                Err(e) => {
                    return Err(self.fs_fail(name, &format!("looking up {}", prefix()), &e));
                }
            }
        }
        Ok(Some(cur))
    }

    /// Checks that `parent/leaf` is free for a new entry. A directory entry may name a
    /// directory created earlier as a missing parent (returned: it takes the entry's
    /// metadata); anything else there is a duplicate or a conflict.
    fn claim(
        &self,
        parent: Ino,
        leaf: &[u8],
        for_dir: bool,
        name: &str,
        dirs: &BTreeMap<Ino, PendingDir>,
    ) -> Result<Option<Ino>, String> {
        match self.fs.lookup(parent, leaf) {
            Err(FsError::NotFound) => Ok(None),
            Err(e) => Err(self.fs_fail(name, "looking it up", &e)),
            Ok(a) if a.kind == FileKind::Directory => {
                if !for_dir {
                    Err(self.refuse(
                        name,
                        "conflicting entry: an earlier entry made this path a directory",
                    ))
                } else if dirs.contains_key(&a.ino) {
                    Err(self.refuse(name, "duplicate entry: an earlier entry has the same path"))
                } else {
                    Ok(Some(a.ino))
                }
            }
            Ok(a) if for_dir => Err(self.refuse(
                name,
                format!(
                    "conflicting entry: a directory where an earlier entry made a {}",
                    kind_name(a.kind)
                ),
            )),
            Ok(_) => Err(self.refuse(name, "duplicate entry: an earlier entry has the same path")),
        }
    }

    /// The inode a hard link entry names: an earlier non-directory entry of the archive.
    fn link_target(&mut self, target: &[u8], name: &str) -> Result<Ino, String> {
        let comps = components(target)
            .map_err(|e| self.refuse(name, format!("hard link target {}: {e}", quote(target))))?;
        let missing = |me: &Self| {
            me.refuse(
                name,
                format!(
                    "hard link to {}, which is not an earlier entry of the archive",
                    quote(target)
                ),
            )
        };
        let Some((leaf, parents)) = comps.split_last() else {
            return Err(self.refuse(name, "hard link to the archive's root directory"));
        };
        let Some(dir) = self.tar_dirs(parents, name, "its hard link target", false)? else {
            return Err(missing(self));
        };
        match self.fs.lookup(dir, leaf) {
            Ok(a) if a.kind == FileKind::Directory => Err(self.refuse(
                name,
                format!("hard link to the directory {}: not allowed", quote(target)),
            )),
            Ok(a) => Ok(a.ino),
            Err(FsError::NotFound) => Err(missing(self)),
            Err(e) => Err(self.fs_fail(name, "looking up its hard link target", &e)),
        }
    }

    /// Writes a sparse file's data segments; returns its real size.
    fn tar_sparse_data(
        &mut self,
        ino: Ino,
        data: &mut Data<'_, '_>,
        size: u64,
        s: SparseInfo,
        name: &str,
    ) -> Result<u64, String> {
        let segments = if s.map_in_data {
            read_sparse_map(data, size)
                .map_err(|e| self.refuse(name, format!("its sparse map: {e}")))?
        } else {
            s.segments
        };
        let mut prev_end = 0u64;
        for &(off, len) in &segments {
            let end = off
                .checked_add(len)
                .filter(|e| *e <= s.real_size && off >= prev_end);
            let Some(end) = end else {
                return Err(self.refuse(
                    name,
                    format!(
                        "its sparse map: segment {off}+{len} is out of order or past the file size {}",
                        s.real_size
                    ),
                ));
            };
            prev_end = end;
            if len == 0 {
                continue;
            }
            let got = self.copy_stream(ino, data, off, Some(len), name)?;
            if got != len {
                return Err(self.refuse(
                    name,
                    "the archive ends inside a sparse segment (truncated, or a sparse map larger than the data?)",
                ));
            }
        }
        Ok(s.real_size)
    }
}

fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Regular => "file",
        FileKind::Directory => "directory",
        FileKind::Symlink => "symlink",
        FileKind::Fifo => "FIFO",
        FileKind::CharDevice | FileKind::BlockDevice => "device node",
        FileKind::Socket => "socket",
    }
}

// ---- tar framing ----

/// A framing error: where, which entry if its path is known yet, and why.
#[derive(Debug)]
struct FrameError {
    at: u64,
    path: Option<Vec<u8>>,
    reason: String,
}

/// Reads a tar archive's framing (headers, extension headers, data, padding) from a
/// stream, strictly in order. Memory is bounded: by [`MAX_EXTENSION`] per extension header
/// and [`MAX_HEADERS`] for all the headers of one entry; data is streamed.
struct TarReader<'a> {
    inner: Box<dyn Read + 'a>,
    /// Bytes read so far.
    pos: u64,
    /// Largest data size accepted for one entry.
    capacity: u64,
}

/// One archive entry: its main header and what the extension headers before it said.
struct Member {
    header: tar::Header,
    ext: Extensions,
    /// As the archive gives it: PAX `path`, else GNU long name, else the header's.
    path: Vec<u8>,
    /// Data bytes that follow in the archive (before padding).
    size: u64,
    /// An old GNU sparse file ('S'): `(offset, length)` of each data segment, real size.
    old_sparse: Option<(Vec<(u64, u64)>, u64)>,
}

/// The data of the current entry, as a reader that ends with it.
struct Data<'r, 'a> {
    tar: &'r mut TarReader<'a>,
    left: u64,
}

impl Read for Data<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.tar.inner.read(&mut buf[..want])?;
        self.tar.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

impl TarReader<'_> {
    /// Fills `buf` unless the stream ends first; returns the bytes read.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = read_full(&mut self.inner, buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let k = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.pos += k;
        Ok(k)
    }

    /// Skips what is left of an entry's data and its padding to the next block.
    fn skip_data(&mut self, left: u64, size: u64) -> Result<(), String> {
        let pad = (512 - size % 512) % 512;
        let want = left + pad;
        let got = self
            .skip(want)
            .map_err(|e| format!("reading the archive: {e}"))?;
        if got < left {
            return Err("the archive ends inside its data (truncated?)".into());
        }
        if got < want {
            return Err("the archive ends inside the padding after its data (truncated?)".into());
        }
        Ok(())
    }

    fn drain(&mut self) -> io::Result<u64> {
        io::copy(&mut self.inner, &mut io::sink())
    }

    /// The next entry, its extension headers read; `None` at the end-of-archive block.
    fn next_member(&mut self) -> Result<Option<Member>, FrameError> {
        let start = self.pos;
        let mut ext = Extensions::default();
        let mut block = [0u8; 512];
        loop {
            let at = self.pos;
            let known = ext
                .get(b"path")
                .map(<[u8]>::to_vec)
                .or_else(|| ext.long_name.clone());
            let err = |path: Option<Vec<u8>>, reason: String| FrameError { at, path, reason };
            let n = self
                .fill(&mut block)
                .map_err(|e| err(known.clone(), format!("reading the archive: {e}")))?;
            if n == 0 {
                return Err(err(
                    known,
                    "the archive ends without its end-of-archive block (truncated?)".into(),
                ));
            }
            if n < block.len() {
                return Err(err(
                    known.or_else(|| raw_path(&block[..n])),
                    format!(
                        "the archive ends inside a header, after {n} of its 512 bytes (truncated?)"
                    ),
                ));
            }
            if block.iter().all(|&b| b == 0) {
                if at != start {
                    return Err(err(
                        known,
                        "extension headers not followed by an entry".into(),
                    ));
                }
                return Ok(None);
            }
            if at == 0 && !checksum_ok(&block) {
                return Err(err(
                    None,
                    "not a tar archive (its first header's checksum is wrong)".into(),
                ));
            }
            let path = known.or_else(|| raw_path(&block));
            if !checksum_ok(&block) {
                return Err(err(
                    path,
                    "bad header checksum (the archive is corrupt, or not a tar archive)".into(),
                ));
            }
            let Some(mut size) = numeric(&block[124..136]) else {
                return Err(err(
                    path,
                    format!("bad size field '{}'", show(&block[124..136])),
                ));
            };
            let kind = block[156];
            if matches!(kind, b'x' | b'g' | b'L' | b'K' | b'V') {
                let what = match kind {
                    b'x' => "PAX",
                    b'g' => "global PAX",
                    b'L' => "GNU long name",
                    b'K' => "GNU long link",
                    _ => "volume label",
                };
                if size > MAX_EXTENSION {
                    return Err(err(
                        path,
                        format!(
                            "its {what} header claims {size} bytes (at most {MAX_EXTENSION} are accepted)"
                        ),
                    ));
                }
                if self.pos - start + size > MAX_HEADERS {
                    return Err(err(
                        path,
                        format!("its headers take more than {MAX_HEADERS} bytes"),
                    ));
                }
                let mut body = vec![0u8; size as usize];
                let got = self
                    .fill(&mut body)
                    .map_err(|e| err(path.clone(), format!("reading the archive: {e}")))?;
                let pad = (512 - size % 512) % 512;
                let padded = self
                    .skip(pad)
                    .map_err(|e| err(path.clone(), format!("reading the archive: {e}")))?;
                if got < body.len() || padded < pad {
                    return Err(err(
                        path,
                        format!("the archive ends inside its {what} header (truncated?)"),
                    ));
                }
                match kind {
                    b'x' => ext.pax.extend(
                        parse_pax_records(&body)
                            .map_err(|e| err(path, format!("its PAX header: {e}")))?,
                    ),
                    // Global records (git archive's commit id…) describe no file; they
                    // are checked, not used.
                    b'g' => {
                        parse_pax_records(&body)
                            .map_err(|e| err(path, format!("a global PAX header: {e}")))?;
                    }
                    b'L' => ext.long_name = Some(trim_nul(&body)),
                    b'K' => ext.long_link = Some(trim_nul(&body)),
                    _ => {}
                }
                continue;
            }
            let header = tar::Header::from_byte_slice(&block).clone();
            let path = ext
                .get(b"path")
                .map(<[u8]>::to_vec)
                .or_else(|| ext.long_name.clone())
                .unwrap_or_else(|| header.path_bytes().into_owned());
            let err = |reason: String| FrameError {
                at: start,
                path: Some(path.clone()),
                reason,
            };
            if let Some(v) = ext.get(b"size") {
                size = parse_decimal(v).ok_or_else(|| {
                    err(format!(
                        "its PAX size record '{}' is not a size, or is absurd",
                        show(v)
                    ))
                })?;
            }
            if size > FILE_MAX {
                return Err(err(format!(
                    "its size {size} is absurd (beyond 2^63 - 1 bytes)"
                )));
            }
            if size > self.capacity {
                return Err(err(format!(
                    "its size {size} is more than the volume can hold ({} bytes: its quota, or the disk holding the store)",
                    self.capacity
                )));
            }
            let mut old_sparse = None;
            if kind == b'S' {
                let real = numeric(&block[483..495])
                    .ok_or_else(|| err("bad sparse real size field".into()))?;
                if real > FILE_MAX {
                    return Err(err(format!(
                        "its sparse real size {real} is absurd (beyond 2^63 - 1 bytes)"
                    )));
                }
                let mut segments = Vec::new();
                sparse_entries(&block[386..482], &mut segments).map_err(&err)?;
                let mut extended = block[482] != 0;
                while extended {
                    if self.pos - start + 512 > MAX_HEADERS {
                        return Err(err(format!(
                            "its sparse map takes more than {MAX_HEADERS} bytes"
                        )));
                    }
                    let n = self
                        .fill(&mut block)
                        .map_err(|e| err(format!("reading the archive: {e}")))?;
                    if n < block.len() {
                        return Err(err(
                            "the archive ends inside its sparse map (truncated?)".into()
                        ));
                    }
                    sparse_entries(&block[..504], &mut segments).map_err(&err)?;
                    extended = block[504] != 0;
                }
                let stored = segments
                    .iter()
                    .try_fold(0u64, |t, &(_, len)| t.checked_add(len));
                if stored != Some(size) {
                    return Err(err(format!(
                        "its sparse map does not add up to its {size} bytes of data"
                    )));
                }
                old_sparse = Some((segments, real));
            }
            return Ok(Some(Member {
                header,
                ext,
                path,
                size,
                old_sparse,
            }));
        }
    }
}

/// Appends the `(offset, length)` pairs of an old GNU sparse map (24-byte entries); an
/// entry whose offset field is empty ends the list.
fn sparse_entries(b: &[u8], out: &mut Vec<(u64, u64)>) -> Result<(), String> {
    for e in b.chunks_exact(24) {
        if e[0] == 0 {
            break;
        }
        match (numeric(&e[..12]), numeric(&e[12..])) {
            (Some(off), Some(len)) => out.push((off, len)),
            _ => return Err("bad number in its sparse map".into()),
        }
    }
    Ok(())
}

/// A tar numeric field: octal digits (leading spaces, ending in spaces or NULs; empty is
/// 0), or GNU base-256 (high bit set; negative values refused). `None` if malformed or
/// beyond u64.
fn numeric(f: &[u8]) -> Option<u64> {
    match f.first() {
        Some(&b) if b & 0x80 != 0 => {
            if b == 0xff {
                return None;
            }
            let mut v = u64::from(b & 0x7f);
            for &x in f.get(1..).unwrap_or_default() {
                v = v.checked_mul(256)?.checked_add(u64::from(x))?;
            }
            Some(v)
        }
        _ => {
            let s = f
                .iter()
                .position(|&b| b != b' ')
                .map_or(&[][..], |i| &f[i..]);
            let end = s
                .iter()
                .position(|b| !(b'0'..=b'7').contains(b))
                .unwrap_or(s.len());
            let (digits, rest) = s.split_at(end);
            if !rest.iter().all(|&b| b == b' ' || b == 0) {
                return None;
            }
            let mut v = 0u64;
            for &d in digits {
                v = v.checked_mul(8)?.checked_add(u64::from(d - b'0'))?;
            }
            Some(v)
        }
    }
}

/// A decimal number with nothing else around it.
fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether a header's checksum is right: the sum of its bytes with the checksum field
/// counted as spaces, as unsigned bytes (POSIX) or signed ones (old tars).
fn checksum_ok(b: &[u8; 512]) -> bool {
    let Some(want) = numeric(&b[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &x) in b.iter().enumerate() {
        let x = if (148..156).contains(&i) { b' ' } else { x };
        unsigned += u64::from(x);
        signed += i64::from(x as i8);
    }
    want == unsigned || i64::try_from(want).is_ok_and(|w| w == signed)
}

/// The path a raw (maybe partial, maybe corrupt) header names, for messages.
fn raw_path(b: &[u8]) -> Option<Vec<u8>> {
    let name = trim_nul(b.get(..100)?);
    let prefix = match (b.get(257..263), b.get(345..500)) {
        (Some(b"ustar\0"), Some(p)) => trim_nul(p),
        _ => Vec::new(),
    };
    let path = if prefix.is_empty() {
        name
    } else {
        [&prefix[..], b"/", &name[..]].concat()
    };
    (!path.is_empty()).then_some(path)
}

/// Bytes up to the first NUL.
fn trim_nul(b: &[u8]) -> Vec<u8> {
    let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
    b[..end].to_vec()
}

/// The extension headers of one entry.
#[derive(Debug, Default)]
struct Extensions {
    /// PAX records in order (a later record for a key overrides an earlier one).
    pax: Pairs,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Extensions {
    /// The value of a PAX keyword; an empty value means "not set".
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
            .filter(|v| !v.is_empty())
    }

    fn link_name(&self, h: &tar::Header) -> Vec<u8> {
        match self.get(b"linkpath") {
            Some(l) => l.to_vec(),
            None => match &self.long_link {
                Some(l) => l.clone(),
                None => h
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default(),
            },
        }
    }
}

/// PAX records: `"<length> <key>=<value>\n"`, where the length counts the whole record, so
/// a value may hold any byte.
fn parse_pax_records(mut body: &[u8]) -> Result<Pairs, String> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let bad = |body: &[u8]| {
            format!(
                "malformed PAX record at '{}'",
                show(&body[..body.len().min(40)])
            )
        };
        // GNU tar pads a PAX header's data with NULs.
        if body.iter().all(|&b| b == 0) {
            break;
        }
        let sp = body
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or_else(|| bad(body))?;
        let len = parse_decimal(&body[..sp])
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| bad(body))?;
        if len > body.len() {
            return Err(format!(
                "a PAX record's length {len} runs past the end of its header ({} bytes left)",
                body.len()
            ));
        }
        if len <= sp + 1 || body[len - 1] != b'\n' {
            return Err(bad(body));
        }
        let kv = &body[sp + 1..len - 1];
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad(body))?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        body = &body[len..];
    }
    Ok(out)
}

// ---- helpers ----

fn timestamp(secs: i64, nsecs: i64) -> Timestamp {
    Timestamp {
        secs,
        nsecs: nsecs.clamp(0, 999_999_999) as u32,
    }
}

/// Linux's 32-bit device encoding (`new_encode_dev`), which FUSE carries.
fn encode_rdev(major: u64, minor: u64) -> Option<u32> {
    if major > 0xfff || minor > 0xf_ffff {
        return None;
    }
    Some(((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as u32)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes `data` at `offset` of a new file, skipping pieces that are all zeros within one
/// chunk (they read back as zeros from the hole); returns the bytes written.
fn write_nonzero(fs: &SledFs, ino: Ino, offset: u64, data: &[u8]) -> Result<u64, FsError> {
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let mut i = 0usize;
    let mut flush = |start: usize, end: usize| -> Result<(), FsError> {
        let n = fs.write(ino, offset + start as u64, &data[start..end], false)?;
        if n as usize != end - start {
            return Err(FsError::Io(format!(
                "short write: {n} of {} bytes",
                end - start
            )));
        }
        written += n as u64;
        Ok(())
    };
    while i < data.len() {
        let at = offset + i as u64;
        let step = (CHUNK_SIZE - at % CHUNK_SIZE) as usize;
        let end = data.len().min(i + step);
        if data[i..end].iter().all(|&b| b == 0) {
            if let Some(start) = run.take() {
                flush(start, i)?;
            }
        } else if run.is_none() {
            run = Some(i);
        }
        i = end;
    }
    if let Some(start) = run {
        flush(start, data.len())?;
    }
    Ok(written)
}

/// Opens a host file for reading without following a symlink, without blocking on a FIFO
/// swapped in, and without touching its atime where allowed.
fn open_noatime(path: &Path) -> io::Result<File> {
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | flags)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// A directory's entry names, sorted, read without touching its atime where allowed.
fn list_dir(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = match Dir::open(path, flags | OFlag::O_NOATIME, Mode::empty()) {
        Err(Errno::EPERM) => Dir::open(path, flags, Mode::empty()),
        r => r,
    }
    .map_err(io::Error::from)?;
    let mut names = Vec::new();
    for e in dir {
        let e = e.map_err(io::Error::from)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// The xattrs of a host file, not following a symlink.
fn host_xattrs(path: &Path) -> io::Result<Pairs> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for n in names {
        if let Some(v) = xattr::get(path, &n)? {
            out.push((n.as_bytes().to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

/// The components of a tar entry path below the import root (`.` components and repeated
/// slashes dropped). Refused: an empty or absolute path, a NUL byte, a `..` component, a
/// component over NAME_MAX, a path of PATH_MAX bytes or more.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() >= PATH_MAX {
        return Err(format!(
            "path of {} bytes is too long (PATH_MAX is {PATH_MAX} bytes, NUL included)",
            path.len()
        ));
    }
    if path.contains(&0) {
        return Err("path holds a NUL byte".into());
    }
    if path.starts_with(b"/") {
        return Err("absolute path (archive entries must be relative to the volume)".into());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path leaves the volume (\"..\")".into()),
            c if c.len() > NAME_MAX => {
                return Err(format!(
                    "name {} of {} bytes is too long (NAME_MAX is {NAME_MAX} bytes)",
                    quote(c),
                    c.len()
                ));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Whether a 512-byte block starts a tar archive: a ustar magic, a valid v7 header
/// checksum, or all zeros (an empty archive).
fn looks_like_tar(head: &[u8]) -> bool {
    if head.len() < 512 {
        return false;
    }
    if &head[257..262] == b"ustar" || head.iter().all(|&b| b == 0) {
        return true;
    }
    let field: Vec<u8> = head[148..156]
        .iter()
        .copied()
        .filter(|b| (b'0'..=b'7').contains(b))
        .collect();
    let Ok(want) = u32::from_str_radix(&String::from_utf8_lossy(&field), 8) else {
        return false;
    };
    let sum: u32 = head
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    sum == want
}

/// A PAX time: decimal seconds, maybe negative, maybe with a fraction.
fn parse_pax_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut nsecs = 0u32;
    for i in 0..9 {
        let d = frac.as_bytes().get(i).map_or(0, |b| u32::from(b - b'0'));
        nsecs = nsecs * 10 + d;
    }
    Some(if !neg {
        Timestamp { secs, nsecs }
    } else if nsecs > 0 {
        Timestamp {
            secs: -secs - 1,
            nsecs: 1_000_000_000 - nsecs,
        }
    } else {
        Timestamp {
            secs: -secs,
            nsecs: 0,
        }
    })
}

/// A GNU sparse file described in PAX headers.
struct SparseInfo {
    /// The real name (`GNU.sparse.name`), if given.
    name: Option<Vec<u8>>,
    real_size: u64,
    /// `(offset, length)` of each data segment, for formats 0.0 and 0.1.
    segments: Vec<(u64, u64)>,
    /// Format 1.0: the map is at the start of the data.
    map_in_data: bool,
}

fn sparse_info(pax: &[(Vec<u8>, Vec<u8>)]) -> Result<Option<SparseInfo>, String> {
    if !pax.iter().any(|(k, _)| k.starts_with(b"GNU.sparse.")) {
        return Ok(None);
    }
    let num = |v: &[u8]| -> Result<u64, String> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("'{}' is not a number", show(v)))
    };
    let get = |key: &[u8]| {
        pax.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    };
    let major = get(b"GNU.sparse.major").map(num).transpose()?;
    let map_in_data = match major {
        None | Some(0) => false,
        Some(1) => true,
        Some(m) => return Err(format!("unsupported GNU sparse format version {m}")),
    };
    let real_size = get(b"GNU.sparse.realsize")
        .or_else(|| get(b"GNU.sparse.size"))
        .ok_or("GNU sparse entry without its real size")
        .map_err(str::to_string)
        .and_then(num)?;
    let mut segments = Vec::new();
    if !map_in_data {
        if let Some(map) = get(b"GNU.sparse.map") {
            let nums = map
                .split(|&b| b == b',')
                .filter(|p| !p.is_empty())
                .map(num)
                .collect::<Result<Vec<u64>, String>>()?;
            if nums.len() % 2 != 0 {
                return Err("GNU.sparse.map has an odd count of numbers".to_string());
            }
            segments = nums.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        } else {
            let mut offset = None;
            for (k, v) in pax {
                match k.as_slice() {
                    b"GNU.sparse.offset" => offset = Some(num(v)?),
                    b"GNU.sparse.numbytes" => {
                        let off = offset
                            .take()
                            .ok_or("GNU.sparse.numbytes without an offset")?;
                        segments.push((off, num(v)?));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(Some(SparseInfo {
        name: get(b"GNU.sparse.name").map(<[u8]>::to_vec),
        real_size,
        segments,
        map_in_data,
    }))
}

/// Reads a format 1.0 sparse map: decimal numbers, one a line (count, then offset and length
/// pairs), padded to a 512-byte block.
fn read_sparse_map(r: &mut dyn Read, limit: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut nums: Vec<u64> = Vec::new();
    let mut cur: Option<u64> = None;
    let mut consumed = 0u64;
    let mut block = [0u8; 512];
    loop {
        if consumed + 512 > limit.max(512) {
            return Err("the sparse map is larger than the entry".to_string());
        }
        if consumed + 512 > MAX_HEADERS {
            return Err(format!(
                "the sparse map takes more than {MAX_HEADERS} bytes"
            ));
        }
        let n = read_full(r, &mut block).map_err(|e| e.to_string())?;
        if n < block.len() {
            return Err("the archive ends inside a sparse map (truncated?)".to_string());
        }
        consumed += 512;
        for &b in &block {
            match b {
                b'0'..=b'9' => {
                    let v = cur
                        .unwrap_or(0)
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(b - b'0')))
                        .ok_or("number too large in the sparse map")?;
                    cur = Some(v);
                }
                b'\n' => {
                    let v = cur.take().ok_or("empty line in the sparse map")?;
                    nums.push(v);
                }
                _ => return Err(format!("unexpected byte {b:#04x} in the sparse map")),
            }
            if let Some(&count) = nums.first() {
                if count > limit {
                    return Err(format!("sparse map claims {count} segments"));
                }
                if nums.len() as u64 == 1 + 2 * count {
                    return Ok(nums[1..].chunks_exact(2).map(|p| (p[0], p[1])).collect());
                }
            }
        }
    }
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// A text ACL as GNU tar (`SCHILY.acl.*`) or star writes it (`tag:qualifier:perms[:id]`,
/// entries separated by newlines or commas) in the kernel's xattr form. Names without a
/// numeric id are resolved on this host, as GNU tar does when extracting.
fn acl_from_text(text: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "the ACL text is not UTF-8".to_string())?;
    let mut entries: Vec<(u16, u16, u32)> = Vec::new();
    for item in text.split([',', '\n']) {
        let item = item.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        let f: Vec<&str> = item.split(':').map(str::trim).collect();
        let (tag, qual, perms, id) = match f.as_slice() {
            [t, p] => (*t, "", *p, None),
            [t, q, p] => (*t, *q, *p, None),
            [t, q, p, i] => (*t, *q, *p, Some(*i)),
            _ => return Err(format!("bad ACL entry '{item}'")),
        };
        let mut perm = 0u16;
        for c in perms.chars() {
            perm |= match c {
                'r' => 4,
                'w' => 2,
                'x' => 1,
                '-' => 0,
                _ => return Err(format!("bad permissions in ACL entry '{item}'")),
            };
        }
        let resolve = |user: bool| -> Result<u32, String> {
            if let Some(id) = id {
                return id
                    .parse()
                    .map_err(|_| format!("bad id in ACL entry '{item}'"));
            }
            if let Ok(n) = qual.parse::<u32>() {
                return Ok(n);
            }
            let found = if user {
                nix::unistd::User::from_name(qual)
                    .ok()
                    .flatten()
                    .map(|u| u.uid.as_raw())
            } else {
                nix::unistd::Group::from_name(qual)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            };
            found.ok_or_else(|| {
                format!(
                    "ACL entry '{item}' names a {} unknown on this host and gives no numeric id",
                    if user { "user" } else { "group" }
                )
            })
        };
        let entry = match tag {
            "user" | "u" if qual.is_empty() => (ACL_USER_OBJ, perm, ACL_UNDEFINED_ID),
            "user" | "u" => (ACL_USER, perm, resolve(true)?),
            "group" | "g" if qual.is_empty() => (ACL_GROUP_OBJ, perm, ACL_UNDEFINED_ID),
            "group" | "g" => (ACL_GROUP, perm, resolve(false)?),
            "mask" | "m" => (ACL_MASK, perm, ACL_UNDEFINED_ID),
            "other" | "o" => (ACL_OTHER, perm, ACL_UNDEFINED_ID),
            _ => return Err(format!("bad tag in ACL entry '{item}'")),
        };
        entries.push(entry);
    }
    // The kernel's order: by tag, then by id.
    entries.sort_by_key(|&(tag, _, id)| (tag, id));
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{SFlag, UtimensatFlags, makedev, mknod, utimensat};
    use nix::sys::time::TimeSpec;
    use nix::unistd::{Gid, Uid, fchownat, mkfifo};
    use std::collections::BTreeSet;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn volume(dir: &Path) -> SledFs {
        let store = Store::open_with(&dir.join("volume"), 1 << 20).expect("store");
        SledFs::init_volume(&store, 1, 0, 0, 0o755).expect("init");
        SledFs::open(store, 1, "t").expect("open")
    }

    /// One inode as seen at one path; `data` is file bytes or the symlink target.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Node {
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        nlink: u32,
        size: u64,
        atime: Timestamp,
        mtime: Timestamp,
        xattrs: Pairs,
        data: Vec<u8>,
    }

    #[derive(Debug, Default)]
    struct Snap {
        nodes: BTreeMap<Vec<u8>, Node>,
        /// Paths sharing one inode (non-directories with several links).
        links: BTreeSet<Vec<Vec<u8>>>,
    }

    fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
        if rel == b"." {
            name.to_vec()
        } else {
            [rel, b"/", name].concat()
        }
    }

    fn groups<K: Ord>(g: BTreeMap<K, Vec<Vec<u8>>>) -> BTreeSet<Vec<Vec<u8>>> {
        g.into_values()
            .map(|mut v| {
                v.sort();
                v
            })
            .collect()
    }

    /// The host tree (sockets left out: they are not imported).
    fn host_snapshot(root: &Path) -> Snap {
        let mut snap = Snap::default();
        let mut ids: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
        let mut todo = vec![(root.to_path_buf(), b".".to_vec())];
        while let Some((path, rel)) = todo.pop() {
            // readlink first: it may update the atime, which lstat then reports.
            let target = std::fs::read_link(&path).ok();
            let md = std::fs::symlink_metadata(&path).expect("lstat");
            let kind = FileKind::from_mode(md.mode()).expect("kind");
            let data = match kind {
                FileKind::Socket => continue,
                FileKind::Regular => {
                    let mut v = Vec::new();
                    open_noatime(&path)
                        .expect("open")
                        .read_to_end(&mut v)
                        .expect("read");
                    v
                }
                FileKind::Symlink => target
                    .expect("symlink target")
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
                _ => Vec::new(),
            };
            let rdev = if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                encode_rdev(
                    nix::sys::stat::major(md.rdev()),
                    nix::sys::stat::minor(md.rdev()),
                )
                .expect("rdev")
            } else {
                0
            };
            if kind != FileKind::Directory && md.nlink() > 1 {
                ids.entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            if kind == FileKind::Directory {
                for n in list_dir(&path).expect("list") {
                    todo.push((path.join(OsStr::from_bytes(&n)), join(&rel, &n)));
                }
            }
            let node = Node {
                kind,
                perm: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                rdev,
                nlink: md.nlink() as u32,
                size: if kind == FileKind::Directory {
                    0
                } else {
                    md.size()
                },
                atime: timestamp(md.atime(), md.atime_nsec()),
                mtime: timestamp(md.mtime(), md.mtime_nsec()),
                xattrs: host_xattrs(&path).expect("xattrs"),
                data,
            };
            snap.nodes.insert(rel, node);
        }
        snap.links = groups(ids);
        snap
    }

    /// The volume's tree, walked through the `FileSystem` trait only.
    fn volume_snapshot(fs: &SledFs) -> Snap {
        let mut snap = Snap::default();
        let mut inos: BTreeMap<Ino, Vec<Vec<u8>>> = BTreeMap::new();
        let mut todo = vec![(ROOT_INO, b".".to_vec())];
        while let Some((ino, rel)) = todo.pop() {
            let a = fs.getattr(ino).expect("getattr");
            let data = match a.kind {
                FileKind::Regular => {
                    let d = fs.read(ino, 0, a.size as u32).expect("read");
                    assert_eq!(d.len() as u64, a.size, "{}", show(&rel));
                    d
                }
                FileKind::Symlink => fs.readlink(ino).expect("readlink"),
                _ => Vec::new(),
            };
            let list = fs.listxattr(ino).expect("listxattr");
            let mut xattrs: Pairs = list
                .split(|&b| b == 0)
                .filter(|n| !n.is_empty())
                .map(|n| (n.to_vec(), fs.getxattr(ino, n).expect("getxattr")))
                .collect();
            xattrs.sort();
            if a.kind == FileKind::Directory {
                let mut cookie = 0;
                loop {
                    let entries = fs.readdir(ino, cookie, 7).expect("readdir");
                    let Some(last) = entries.last() else { break };
                    cookie = last.cookie;
                    for e in entries {
                        if e.name != b"." && e.name != b".." {
                            todo.push((e.ino, join(&rel, &e.name)));
                        }
                    }
                }
            } else if a.nlink > 1 {
                inos.entry(ino).or_default().push(rel.clone());
            }
            let node = Node {
                kind: a.kind,
                perm: a.perm,
                uid: a.uid,
                gid: a.gid,
                rdev: a.rdev,
                nlink: a.nlink,
                size: if a.kind == FileKind::Directory {
                    0
                } else {
                    a.size
                },
                atime: a.atime,
                mtime: a.mtime,
                xattrs,
                data,
            };
            snap.nodes.insert(rel, node);
        }
        snap.links = groups(inos);
        snap
    }

    fn assert_same(want: &Snap, got: &Snap) {
        let names = |s: &Snap| s.nodes.keys().map(|k| show(k)).collect::<Vec<_>>();
        assert_eq!(names(want), names(got), "paths differ");
        for (path, w) in &want.nodes {
            let g = &got.nodes[path];
            let meta = |n: &Node| Node {
                data: Vec::new(),
                ..n.clone()
            };
            assert_eq!(meta(w), meta(g), "metadata of {}", show(path));
            assert!(w.data == g.data, "data of {} differs", show(path));
        }
        assert_eq!(want.links, got.links, "hard link groups differ");
    }

    fn ts(secs: i64, nsecs: i64) -> TimeSpec {
        TimeSpec::new(secs, nsecs)
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Long enough to need a GNU long name or a PAX path in a tar.
    fn long_path() -> Vec<u8> {
        [&b"long/"[..], &[b'a'; 120], b"/", &[b'b'; 150]].concat()
    }

    /// A tree with every kind of file and metadata volfs keeps, made as root.
    fn build_tree(root: &Path, with_socket: bool) {
        let p = |r: &[u8]| root.join(OsStr::from_bytes(r));
        std::fs::create_dir_all(root).expect("root");
        for d in [
            &b"dir"[..],
            b"dir/sub",
            b"dir/sub/deep",
            b"sticky",
            b"sgid-dir",
            b"acldir",
            b"empty-dir",
        ] {
            std::fs::create_dir(p(d)).expect("mkdir");
        }
        let files: Vec<(&[u8], Vec<u8>)> = vec![
            (b"plain.txt", b"hello world\n".to_vec()),
            (b"big.bin", pattern(2_500_000, 1)),
            (b"empty", Vec::new()),
            (b"suid", b"#!/bin/sh\necho hi\n".to_vec()),
            (b"sgid", b"#!/bin/sh\n".to_vec()),
            (b"acl.txt", b"acl\n".to_vec()),
            (b"dir/sub/deep/file", pattern(40_000, 2)),
            (b"with space", b"space\n".to_vec()),
            (b"new\nline", b"newline\n".to_vec()),
            (b"caf\xe9", b"latin-1 name\n".to_vec()),
            (&[b'n'; 255], b"longest name\n".to_vec()),
            (b"zeros.bin", [vec![0u8; 100_000], b"end".to_vec()].concat()),
        ];
        for (name, data) in &files {
            std::fs::write(p(name), data).expect("write");
        }
        let lp = long_path();
        std::fs::create_dir_all(p(&lp[..lp.len() - 151])).expect("long dirs");
        std::fs::write(p(&lp), b"deep and long\n").expect("long file");
        {
            let f = File::create(p(b"sparse.img")).expect("sparse");
            f.write_all_at(b"head", 0).expect("w");
            f.write_all_at(&pattern(100_000, 3), 3 << 20).expect("w");
            f.write_all_at(b"tail", 9 << 20).expect("w");
            f.set_len(12 << 20).expect("len");
        }
        std::os::unix::fs::symlink("plain.txt", p(b"link")).expect("symlink");
        std::os::unix::fs::symlink("/etc/passwd", p(b"dir/abs")).expect("symlink");
        std::os::unix::fs::symlink("nowhere/../x", p(b"dangling")).expect("symlink");
        std::fs::hard_link(p(b"plain.txt"), p(b"dir/hard")).expect("link");
        std::fs::hard_link(p(b"plain.txt"), p(b"dir/sub/hard2")).expect("link");
        std::fs::hard_link(p(b"link"), p(b"link.hard")).expect("link to symlink");
        mkfifo(&p(b"fifo"), Mode::from_bits_truncate(0o600)).expect("fifo");
        mknod(
            &p(b"null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(1, 3),
        )
        .expect("chr");
        mknod(
            &p(b"blk"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            makedev(259, 70000),
        )
        .expect("blk");
        if with_socket {
            std::os::unix::net::UnixListener::bind(p(b"sock")).expect("socket");
        }
        // A default ACL, then a child created under it (the kernel gives it an access ACL).
        let default =
            acl_from_text(b"user::rwx,user:99:r-x,group::r-x,mask::r-x,other::---").expect("acl");
        xattr::set(p(b"acldir"), "system.posix_acl_default", &default).expect("default acl");
        std::fs::write(p(b"acldir/child"), b"inherits\n").expect("child");

        let owners: &[(&[u8], u32, u32)] = &[
            (b".", 4242, 4343),
            (b"plain.txt", 1001, 1002),
            (b"big.bin", 3000, 3000),
            (b"suid", 0, 0),
            (b"sgid", 5, 6),
            (b"dir", 1000, 1000),
            (b"dir/sub", 2000, 2001),
            (b"sgid-dir", 0, 50),
            (b"link", 1003, 1004),
            (b"dir/abs", 77, 78),
            (b"fifo", 10, 20),
            (b"blk", 0, 6),
            (b"caf\xe9", 65534, 65534),
            (b"acldir/child", 1234, 4321),
        ];
        for (name, uid, gid) in owners {
            fchownat(
                None,
                &p(name),
                Some(Uid::from_raw(*uid)),
                Some(Gid::from_raw(*gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .expect("lchown");
        }
        let modes: &[(&[u8], u32)] = &[
            (b".", 0o750),
            (b"plain.txt", 0o644),
            (b"big.bin", 0o600),
            (b"suid", 0o4755),
            (b"sgid", 0o2755),
            (b"dir/sub", 0o700),
            (b"sticky", 0o1777),
            (b"sgid-dir", 0o2775),
            (b"fifo", 0o640),
            (b"null", 0o666),
            (b"blk", 0o660),
            (b"new\nline", 0o400),
            (b"acldir/child", 0o640),
        ];
        for (name, mode) in modes {
            std::fs::set_permissions(p(name), std::fs::Permissions::from_mode(*mode))
                .expect("chmod");
        }
        let access = acl_from_text(
            b"user::rw-\nuser:10:r--\nuser:1234:rwx\ngroup::r--\nmask::rwx\nother::r--\n",
        )
        .expect("acl");
        let xattrs: &[(&[u8], &str, &[u8])] = &[
            (b"plain.txt", "user.comment", b"hello"),
            (
                b"plain.txt",
                "user.bin",
                b"\x00\x01\xff\n22 linkpath=/etc/evil\n\x00",
            ),
            (b"plain.txt", "trusted.secret", b"t"),
            (b"plain.txt", "security.test", b"s"),
            (b"dir", "user.dir", b"yes"),
            (b".", "user.root", b"root"),
            (b"link", "trusted.sym", b"on a symlink"),
            (b"fifo", "trusted.fifo", b"f"),
            (b"suid", "user.empty", b""),
            (b"acl.txt", "system.posix_acl_access", &access),
        ];
        for (name, key, value) in xattrs {
            xattr::set(p(name), key, value).expect("setxattr");
        }
        // Times last, children before their directory, with nanoseconds.
        let mut all = Vec::new();
        let mut todo = vec![(root.to_path_buf(), 0usize)];
        while let Some((path, depth)) = todo.pop() {
            if std::fs::symlink_metadata(&path).expect("lstat").is_dir() {
                for n in list_dir(&path).expect("list") {
                    todo.push((path.join(OsStr::from_bytes(&n)), depth + 1));
                }
            }
            all.push((depth, path));
        }
        all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        // A symlink's atime is set ahead of now: reading a link has no O_NOATIME, and
        // relatime leaves an atime alone only when it is later than mtime and ctime.
        let ahead = crate::store::Timestamp::now().secs + 3600;
        for (i, (_, path)) in all.iter().enumerate() {
            let i = i as i64;
            let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            let atime = if is_link {
                ahead + i
            } else {
                1_500_000_000 + i * 1000
            };
            utimensat(
                None,
                path,
                &ts(atime, (i * 7_919) % 1_000_000_000 + 1),
                &ts(1_600_000_000 + i * 1000, 999_999_999 - i),
                UtimensatFlags::NoFollowSymlink,
            )
            .expect("utimensat");
        }
    }

    fn run_tar(args: &[&str]) {
        let out = Command::new("tar").args(args).output().expect("run tar");
        assert!(
            out.status.success(),
            "tar {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn counts(snap: &Snap) -> (u64, u64, u64, u64, u64) {
        let mut seen = BTreeSet::new();
        let (mut files, mut dirs, mut symlinks, mut hardlinks, mut others) = (0, 0, 0, 0, 0);
        for (path, n) in &snap.nodes {
            if let Some(group) = snap.links.iter().find(|g| g.contains(path)) {
                if !seen.insert(group.clone()) {
                    hardlinks += 1;
                    continue;
                }
            }
            match n.kind {
                FileKind::Regular => files += 1,
                FileKind::Directory if path != b"." => dirs += 1,
                FileKind::Directory => {}
                FileKind::Symlink => symlinks += 1,
                _ => others += 1,
            }
        }
        (files, dirs, symlinks, hardlinks, others)
    }

    #[test]
    fn directory_source_is_copied_exactly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        build_tree(&src, true);
        let want = host_snapshot(&src);
        let fs = volume(tmp.path());
        let stats = import(&fs, &src).expect("import");
        let got = volume_snapshot(&fs);
        assert_same(&want, &got);

        let (files, dirs, symlinks, hardlinks, others) = counts(&want);
        assert_eq!(
            (
                stats.files,
                stats.dirs,
                stats.symlinks,
                stats.hardlinks,
                stats.others
            ),
            (files, dirs, symlinks, hardlinks, others + 1),
            "{stats:?} (others include the skipped socket)"
        );
        assert_eq!((hardlinks, symlinks), (3, 3));
        assert!(fs.lookup(ROOT_INO, b"sock").is_err(), "sockets are skipped");
        let sparse = fs.lookup(ROOT_INO, b"sparse.img").expect("sparse");
        assert_eq!(sparse.size, 12 << 20);
        assert!(
            sparse.blocks * 512 < 1 << 20,
            "holes kept: {} blocks",
            sparse.blocks
        );
        assert_eq!(fs.lseek(sparse.ino, 0, libc::SEEK_HOLE), Ok(CHUNK_SIZE));
        let zeros = fs.lookup(ROOT_INO, b"zeros.bin").expect("zeros");
        assert!(zeros.blocks * 512 < 50_000, "zero blocks not written");
        let total: u64 = want
            .nodes
            .values()
            .filter(|n| n.kind == FileKind::Regular)
            .count() as u64;
        assert!(stats.bytes > 2_500_000 && total > 0);
        // The source was not touched (atimes included).
        assert_same(&want, &host_snapshot(&src));
    }

    #[test]
    fn symlink_to_a_directory_as_source_is_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).expect("mkdir");
        std::fs::write(src.join("f"), b"x").expect("write");
        std::os::unix::fs::symlink(&src, tmp.path().join("via")).expect("symlink");
        let fs = volume(tmp.path());
        let stats = import(&fs, &tmp.path().join("via")).expect("import");
        assert_eq!(stats.files, 1);
        assert_same(&host_snapshot(&src), &volume_snapshot(&fs));
    }

    #[test]
    fn gnu_tar_with_xattrs_is_copied_exactly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        build_tree(&src, false);
        let want = host_snapshot(&src);
        let tar = tmp.path().join("a.tar");
        run_tar(&[
            "--xattrs",
            "--xattrs-include=*",
            "--atime-preserve=system",
            "-cpf",
            tar.to_str().expect("utf-8"),
            "-C",
            src.to_str().expect("utf-8"),
            ".",
        ]);
        let fs = volume(tmp.path());
        let stats = import(&fs, &tar).expect("import");
        assert_same(&want, &volume_snapshot(&fs));
        let (files, dirs, symlinks, hardlinks, others) = counts(&want);
        assert_eq!(
            (
                stats.files,
                stats.dirs,
                stats.symlinks,
                stats.hardlinks,
                stats.others
            ),
            (files, dirs, symlinks, hardlinks, others)
        );
        let sparse = fs.lookup(ROOT_INO, b"sparse.img").expect("sparse");
        assert!(sparse.blocks * 512 < 1 << 20, "zero blocks stay holes");
    }

    #[test]
    fn gzip_and_zstd_tars_are_copied_exactly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        build_tree(&src, false);
        let want = host_snapshot(&src);
        let (tgz, tar) = (tmp.path().join("a.tar.gz"), tmp.path().join("a.tar"));
        for (flag, out) in [("-czpf", &tgz), ("-cpf", &tar)] {
            run_tar(&[
                "--xattrs",
                "--xattrs-include=*",
                "--atime-preserve=system",
                flag,
                out.to_str().expect("utf-8"),
                "-C",
                src.to_str().expect("utf-8"),
                ".",
            ]);
        }
        let tzst = tmp.path().join("a.tar.zst");
        let plain = std::fs::read(&tar).expect("read");
        std::fs::write(&tzst, zstd::encode_all(&plain[..], 3).expect("zstd")).expect("write");
        for (i, archive) in [&tgz, &tzst].into_iter().enumerate() {
            let fs = volume(&tmp.path().join(format!("v{i}")));
            import(&fs, archive).expect("import");
            assert_same(&want, &volume_snapshot(&fs));
        }
    }

    /// Name, type, mode, owner, mtime seconds and data: what every tar format keeps.
    type Basic = (FileKind, u32, u32, u32, i64, Vec<u8>);

    fn basic(s: &Snap) -> BTreeMap<Vec<u8>, Basic> {
        s.nodes
            .iter()
            .map(|(k, n)| {
                let t = (n.kind, n.perm, n.uid, n.gid, n.mtime.secs, n.data.clone());
                (k.clone(), t)
            })
            .collect()
    }

    #[test]
    fn gnu_format_long_names_and_every_sparse_format() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        build_tree(&src, false);
        let want = host_snapshot(&src);
        let s = src.to_str().expect("utf-8");
        let cases: [&[&str]; 4] = [
            &["--format=gnu", "-S"],
            &["--format=posix", "-S", "--sparse-version=0.0"],
            &["--format=posix", "-S", "--sparse-version=0.1"],
            &["--format=posix", "-S", "--sparse-version=1.0"],
        ];
        for (i, opts) in cases.iter().enumerate() {
            let tar = tmp.path().join(format!("s{i}.tar"));
            let mut args = opts.to_vec();
            args.extend(["-cpf", tar.to_str().expect("utf-8"), "-C", s, "."]);
            run_tar(&args);
            let fs = volume(&tmp.path().join(format!("v{i}")));
            import(&fs, &tar).unwrap_or_else(|e| panic!("{opts:?}: {e}"));
            let got = volume_snapshot(&fs);
            let (w, g) = (basic(&want), basic(&got));
            assert_eq!(
                w.keys().collect::<Vec<_>>(),
                g.keys().collect::<Vec<_>>(),
                "{opts:?}"
            );
            for (k, v) in &w {
                assert!(v == &g[k], "{opts:?}: {} differs", show(k));
            }
            assert_eq!(want.links, got.links, "{opts:?}");
            let sparse = fs.lookup(ROOT_INO, b"sparse.img").expect("sparse");
            assert_eq!(sparse.size, 12 << 20, "{opts:?}");
            assert!(sparse.blocks * 512 < 1 << 20, "{opts:?}: holes kept");
        }
    }

    #[test]
    fn gnu_tar_text_acls_become_acl_xattrs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        build_tree(&src, false);
        let tar = tmp.path().join("acl.tar");
        // --acls alone: ACLs as SCHILY.acl.* text, with names where the host has them.
        let s = src.to_str().expect("utf-8");
        run_tar(&[
            "--acls",
            "-cpf",
            tar.to_str().expect("utf-8"),
            "-C",
            s,
            "./acl.txt",
            "./acldir",
        ]);
        let fs = volume(tmp.path());
        import(&fs, &tar).expect("import");
        for (path, name) in [
            (&b"acl.txt"[..], "system.posix_acl_access"),
            (b"acldir", "system.posix_acl_default"),
            (b"acldir/child", "system.posix_acl_access"),
        ] {
            let host = xattr::get(src.join(OsStr::from_bytes(path)), name)
                .expect("getxattr")
                .expect("host has the ACL");
            let mut ino = ROOT_INO;
            for c in path.split(|&b| b == b'/') {
                ino = fs.lookup(ino, c).expect("lookup").ino;
            }
            assert_eq!(
                fs.getxattr(ino, name.as_bytes()),
                Ok(host),
                "{}",
                show(path)
            );
        }
    }

    /// A tar made entry by entry, names written raw (the tar crate's setters refuse `..`).
    struct RawTar(tar::Builder<Vec<u8>>);

    impl RawTar {
        fn new() -> RawTar {
            RawTar(tar::Builder::new(Vec::new()))
        }

        fn add(
            &mut self,
            name: &[u8],
            t: tar::EntryType,
            mode: u32,
            uid: u64,
            link: &[u8],
            data: &[u8],
        ) {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_entry_type(t);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data).expect("append");
        }

        fn file(&mut self, name: &[u8], data: &[u8]) {
            self.add(name, tar::EntryType::Regular, 0o644, 0, b"", data);
        }

        fn write(self, path: &Path) {
            std::fs::write(path, self.0.into_inner().expect("finish")).expect("write tar");
        }
    }

    fn import_err(tar: RawTar) -> String {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("t.tar");
        tar.write(&path);
        let fs = volume(tmp.path());
        import(&fs, &path).expect_err("refused")
    }

    #[test]
    fn tar_paths_leaving_the_volume_are_refused() {
        use tar::EntryType as T;
        for evil in [&b"../evil"[..], b"a/../../evil", b"./../evil", b"ok/.."] {
            let mut t = RawTar::new();
            t.file(b"fine", b"x");
            t.file(evil, b"evil");
            let e = import_err(t);
            assert!(
                e.contains(&format!(
                    "archive entry {}: path leaves the volume (\"..\")",
                    quote(evil)
                )),
                "{e}"
            );
        }
        let mut t = RawTar::new();
        t.file(b"/etc/evil", b"evil");
        let e = import_err(t);
        assert!(
            e.contains("archive entry \"/etc/evil\": absolute path"),
            "{e}"
        );

        let mut t = RawTar::new();
        t.add(b"s", T::Symlink, 0o777, 0, b"/tmp", b"");
        t.file(b"s/evil", b"evil");
        let e = import_err(t);
        assert!(
            e.contains("archive entry \"s/evil\": its path goes through the symlink \"s\""),
            "{e}"
        );

        let mut t = RawTar::new();
        t.add(b"d/s", T::Symlink, 0o777, 0, b"..", b"");
        t.add(b"d/s/x", T::Directory, 0o755, 0, b"", b"");
        let e = import_err(t);
        assert!(
            e.contains("archive entry \"d/s/x\": its path goes through the symlink \"d/s\""),
            "{e}"
        );

        let mut t = RawTar::new();
        t.add(b"h", T::Link, 0o644, 0, b"../etc/passwd", b"");
        let e = import_err(t);
        assert!(
            e.contains("archive entry \"h\": hard link target \"../etc/passwd\": path leaves"),
            "{e}"
        );
    }

    #[test]
    fn tar_hard_link_to_an_unknown_target_is_refused() {
        let mut t = RawTar::new();
        t.file(b"a", b"x");
        t.add(b"h", tar::EntryType::Link, 0o644, 0, b"missing/file", b"");
        let e = import_err(t);
        assert!(
            e.contains(
                "archive entry \"h\": hard link to \"missing/file\", which is not an earlier entry"
            ),
            "{e}"
        );
        // A later entry does not count.
        let mut t = RawTar::new();
        t.add(b"h", tar::EntryType::Link, 0o644, 0, b"a", b"");
        t.file(b"a", b"x");
        let e = import_err(t);
        assert!(e.contains("not an earlier entry"), "{e}");
        let mut t = RawTar::new();
        t.add(b"d", tar::EntryType::Directory, 0o755, 0, b"", b"");
        t.add(b"h", tar::EntryType::Link, 0o644, 0, b"d", b"");
        let e = import_err(t);
        assert!(e.contains("entry \"h\"") && e.contains("directory"), "{e}");
    }

    #[test]
    fn tar_duplicate_and_conflicting_entries_are_refused() {
        use tar::EntryType as T;
        type Build = fn(&mut RawTar);
        let cases: [(&str, Build, &str); 7] = [
            (
                "two files",
                |t| {
                    t.file(b"a", b"one");
                    t.file(b"./a", b"two");
                },
                "archive entry \"./a\": duplicate entry",
            ),
            (
                "file then directory",
                |t| {
                    t.file(b"e", b"file first");
                    t.add(b"e", T::Directory, 0o755, 0, b"", b"");
                },
                "archive entry \"e\": conflicting entry: a directory where an earlier entry made a file",
            ),
            (
                "directory then file",
                |t| {
                    t.add(b"g", T::Directory, 0o755, 0, b"", b"");
                    t.file(b"g", b"file after a dir");
                },
                "archive entry \"g\": conflicting entry: an earlier entry made this path a directory",
            ),
            (
                "directory twice",
                |t| {
                    t.add(b"d", T::Directory, 0o755, 0, b"", b"");
                    t.add(b"d/", T::Directory, 0o700, 0, b"", b"");
                },
                "archive entry \"d/\": duplicate entry",
            ),
            (
                "root twice",
                |t| {
                    t.add(b"./", T::Directory, 0o755, 0, b"", b"");
                    t.add(b".", T::Directory, 0o700, 0, b"", b"");
                },
                "archive entry \".\": duplicate entry",
            ),
            (
                "hard link twice",
                |t| {
                    t.file(b"a", b"x");
                    t.add(b"hl", T::Link, 0o644, 0, b"./a", b"");
                    t.add(b"hl", T::Link, 0o644, 0, b"a", b"");
                },
                "archive entry \"hl\": duplicate entry",
            ),
            (
                "file below a file",
                |t| {
                    t.file(b"f", b"x");
                    t.file(b"f/g", b"x");
                },
                "archive entry \"f/g\": its path goes through \"f\", which an earlier entry made a file",
            ),
        ];
        for (what, build, says) in cases {
            let mut t = RawTar::new();
            build(&mut t);
            let e = import_err(t);
            assert!(e.contains(says), "{what}: {e}");
        }
    }

    #[test]
    fn tar_late_directory_entries_and_missing_parents_are_made() {
        use tar::EntryType as T;
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut t = RawTar::new();
        t.file(b"a", b"one");
        t.add(b"d", T::Directory, 0o700, 0, b"", b"");
        t.file(b"d/f", b"in d");
        t.file(b"x/y/z", b"deep");
        // Listed after its children, which created it as a missing parent.
        t.add(b"x/y/", T::Directory, 0o750, 5, b"", b"");
        t.add(b"hl", T::Link, 0o644, 0, b"./a", b"");
        t.add(b"old-dir/", T::Regular, 0o755, 0, b"", b"");
        t.add(b"dumpdir", T::new(b'D'), 0o755, 0, b"", b"Yold-dir\0\0");
        // The root last, once.
        t.add(b"./", T::Directory, 0o711, 7, b"", b"");
        {
            // PAX: fractional mtime and atime, an xattr, a uid too big for the old header.
            let mut h = tar::Header::new_ustar();
            h.set_path("pax").expect("path");
            h.set_size(3);
            h.set_mode(0o640);
            h.set_uid(1);
            h.set_gid(2);
            h.set_mtime(1);
            h.set_cksum();
            t.0.append_pax_extensions([
                ("mtime", &b"1700000000.5"[..]),
                ("atime", b"-1.25"),
                ("uid", b"3000000000"),
                ("SCHILY.xattr.user.k", b"v\x00w"),
            ])
            .expect("pax");
            t.0.append(&h, &b"pax"[..]).expect("append");
        }
        let path = tmp.path().join("t.tar");
        t.write(&path);
        let fs = volume(tmp.path());
        let stats = import(&fs, &path).expect("import");
        let at = |p: &[u8]| {
            let mut ino = ROOT_INO;
            for c in p.split(|&b| b == b'/') {
                ino = fs.lookup(ino, c).expect("lookup").ino;
            }
            fs.getattr(ino).expect("getattr")
        };
        let root = fs.getattr(ROOT_INO).expect("root");
        assert_eq!((root.perm, root.uid, root.gid), (0o711, 7, 7));
        let a = at(b"a");
        assert_eq!(fs.read(a.ino, 0, 100).expect("read"), b"one");
        assert_eq!(a.nlink, 2);
        assert_eq!(at(b"hl").ino, a.ino);
        let d = at(b"d");
        assert_eq!((d.perm, d.uid), (0o700, 0));
        at(b"d/f");
        let x = at(b"x");
        assert_eq!(
            (x.kind, x.perm, x.uid, x.gid),
            (FileKind::Directory, 0o755, 0, 0)
        );
        let y = at(b"x/y");
        assert_eq!(
            (y.kind, y.perm, y.uid, y.gid),
            (FileKind::Directory, 0o750, 5, 5)
        );
        assert_eq!(stats.dirs, 5, "d, x, x/y, old-dir, dumpdir: {stats:?}");
        assert_eq!(at(b"old-dir").kind, FileKind::Directory);
        assert_eq!(at(b"dumpdir").kind, FileKind::Directory);
        let pax = at(b"pax");
        assert_eq!(
            pax.mtime,
            Timestamp {
                secs: 1_700_000_000,
                nsecs: 500_000_000
            }
        );
        assert_eq!(
            pax.atime,
            Timestamp {
                secs: -2,
                nsecs: 750_000_000
            }
        );
        assert_eq!((pax.uid, pax.perm), (3_000_000_000, 0o640));
        assert_eq!(fs.getxattr(pax.ino, b"user.k"), Ok(b"v\x00w".to_vec()));
        assert_eq!(stats.hardlinks, 1);
    }

    #[test]
    fn bad_sources_are_refused_clearly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = volume(tmp.path());
        let missing = tmp.path().join("missing");
        let e = import(&fs, &missing).expect_err("missing");
        assert!(
            e.starts_with(&format!("from={}: cannot read it", missing.display())),
            "{e}"
        );

        let text = tmp.path().join("notes.txt");
        std::fs::write(&text, "just some text\n".repeat(100)).expect("write");
        let e = import(&fs, &text).expect_err("text");
        assert!(
            e.contains(
                "not a directory or tar file (expected a directory, .tar, .tar.gz or .tar.zst)"
            ),
            "{e}"
        );

        let empty = tmp.path().join("empty");
        std::fs::write(&empty, b"").expect("write");
        assert!(
            import(&fs, &empty)
                .expect_err("empty")
                .contains("the archive is empty")
        );

        let bz = tmp.path().join("a.tar.bz2");
        std::fs::write(&bz, b"BZh91AY&SY\x00\x00").expect("write");
        assert!(import(&fs, &bz).expect_err("bz2").contains("bzip2 and xz"));

        let gz = tmp.path().join("text.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&"not a tar at all\n".repeat(100).into_bytes())
            .expect("gz");
        std::fs::write(&gz, enc.finish().expect("gz")).expect("write");
        let e = import(&fs, &gz).expect_err("gz of text");
        assert!(
            e.contains("archive header at byte 0: not a tar archive"),
            "{e}"
        );

        let mut t = RawTar::new();
        t.file(b"big", &pattern(100_000, 9));
        let whole = t.0.into_inner().expect("finish");
        let cut = tmp.path().join("cut.tar");
        std::fs::write(&cut, &whole[..20_000]).expect("write");
        let e = import(&fs, &cut).expect_err("truncated");
        assert!(e.contains("entry") || e.contains("big"), "{e}");
        assert!(e.contains("truncated"), "{e}");

        let full = volume(&tmp.path().join("full"));
        full.mknod(&ROOT, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, 0)
            .expect("create");
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).expect("mkdir");
        assert!(
            import(&full, &dir)
                .expect_err("not empty")
                .contains("not empty")
        );
    }

    /// A small tree for the fuzz test: a file, a sparse file with three small holes, a
    /// long name, an xattr, a symlink, a hard link, a FIFO.
    fn small_tree(root: &Path) {
        std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
        std::fs::write(root.join("d/f"), pattern(3000, 5)).expect("write");
        std::fs::write(root.join("d/e/").join("n".repeat(120)), b"long name").expect("write");
        let f = File::create(root.join("sparse")).expect("sparse");
        for i in 0..3u64 {
            f.write_all_at(b"data", i * 3 * CHUNK_SIZE).expect("w");
        }
        f.set_len(10 * CHUNK_SIZE).expect("len");
        xattr::set(root.join("d/f"), "user.k", b"v\nw").expect("xattr");
        std::os::unix::fs::symlink("d/f", root.join("l")).expect("symlink");
        std::fs::hard_link(root.join("d/f"), root.join("h")).expect("link");
        mkfifo(&root.join("p"), Mode::from_bits_truncate(0o600)).expect("fifo");
    }

    /// A deterministic xorshift generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Rewrites a header block's checksum, so that a mutation gets past the check.
    fn fix_checksum(block: &mut [u8]) {
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    /// One mutation of `base`: cut, bytes flipped, a header field rewritten (checksum
    /// fixed or not), blocks repeated, dropped or swapped.
    fn mutate(base: &[u8], rng: &mut Rng) -> (String, Vec<u8>) {
        let mut v = base.to_vec();
        let blocks = v.len() / 512;
        if blocks < 2 {
            return (String::from("unchanged (too short to mutate)"), v);
        }
        match rng.below(6) {
            0 => {
                let at = rng.below(v.len());
                v.truncate(at);
                (format!("cut at {at}"), v)
            }
            1 => {
                let n = 1 + rng.below(8);
                for _ in 0..n {
                    let at = rng.below(v.len());
                    v[at] ^= 1 << rng.below(8);
                }
                (format!("{n} bits flipped"), v)
            }
            2 | 3 => {
                // A header field: name, mode, uid, size, mtime, checksum, type, link
                // name, magic, prefix, or an old GNU sparse map.
                let fields = [
                    (0, 100),
                    (100, 8),
                    (108, 8),
                    (124, 12),
                    (136, 12),
                    (148, 8),
                    (156, 1),
                    (157, 100),
                    (257, 8),
                    (345, 155),
                    (386, 96),
                    (482, 13),
                ];
                let b = rng.below(blocks) * 512;
                let (off, len) = fields[rng.below(fields.len())];
                let fill: Vec<u8> = match rng.below(5) {
                    0 => (0..len).map(|_| b'0' + rng.below(8) as u8).collect(),
                    1 => {
                        let mut f = vec![0u8; len];
                        f[0] = 0x80;
                        for x in f.iter_mut().skip(1) {
                            *x = rng.next() as u8;
                        }
                        f
                    }
                    2 => (0..len).map(|_| rng.next() as u8).collect(),
                    3 => {
                        let s = b"../../../../../../tmp/x/y";
                        (0..len).map(|i| s[i % s.len()]).collect()
                    }
                    _ => vec![b"0125LKxgS7D"[rng.below(11)]; len],
                };
                v[b + off..b + off + len].copy_from_slice(&fill);
                if rng.below(4) != 0 {
                    fix_checksum(&mut v[b..b + 512]);
                }
                (format!("field {off}+{len} of block {}", b / 512), v)
            }
            4 => {
                // A PAX record's length, rewritten.
                let find = |pat: &[u8]| v.windows(pat.len()).position(|w| w == pat);
                match find(b" path=").or_else(|| find(b" SCHILY")) {
                    Some(at) if at >= 2 => {
                        let digits = format!("{}", rng.below(100_000));
                        let d = digits.as_bytes();
                        let n = d.len().min(2);
                        v[at - n..at].copy_from_slice(&d[..n]);
                        (format!("PAX length at {at}"), v)
                    }
                    _ => (String::from("unchanged"), v),
                }
            }
            _ => {
                let (a, b) = (rng.below(blocks), rng.below(blocks));
                let blk = |i: usize| i * 512..(i + 1) * 512;
                let copy = v[blk(a)].to_vec();
                match rng.below(3) {
                    0 => v.splice(blk(b).start..blk(b).start, copy).for_each(drop),
                    1 => v.drain(blk(a)).for_each(drop),
                    _ => {
                        let other = v[blk(b)].to_vec();
                        v[blk(a)].copy_from_slice(&other);
                        v[blk(b)].copy_from_slice(&copy);
                    }
                }
                (format!("blocks {a} and {b} moved"), v)
            }
        }
    }

    /// Thousands of mutated and truncated archives: each import ends in Ok or Err, never
    /// in a panic or a hang.
    #[test]
    fn mutated_archives_never_panic_or_hang() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        small_tree(&src);
        let s = src.to_str().expect("utf-8");
        let mut bases = Vec::new();
        for (i, opts) in [
            &["--format=gnu", "-S"][..],
            &["--format=posix", "-S", "--sparse-version=1.0", "--xattrs"],
            &["--format=posix", "-S", "--sparse-version=0.1"],
            &["--format=oldgnu"],
        ]
        .iter()
        .enumerate()
        {
            let tar = tmp.path().join(format!("b{i}.tar"));
            let mut args = opts.to_vec();
            args.extend(["-cpf", tar.to_str().expect("utf-8"), "-C", s, "."]);
            run_tar(&args);
            let bytes = std::fs::read(&tar).expect("read");
            // Without the zero padding of the last record: mutations land on content.
            let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            bases.push(bytes[..(end.div_ceil(512) + 2) * 512].to_vec());
        }
        let store = Store::open_with(&tmp.path().join("volume"), 1 << 20).expect("store");
        // VOLFS_FUZZ_CASES and VOLFS_FUZZ_SEED run a longer or another series.
        let env = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let cases = env("VOLFS_FUZZ_CASES", 2000);
        let seed = env("VOLFS_FUZZ_SEED", 0x9e37_79b9_7f4a_7c15) | 1;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = done.clone();
        // At most a few seconds (a slow debug build on a busy machine runs a prefix of the
        // series; 500 cases at least).
        let budget = std::time::Duration::from_secs(env("VOLFS_FUZZ_SECS", 4));
        let worker = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut rng = Rng(seed);
            let (mut ok, mut refused) = (0u64, 0u64);
            for case in 0..cases {
                if case >= 500 && started.elapsed() > budget {
                    break;
                }
                let base = &bases[rng.below(bases.len())];
                let (what, bytes) = mutate(base, &mut rng);
                let (what, bytes) = if rng.below(3) == 0 {
                    // Twice mutated.
                    let (w2, b2) = mutate(&bytes, &mut rng);
                    (format!("{what}, then {w2}"), b2)
                } else {
                    (what, bytes)
                };
                let vol = case + 1;
                SledFs::init_volume(&store, vol, 0, 0, 0o755).expect("init");
                let fs = SledFs::open(store.clone(), vol, "fuzz").expect("open");
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    import_archive(&fs, ROOT_INO, &mut io::Cursor::new(&bytes))
                }));
                match r {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(_)) => refused += 1,
                    Err(_) => panic!("case {case} ({what}): the importer panicked"),
                }
                progress.store(case + 1, std::sync::atomic::Ordering::Relaxed);
            }
            (ok, refused)
        });
        let t0 = std::time::Instant::now();
        let mut last = (0, t0);
        while !worker.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let n = done.load(std::sync::atomic::Ordering::Relaxed);
            if n != last.0 {
                last = (n, std::time::Instant::now());
            }
            assert!(
                last.1.elapsed() < std::time::Duration::from_secs(20),
                "case {n} has run for 20 s: the importer hangs"
            );
        }
        let (ok, refused) = worker.join().expect("no panic");
        let ran = ok + refused;
        assert!(ran >= cases.min(500), "only {ran} cases ran");
        // Both outcomes are exercised (a mutation in data or padding is harmless).
        assert!(
            ok > ran / 20 && refused > ran / 5,
            "{ok} imported, {refused} refused"
        );
        eprintln!(
            "{ran} of {cases} mutated archives (seed {seed:#x}): {ok} imported, {refused} refused in {:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn pax_records_are_read_by_length() {
        let body = b"30 SCHILY.xattr.user.a=x\n22 y\n14 path=a\nb/c\n";
        let r = parse_pax_records(body).expect("parse");
        assert_eq!(
            r,
            vec![
                (b"SCHILY.xattr.user.a".to_vec(), b"x\n22 y".to_vec()),
                (b"path".to_vec(), b"a\nb/c".to_vec()),
            ]
        );
        for bad in [
            &b"5 a=b\n"[..],
            b"x a=b\n",
            b"7 ab\n\n",
            b"99 a=b\n",
            b"6 a=bc",
        ] {
            assert!(parse_pax_records(bad).is_err(), "{}", show(bad));
        }
    }

    #[test]
    fn small_parsers() {
        let t = |s: &str| parse_pax_time(s.as_bytes());
        assert_eq!(
            t("1700000000"),
            Some(Timestamp {
                secs: 1_700_000_000,
                nsecs: 0
            })
        );
        assert_eq!(
            t("1.123456789123"),
            Some(Timestamp {
                secs: 1,
                nsecs: 123_456_789
            })
        );
        assert_eq!(
            t("1.5"),
            Some(Timestamp {
                secs: 1,
                nsecs: 500_000_000
            })
        );
        assert_eq!(
            t("-0.5"),
            Some(Timestamp {
                secs: -1,
                nsecs: 500_000_000
            })
        );
        assert_eq!(t("-3"), Some(Timestamp { secs: -3, nsecs: 0 }));
        for bad in ["", ".", "x", "1.2.3", "1e9", "--1"] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(
            components(b"./a//b/./c/").expect("ok"),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(components(b"./").expect("ok").is_empty());
        let long = vec![b'n'; 256];
        let deep = [&b"d/"[..]].repeat(2048).concat();
        for (bad, says) in [
            (&b"a/../b"[..], "path leaves the volume (\"..\")"),
            (b"/a", "absolute path"),
            (b"", "empty path"),
            (b"a\0b", "NUL byte"),
            (&long, "of 256 bytes is too long (NAME_MAX is 255 bytes)"),
            (
                &deep,
                "path of 4096 bytes is too long (PATH_MAX is 4096 bytes",
            ),
        ] {
            let e = components(bad).expect_err(&show(bad));
            assert!(e.contains(says), "{}: {e}", show(bad));
        }
        assert!(components(&deep[..4095]).is_ok());
        assert_eq!(quote(b"a\"b\\c\nd\xffe"), r#""a\"b\\c\nd\xffe""#);
        let q = quote(&[b'x'; 5000]);
        assert!(q.contains("[5000 bytes in all]") && q.len() < 300, "{q}");
        assert_eq!(numeric(b"0000644\0"), Some(0o644));
        assert_eq!(numeric(b"  755 \0"), Some(0o755));
        assert_eq!(numeric(b"\0\0\0\0"), Some(0));
        assert_eq!(numeric(b"12x4"), None);
        assert_eq!(numeric(b"77777777777777777777777"), None, "beyond u64");
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[4] = 0x40;
        assert_eq!(numeric(&b256), Some(1 << 62));
        b256[0] = 0xff;
        assert_eq!(numeric(&b256), None, "negative");
        for (ma, mi) in [(1u64, 3u64), (8, 1), (259, 70_000), (4095, 1_048_575)] {
            let host = makedev(ma, mi);
            assert_eq!(encode_rdev(ma, mi), Some(host as u32), "{ma}:{mi}");
        }
        assert_eq!(encode_rdev(4096, 0), None);
        let acl =
            acl_from_text(b"u::rw-,g::r--,o::---,u:root:r--,m::r--,g:7:rwx # note\n").expect("acl");
        let mut want = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 0),
            (4, 4, u32::MAX),
            (8, 7, 7),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            want.extend(tag.to_le_bytes());
            want.extend(perm.to_le_bytes());
            want.extend(id.to_le_bytes());
        }
        assert_eq!(acl, want);
        assert!(acl_from_text(b"user:no-such-user-here:rwx").is_err());
        assert!(acl_from_text(b"user:joe:rwx:1000").is_ok());
        let mut v7 = vec![0u8; 512];
        v7[..4].copy_from_slice(b"file");
        v7[148..156].copy_from_slice(b"        ");
        let sum: u32 = v7.iter().map(|&b| u32::from(b)).sum();
        v7[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        assert!(looks_like_tar(&v7));
        v7[0] = b'g';
        assert!(!looks_like_tar(&v7));
    }
}
