//! Writing a volume out as a POSIX pax tar archive (`volfs export`), the reverse of
//! [`crate::import`]: everything is read through the [`FileSystem`] seam as root, so the
//! archive holds exactly what a client sees through a mount.
//!
//! What an entry keeps: its type (regular file, directory, symlink, FIFO, character or
//! block device; unix sockets cannot be archived and are skipped, counted in
//! [`ExportStats::skipped`]), its permission bits with setuid, setgid and sticky, its numeric
//! owner (user and group names are left empty), its mtime and atime to the nanosecond (PAX
//! `mtime`/`atime`; ctime cannot be restored, so it is not written), its xattrs
//! (`SCHILY.xattr.NAME`, any namespace volfs stores) and its POSIX ACLs, as the text GNU tar
//! `--acls` writes (`SCHILY.acl.access`/`.default`, numeric qualifiers) instead of the
//! binary `system.posix_acl_*` xattrs. A name shared by an inode met earlier becomes a hard
//! link entry (`1`) pointing at the first name. Paths and link targets longer than the
//! ustar fields go in PAX `path`/`linkpath` records (with `hdrcharset=BINARY` when they are
//! not UTF-8); sizes and owners too large for the octal fields in `size`/`uid`/`gid`.
//!
//! Order: the root as `./` first, then depth-first, each directory before its content and
//! the names of a directory sorted bytewise; directories are written with a trailing `/`.
//! Nothing in a header depends on the time of the export or on the process (extension
//! headers are named `DIR/PaxHeaders/NAME` and carry times 0, as GNU tar 1.34 names them),
//! so exporting unchanged content twice gives identical bytes.
//!
//! Sparse files: a regular file whose data (found with `SEEK_DATA`/`SEEK_HOLE` through the
//! seam, at chunk granularity) does not cover its whole size is written in GNU's PAX sparse
//! format 1.0, which GNU tar and libarchive both read: records `GNU.sparse.major=1`,
//! `GNU.sparse.minor=0`, `GNU.sparse.name` (the real path), `GNU.sparse.realsize`; a header
//! named `DIR/GNUSparseFile.0/NAME`; then in the data the map (the count of segments, then
//! offset and length of each, decimal, one per line, padded with NULs to a 512-byte block)
//! followed by the data segments only. A file ending in a hole gets a last segment of
//! length 0 at its size, as GNU tar writes it (its extractor truncates there). Holes are
//! never materialised, except in a file so fragmented that its map would pass
//! [`MAX_SEGMENTS`]: then the smallest holes are merged into their neighbours until it fits.
//!
//! Memory stays bounded whatever the volume's size: file data goes through one buffer of
//! [`READ_MAX`] bytes; what is held besides is the sorted names of the directories on the
//! current path, one file's sparse map (at most [`MAX_SEGMENTS`] entries) and the first path
//! of each inode with several links until its last link has been met.
//!
//! Invariants: every header's size is exactly the number of data bytes that follow it (a
//! file that shrinks while it is read is padded with zeros and logged, so the archive stays
//! readable); the archive ends with two zero blocks; nothing is written for an entry that
//! vanished between its listing and its reading (a live volume may change under an export:
//! only a snapshot gives a consistent one). Errors name the path that failed.

use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write;

use crate::error::FsError;
use crate::store::ROOT_INO;
use crate::vfs::{Attr, FileKind, FileSystem, Ino, Timestamp, acl};

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Regular files with their data (hard links excluded).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    pub symlinks: u64,
    /// Hard link entries: names of an inode written earlier under another name.
    pub hardlinks: u64,
    /// FIFOs and device nodes.
    pub others: u64,
    /// Unix sockets, which a tar archive cannot hold.
    pub skipped: u64,
    /// File data bytes (holes excluded).
    pub bytes: u64,
    /// Bytes of the whole archive.
    pub archive_bytes: u64,
}

/// Largest single read from the volume.
pub const READ_MAX: usize = 1 << 20;
/// Most segments in one sparse file's map (16 bytes each in memory).
pub const MAX_SEGMENTS: usize = 1 << 16;
/// Names asked of `readdir` at a time.
const READDIR_BATCH: usize = 1024;

const BLOCK: usize = 512;
/// Largest value of an 11-digit octal field (size, mtime).
const OCTAL_11: u64 = 0o777_7777_7777;
/// Largest value of a 7-digit octal field (uid, gid, device numbers).
const OCTAL_7: u64 = 0o777_7777;

/// Writes the volume served by `fs` to `out` as a pax tar archive (see the module
/// documentation), calling `progress` with the archive bytes written so far.
pub fn export<F: FileSystem + ?Sized>(
    fs: &F,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<ExportStats, String> {
    let mut ex = Exporter {
        fs,
        out: Sink {
            out,
            written: 0,
            progress,
        },
        stats: ExportStats::default(),
        links: HashMap::new(),
        zeros: vec![0u8; READ_MAX],
    };
    ex.run()?;
    ex.out.write(&[0u8; 2 * BLOCK])?;
    ex.out
        .out
        .flush()
        .map_err(|e| format!("writing the archive: {e}"))?;
    ex.stats.archive_bytes = ex.out.written;
    (ex.out.progress)(ex.out.written);
    Ok(ex.stats)
}

/// The archive being written, counted.
struct Sink<'a> {
    out: &'a mut dyn Write,
    written: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl Sink<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        self.out
            .write_all(data)
            .map_err(|e| format!("writing the archive: {e}"))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Zeros up to the next block boundary.
    fn pad(&mut self) -> Result<(), String> {
        let rest = (BLOCK - (self.written % BLOCK as u64) as usize) % BLOCK;
        self.write(&[0u8; BLOCK][..rest])
    }
}

/// A directory being walked: its path (`./` or `./a/b/`) and its children not yet written.
struct Frame {
    path: Vec<u8>,
    children: std::vec::IntoIter<(Vec<u8>, Ino)>,
}

/// The first path of an inode with several links, and how many of its links are still to
/// come.
struct FirstName {
    path: Vec<u8>,
    pending: u32,
}

struct Exporter<'a, F: FileSystem + ?Sized> {
    fs: &'a F,
    out: Sink<'a>,
    stats: ExportStats,
    links: HashMap<Ino, FirstName>,
    /// Zeros standing in for data that could no longer be read.
    zeros: Vec<u8>,
}

/// A path for messages: lossy UTF-8 with control characters escaped.
fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

fn fail(path: &[u8], what: &str, e: impl Display) -> String {
    format!("exporting {}: {what}: {e}", show(path))
}

impl<F: FileSystem + ?Sized> Exporter<'_, F> {
    fn run(&mut self) -> Result<(), String> {
        let root = self
            .fs
            .getattr(ROOT_INO)
            .map_err(|e| fail(b"./", "reading the volume root", e))?;
        let mut stack = vec![self.directory(b"./".to_vec(), &root)?];
        while let Some(top) = stack.last_mut() {
            let Some((name, ino)) = top.children.next() else {
                stack.pop();
                continue;
            };
            let mut path = top.path.clone();
            path.extend_from_slice(&name);
            let attr = match self.fs.getattr(ino) {
                Ok(a) => a,
                Err(FsError::NotFound) => {
                    tracing::debug!("export: {} vanished since its listing", show(&path));
                    continue;
                }
                Err(e) => return Err(fail(&path, "reading its attributes", e)),
            };
            if attr.kind == FileKind::Directory {
                path.push(b'/');
                let frame = self.directory(path, &attr)?;
                stack.push(frame);
            } else {
                self.non_directory(&path, &attr)?;
            }
        }
        Ok(())
    }

    /// Writes a directory's entry and lists its children, sorted.
    fn directory(&mut self, path: Vec<u8>, attr: &Attr) -> Result<Frame, String> {
        let mut children = Vec::new();
        let mut cookie = 0;
        loop {
            let batch = match self.fs.readdir(attr.ino, cookie, READDIR_BATCH) {
                Ok(b) => b,
                // Removed since its parent was listed: nothing below it to write.
                Err(FsError::NotFound) if attr.ino != ROOT_INO => Vec::new(),
                Err(e) => return Err(fail(&path, "listing the directory", e)),
            };
            let Some(last) = batch.last() else { break };
            cookie = last.cookie;
            children.extend(
                batch
                    .into_iter()
                    .filter(|d| d.name != b"." && d.name != b"..")
                    .map(|d| (d.name, d.ino)),
            );
        }
        children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let records = self.extended_records(&path, attr)?;
        let h = Header::of(attr, &path, TYPE_DIR, 0);
        self.write_entry(&h, &records)?;
        self.stats.dirs += 1;
        Ok(Frame {
            path,
            children: children.into_iter(),
        })
    }

    fn non_directory(&mut self, path: &[u8], attr: &Attr) -> Result<(), String> {
        if attr.kind == FileKind::Socket {
            tracing::info!("export: {}: unix socket skipped", show(path));
            self.stats.skipped += 1;
            return Ok(());
        }
        if attr.nlink > 1 {
            if let Some(first) = self.links.get_mut(&attr.ino) {
                let mut h = Header::of(attr, path, TYPE_LINK, 0);
                h.link = first.path.clone();
                first.pending = first.pending.saturating_sub(1);
                if first.pending == 0 {
                    self.links.remove(&attr.ino);
                }
                // A link entry carries no xattrs: they belong to the inode, already written.
                self.write_entry(&h, &[])?;
                self.stats.hardlinks += 1;
                return Ok(());
            }
            self.links.insert(
                attr.ino,
                FirstName {
                    path: path.to_vec(),
                    pending: attr.nlink - 1,
                },
            );
        }
        let records = self.extended_records(path, attr)?;
        match attr.kind {
            FileKind::Regular => self.regular(path, attr, records),
            FileKind::Symlink => {
                let target = match self.fs.readlink(attr.ino) {
                    Ok(t) => t,
                    Err(FsError::NotFound) => return Ok(()),
                    Err(e) => return Err(fail(path, "reading the symlink", e)),
                };
                let mut h = Header::of(attr, path, TYPE_SYMLINK, 0);
                h.link = target;
                self.write_entry(&h, &records)?;
                self.stats.symlinks += 1;
                Ok(())
            }
            FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => {
                let t = match attr.kind {
                    FileKind::Fifo => TYPE_FIFO,
                    FileKind::CharDevice => TYPE_CHAR,
                    _ => TYPE_BLOCK,
                };
                let h = Header::of(attr, path, t, 0);
                self.write_entry(&h, &records)?;
                self.stats.others += 1;
                Ok(())
            }
            FileKind::Directory | FileKind::Socket => Ok(()),
        }
    }

    /// A regular file: plain if its data covers it, GNU sparse 1.0 if it has holes.
    fn regular(&mut self, path: &[u8], attr: &Attr, mut records: Records) -> Result<(), String> {
        let size = attr.size;
        let segments = match data_segments(self.fs, attr.ino, size) {
            Ok(s) => s,
            Err(FsError::NotFound) => return Ok(()),
            Err(e) => return Err(fail(path, "finding its data", e)),
        };
        let data: u64 = segments.iter().map(|s| s.1).sum();
        if data == size {
            let h = Header::of(attr, path, TYPE_REGULAR, size);
            self.write_entry(&h, &records)?;
            self.copy_data(path, attr.ino, 0, size)?;
        } else {
            let mut map = segments;
            if map.last().is_none_or(|&(off, len)| off + len < size) {
                map.push((size, 0));
            }
            let map_text = sparse_map_text(&map);
            let stored = map_text.len() as u64 + data;
            let mut sparse: Records = vec![
                (b"GNU.sparse.major".to_vec(), b"1".to_vec()),
                (b"GNU.sparse.minor".to_vec(), b"0".to_vec()),
                (b"GNU.sparse.name".to_vec(), path.to_vec()),
                (
                    b"GNU.sparse.realsize".to_vec(),
                    size.to_string().into_bytes(),
                ),
            ];
            sparse.append(&mut records);
            let mut h = Header::of(attr, &sparse_header_name(path), TYPE_REGULAR, stored);
            h.sparse_name = Some(path.to_vec());
            self.write_entry(&h, &sparse)?;
            self.out.write(&map_text)?;
            for &(off, len) in &map {
                self.copy_data(path, attr.ino, off, len)?;
            }
        }
        self.out.pad()?;
        self.stats.files += 1;
        self.stats.bytes += data;
        (self.out.progress)(self.out.written);
        Ok(())
    }

    /// Copies `len` bytes of `ino` from `offset`; what can no longer be read (the file
    /// shrank or vanished meanwhile) is written as zeros, so the header stays true.
    fn copy_data(&mut self, path: &[u8], ino: Ino, offset: u64, len: u64) -> Result<(), String> {
        let mut done = 0u64;
        let mut short = false;
        while done < len {
            let want = (len - done).min(READ_MAX as u64) as usize;
            let data = if short {
                Vec::new()
            } else {
                match self.fs.read(ino, offset + done, want as u32) {
                    Ok(mut data) => {
                        data.truncate(want);
                        data
                    }
                    Err(FsError::NotFound) => Vec::new(),
                    Err(e) => return Err(fail(path, "reading its data", e)),
                }
            };
            self.out.write(&data)?;
            if data.len() < want {
                if !short {
                    tracing::warn!(
                        "export: {} shrank or vanished while it was read; the rest is written as zeros",
                        show(path)
                    );
                    short = true;
                }
                self.out.write(&self.zeros[..want - data.len()])?;
            }
            done += want as u64;
            (self.out.progress)(self.out.written);
        }
        Ok(())
    }

    /// The xattr and ACL records of an inode, sorted by name.
    fn extended_records(&self, path: &[u8], attr: &Attr) -> Result<Records, String> {
        let list = match self.fs.listxattr(attr.ino) {
            Ok(l) => l,
            Err(FsError::NotFound) => return Ok(Vec::new()),
            Err(e) => return Err(fail(path, "listing its xattrs", e)),
        };
        let mut names: Vec<&[u8]> = list.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        names.sort_unstable();
        let mut acls = Vec::new();
        let mut xattrs = Vec::new();
        for name in names {
            let value = match self.fs.getxattr(attr.ino, name) {
                Ok(v) => v,
                Err(FsError::NoData | FsError::NotFound) => continue,
                Err(e) => return Err(fail(path, &format!("reading xattr {}", show(name)), e)),
            };
            let acl_key: &[u8] = match name {
                n if n == acl::ACCESS => b"SCHILY.acl.access",
                n if n == acl::DEFAULT => b"SCHILY.acl.default",
                _ => b"",
            };
            if !acl_key.is_empty() {
                let text = acl::to_text(&value)
                    .map_err(|e| fail(path, &format!("reading its ACL {}", show(name)), e))?;
                acls.push((acl_key.to_vec(), text.into_bytes()));
            } else if name.contains(&b'=') {
                // A PAX keyword ends at the first '='.
                tracing::warn!(
                    "export: {}: xattr {} skipped: a tar archive cannot name it",
                    show(path),
                    show(name)
                );
            } else {
                let mut key = b"SCHILY.xattr.".to_vec();
                key.extend_from_slice(name);
                xattrs.push((key, value));
            }
        }
        acls.sort_unstable();
        acls.append(&mut xattrs);
        Ok(acls)
    }

    /// Writes an entry's extension header (if it needs one) and its header.
    fn write_entry(&mut self, h: &Header, extra: &[(Vec<u8>, Vec<u8>)]) -> Result<(), String> {
        let (pax, block) = encode_entry(h, extra);
        if !pax.is_empty() {
            let name = h.sparse_name.as_deref().unwrap_or(&h.path);
            self.out.write(&pax_header_block(name, pax.len() as u64))?;
            self.out.write(&pax)?;
            self.out.pad()?;
        }
        self.out.write(&block)
    }
}

/// PAX records `(keyword, value)`, in the order they are written.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

const TYPE_REGULAR: u8 = b'0';
const TYPE_LINK: u8 = b'1';
const TYPE_SYMLINK: u8 = b'2';
const TYPE_CHAR: u8 = b'3';
const TYPE_BLOCK: u8 = b'4';
const TYPE_DIR: u8 = b'5';
const TYPE_FIFO: u8 = b'6';
const TYPE_PAX: u8 = b'x';

/// One entry's header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    path: Vec<u8>,
    typeflag: u8,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Timestamp,
    atime: Timestamp,
    link: Vec<u8>,
    /// Device (major, minor) of a device node.
    dev: (u32, u32),
    /// For a sparse file: its real path (the header's path is a stand-in).
    sparse_name: Option<Vec<u8>>,
}

impl Header {
    fn of(attr: &Attr, path: &[u8], typeflag: u8, size: u64) -> Header {
        let dev = match attr.kind {
            FileKind::CharDevice | FileKind::BlockDevice => decode_rdev(attr.rdev),
            _ => (0, 0),
        };
        Header {
            path: path.to_vec(),
            typeflag,
            perm: attr.perm & 0o7777,
            uid: attr.uid,
            gid: attr.gid,
            size,
            mtime: attr.mtime,
            atime: attr.atime,
            link: Vec::new(),
            dev,
            sparse_name: None,
        }
    }
}

/// Linux's 32-bit device encoding (`new_decode_dev`), which FUSE carries: (major, minor).
fn decode_rdev(rdev: u32) -> (u32, u32) {
    (
        (rdev & 0xfff00) >> 8,
        (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
    )
}

/// A PAX time: seconds with up to nine decimals, trailing zeros dropped (as GNU tar writes
/// it); a time before the epoch is negative (`-1.5` is 1.5 s before).
fn pax_time(t: Timestamp) -> String {
    let nsecs = t.nsecs.min(999_999_999);
    let (sign, secs, frac) = if t.secs < 0 && nsecs > 0 {
        ("-", (t.secs + 1).unsigned_abs(), 1_000_000_000 - nsecs)
    } else if t.secs < 0 {
        ("-", t.secs.unsigned_abs(), 0)
    } else {
        ("", t.secs.unsigned_abs(), nsecs)
    };
    if frac == 0 {
        return format!("{sign}{secs}");
    }
    let digits = format!("{frac:09}");
    format!("{sign}{secs}.{}", digits.trim_end_matches('0'))
}

/// One PAX record: `"<length> <key>=<value>\n"`, the length counting the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Writes `v` as zero-padded octal filling all but the last byte of `field` (a NUL), or
/// zeros if it does not fit (the caller writes a PAX record instead).
fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let text = format!("{v:0digits$o}");
    let text = if text.len() > digits {
        "0".repeat(digits)
    } else {
        text
    };
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

/// `bytes` cut to at most `max` bytes, at a character boundary when they are UTF-8.
fn truncated(bytes: &[u8], max: usize) -> &[u8] {
    if bytes.len() <= max {
        return bytes;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &bytes[..end]
        }
        Err(_) => &bytes[..max],
    }
}

/// Splits `path` (maybe ending in '/') into its directory (without the '/') and last name.
fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (b".", trimmed),
    }
}

/// `DIR/INFIX/NAME` for a stand-in header name, or `./INFIX/NAME` if that is too long for
/// the ustar name field; the name is cut to fit.
fn stand_in_name(path: &[u8], infix: &[u8]) -> Vec<u8> {
    let (dir, name) = split_path(path);
    let name = if name.is_empty() { b"." } else { name };
    let mut full = dir.to_vec();
    full.push(b'/');
    full.extend_from_slice(infix);
    full.push(b'/');
    full.extend_from_slice(name);
    if full.len() <= 100 {
        return full;
    }
    let mut short = b"./".to_vec();
    short.extend_from_slice(infix);
    short.push(b'/');
    let room = 100 - short.len();
    short.extend_from_slice(truncated(name, room));
    short
}

/// The name of a sparse file's header, as GNU tar makes it (with a fixed number where GNU
/// tar puts its process id, so that it does not change).
fn sparse_header_name(path: &[u8]) -> Vec<u8> {
    stand_in_name(path, b"GNUSparseFile.0")
}

/// The ustar header block of `h`: names and links cut to their fields, numbers that do not
/// fit their octal fields (or a time before the epoch) written as 0, the PAX records
/// carrying them instead.
fn ustar_block(h: &Header) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let name = truncated(&h.path, 100);
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], u64::from(h.perm));
    octal(&mut b[108..116], u64::from(h.uid));
    octal(&mut b[116..124], u64::from(h.gid));
    octal(&mut b[124..136], h.size);
    octal(&mut b[136..148], u64::try_from(h.mtime.secs).unwrap_or(0));
    b[156] = h.typeflag;
    let link = truncated(&h.link, 100);
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    // uname and gname stay empty: owners are numeric.
    if matches!(h.typeflag, TYPE_CHAR | TYPE_BLOCK) {
        octal(&mut b[329..337], u64::from(h.dev.0));
        octal(&mut b[337..345], u64::from(h.dev.1));
    }
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..154].copy_from_slice(format!("{sum:06o}").as_bytes());
    b[154] = 0;
    b
}

/// The header of an extension header holding `len` bytes of records for `path`.
fn pax_header_block(path: &[u8], len: u64) -> [u8; BLOCK] {
    let epoch = Timestamp { secs: 0, nsecs: 0 };
    ustar_block(&Header {
        path: stand_in_name(path, b"PaxHeaders"),
        typeflag: TYPE_PAX,
        perm: 0o644,
        uid: 0,
        gid: 0,
        size: len,
        mtime: epoch,
        atime: epoch,
        link: Vec::new(),
        dev: (0, 0),
        sparse_name: None,
    })
}

/// An entry's PAX records (empty if it needs none) and its ustar header block. `extra`
/// records (sparse, ACLs, xattrs) follow the standard ones.
fn encode_entry(h: &Header, extra: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, [u8; BLOCK]) {
    let mut pax = Vec::new();
    let long_path = h.path.len() > 100;
    let long_link = h.link.len() > 100;
    let binary = |b: &[u8]| std::str::from_utf8(b).is_err();
    let sparse_binary = h.sparse_name.as_deref().is_some_and(binary);
    if (long_path && binary(&h.path)) || (long_link && binary(&h.link)) || sparse_binary {
        pax_record(&mut pax, b"hdrcharset", b"BINARY");
    }
    if long_path {
        pax_record(&mut pax, b"path", &h.path);
    }
    if long_link {
        pax_record(&mut pax, b"linkpath", &h.link);
    }
    if h.size > OCTAL_11 {
        pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
    }
    if u64::from(h.uid) > OCTAL_7 {
        pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
    }
    if u64::from(h.gid) > OCTAL_7 {
        pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
    }
    if h.typeflag != TYPE_LINK {
        pax_record(&mut pax, b"mtime", pax_time(h.mtime).as_bytes());
        pax_record(&mut pax, b"atime", pax_time(h.atime).as_bytes());
    }
    for (k, v) in extra {
        pax_record(&mut pax, k, v);
    }
    let block = ustar_block(h);
    (pax, block)
}

/// A sparse map in format 1.0: count, then offset and length of each segment, decimal, one
/// a line, padded with NULs to a whole block.
fn sparse_map_text(map: &[(u64, u64)]) -> Vec<u8> {
    let mut t = format!("{}\n", map.len()).into_bytes();
    for (off, len) in map {
        t.extend_from_slice(format!("{off}\n{len}\n").as_bytes());
    }
    t.resize(t.len().div_ceil(BLOCK) * BLOCK, 0);
    t
}

/// The data segments `(offset, length)` of a file of `size` bytes, in order, found with
/// `SEEK_DATA`/`SEEK_HOLE`; at most [`MAX_SEGMENTS`] (see [`merge_small_holes`]).
fn data_segments<F: FileSystem + ?Sized>(
    fs: &F,
    ino: Ino,
    size: u64,
) -> Result<Vec<(u64, u64)>, FsError> {
    let mut segs: Vec<(u64, u64)> = Vec::new();
    let mut min_hole = 0u64;
    let mut off = 0u64;
    while off < size {
        let start = match fs.lseek(ino, off, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(FsError::NoSeekData) => break,
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = match fs.lseek(ino, start, libc::SEEK_HOLE) {
            Ok(e) => e.clamp(start, size),
            // Truncated meanwhile: no data from here.
            Err(FsError::NoSeekData) => break,
            Err(e) => return Err(e),
        };
        if end == start {
            break;
        }
        match segs.last_mut() {
            Some(last) if start - (last.0 + last.1) < min_hole.max(1) => {
                last.1 = end - last.0;
            }
            _ => segs.push((start, end - start)),
        }
        if segs.len() > MAX_SEGMENTS {
            min_hole = merge_small_holes(&mut segs, min_hole);
        }
        off = end;
    }
    Ok(segs)
}

/// Merges the segments separated by holes smaller than a threshold, doubled (from
/// `min_hole`, at least 2 × 16 KiB) until at most half of [`MAX_SEGMENTS`] remain; returns
/// the threshold, which later segments are merged with too.
fn merge_small_holes(segs: &mut Vec<(u64, u64)>, min_hole: u64) -> u64 {
    let mut threshold = min_hole.max(16 * 1024);
    while segs.len() > MAX_SEGMENTS / 2 {
        threshold = threshold.saturating_mul(2);
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(segs.len());
        for &(off, len) in segs.iter() {
            match merged.last_mut() {
                Some(last) if off - (last.0 + last.1) < threshold => last.1 = off + len - last.0,
                _ => merged.push((off, len)),
            }
        }
        *segs = merged;
    }
    threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: FileKind, perm: u32) -> Attr {
        let t = Timestamp {
            secs: 1_600_000_000,
            nsecs: 123_456_789,
        };
        Attr {
            ino: 7,
            kind,
            perm,
            nlink: 1,
            uid: 1234,
            gid: 1234,
            rdev: 0,
            size: 0,
            blocks: 0,
            atime: Timestamp {
                secs: 1_700_000_000,
                nsecs: 500_000_000,
            },
            mtime: t,
            ctime: t,
            btime: t,
        }
    }

    /// Parses a header block with the tar crate, as a reader would.
    fn parsed(block: &[u8; BLOCK]) -> tar::Header {
        let h = tar::Header::from_byte_slice(block);
        assert_eq!(
            h.cksum().expect("checksum field"),
            {
                let mut b = *block;
                b[148..156].fill(b' ');
                b.iter().map(|&x| u32::from(x)).sum::<u32>()
            },
            "checksum"
        );
        h.clone()
    }

    fn records(pax: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = pax;
        while !rest.is_empty() {
            let sp = rest.iter().position(|&b| b == b' ').expect("space");
            let len: usize = std::str::from_utf8(&rest[..sp])
                .expect("utf-8")
                .parse()
                .expect("length");
            let rec = &rest[sp + 1..len - 1];
            assert_eq!(rest[len - 1], b'\n');
            let eq = rec.iter().position(|&b| b == b'=').expect("=");
            out.push((
                String::from_utf8(rec[..eq].to_vec()).expect("key"),
                rec[eq + 1..].to_vec(),
            ));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn ustar_fields_are_octal_with_a_valid_checksum_and_no_names() {
        let mut a = attr(FileKind::Regular, 0o4755);
        a.size = 5;
        let h = Header::of(&a, b"./dir/file", TYPE_REGULAR, 5);
        let (pax, block) = encode_entry(&h, &[]);
        let t = parsed(&block);
        assert_eq!(t.path_bytes().as_ref(), b"./dir/file");
        assert_eq!(t.mode().expect("mode"), 0o4755);
        assert_eq!((t.uid().expect("uid"), t.gid().expect("gid")), (1234, 1234));
        assert_eq!(t.size().expect("size"), 5);
        assert_eq!(t.mtime().expect("mtime"), 1_600_000_000);
        assert_eq!(&block[100..108], b"0004755\0");
        assert_eq!(&block[257..265], b"ustar\x0000");
        assert_eq!(t.username_bytes(), Some(&b""[..]));
        assert_eq!(t.groupname_bytes(), Some(&b""[..]));
        assert_eq!(
            records(&pax),
            vec![
                ("mtime".to_string(), b"1600000000.123456789".to_vec()),
                ("atime".to_string(), b"1700000000.5".to_vec()),
            ]
        );
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for n in [0usize, 1, 5, 6, 7, 90, 93, 94, 95, 996, 997, 998, 9_990] {
            let mut out = Vec::new();
            pax_record(&mut out, b"k", &vec![b'v'; n]);
            let sp = out.iter().position(|&b| b == b' ').expect("space");
            let len: usize = std::str::from_utf8(&out[..sp])
                .expect("utf-8")
                .parse()
                .expect("number");
            assert_eq!(len, out.len(), "value of {n} bytes");
        }
        let mut out = Vec::new();
        pax_record(&mut out, b"SCHILY.xattr.user.bin", b"a\nb=\0c");
        assert_eq!(
            records(&out),
            vec![("SCHILY.xattr.user.bin".to_string(), b"a\nb=\0c".to_vec())]
        );
    }

    #[test]
    fn times_keep_nanoseconds_and_negative_times_count_down() {
        let t = |secs, nsecs| pax_time(Timestamp { secs, nsecs });
        assert_eq!(t(0, 0), "0");
        assert_eq!(t(5, 1), "5.000000001");
        assert_eq!(t(5, 120_000_000), "5.12");
        assert_eq!(t(-2, 500_000_000), "-1.5");
        assert_eq!(t(-1, 0), "-1");
        assert_eq!(t(-1, 999_999_999), "-0.000000001");
    }

    #[test]
    fn long_paths_links_and_big_numbers_go_in_pax_records() {
        let long: Vec<u8> = [b"./".to_vec(), vec![b'x'; 255]].concat();
        let target = vec![b'y'; 300];
        let mut a = attr(FileKind::Symlink, 0o777);
        a.uid = 4_000_000;
        let mut h = Header::of(&a, &long, TYPE_SYMLINK, 0);
        h.link = target.clone();
        let (pax, block) = encode_entry(&h, &[]);
        let r = records(&pax);
        assert_eq!(r[0], ("path".to_string(), long.clone()));
        assert_eq!(r[1], ("linkpath".to_string(), target));
        assert_eq!(r[2], ("uid".to_string(), b"4000000".to_vec()));
        let t = parsed(&block);
        assert_eq!(t.path_bytes().len(), 100);
        assert_eq!(t.link_name_bytes().expect("link").len(), 100);
        assert_eq!(
            &block[108..116],
            b"0000000\0",
            "uid too large: 0 in the field"
        );

        let mut f = attr(FileKind::Regular, 0o600);
        f.size = 1 << 40;
        let (pax, block) = encode_entry(&Header::of(&f, b"./big", TYPE_REGULAR, 1 << 40), &[]);
        assert_eq!(
            records(&pax)[0],
            ("size".to_string(), b"1099511627776".to_vec())
        );
        assert_eq!(&block[124..136], b"00000000000\0");

        let odd = [b"./".to_vec(), vec![0xff; 120]].concat();
        let (pax, _) = encode_entry(&Header::of(&f, &odd, TYPE_REGULAR, 0), &[]);
        assert_eq!(
            records(&pax)[0],
            ("hdrcharset".to_string(), b"BINARY".to_vec())
        );
    }

    #[test]
    fn devices_hard_links_and_stand_in_names() {
        let mut c = attr(FileKind::CharDevice, 0o620);
        // 4:64 and 259:1048575 in Linux's 32-bit encoding.
        c.rdev = (64 & 0xff) | (4 << 8);
        let (_, block) = encode_entry(&Header::of(&c, b"./tty", TYPE_CHAR, 0), &[]);
        let t = parsed(&block);
        assert_eq!(t.device_major().expect("major"), Some(4));
        assert_eq!(t.device_minor().expect("minor"), Some(64));
        for (major, minor) in [(4u32, 64u32), (259, 0xfffff), (0xfff, 0)] {
            let rdev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
            assert_eq!(decode_rdev(rdev), (major, minor));
        }

        let mut h = Header::of(&attr(FileKind::Regular, 0o644), b"./b", TYPE_LINK, 0);
        h.link = b"./a".to_vec();
        let (pax, block) = encode_entry(&h, &[]);
        assert!(pax.is_empty(), "a hard link needs no times");
        assert_eq!(
            parsed(&block).link_name_bytes().expect("link").as_ref(),
            b"./a"
        );

        assert_eq!(stand_in_name(b"./", b"PaxHeaders"), b"./PaxHeaders/.");
        assert_eq!(stand_in_name(b"./d/e/", b"PaxHeaders"), b"./d/PaxHeaders/e");
        assert_eq!(sparse_header_name(b"./s"), b"./GNUSparseFile.0/s");
        let deep = [
            b"./".to_vec(),
            vec![b'd'; 90],
            b"/".to_vec(),
            vec![b'f'; 200],
        ]
        .concat();
        let n = sparse_header_name(&deep);
        assert_eq!(n.len(), 100);
        assert!(n.starts_with(b"./GNUSparseFile.0/fff"));
    }

    #[test]
    fn sparse_maps_are_decimal_lines_padded_to_a_block() {
        let t = sparse_map_text(&[(0, 16384), (1 << 30, 0)]);
        assert_eq!(t.len(), BLOCK);
        assert!(t.starts_with(b"2\n0\n16384\n1073741824\n0\n\0"));
        assert!(t[23..].iter().all(|&b| b == 0));
    }

    #[test]
    fn too_many_segments_merge_the_smallest_holes_first() {
        // Alternating 16 KiB of data and 16 KiB of hole, and one large hole in the middle.
        let mut segs: Vec<(u64, u64)> = (0..MAX_SEGMENTS as u64 + 1)
            .map(|i| (i * 32 * 1024, 16 * 1024))
            .collect();
        let mid = segs.len() / 2;
        for s in &mut segs[mid..] {
            s.0 += 1 << 30;
        }
        let threshold = merge_small_holes(&mut segs, 0);
        assert!(segs.len() <= MAX_SEGMENTS / 2);
        assert_eq!(segs.len(), 2, "{threshold}");
        assert_eq!(segs[1].0, mid as u64 * 32 * 1024 + (1 << 30));
    }

    fn volume(dir: &std::path::Path, name: &str) -> crate::vfs::SledFs {
        let store = crate::store::Store::open_with(&dir.join(name), 1 << 20).expect("store");
        crate::vfs::SledFs::init_volume(&store, 1, 0, 0, 0o755).expect("init");
        crate::vfs::SledFs::open(store, 1, name).expect("open")
    }

    fn export_bytes(fs: &crate::vfs::SledFs) -> (Vec<u8>, ExportStats) {
        let mut out = Vec::new();
        let mut last = 0;
        let stats = export(fs, &mut out, &mut |n| last = n).expect("export");
        assert_eq!(last, out.len() as u64);
        assert_eq!(stats.archive_bytes, out.len() as u64);
        (out, stats)
    }

    #[test]
    fn a_volume_exports_imports_and_exports_to_the_same_bytes() {
        use crate::vfs::{Ctx, SetAttr, SetTime};
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = volume(dir.path(), "a");
        let root = Ctx::ROOT;
        let at = |secs| {
            SetTime::At(Timestamp {
                secs,
                nsecs: 987_654_321,
            })
        };
        let d = fs.mkdir(&root, ROOT_INO, b"d", 0o2755, 0).expect("mkdir");
        let f = fs
            .mknod(&root, d.ino, b"f", libc::S_IFREG | 0o644, 0, 0)
            .expect("file");
        fs.write(f.ino, 0, b"hello", false).expect("write");
        fs.link(f.ino, ROOT_INO, b"f2").expect("link");
        let s = fs
            .mknod(&root, ROOT_INO, b"sparse", libc::S_IFREG | 0o600, 0, 0)
            .expect("sparse");
        fs.write(s.ino, 1 << 20, b"middle", false).expect("write");
        fs.setattr(
            &root,
            s.ino,
            &SetAttr {
                size: Some(3 << 20),
                ..SetAttr::default()
            },
        )
        .expect("truncate");
        fs.symlink(&root, d.ino, b"l", &[b'z'; 150])
            .expect("symlink");
        fs.mknod(&root, ROOT_INO, b"p", libc::S_IFIFO | 0o640, 0, 0)
            .expect("fifo");
        fs.mknod(
            &root,
            ROOT_INO,
            b"tty",
            libc::S_IFCHR | 0o620,
            0,
            (4 << 8) | 64,
        )
        .expect("char device");
        fs.setxattr(&root, f.ino, b"user.k", b"v\n=\0", 0)
            .expect("xattr");
        let acl_value: Vec<u8> = [2u32.to_le_bytes().to_vec()]
            .into_iter()
            .chain(
                [
                    (1u16, 6u16, u32::MAX),
                    (2, 4, 1234),
                    (4, 4, u32::MAX),
                    (16, 4, u32::MAX),
                    (32, 0, u32::MAX),
                ]
                .iter()
                .map(|&(t, p, i)| {
                    [
                        t.to_le_bytes().to_vec(),
                        p.to_le_bytes().to_vec(),
                        i.to_le_bytes().to_vec(),
                    ]
                    .concat()
                }),
            )
            .collect::<Vec<_>>()
            .concat();
        fs.setxattr(&root, f.ino, acl::ACCESS, &acl_value, 0)
            .expect("acl");
        for (i, ino) in [f.ino, s.ino, d.ino, ROOT_INO].into_iter().enumerate() {
            let set = SetAttr {
                uid: Some(1234),
                gid: Some(1234),
                atime: Some(at(1_700_000_000 + i as i64)),
                mtime: Some(at(1_600_000_000 + i as i64)),
                ..SetAttr::default()
            };
            fs.setattr(&root, ino, &set).expect("setattr");
        }

        let (first, stats) = export_bytes(&fs);
        assert_eq!(
            (
                stats.files,
                stats.dirs,
                stats.symlinks,
                stats.hardlinks,
                stats.others
            ),
            (2, 2, 1, 1, 2)
        );
        assert_eq!(stats.bytes, 5 + 16 * 1024, "holes are not written");
        assert!(first.len() < 64 * 1024, "{} bytes", first.len());
        assert!(first.ends_with(&[0u8; 1024]));
        assert_eq!(export_bytes(&fs).0, first, "a second export is identical");

        let tar = dir.path().join("a.tar");
        std::fs::write(&tar, &first).expect("write tar");
        let copy = volume(dir.path(), "b");
        crate::import::import(&copy, &tar).expect("import");
        let (second, _) = export_bytes(&copy);
        assert!(second == first, "export of the imported copy differs");
    }
}
