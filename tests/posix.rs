//! POSIX behaviour of regular files through a real volfs mount: I/O, truncate, holes, large
//! offsets, fallocate, SEEK_DATA/SEEK_HOLE, O_APPEND/O_EXCL/O_TRUNC, mmap, open-unlinked files,
//! statfs. Also holds the small syscall helpers shared by the `posix_*` modules.
#![allow(unsafe_code)] // thin wrappers over libc calls nix does not expose (xattr, getdents, mmap)

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use nix::sys::stat::FileStat;
use nix::unistd::Whence;

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// helpers shared by the posix_* modules
// ---------------------------------------------------------------------------------------------

/// `lstat`, panicking with the path on failure.
#[track_caller]
pub fn st(p: &Path) -> FileStat {
    nix::sys::stat::lstat(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// `fstat` of an open file.
#[track_caller]
pub fn fst(f: &File) -> FileStat {
    nix::sys::stat::fstat(f.as_raw_fd()).unwrap_or_else(|e| panic!("fstat: {e}"))
}

/// Permission bits (incl. setuid/setgid/sticky) of `p` (not following symlinks).
#[track_caller]
pub fn perm(p: &Path) -> u32 {
    st(p).st_mode & 0o7777
}

/// File type bits (`S_IFMT`) of `p` (not following symlinks).
#[track_caller]
pub fn ftype(p: &Path) -> u32 {
    st(p).st_mode & libc::S_IFMT
}

/// Deterministic, position-dependent, mostly non-zero bytes (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    xorshift_fill(
        Vec::new(),
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        len,
    )
}

/// Read up to `len` bytes at `off` (fewer only at EOF).
#[track_caller]
pub fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f
            .read_at(&mut buf[done..], off + done as u64)
            .expect("pread");
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

/// Position of the first byte where `a` and `b` differ, for readable assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() == b.len() {
            None
        } else {
            Some(a.len().min(b.len()))
        })
}

/// Assert two byte strings are equal, reporting length and first differing offset.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: got {} bytes, want {}; first difference at byte {i} (got {:?}, want {:?})",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cname(n: &str) -> CString {
    CString::new(n).expect("name without NUL")
}

/// `setxattr(2)` (follows symlinks); `flags` is 0, `libc::XATTR_CREATE` or `libc::XATTR_REPLACE`.
pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> nix::Result<()> {
    let (cp, cn) = (cpath(p), cname(name));
    // SAFETY: valid C strings and a value buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    Errno::result(r).map(drop)
}

/// `lsetxattr(2)` (does not follow symlinks).
pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> nix::Result<()> {
    let (cp, cn) = (cpath(p), cname(name));
    // SAFETY: as above.
    let r = unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    Errno::result(r).map(drop)
}

/// `getxattr(2)` with a size query first (size 0), then a get into a buffer of exactly that size.
pub fn getxattr(p: &Path, name: &str) -> nix::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), cname(name));
    // SAFETY: size 0 query with a null buffer is allowed.
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    let n = Errno::result(n)? as usize;
    let mut buf = vec![0u8; n];
    // SAFETY: buffer of n bytes.
    let m = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), n) };
    let m = Errno::result(m)? as usize;
    assert_eq!(
        m, n,
        "getxattr {name}: size query said {n} bytes, get returned {m}"
    );
    buf.truncate(m);
    Ok(buf)
}

/// `getxattr(2)` into a buffer of `size` bytes (to test ERANGE).
pub fn getxattr_sized(p: &Path, name: &str, size: usize) -> nix::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), cname(name));
    let mut buf = vec![0u8; size];
    // SAFETY: buffer of `size` bytes.
    let m = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), size) };
    let m = Errno::result(m)? as usize;
    buf.truncate(m);
    Ok(buf)
}

/// `lgetxattr(2)` (does not follow symlinks), size query then get.
pub fn lgetxattr(p: &Path, name: &str) -> nix::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), cname(name));
    // SAFETY: size query.
    let n = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    let n = Errno::result(n)? as usize;
    let mut buf = vec![0u8; n];
    // SAFETY: buffer of n bytes.
    let m = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), n) };
    buf.truncate(Errno::result(m)? as usize);
    Ok(buf)
}

/// `listxattr(2)` (size query, then list), sorted names.
pub fn listxattr(p: &Path) -> nix::Result<Vec<String>> {
    let cp = cpath(p);
    // SAFETY: size query.
    let n = Errno::result(unsafe { libc::listxattr(cp.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; n as usize];
    // SAFETY: buffer of n bytes.
    let m = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let m = Errno::result(m)? as usize;
    assert_eq!(
        m, n as usize,
        "listxattr: size query said {n} bytes, list returned {m}"
    );
    buf.truncate(m);
    assert!(
        buf.is_empty() || buf.ends_with(&[0]),
        "listxattr list not NUL-terminated: {buf:?}"
    );
    let mut v: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// `removexattr(2)`.
pub fn removexattr(p: &Path, name: &str) -> nix::Result<()> {
    let (cp, cn) = (cpath(p), cname(name));
    // SAFETY: valid C strings.
    Errno::result(unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) }).map(drop)
}

/// One directory entry from `getdents64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub off: i64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

/// One `getdents64` call with a buffer of `bufsize` bytes; empty at end of directory.
pub fn getdents(f: &File, bufsize: usize) -> nix::Result<Vec<Dirent>> {
    let mut buf = vec![0u8; bufsize];
    // SAFETY: getdents64 writes at most bufsize bytes into buf.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            f.as_raw_fd(),
            buf.as_mut_ptr(),
            bufsize,
        )
    };
    let n = Errno::result(n)? as usize;
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let ino = u64::from_ne_bytes(buf[i..i + 8].try_into().unwrap());
        let off = i64::from_ne_bytes(buf[i + 8..i + 16].try_into().unwrap());
        let reclen = u16::from_ne_bytes(buf[i + 16..i + 18].try_into().unwrap()) as usize;
        let dtype = buf[i + 18];
        let name_area = &buf[i + 19..i + reclen];
        let end = name_area
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(name_area.len());
        out.push(Dirent {
            ino,
            off,
            dtype,
            name: name_area[..end].to_vec(),
        });
        i += reclen;
    }
    Ok(out)
}

/// Every entry of directory `dir` (including `.` and `..`), read with getdents64.
pub fn read_dir_all(dir: &Path) -> Vec<Dirent> {
    let f = File::open(dir).unwrap_or_else(|e| panic!("open dir {}: {e}", dir.display()));
    let mut all = Vec::new();
    loop {
        let batch = getdents(&f, 4096).expect("getdents64");
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// Sorted names in `dir`, without `.` and `..`.
pub fn names(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("readdir entry").file_name())
        .collect();
    v.sort();
    v
}

/// Run a program; panic with its output unless it exits 0; return stdout.
#[track_caller]
pub fn run_ok(prog: &str, args: &[&OsStr]) -> String {
    let out = std::process::Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {prog}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Create a file with `data`.
#[track_caller]
pub fn write_file(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// Make `p` a directory everybody can write (for tests acting as other users).
#[track_caller]
pub fn mkdir_world_writable(p: &Path) {
    fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    nix::sys::stat::fchmodat(
        None,
        p,
        nix::sys::stat::Mode::from_bits_truncate(0o777),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .expect("chmod 0777");
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

// ---------------------------------------------------------------------------------------------
// regular file I/O
// ---------------------------------------------------------------------------------------------

#[test]
fn write_then_read_returns_exact_bytes() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    let data = pattern(3 * MIB as usize + 12345, 1);
    let mut f = File::create(&p).unwrap();
    for chunk in data.chunks(4097) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    assert_eq!(st(&p).st_size as usize, data.len(), "size after writes");
    assert_bytes_eq(&fs::read(&p).unwrap(), &data, "read back whole file");
    let f = File::open(&p).unwrap();
    for off in [0u64, 1, 4095, 4096, 4097, 65535, 131072, MIB - 1, 3 * MIB] {
        let want = &data[off as usize..(off as usize + 5000).min(data.len())];
        assert_bytes_eq(&read_at(&f, off, 5000), want, &format!("pread at {off}"));
    }
    // Reading at or past EOF returns 0 bytes; a read crossing EOF is short.
    assert!(read_at(&f, data.len() as u64, 10).is_empty(), "read at EOF");
    assert!(
        read_at(&f, data.len() as u64 + 100, 10).is_empty(),
        "read past EOF"
    );
    assert_eq!(
        read_at(&f, data.len() as u64 - 3, 10).len(),
        3,
        "short read at EOF"
    );
}

#[test]
fn overwrite_in_the_middle_keeps_the_rest() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    let mut want = pattern(20000, 2);
    write_file(&p, &want);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    for (off, s) in [
        (4095usize, &b"XYZ"[..]),
        (0, b"head"),
        (8191, b"\0\0"),
        (19998, b"ENDS"),
    ] {
        f.write_all_at(s, off as u64).unwrap();
        if off + s.len() > want.len() {
            want.resize(off + s.len(), 0);
        }
        want[off..off + s.len()].copy_from_slice(s);
    }
    drop(f);
    assert_eq!(st(&p).st_size, 20002);
    assert_bytes_eq(&fs::read(&p).unwrap(), &want, "after overwrites");
}

#[test]
fn pwrite_past_eof_leaves_a_zero_filled_gap() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"abc");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"xyz", 10_000).unwrap();
    drop(f);
    let got = fs::read(&p).unwrap();
    let mut want = b"abc".to_vec();
    want.resize(10_000, 0);
    want.extend_from_slice(b"xyz");
    assert_bytes_eq(&got, &want, "file with gap");
}

#[test]
fn truncate_down_then_up_reads_zeros_past_the_old_end() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    let data = pattern(3 * 4096 + 100, 3);
    write_file(&p, &data);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len(100).unwrap();
    assert_eq!(fst(&f).st_size, 100);
    assert_bytes_eq(
        &read_at(&f, 0, 1 << 20),
        &data[..100],
        "after truncate to 100",
    );
    f.set_len(3 * 4096 + 100).unwrap();
    let mut want = data[..100].to_vec();
    want.resize(3 * 4096 + 100, 0);
    assert_bytes_eq(&read_at(&f, 0, 1 << 20), &want, "after truncate back up");
    drop(f);
    // Path-based truncate(2), shrinking inside a block and growing again.
    nix::unistd::truncate(&p, 50).unwrap();
    assert_eq!(st(&p).st_size, 50);
    nix::unistd::truncate(&p, 5000).unwrap();
    let mut want = data[..50].to_vec();
    want.resize(5000, 0);
    assert_bytes_eq(
        &fs::read(&p).unwrap(),
        &want,
        "after truncate(2) 50 -> 5000",
    );
    nix::unistd::truncate(&p, 0).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"");
}

#[test]
fn truncate_up_extends_with_zeros_and_keeps_data() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"hello");
    nix::unistd::truncate(&p, 3 * MIB as i64 + 7).unwrap();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len() as u64, 3 * MIB + 7);
    assert_eq!(&got[..5], b"hello");
    assert!(
        got[5..].iter().all(|b| *b == 0),
        "bytes past the old end are not all zero"
    );
}

#[test]
fn sparse_file_holes_read_as_zeros() {
    let tv = TestVolume::new();
    let p = tv.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let a = pattern(4096, 4);
    let b = pattern(777, 5);
    f.write_all_at(&a, MIB).unwrap();
    f.write_all_at(&b, 3 * MIB + 123).unwrap();
    f.set_len(4 * MIB).unwrap();
    let got = read_at(&f, 0, 4 * MIB as usize + 10);
    let mut want = vec![0u8; 4 * MIB as usize];
    want[MIB as usize..MIB as usize + 4096].copy_from_slice(&a);
    want[3 * MIB as usize + 123..3 * MIB as usize + 900].copy_from_slice(&b);
    assert_bytes_eq(&got, &want, "sparse file contents");
    drop(f);
    assert_bytes_eq(
        &fs::read(&p).unwrap(),
        &want,
        "sparse file re-read after close",
    );
}

#[test]
fn file_past_4gib_reads_back_with_exact_size() {
    let tv = TestVolume::new();
    let p = tv.path("big");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let data = pattern(64 * KIB as usize, 6);
    f.write_all_at(&data, 5 * GIB).unwrap();
    // A write straddling the 4 GiB boundary (32-bit offset overflow check).
    f.write_all_at(b"ABCDEFGH", 4 * GIB - 4).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fst(&f).st_size as u64, 5 * GIB + 64 * KIB, "size via fstat");
    drop(f);
    assert_eq!(st(&p).st_size as u64, 5 * GIB + 64 * KIB, "size via stat");
    let f = File::open(&p).unwrap();
    assert_bytes_eq(
        &read_at(&f, 5 * GIB, 64 * KIB as usize + 100),
        &data,
        "data at 5 GiB",
    );
    assert_eq!(
        read_at(&f, 4 * GIB - 8, 16),
        b"\0\0\0\0ABCDEFGH\0\0\0\0",
        "around 4 GiB"
    );
    assert!(
        read_at(&f, 2 * GIB, 4096).iter().all(|b| *b == 0),
        "hole at 2 GiB"
    );
    assert!(
        read_at(&f, 5 * GIB - 4096, 4096).iter().all(|b| *b == 0),
        "hole before 5 GiB"
    );
    let mut g = File::open(&p).unwrap();
    assert_eq!(
        g.seek(SeekFrom::End(0)).unwrap(),
        5 * GIB + 64 * KIB,
        "SEEK_END"
    );
}

#[test]
fn fallocate_default_mode_grows_size_and_reads_zeros() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"0123456789");
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    nix::fcntl::fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, MIB as i64)
        .expect("fallocate(mode 0)");
    assert_eq!(fst(&f).st_size as u64, MIB, "size after fallocate");
    let got = read_at(&f, 0, 2 * MIB as usize);
    assert_eq!(got.len() as u64, MIB);
    assert_eq!(
        &got[..10],
        b"0123456789",
        "data inside the allocated range is kept"
    );
    assert!(
        got[10..].iter().all(|b| *b == 0),
        "allocated range past old EOF is not zero"
    );
    // A range entirely inside the file changes nothing.
    nix::fcntl::fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, 5).unwrap();
    assert_eq!(fst(&f).st_size as u64, MIB);
    assert_eq!(read_at(&f, 0, 10), b"0123456789");
}

#[test]
fn fallocate_keep_size_leaves_size_unchanged() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    let data = pattern(1000, 7);
    write_file(&p, &data);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        MIB as i64,
    )
    .expect("fallocate(KEEP_SIZE)");
    assert_eq!(fst(&f).st_size, 1000, "size after fallocate KEEP_SIZE");
    assert_bytes_eq(
        &read_at(&f, 0, 4096),
        &data,
        "data after fallocate KEEP_SIZE",
    );
    drop(f);
    assert_eq!(st(&p).st_size, 1000);
}

#[test]
fn fallocate_punch_hole_zeroes_the_range_and_keeps_the_rest() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    let data = pattern(256 * KIB as usize, 8);
    write_file(&p, &data);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let (off, len) = (4096 + 100, 70_000usize);
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off as i64,
        len as i64,
    )
    .expect("fallocate(PUNCH_HOLE|KEEP_SIZE)");
    let mut want = data.clone();
    want[off..off + len].fill(0);
    assert_eq!(fst(&f).st_size as usize, data.len(), "size after punch");
    assert_bytes_eq(
        &read_at(&f, 0, data.len() + 10),
        &want,
        "after punch (same fd)",
    );
    drop(f);
    assert_bytes_eq(&fs::read(&p).unwrap(), &want, "after punch (re-read)");
    // Punching past EOF never grows the file.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        data.len() as i64 - 10,
        MIB as i64,
    )
    .unwrap();
    assert_eq!(fst(&f).st_size as usize, data.len());
    want[data.len() - 10..].fill(0);
    drop(f);
    assert_bytes_eq(&fs::read(&p).unwrap(), &want, "after punch across EOF");
}

#[test]
fn seek_data_and_seek_hole_on_a_sparse_file() {
    let tv = TestVolume::new();
    let p = tv.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let size = 4 * MIB as i64;
    let (doff, dlen) = (MIB as i64, 64 * KIB as i64);
    f.write_all_at(&pattern(dlen as usize, 9), doff as u64)
        .unwrap();
    f.set_len(size as u64).unwrap();
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    let data0 = nix::unistd::lseek(fd, 0, Whence::SeekData).expect("SEEK_DATA 0");
    assert!(
        (0..=doff).contains(&data0),
        "SEEK_DATA(0) = {data0}, must be in [0, {doff}]"
    );
    let in_data = nix::unistd::lseek(fd, doff + 10, Whence::SeekData).expect("SEEK_DATA in data");
    assert_eq!(
        in_data,
        doff + 10,
        "SEEK_DATA inside data returns the offset itself"
    );
    let hole = nix::unistd::lseek(fd, doff, Whence::SeekHole).expect("SEEK_HOLE");
    assert!(
        hole >= doff + dlen && hole <= size,
        "SEEK_HOLE({doff}) = {hole}, must be in [{}, {size}]",
        doff + dlen
    );
    let hole0 = nix::unistd::lseek(fd, 0, Whence::SeekHole).expect("SEEK_HOLE 0");
    assert!(
        hole0 <= doff || (hole0 >= doff + dlen && hole0 <= size),
        "SEEK_HOLE(0) = {hole0} points inside the data at [{doff}, {})",
        doff + dlen
    );
    assert_eq!(
        errno(nix::unistd::lseek(fd, size, Whence::SeekData)),
        Errno::ENXIO,
        "SEEK_DATA at EOF"
    );
    assert_eq!(
        errno(nix::unistd::lseek(fd, size + MIB as i64, Whence::SeekData)),
        Errno::ENXIO,
        "SEEK_DATA past EOF"
    );
    assert_eq!(
        errno(nix::unistd::lseek(fd, size, Whence::SeekHole)),
        Errno::ENXIO,
        "SEEK_HOLE at EOF"
    );
    // The implicit hole at EOF: SEEK_HOLE from the last byte is at most the size.
    let last = nix::unistd::lseek(fd, size - 1, Whence::SeekHole).expect("SEEK_HOLE last byte");
    assert!(
        last == size - 1 || last == size,
        "SEEK_HOLE(size-1) = {last}"
    );
}

#[test]
fn o_append_sequential_appends_land_in_order() {
    let tv = TestVolume::new();
    let p = tv.path("log");
    write_file(&p, b"start\n");
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    let mut want = b"start\n".to_vec();
    for i in 0..100 {
        let la = format!("A{i:03}\n");
        let lb = format!("B{i:03} {}\n", "x".repeat(i));
        a.write_all(la.as_bytes()).unwrap();
        b.write_all(lb.as_bytes()).unwrap();
        want.extend_from_slice(la.as_bytes());
        want.extend_from_slice(lb.as_bytes());
    }
    // An O_APPEND write ignores the file offset.
    a.seek(SeekFrom::Start(0)).unwrap();
    a.write_all(b"end\n").unwrap();
    want.extend_from_slice(b"end\n");
    drop((a, b));
    assert_bytes_eq(&fs::read(&p).unwrap(), &want, "appended file");
}

#[test]
fn o_append_concurrent_appenders_lose_nothing() {
    let tv = TestVolume::new();
    let p = tv.path("log");
    const REC: usize = 100;
    const N: usize = 300;
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut f = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o644)
                    .open(&p)
                    .unwrap();
                for i in 0..N {
                    let mut rec = format!("T{t} {i:05} ").into_bytes();
                    rec.resize(REC - 1, b'a' + t);
                    rec.push(b'\n');
                    f.write_all(&rec).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 2 * N * REC, "total appended size");
    let mut next = [0usize; 2];
    for (k, rec) in got.chunks(REC).enumerate() {
        let t = (rec[1] - b'0') as usize;
        assert!(
            rec[0] == b'T' && t < 2,
            "record {k} is torn: {:?}",
            String::from_utf8_lossy(rec)
        );
        let mut want = format!("T{t} {:05} ", next[t]).into_bytes();
        want.resize(REC - 1, b'a' + t as u8);
        want.push(b'\n');
        assert_eq!(rec, &want[..], "record {k}: out of order or torn");
        next[t] += 1;
    }
    assert_eq!(next, [N, N]);
}

#[test]
fn o_excl_on_existing_name_is_eexist() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"keep");
    assert_errno!(
        OpenOptions::new().write(true).create_new(true).open(&p),
        EEXIST
    );
    assert_eq!(
        fs::read(&p).unwrap(),
        b"keep",
        "O_EXCL failure must not touch the file"
    );
    fs::create_dir(tv.path("d")).unwrap();
    assert_errno!(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tv.path("d")),
        EEXIST
    );
    // O_EXCL does not follow symlinks, even dangling ones.
    std::os::unix::fs::symlink("nowhere", tv.path("dangling")).unwrap();
    assert_errno!(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tv.path("dangling")),
        EEXIST
    );
    assert!(!tv.path("nowhere").exists());
    // And on a fresh name it creates the file.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tv.path("new"))
        .unwrap();
    assert_eq!(st(&tv.path("new")).st_size, 0);
}

#[test]
fn o_trunc_empties_an_existing_file_and_updates_mtime() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, &pattern(100_000, 10));
    let before = st(&p);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(fst(&f).st_size, 0, "size right after O_TRUNC");
    f.write_all(b"new").unwrap();
    drop(f);
    let after = st(&p);
    assert_eq!(fs::read(&p).unwrap(), b"new");
    assert_eq!(after.st_ino, before.st_ino, "O_TRUNC keeps the inode");
    assert!(
        (after.st_mtime, after.st_mtime_nsec) > (before.st_mtime, before.st_mtime_nsec),
        "mtime not updated by O_TRUNC + write"
    );
}

fn mmap_shared(f: &File, len: usize, write: bool) -> *mut u8 {
    let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
    // SAFETY: fresh mapping of an open file descriptor; checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

#[test]
fn shared_writable_mmap_is_visible_to_read_after_msync() {
    let tv = TestVolume::new();
    let p = tv.path("m");
    let len = 3 * 4096 + 10;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(len as u64).unwrap();
    let data = pattern(len, 11);
    let m = mmap_shared(&f, len, true);
    // SAFETY: m maps `len` bytes of the file, read-write.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), m, len);
        assert_eq!(libc::msync(m.cast(), len, libc::MS_SYNC), 0, "msync");
        assert_eq!(libc::munmap(m.cast(), len), 0, "munmap");
    }
    assert_bytes_eq(
        &read_at(&f, 0, len + 100),
        &data,
        "read() after mmap write (same fd)",
    );
    drop(f);
    assert_bytes_eq(
        &fs::read(&p).unwrap(),
        &data,
        "read() after mmap write (new fd)",
    );
    assert_eq!(st(&p).st_size as usize, len);
}

#[test]
fn mmap_reads_what_write_wrote() {
    let tv = TestVolume::new();
    let p = tv.path("m");
    let data = pattern(2 * 4096 + 77, 12);
    write_file(&p, &data);
    let f = File::open(&p).unwrap();
    let m = mmap_shared(&f, data.len(), false);
    // SAFETY: m maps data.len() readable bytes.
    let seen = unsafe { std::slice::from_raw_parts(m, data.len()) }.to_vec();
    assert_bytes_eq(&seen, &data, "mmap view of written data");
    // A later write() through another fd is visible through the shared mapping.
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_all_at(b"CHANGED", 4096).unwrap();
    // SAFETY: as above.
    let seen = unsafe { std::slice::from_raw_parts(m.add(4096), 7) }.to_vec();
    assert_eq!(seen, b"CHANGED", "mmap does not see a later write()");
    // SAFETY: unmapping the mapping created above.
    unsafe { libc::munmap(m.cast(), data.len()) };
}

#[test]
fn open_unlinked_file_keeps_working_until_last_close() {
    let tv = TestVolume::new();
    let p = tv.path("gone");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.write_all(b"before unlink;").unwrap();
    let ino = fst(&f).st_ino;
    fs::remove_file(&p).unwrap();
    assert_errno!(nix::sys::stat::lstat(&p), ENOENT);
    assert!(
        names(tv.mnt()).is_empty(),
        "unlinked name still listed: {:?}",
        names(tv.mnt())
    );
    let s = fst(&f);
    assert_eq!(s.st_nlink, 0, "nlink of an open, unlinked file");
    assert_eq!(s.st_ino, ino);
    assert_eq!(s.st_size, 14);
    let more = pattern(200_000, 13);
    f.write_all(&more).unwrap();
    f.sync_all().unwrap();
    let mut want = b"before unlink;".to_vec();
    want.extend_from_slice(&more);
    assert_bytes_eq(&read_at(&f, 0, want.len() + 10), &want, "read after unlink");
    assert_eq!(fst(&f).st_size as usize, want.len());
    f.set_len(5).unwrap();
    assert_eq!(read_at(&f, 0, 100), b"befor");
    // A new file with the same name is a different, empty file.
    write_file(&p, b"other");
    assert_ne!(
        st(&p).st_ino,
        ino,
        "new file reuses the open unlinked file's inode"
    );
    assert_eq!(
        read_at(&f, 0, 100),
        b"befor",
        "unlinked file changed by new same-name file"
    );
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"other");
    assert_eq!(names(tv.mnt()), vec![OsString::from("gone")]);
}

#[test]
fn statfs_is_sane_and_free_space_shrinks_after_writing_64mib() {
    let tv = TestVolume::new();
    let s = nix::sys::statvfs::statvfs(tv.mnt()).expect("statvfs");
    assert!(s.block_size() > 0, "f_bsize = 0");
    assert!(s.fragment_size() > 0, "f_frsize = 0");
    assert!(
        s.blocks() >= s.blocks_free(),
        "f_blocks {} < f_bfree {}",
        s.blocks(),
        s.blocks_free()
    );
    assert!(
        s.blocks_free() >= s.blocks_available(),
        "f_bfree < f_bavail"
    );
    assert!(s.files() > 0, "f_files = 0");
    assert!(s.files() >= s.files_free(), "f_files < f_ffree");
    assert_eq!(s.name_max(), 255, "f_namemax");
    // Free space comes from the host disk, which other tests running in parallel also use (and
    // free): measure each 64 MiB write on its own and allow three attempts for a clean reading.
    let bytes = |s: &nix::sys::statvfs::Statvfs| {
        let f = s.fragment_size();
        ((s.blocks() - s.blocks_free()) * f, s.blocks_free() * f)
    };
    let mut shrinks = Vec::new();
    for attempt in 0..3u8 {
        let (used0, free0) = bytes(&nix::sys::statvfs::statvfs(tv.mnt()).unwrap());
        let mut f = File::create(tv.path(format!("big{attempt}"))).unwrap();
        let chunk = pattern(MIB as usize, 14 + attempt as u64);
        for i in 0..64u8 {
            let mut c = chunk.clone();
            c[0] = i; // no two chunks are identical
            f.write_all(&c).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        let (used1, free1) = bytes(&nix::sys::statvfs::statvfs(tv.mnt()).unwrap());
        assert!(
            used1 >= used0 + 64 * MIB,
            "used bytes (f_blocks - f_bfree) grew by {} after writing 64 MiB",
            used1 as i64 - used0 as i64
        );
        if free1 + 32 * MIB <= free0 {
            return;
        }
        shrinks.push(free0 as i64 - free1 as i64);
    }
    panic!("free space did not shrink by >= 32 MiB after writing 64 MiB (3 tries): {shrinks:?}");
}

#[test]
fn reading_a_directory_fd_is_eisdir_and_opening_it_for_write_is_eisdir() {
    let tv = TestVolume::new();
    let d = tv.path("d");
    fs::create_dir(&d).unwrap();
    assert_errno!(OpenOptions::new().write(true).open(&d), EISDIR);
    assert_errno!(OpenOptions::new().read(true).write(true).open(&d), EISDIR);
    let mut f = File::open(&d).unwrap();
    let mut buf = [0u8; 10];
    assert_errno!(f.read(&mut buf), EISDIR);
    // O_CREAT on an existing directory is also EISDIR.
    assert_errno!(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&d),
        EISDIR
    );
}

#[test]
fn names_with_arbitrary_bytes_round_trip() {
    let tv = TestVolume::new();
    let raw: Vec<Vec<u8>> = vec![
        b"with space".to_vec(),
        b"new\nline".to_vec(),
        "ünïcødé-名前".as_bytes().to_vec(),
        vec![0xff, 0xfe, b'x', 0x80],
        b"-dash".to_vec(),
        b"...".to_vec(),
        b"back\\slash".to_vec(),
    ];
    for (i, n) in raw.iter().enumerate() {
        let p = tv.mnt().join(OsStr::from_bytes(n));
        write_file(&p, format!("{i}").as_bytes());
    }
    let mut want: Vec<OsString> = raw.iter().map(|n| OsString::from_vec(n.clone())).collect();
    want.sort();
    assert_eq!(names(tv.mnt()), want);
    for (i, n) in raw.iter().enumerate() {
        let p = tv.mnt().join(OsStr::from_bytes(n));
        assert_eq!(
            fs::read(&p).unwrap(),
            format!("{i}").as_bytes(),
            "content of {n:?}"
        );
    }
}

#[test]
fn st_blocks_and_st_blksize_account_for_written_data() {
    let tv = TestVolume::new();
    let p = tv.path("dense");
    let mut f = File::create(&p).unwrap();
    f.write_all(&pattern(MIB as usize, 15)).unwrap();
    f.sync_all().unwrap();
    let s = fst(&f);
    assert!(s.st_blksize > 0, "st_blksize = {}", s.st_blksize);
    assert!(
        s.st_blocks as u64 * 512 >= MIB,
        "st_blocks = {} (x512 < 1 MiB) for 1 MiB of written data",
        s.st_blocks
    );
}

#[test]
fn one_tib_sparse_file_is_cheap_to_create_read_and_truncate() {
    let tv = TestVolume::new();
    let p = tv.path("huge");
    let t0 = std::time::Instant::now();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(1 << 40).unwrap();
    f.write_all_at(b"last", (1 << 40) - 4).unwrap();
    f.write_all_at(b"first", 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fst(&f).st_size as u64, 1 << 40);
    assert_eq!(read_at(&f, (1 << 40) - 8, 100), b"\0\0\0\0last");
    assert!(
        read_at(&f, 1 << 39, 64 * KIB as usize)
            .iter()
            .all(|b| *b == 0)
    );
    f.set_len(3).unwrap();
    assert_eq!(read_at(&f, 0, 100), b"fir");
    f.set_len(1 << 40).unwrap();
    assert!(
        read_at(&f, (1 << 40) - 8, 100).iter().all(|b| *b == 0),
        "old tail came back"
    );
    drop(f);
    fs::remove_file(&p).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        secs < 20.0,
        "a 1 TiB sparse file took {secs:.1}s to create, truncate and remove"
    );
}

#[test]
fn copy_file_range_copies_exact_bytes() {
    let tv = TestVolume::new();
    let data = pattern(3 * MIB as usize + 5, 16);
    write_file(&tv.path("src"), &data);
    let src = File::open(tv.path("src")).unwrap();
    let dst = File::create(tv.path("dst")).unwrap();
    let mut off_in: i64 = 100;
    let mut off_out: i64 = 7;
    let mut left = data.len() - 100;
    while left > 0 {
        // SAFETY: valid descriptors and offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= n as usize;
    }
    drop(dst);
    let mut want = vec![0u8; 7];
    want.extend_from_slice(&data[100..]);
    assert_bytes_eq(
        &fs::read(tv.path("dst")).unwrap(),
        &want,
        "copy_file_range result",
    );
}

#[test]
fn fcntl_record_locks_conflict_between_processes() {
    let tv = TestVolume::new();
    let p = tv.path("lockfile");
    write_file(&p, &[0u8; 100]);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let lock = |ty: i32, start: i64, len: i64| libc::flock {
        l_type: ty as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    nix::fcntl::fcntl(
        f.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETLK(&lock(libc::F_WRLCK, 10, 20)),
    )
    .expect("F_SETLK write lock on [10, 30)");
    let me = std::process::id() as i32;
    let pc = p.clone();
    let (conflict, holder, free_ok) = run_as(0, 0, move || {
        let g = OpenOptions::new().read(true).write(true).open(&pc).unwrap();
        let fd = g.as_raw_fd();
        let e = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETLK(&lock(libc::F_RDLCK, 15, 1)),
        )
        .err()
        .map(|e| e as i32);
        let mut q = lock(libc::F_WRLCK, 0, 0);
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETLK(&mut q)).unwrap();
        let free = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETLK(&lock(libc::F_WRLCK, 30, 10)),
        );
        (e, q.l_pid, free.is_ok())
    });
    assert!(
        conflict == Some(libc::EAGAIN) || conflict == Some(libc::EACCES),
        "conflicting F_SETLK from another process: {conflict:?}"
    );
    assert_eq!(holder, me, "F_GETLK names the holder");
    assert!(free_ok, "a lock on a free range [30, 40) was refused");
}

#[test]
fn flock_conflicts_between_open_file_descriptions() {
    let tv = TestVolume::new();
    let p = tv.path("flockfile");
    write_file(&p, b"x");
    let a = File::open(&p).unwrap();
    let b = File::open(&p).unwrap();
    // SAFETY: flock on open descriptors.
    let fl = |f: &File, op: i32| Errno::result(unsafe { libc::flock(f.as_raw_fd(), op) });
    fl(&a, libc::LOCK_EX | libc::LOCK_NB).expect("first LOCK_EX");
    assert_errno!(fl(&b, libc::LOCK_EX | libc::LOCK_NB), EWOULDBLOCK);
    assert_errno!(fl(&b, libc::LOCK_SH | libc::LOCK_NB), EWOULDBLOCK);
    fl(&a, libc::LOCK_UN).unwrap();
    fl(&b, libc::LOCK_SH | libc::LOCK_NB).expect("LOCK_SH after unlock");
    fl(&a, libc::LOCK_SH | libc::LOCK_NB).expect("second LOCK_SH");
    assert_errno!(fl(&a, libc::LOCK_EX | libc::LOCK_NB), EWOULDBLOCK);
}

#[test]
fn executable_on_the_volume_can_be_run() {
    let tv = TestVolume::new();
    let p = tv.path("true");
    fs::copy("/bin/true", &p).unwrap();
    nix::sys::stat::fchmodat(
        None,
        &p,
        nix::sys::stat::Mode::from_bits_truncate(0o755),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .unwrap();
    // Another test thread may be forking while our write descriptor was open (ETXTBSY).
    let mut tries = 0;
    let status = loop {
        match std::process::Command::new(&p).status() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.expect("exec from the volume"),
        }
    };
    assert!(status.success(), "{status}");
    let sh = tv.path("script.sh");
    write_file(&sh, b"#!/bin/sh\nexit 7\n");
    nix::sys::stat::fchmodat(
        None,
        &sh,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .unwrap();
    assert_errno!(std::process::Command::new(&sh).status(), EACCES);
}

#[test]
fn shrinking_then_growing_across_chunk_boundaries_never_shows_stale_bytes() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    let len = 300 * KIB as usize;
    for cut in [
        1usize, 4095, 65_535, 65_536, 65_537, 70_000, 131_072, 200_001,
    ] {
        let data = pattern(len, cut as u64);
        write_file(&p, &data);
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        f.set_len(cut as u64).unwrap();
        // Grow again with a write past EOF (not truncate): the gap must read as zeros.
        f.write_all_at(b"TAIL", len as u64 - 4).unwrap();
        let mut want = data[..cut].to_vec();
        want.resize(len - 4, 0);
        want.extend_from_slice(b"TAIL");
        assert_bytes_eq(
            &read_at(&f, 0, len + 10),
            &want,
            &format!("cut at {cut}, same fd"),
        );
        drop(f);
        assert_bytes_eq(
            &fs::read(&p).unwrap(),
            &want,
            &format!("cut at {cut}, re-read"),
        );
        // Punch a hole that starts and ends inside chunks, then write into its middle.
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let (ho, hl) = (cut.min(len - 140_000) + 10, 130_000usize);
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            ho as i64,
            hl as i64,
        )
        .unwrap();
        want[ho..ho + hl].fill(0);
        f.write_all_at(b"mid", (ho + hl / 2) as u64).unwrap();
        want[ho + hl / 2..ho + hl / 2 + 3].copy_from_slice(b"mid");
        drop(f);
        assert_bytes_eq(
            &fs::read(&p).unwrap(),
            &want,
            &format!("punch after cut at {cut}"),
        );
        fs::remove_file(&p).unwrap();
    }
}

#[test]
fn new_files_never_inherit_data_or_xattrs_of_deleted_ones() {
    let tv = TestVolume::new();
    for i in 0..40 {
        let p = tv.path(format!("old{i}"));
        write_file(&p, &pattern(200 * KIB as usize, 100 + i));
        setxattr(&p, "user.old", b"stale", 0).unwrap();
        fs::remove_file(&p).unwrap();
    }
    fs::create_dir(tv.path("olddir")).unwrap();
    setxattr(&tv.path("olddir"), "user.old", b"stale", 0).unwrap();
    fs::remove_dir(tv.path("olddir")).unwrap();
    for i in 0..40 {
        let p = tv.path(format!("new{i}"));
        let f = File::create(&p).unwrap();
        f.set_len(200 * KIB).unwrap();
        drop(f);
        let got = fs::read(&p).unwrap();
        assert!(
            got.iter().all(|b| *b == 0),
            "new{i} shows old bytes after truncate-extend"
        );
        assert!(
            listxattr(&p).unwrap().is_empty(),
            "new{i} has xattrs {:?}",
            listxattr(&p)
        );
        assert_eq!(st(&p).st_nlink, 1);
    }
    fs::create_dir(tv.path("newdir")).unwrap();
    assert!(listxattr(&tv.path("newdir")).unwrap().is_empty());
    assert!(names(&tv.path("newdir")).is_empty());
}

/// A zeroed buffer aligned for O_DIRECT.
struct Aligned(*mut u8, std::alloc::Layout);

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size layout.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null());
        Aligned(p, layout)
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is layout.size() bytes and exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.0, self.1) }
    }
}

#[test]
fn o_direct_reads_and_writes_exact_bytes() {
    let tv = TestVolume::new();
    let p = tv.path("direct");
    let len = 256 * KIB as usize;
    let data = pattern(len, 17);
    let mut b = Aligned::new(len);
    b.buf().copy_from_slice(&data);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open O_DIRECT");
    f.write_all_at(b.buf(), 0).expect("O_DIRECT write");
    f.write_all_at(&b.buf()[..4096], len as u64 + 8192)
        .expect("O_DIRECT write past EOF");
    drop(f);
    let mut want = data.clone();
    want.resize(len + 8192, 0);
    want.extend_from_slice(&data[..4096]);
    assert_bytes_eq(
        &fs::read(&p).unwrap(),
        &want,
        "buffered read of O_DIRECT writes",
    );
    // O_DIRECT read of what a buffered write wrote.
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_all_at(b"buffered", 4096).unwrap();
    w.sync_all().unwrap();
    drop(w);
    want[4096..4104].copy_from_slice(b"buffered");
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    let mut r = Aligned::new(want.len() + 4096);
    let mut done = 0;
    loop {
        let n = f
            .read_at(&mut r.buf()[done..], done as u64)
            .expect("O_DIRECT read");
        if n == 0 {
            break;
        }
        done += n;
    }
    assert_bytes_eq(&r.buf()[..done], &want, "O_DIRECT read");
}

#[test]
fn mmap_write_updates_mtime_and_ctime() {
    let tv = TestVolume::new();
    let p = tv.path("m");
    write_file(&p, &[0u8; 8192]);
    let old = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
    nix::sys::stat::utimensat(
        None,
        &p,
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let ctime0 = (st(&p).st_ctime, st(&p).st_ctime_nsec);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let m = mmap_shared(&f, 8192, true);
    // SAFETY: m maps 8192 writable bytes.
    unsafe {
        *m.add(100) = 42;
        assert_eq!(libc::msync(m.cast(), 8192, libc::MS_SYNC), 0);
        libc::munmap(m.cast(), 8192);
    }
    drop(f);
    let s = st(&p);
    assert!(
        s.st_mtime > 1_000_000_000,
        "mtime not updated by a write through mmap"
    );
    assert!(
        (s.st_ctime, s.st_ctime_nsec) > ctime0,
        "ctime not updated by a write through mmap"
    );
    assert_eq!(fs::read(&p).unwrap()[100], 42);
}

#[test]
fn fsync_and_fdatasync_succeed_on_files_and_directories() {
    let tv = TestVolume::new();
    fs::create_dir(tv.path("d")).unwrap();
    let mut f = File::create(tv.path("d/f")).unwrap();
    f.write_all(b"x").unwrap();
    f.sync_all().expect("fsync file");
    f.sync_data().expect("fdatasync file");
    File::open(tv.path("d"))
        .unwrap()
        .sync_all()
        .expect("fsync directory");
    File::open(tv.mnt())
        .unwrap()
        .sync_all()
        .expect("fsync volume root");
    nix::unistd::syncfs(File::open(tv.mnt()).unwrap().as_raw_fd()).expect("syncfs");
    let ro = File::open(tv.path("d/f")).unwrap();
    ro.sync_all().expect("fsync of a read-only descriptor");
}
