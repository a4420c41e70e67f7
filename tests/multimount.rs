//! One volume mounted several times at once. Coherence: once a write, create, rename,
//! unlink or attribute change made through one mount has returned, every other mount sees it
//! on its very next read, stat, lookup, readdir or getxattr (no stale page cache, attributes,
//! ACLs or entries), through descriptors and shared mappings it opened before, under
//! concurrent writers and readers in both directions, and also for a mount that cached things
//! before the other mounts existed. Read-only mounts beside read-write ones: every modifying
//! call fails with exactly EROFS (for root, for the owner, for other users) and changes
//! nothing; the flag belongs to one mount, not to the volume.
//!
//! Most coherence tests run twice (see `both!`): `rw_rw` with two read-write mounts and
//! `rw_ro` with the second one read-only. "A" is the primary (read-write) mount, where the
//! changes are made; "B" is the second mount, which must see them.
#![allow(unsafe_code)] // mmap and the fd-based xattr calls

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::RenameFlags;
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{AccessFlags, Gid, Uid};

use crate::posix::*;
use crate::util::*;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A volume mounted twice: `a` is the primary, read-write mount, `b` a second mount.
struct Two {
    a: PathBuf,
    b: PathBuf,
    _tv: TestVolume,
}

fn two(b_read_only: bool) -> Two {
    let mut tv = TestVolume::new();
    let b = tv.mount_again(b_read_only);
    Two {
        a: tv.mnt().to_path_buf(),
        b,
        _tv: tv,
    }
}

/// `both!(f, g, ...)`: for each body `fn f(b_read_only: bool)`, a module `f` with the tests
/// `rw_rw` (B read-write) and `rw_ro` (B read-only).
macro_rules! both {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            #[test]
            fn rw_rw() {
                super::$body(false)
            }
            #[test]
            fn rw_ro() {
                super::$body(true)
            }
        }
    )+};
}

/// The attributes every mount of a volume must agree on (not atime, st_blocks or st_dev).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attrs {
    ino: u64,
    mode: u32,
    nlink: u64,
    uid: u32,
    gid: u32,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn attrs_of(s: &FileStat) -> Attrs {
    Attrs {
        ino: s.st_ino,
        mode: s.st_mode,
        nlink: s.st_nlink,
        uid: s.st_uid,
        gid: s.st_gid,
        size: s.st_size,
        mtime: (s.st_mtime, s.st_mtime_nsec),
        ctime: (s.st_ctime, s.st_ctime_nsec),
    }
}

/// `lstat` through A and through B must agree.
#[track_caller]
fn same_attrs(a: &Path, b: &Path, what: &str) {
    let (x, y) = (attrs_of(&st(a)), attrs_of(&st(b)));
    assert_eq!(
        y,
        x,
        "{what}: attributes of {} (left) differ from those of {} (right)",
        b.display(),
        a.display()
    );
}

/// `p` does not exist: `lstat` and `open` both fail with ENOENT.
#[track_caller]
fn gone(p: &Path, what: &str) {
    match nix::sys::stat::lstat(p) {
        Err(Errno::ENOENT) => {}
        Ok(s) => panic!(
            "{what}: {} still exists (ino {}, mode {:o})",
            p.display(),
            s.st_ino,
            s.st_mode
        ),
        Err(e) => panic!("{what}: lstat {} failed with {e}, want ENOENT", p.display()),
    }
    match File::open(p) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Ok(_) => panic!("{what}: open {} succeeded, want ENOENT", p.display()),
        Err(e) => panic!("{what}: open {} failed with {e}, want ENOENT", p.display()),
    }
}

#[track_caller]
fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[track_caller]
fn chmod(p: &Path, mode: u32) {
    nix::sys::stat::fchmodat(
        None,
        p,
        Mode::from_bits_truncate(mode),
        FchmodatFlags::FollowSymlink,
    )
    .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
}

#[track_caller]
fn chown(p: &Path, uid: u32, gid: u32) {
    nix::unistd::chown(p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", p.display()));
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open O_RDWR {}: {e}", p.display()))
}

fn open_append(p: &Path) -> File {
    OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open O_APPEND {}: {e}", p.display()))
}

/// The `system.posix_acl_access` value for `u::rw-,u:UID:rwx,g::r--,m::rwx,o::---`.
fn acl_granting(uid: u32) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec(); // POSIX_ACL_XATTR_VERSION
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX), // ACL_USER_OBJ
        (0x02, 7, uid),            // ACL_USER
        (0x04, 4, u32::MAX),       // ACL_GROUP_OBJ
        (0x10, 7, u32::MAX),       // ACL_MASK
        (0x20, 0, u32::MAX),       // ACL_OTHER
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// `fsetxattr(2)`.
fn fsetxattr(f: &File, name: &str, value: &[u8]) -> nix::Result<()> {
    let cn = CString::new(name).expect("name without NUL");
    // SAFETY: a valid descriptor, C string and value buffer of the given length.
    let r = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// `fremovexattr(2)`.
fn fremovexattr(f: &File, name: &str) -> nix::Result<()> {
    let cn = CString::new(name).expect("name without NUL");
    // SAFETY: a valid descriptor and C string.
    Errno::result(unsafe { libc::fremovexattr(f.as_raw_fd(), cn.as_ptr()) }).map(drop)
}

/// A read-only, shared mapping of the first `len` bytes of `f`.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(f: &File, len: usize) -> Mapping {
        // SAFETY: a fresh mapping of an open descriptor; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
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
        Mapping { ptr: p.cast(), len }
    }

    /// A fresh copy of what the mapping shows now (volatile loads: every byte is read again).
    fn view(&self) -> Vec<u8> {
        (0..self.len)
            // SAFETY: `ptr` maps `len` readable bytes until drop.
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(i)) })
            .collect()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------------------------
// coherence of data: overwrite, append, truncate, mmap
// ---------------------------------------------------------------------------------------------

both!(
    overwrite_in_place_reaches_the_other_mounts_open_fd,
    append_is_seen_in_fstat_stat_and_read,
    truncate_is_seen_in_size_and_data,
    shared_mapping_sees_the_other_mounts_overwrite,
);

fn overwrite_in_place_reaches_the_other_mounts_open_fd(b_read_only: bool) {
    let m = two(b_read_only);
    let (pa, pb) = (m.a.join("f"), m.b.join("f"));
    let len = 5 * 4096 + 123;
    let mut want = pattern(len, 1);
    write_file(&pa, &want);
    // B reads the whole file: its page cache and attributes are populated.
    let rb = File::open(&pb).unwrap();
    assert_bytes_eq(&read_at(&rb, 0, len + 10), &want, "B's first read");
    assert_eq!(fst(&rb).st_size as usize, len);
    let wa = open_rw(&pa);
    // Same size each time: a few bytes inside a page, a page across a page boundary, a whole
    // aligned page, the tail of the partial last page.
    for (i, (off, n)) in [
        (100, 8),
        (4096 + 2048, 4096),
        (2 * 4096, 4096),
        (len - 10, 10),
    ]
    .into_iter()
    .enumerate()
    {
        let new = pattern(n, 100 + i as u64);
        wa.write_all_at(&new, off as u64).unwrap();
        want[off..off + n].copy_from_slice(&new);
        assert_bytes_eq(
            &read_at(&rb, off as u64, n),
            &new,
            &format!("B's pread (fd opened before) of the {n} bytes A wrote at {off}"),
        );
        assert_bytes_eq(
            &read_at(&rb, 0, len + 10),
            &want,
            &format!("B's pread of the whole file after A wrote at {off}"),
        );
        assert_bytes_eq(
            &read(&pb),
            &want,
            &format!("B's read through a new fd after A wrote at {off}"),
        );
        assert_eq!(
            fst(&rb).st_size as usize,
            len,
            "B's fstat size after an in-place write"
        );
        same_attrs(&pa, &pb, &format!("after A wrote {n} bytes at {off}"));
    }
}

fn append_is_seen_in_fstat_stat_and_read(b_read_only: bool) {
    let m = two(b_read_only);
    let (pa, pb) = (m.a.join("f"), m.b.join("f"));
    let mut want = pattern(10_000, 2);
    write_file(&pa, &want);
    // B reads all of it (its last, partial page is cached with zeros past the end) and
    // caches the size.
    let rb = File::open(&pb).unwrap();
    assert_bytes_eq(&read_at(&rb, 0, 20_000), &want, "B's first read");
    assert_eq!(st(&pb).st_size, 10_000);
    let mut wa = open_append(&pa);
    for (round, n) in [1usize, 3000, 8192, 20_000].into_iter().enumerate() {
        let old = want.len();
        let more = pattern(n, 10 + round as u64);
        wa.write_all(&more).unwrap();
        want.extend_from_slice(&more);
        let size = want.len() as i64;
        let what = format!("after A appended {n} bytes at {old}");
        // Alternately read past the size B knew first, and fstat first.
        if round % 2 == 0 {
            assert_bytes_eq(
                &read_at(&rb, old as u64, n + 100),
                &more,
                &format!("B's pread (fd opened before) of the appended bytes {what}"),
            );
            assert_eq!(fst(&rb).st_size, size, "B's fstat {what}");
        } else {
            assert_eq!(fst(&rb).st_size, size, "B's fstat {what}");
            assert_bytes_eq(
                &read_at(&rb, old as u64, n + 100),
                &more,
                &format!("B's pread (fd opened before) of the appended bytes {what}"),
            );
        }
        assert_eq!(st(&pb).st_size, size, "B's stat {what}");
        assert_bytes_eq(
            &read_at(&rb, 0, want.len() + 100),
            &want,
            &format!("B's pread of the whole file {what}"),
        );
        assert_bytes_eq(&read(&pb), &want, &format!("B's read via a new fd {what}"));
        same_attrs(&pa, &pb, &what);
    }
}

fn truncate_is_seen_in_size_and_data(b_read_only: bool) {
    let m = two(b_read_only);
    let (pa, pb) = (m.a.join("f"), m.b.join("f"));
    let data = pattern(20_000, 3);
    write_file(&pa, &data);
    let rb = File::open(&pb).unwrap();
    assert_bytes_eq(&read_at(&rb, 0, 30_000), &data, "B's first read");
    assert_eq!(fst(&rb).st_size, 20_000);

    // Shrink by path.
    nix::unistd::truncate(&pa, 5000).unwrap();
    assert_eq!(
        fst(&rb).st_size,
        5000,
        "B's fstat after A truncated to 5000"
    );
    assert_eq!(st(&pb).st_size, 5000, "B's stat after A truncated to 5000");
    assert_bytes_eq(
        &read_at(&rb, 0, 30_000),
        &data[..5000],
        "B's pread after A truncated to 5000",
    );
    assert_eq!(read_at(&rb, 6000, 100), b"", "B's pread past the new end");
    same_attrs(&pa, &pb, "after truncate to 5000");

    // Grow again through a descriptor: the old bytes must not come back in B.
    let wa = open_rw(&pa);
    wa.set_len(12_000).unwrap();
    let mut want = data[..5000].to_vec();
    want.resize(12_000, 0);
    assert_bytes_eq(
        &read_at(&rb, 0, 30_000),
        &want,
        "B's pread after A truncated to 5000 and then extended to 12000 (zeros past 5000)",
    );
    assert_eq!(fst(&rb).st_size, 12_000, "B's fstat after A extended");
    same_attrs(&pa, &pb, "after ftruncate to 12000");

    wa.set_len(0).unwrap();
    assert_eq!(
        read_at(&rb, 0, 30_000),
        b"",
        "B's pread after A truncated to 0"
    );
    assert_eq!(fst(&rb).st_size, 0, "B's fstat after A truncated to 0");
    assert_eq!(st(&pb).st_size, 0, "B's stat after A truncated to 0");
    assert_eq!(read(&pb), b"", "B's read via a new fd after truncate to 0");
    same_attrs(&pa, &pb, "after ftruncate to 0");
}

/// A shared mapping shows B's page cache itself: the pages A's write made stale must be gone
/// from it (the kernel unmaps invalidated pages) by the time the write returns, so the next
/// access faults in the new bytes.
fn shared_mapping_sees_the_other_mounts_overwrite(b_read_only: bool) {
    let m = two(b_read_only);
    let (pa, pb) = (m.a.join("f"), m.b.join("f"));
    let len = 4 * 4096;
    let mut want = pattern(len, 4);
    write_file(&pa, &want);
    let rb = File::open(&pb).unwrap();
    let map = Mapping::new(&rb, len);
    assert_bytes_eq(&map.view(), &want, "B's mapping before the change");
    let wa = open_rw(&pa);
    wa.write_all_at(b"CHANGED!", 4096 + 100).unwrap();
    want[4096 + 100..4096 + 108].copy_from_slice(b"CHANGED!");
    let page = pattern(4096, 5);
    wa.write_all_at(&page, 2 * 4096).unwrap();
    want[2 * 4096..3 * 4096].copy_from_slice(&page);
    assert_bytes_eq(
        &map.view(),
        &want,
        "B's MAP_SHARED mapping after A's pwrite",
    );
    assert_bytes_eq(&read_at(&rb, 0, len), &want, "B's pread after A's pwrite");
}

// ---------------------------------------------------------------------------------------------
// coherence of names: rename, unlink, replace, create, mkdir/rmdir
// ---------------------------------------------------------------------------------------------

both!(
    rename_is_seen_by_lookups,
    unlink_and_link_counts_are_seen,
    rename_over_a_name_shows_the_new_inode,
    names_created_after_failed_lookups_are_seen,
    mkdir_and_rmdir_are_seen_by_stat_and_readdir,
);

fn rename_is_seen_by_lookups(b_read_only: bool) {
    let m = two(b_read_only);
    let (a, b) = (&m.a, &m.b);
    write_file(&a.join("x"), b"x");
    fs::create_dir(a.join("d")).unwrap();
    write_file(&a.join("d/inner"), b"inner");
    // B caches the names, their attributes and a failed lookup of the target.
    let ino_x = st(&b.join("x")).st_ino;
    assert_eq!(read(&b.join("x")), b"x");
    let ino_inner = st(&b.join("d/inner")).st_ino;
    gone(&b.join("y"), "before the rename");

    fs::rename(a.join("x"), a.join("y")).unwrap();
    gone(&b.join("x"), "after A renamed x to y");
    assert_eq!(st(&b.join("y")).st_ino, ino_x, "B's y is not the old x");
    assert_eq!(read(&b.join("y")), b"x");
    assert_eq!(names(b), names(a));
    same_attrs(a, b, "root after rename");

    // A directory: the names under its old path go with it.
    fs::rename(a.join("d"), a.join("e")).unwrap();
    gone(&b.join("d/inner"), "after A renamed d to e");
    gone(&b.join("d"), "after A renamed d to e");
    assert_eq!(st(&b.join("e/inner")).st_ino, ino_inner);
    assert_eq!(read(&b.join("e/inner")), b"inner");

    // Across directories.
    fs::rename(a.join("e/inner"), a.join("inner2")).unwrap();
    gone(&b.join("e/inner"), "after A moved e/inner to inner2");
    assert_eq!(st(&b.join("inner2")).st_ino, ino_inner);
    assert!(names(&b.join("e")).is_empty(), "B still lists e/inner");
    assert_eq!(names(b), names(a));
    same_attrs(&a.join("e"), &b.join("e"), "e after its entry moved out");
    same_attrs(a, b, "root after the entry moved in");
}

fn unlink_and_link_counts_are_seen(b_read_only: bool) {
    let m = two(b_read_only);
    let (a, b) = (&m.a, &m.b);
    write_file(&a.join("f"), b"f");
    write_file(&a.join("g"), b"g");
    assert_eq!(read(&b.join("f")), b"f");
    assert_eq!(st(&b.join("g")).st_nlink, 1);
    gone(&b.join("h"), "before the link");

    fs::hard_link(a.join("g"), a.join("h")).unwrap();
    assert_eq!(st(&b.join("g")).st_nlink, 2, "B's nlink after A's link");
    assert_eq!(st(&b.join("h")).st_ino, st(&b.join("g")).st_ino);
    same_attrs(&a.join("g"), &b.join("g"), "after link");

    fs::remove_file(a.join("f")).unwrap();
    gone(&b.join("f"), "after A unlinked f");
    assert_eq!(names(b), ["g", "h"]);
    same_attrs(a, b, "root after unlink");

    fs::remove_file(a.join("h")).unwrap();
    gone(&b.join("h"), "after A unlinked h");
    assert_eq!(st(&b.join("g")).st_nlink, 1, "B's nlink after A's unlink");
    same_attrs(
        &a.join("g"),
        &b.join("g"),
        "after unlink of the second link",
    );
    assert_eq!(names(b), ["g"]);
}

fn rename_over_a_name_shows_the_new_inode(b_read_only: bool) {
    let m = two(b_read_only);
    let (a, b) = (&m.a, &m.b);
    write_file(&a.join("t"), b"old");
    let old_fd = File::open(b.join("t")).unwrap();
    assert_eq!(read_at(&old_fd, 0, 100), b"old");
    let ino_old = st(&b.join("t")).st_ino;

    write_file(&a.join("t.new"), b"new contents");
    let ino_new = st(&a.join("t.new")).st_ino;
    fs::rename(a.join("t.new"), a.join("t")).unwrap();
    let now = st(&b.join("t")).st_ino;
    assert_eq!(
        now, ino_new,
        "B's t is inode {now}, want the new {ino_new} (old was {ino_old})"
    );
    assert_eq!(read(&b.join("t")), b"new contents");
    gone(&b.join("t.new"), "after A renamed t.new over t");
    assert_eq!(
        read_at(&old_fd, 0, 100),
        b"old",
        "B's descriptor of the replaced file"
    );
    drop(old_fd);
    same_attrs(&a.join("t"), &b.join("t"), "after rename over");

    // A directory replaces an empty one.
    fs::create_dir(a.join("d1")).unwrap();
    fs::create_dir(a.join("d2")).unwrap();
    write_file(&a.join("d2/in"), b"in");
    assert!(names(&b.join("d1")).is_empty());
    let ino_d2 = st(&b.join("d2")).st_ino;
    fs::rename(a.join("d2"), a.join("d1")).unwrap();
    assert_eq!(st(&b.join("d1")).st_ino, ino_d2, "B's d1 is not the old d2");
    assert_eq!(read(&b.join("d1/in")), b"in");
    gone(&b.join("d2"), "after A renamed d2 over d1");
    same_attrs(a, b, "root after directory rename over");

    // RENAME_EXCHANGE swaps two names.
    write_file(&a.join("p"), b"p");
    write_file(&a.join("q"), b"q");
    let (ip, iq) = (st(&b.join("p")).st_ino, st(&b.join("q")).st_ino);
    assert_eq!(read(&b.join("p")), b"p");
    nix::fcntl::renameat2(
        None,
        &a.join("p"),
        None,
        &a.join("q"),
        RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(st(&b.join("p")).st_ino, iq, "B's p after exchange");
    assert_eq!(st(&b.join("q")).st_ino, ip, "B's q after exchange");
    assert_eq!(read(&b.join("p")), b"q");
    assert_eq!(read(&b.join("q")), b"p");
}

fn names_created_after_failed_lookups_are_seen(b_read_only: bool) {
    let m = two(b_read_only);
    let (a, b) = (&m.a, &m.b);
    for _ in 0..2 {
        gone(&b.join("n"), "before create");
        gone(&b.join("dir"), "before mkdir");
        gone(&b.join("dir/n"), "before mkdir");
        gone(&b.join("l"), "before symlink");
        gone(&b.join("fifo"), "before mkfifo");
    }
    assert!(names(b).is_empty());

    write_file(&a.join("n"), b"n");
    assert_eq!(read(&b.join("n")), b"n", "B's read of a name A created");
    same_attrs(&a.join("n"), &b.join("n"), "new file");

    fs::create_dir(a.join("dir")).unwrap();
    assert_eq!(ftype(&b.join("dir")), libc::S_IFDIR);
    gone(&b.join("dir/n"), "in the new directory");
    write_file(&a.join("dir/n"), b"dn");
    assert_eq!(read(&b.join("dir/n")), b"dn");

    symlink("n", a.join("l")).unwrap();
    assert_eq!(fs::read_link(b.join("l")).unwrap(), Path::new("n"));
    assert_eq!(read(&b.join("l")), b"n");

    nix::unistd::mkfifo(&a.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    assert_eq!(ftype(&b.join("fifo")), libc::S_IFIFO);

    assert_eq!(names(b), ["dir", "fifo", "l", "n"]);
    same_attrs(a, b, "root after the creates");
}

fn mkdir_and_rmdir_are_seen_by_stat_and_readdir(b_read_only: bool) {
    let m = two(b_read_only);
    let (a, b) = (&m.a, &m.b);
    assert!(names(b).is_empty());
    gone(&b.join("d"), "before mkdir");
    let root_before = st(b);

    fs::create_dir(a.join("d")).unwrap();
    assert_eq!(ftype(&b.join("d")), libc::S_IFDIR);
    assert_eq!(names(b), ["d"]);
    assert_eq!(
        st(b).st_nlink,
        root_before.st_nlink + 1,
        "B's root nlink after A's mkdir"
    );
    same_attrs(a, b, "root after mkdir");
    let ino_first = st(&b.join("d")).st_ino;

    write_file(&a.join("d/x"), b"x");
    assert_eq!(names(&b.join("d")), ["x"]);
    let listed: Vec<Vec<u8>> = read_dir_all(&b.join("d"))
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        listed.contains(&b"x".to_vec()),
        "getdents in B misses x: {listed:?}"
    );

    fs::remove_file(a.join("d/x")).unwrap();
    assert!(names(&b.join("d")).is_empty(), "B still lists d/x");
    fs::remove_dir(a.join("d")).unwrap();
    gone(&b.join("d"), "after A's rmdir");
    assert!(names(b).is_empty(), "B still lists d");
    assert_eq!(
        st(b).st_nlink,
        root_before.st_nlink,
        "B's root nlink after rmdir"
    );
    same_attrs(a, b, "root after rmdir");

    // The same name again, a new directory.
    fs::create_dir(a.join("d")).unwrap();
    let ino_second = st(&a.join("d")).st_ino;
    assert_eq!(
        st(&b.join("d")).st_ino,
        ino_second,
        "B's d after rmdir + mkdir (first was {ino_first})"
    );
    assert!(names(&b.join("d")).is_empty());
    same_attrs(&a.join("d"), &b.join("d"), "the new d");
}

// ---------------------------------------------------------------------------------------------
// coherence of attributes, xattrs and ACLs
// ---------------------------------------------------------------------------------------------

both!(attribute_xattr_and_acl_changes_are_seen_at_once);

fn attribute_xattr_and_acl_changes_are_seen_at_once(b_read_only: bool) {
    let m = two(b_read_only);
    let (pa, pb) = (m.a.join("f"), m.b.join("f"));
    write_file(&pa, b"data");
    chmod(&pa, 0o644);
    // B caches the attributes, a missing xattr and a missing ACL.
    assert_eq!(perm(&pb), 0o644);
    assert_errno!(getxattr(&pb, "user.k"), ENODATA);
    assert_errno!(getxattr(&pb, "system.posix_acl_access"), ENODATA);
    assert_eq!(read(&pb), b"data");

    chmod(&pa, 0o640);
    assert_eq!(perm(&pb), 0o640, "B's mode after A's chmod");
    same_attrs(&pa, &pb, "after chmod");

    chown(&pa, 1234, 5678);
    let s = st(&pb);
    assert_eq!(
        (s.st_uid, s.st_gid),
        (1234, 5678),
        "B's owner after A's chown"
    );
    same_attrs(&pa, &pb, "after chown");

    let (at, mt) = (TimeSpec::new(1_000_000, 5), TimeSpec::new(2_000_000, 7));
    nix::sys::stat::utimensat(None, &pa, &at, &mt, UtimensatFlags::FollowSymlink).unwrap();
    let s = st(&pb);
    assert_eq!(
        ((s.st_atime, s.st_atime_nsec), (s.st_mtime, s.st_mtime_nsec)),
        ((1_000_000, 5), (2_000_000, 7)),
        "B's atime and mtime after A's utimensat"
    );
    same_attrs(&pa, &pb, "after utimensat");

    setxattr(&pa, "user.k", b"v1", 0).unwrap();
    assert_eq!(getxattr(&pb, "user.k").unwrap(), b"v1");
    assert_eq!(listxattr(&pb).unwrap(), ["user.k"]);
    setxattr(&pa, "user.k", b"v22, longer", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&pb, "user.k").unwrap(), b"v22, longer");
    removexattr(&pa, "user.k").unwrap();
    assert_errno!(getxattr(&pb, "user.k"), ENODATA);
    assert!(listxattr(&pb).unwrap().is_empty());
    same_attrs(&pa, &pb, "after the xattr changes");

    // Permission decisions in B follow A's changes at once: mode bits, then an ACL.
    chown(&pa, 0, 0);
    chmod(&pa, 0o600);
    let pb2 = pb.clone();
    run_as(4321, 4321, move || {
        assert_errno!(File::open(&pb2), EACCES);
    });
    chmod(&pa, 0o604);
    let pb2 = pb.clone();
    run_as(4321, 4321, move || {
        assert_eq!(fs::read(&pb2).unwrap(), b"data", "read after A's chmod o+r");
    });
    chmod(&pa, 0o600);
    let pb2 = pb.clone();
    run_as(4321, 4321, move || {
        assert_errno!(File::open(&pb2), EACCES);
    });
    let acl = acl_granting(4321);
    setxattr(&pa, "system.posix_acl_access", &acl, 0).unwrap();
    assert_eq!(getxattr(&pb, "system.posix_acl_access").unwrap(), acl);
    same_attrs(&pa, &pb, "after setting an ACL");
    let pb2 = pb.clone();
    run_as(4321, 4321, move || {
        assert_eq!(fs::read(&pb2).unwrap(), b"data", "read granted by A's ACL");
    });
    removexattr(&pa, "system.posix_acl_access").unwrap();
    chmod(&pa, 0o600);
    assert_errno!(getxattr(&pb, "system.posix_acl_access"), ENODATA);
    let pb2 = pb.clone();
    run_as(4321, 4321, move || {
        assert_errno!(File::open(&pb2), EACCES);
    });
    same_attrs(&pa, &pb, "after removing the ACL");
}

// ---------------------------------------------------------------------------------------------
// concurrent writers and readers
// ---------------------------------------------------------------------------------------------

/// How long each concurrent test runs.
const RUN_FOR: Duration = Duration::from_secs(3);
/// The unit the counter tests write and check.
const BLOCK: usize = 4096;
/// Where each counter file holds a block: its first page, and a page in its second chunk.
const OFFSETS: [u64; 2] = [0, 5 * BLOCK as u64];

/// The stop flag and the first failure of a concurrent test.
#[derive(Default)]
struct Race {
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Race {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }

    fn fail(&self, msg: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(msg);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// A thread running `body` until the race stops; an error or panic fails the race.
    fn spawn(
        self: &Arc<Self>,
        name: String,
        body: impl FnOnce(&Race) -> Result<(), String> + Send + 'static,
    ) -> JoinHandle<()> {
        let race = self.clone();
        std::thread::spawn(move || {
            if let Err(e) = body(&race) {
                race.fail(format!("{name}: {e}"));
            }
        })
    }

    /// Lets the threads run for [`RUN_FOR`] (less if one fails), stops and joins them, and
    /// panics with the first failure.
    fn finish(self: &Arc<Self>, threads: Vec<JoinHandle<()>>) {
        let deadline = Instant::now() + RUN_FOR;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop.store(true, Ordering::SeqCst);
        for t in threads {
            if let Err(p) = t.join() {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.fail(format!("thread panicked: {msg}"));
            }
        }
        if let Some(m) = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            panic!("{m}");
        }
    }
}

/// A block of file `file` holding `counter`: the counter and the file id (u64 LE), then bytes
/// derived from both.
fn counter_block(file: u64, counter: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK + 8);
    b.extend_from_slice(&counter.to_le_bytes());
    b.extend_from_slice(&file.to_le_bytes());
    let mut x = (counter.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (file + 1).rotate_left(40)) | 1;
    while b.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.truncate(BLOCK);
    b
}

/// The counter of a block read back, if the block is whole and belongs to `file`.
fn check_block(file: u64, got: &[u8]) -> Result<u64, String> {
    if got.len() != BLOCK {
        return Err(format!("short read: {} bytes, want {BLOCK}", got.len()));
    }
    let counter = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
    let id = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes"));
    if id != file {
        return Err(format!(
            "garbage: block says file {id} (counter {counter}), want file {file}"
        ));
    }
    let want = counter_block(file, counter);
    match first_diff(got, &want) {
        None => Ok(counter),
        Some(i) => Err(format!(
            "torn or garbage block: header says counter {counter}, byte {i} differs"
        )),
    }
}

/// Read exactly `buf.len()` bytes at `off` (fewer only at EOF); returns the count.
fn pread_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Directions of a concurrent test: (writer mount, reader mount, tag). A to B always; B to A
/// as well when B is read-write (at the same time).
fn directions(m: &Two, b_read_only: bool) -> Vec<(PathBuf, PathBuf, &'static str)> {
    let mut v = vec![(m.a.clone(), m.b.clone(), "a2b")];
    if !b_read_only {
        v.push((m.b.clone(), m.a.clone(), "b2a"));
    }
    v
}

both!(
    concurrent_counter_writes_are_never_stale_or_torn_on_the_other_mount,
    concurrent_creates_are_found_by_the_other_mounts_lookups,
);

/// Writer threads pwrite increasing counters through one mount and publish each counter once
/// its pwrites returned; reader threads on the other mount must then read that counter or a
/// later one, in whole blocks, through descriptors opened before and through fresh ones.
fn concurrent_counter_writes_are_never_stale_or_torn_on_the_other_mount(b_read_only: bool) {
    const FILES: u64 = 2;
    const READERS: usize = 2;
    let m = two(b_read_only);
    let race = Arc::new(Race::default());
    let mut threads = Vec::new();
    let mut counts = Vec::new();
    for (d, (w, r, tag)) in directions(&m, b_read_only).into_iter().enumerate() {
        let files: Arc<Vec<(u64, PathBuf, PathBuf)>> = Arc::new(
            (0..FILES)
                .map(|i| {
                    let id = d as u64 * FILES + i;
                    let name = format!("{tag}-{i}");
                    (id, w.join(&name), r.join(&name))
                })
                .collect(),
        );
        for (id, wp, _) in files.iter() {
            let f = File::create(wp).unwrap();
            for off in OFFSETS {
                f.write_all_at(&counter_block(*id, 0), off).unwrap();
            }
        }
        let published: Arc<Vec<AtomicU64>> =
            Arc::new((0..FILES).map(|_| AtomicU64::new(0)).collect());
        let writes = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        counts.push((tag, writes.clone(), reads.clone()));
        for i in 0..FILES as usize {
            let (files, published, writes) = (files.clone(), published.clone(), writes.clone());
            threads.push(race.spawn(format!("writer {tag}-{i}"), move |race| {
                let (id, wp, _) = &files[i];
                let f = OpenOptions::new()
                    .write(true)
                    .open(wp)
                    .map_err(|e| format!("open {}: {e}", wp.display()))?;
                let mut c = 0;
                while race.running() {
                    c += 1;
                    let block = counter_block(*id, c);
                    for off in OFFSETS {
                        f.write_all_at(&block, off)
                            .map_err(|e| format!("pwrite {} at {off}: {e}", wp.display()))?;
                    }
                    published[i].store(c, Ordering::SeqCst);
                }
                writes.fetch_add(c, Ordering::Relaxed);
                Ok(())
            }));
        }
        for k in 0..READERS {
            let (files, published, reads) = (files.clone(), published.clone(), reads.clone());
            threads.push(race.spawn(format!("reader {tag} #{k}"), move |race| {
                let open =
                    |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
                let kept: Vec<File> = files
                    .iter()
                    .map(|(_, _, rp)| open(rp))
                    .collect::<Result<_, _>>()?;
                let mut buf = vec![0u8; BLOCK];
                let mut n = 0u64;
                while race.running() {
                    for (i, (id, _, rp)) in files.iter().enumerate() {
                        let v = published[i].load(Ordering::SeqCst);
                        let fresh;
                        let (f, how) = if n % 2 == 0 {
                            (&kept[i], "fd opened at the start")
                        } else {
                            fresh = open(rp)?;
                            (&fresh, "fresh fd")
                        };
                        for off in OFFSETS {
                            let got = pread_full(f, &mut buf, off)
                                .map_err(|e| format!("pread {} at {off}: {e}", rp.display()))?;
                            let c = check_block(*id, &buf[..got])
                                .map_err(|e| format!("{} at {off} ({how}): {e}", rp.display()))?;
                            if c < v {
                                return Err(format!(
                                    "stale read of {} at {off} ({how}): counter {c}, but \
                                     {v} was written through the other mount before",
                                    rp.display()
                                ));
                            }
                        }
                    }
                    n += 1;
                }
                reads.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }));
        }
    }
    race.finish(threads);
    for (tag, writes, reads) in counts {
        let (w, r) = (
            writes.load(Ordering::Relaxed),
            reads.load(Ordering::Relaxed),
        );
        assert!(
            w >= 10 && r >= 10,
            "{tag}: only {w} writes and {r} reads ran"
        );
    }
}

/// A writer thread creates `f1`, `f2`, ... (each holding its number) through one mount and
/// publishes each number once the file is closed; readers on the other mount must find that
/// name, read its contents and list it, while also looking up the next, not yet created name
/// (a failed lookup the next create must override).
fn concurrent_creates_are_found_by_the_other_mounts_lookups(b_read_only: bool) {
    const READERS: usize = 2;
    let m = two(b_read_only);
    let race = Arc::new(Race::default());
    let mut threads = Vec::new();
    let mut counts = Vec::new();
    for (w, r, tag) in directions(&m, b_read_only) {
        fs::create_dir(w.join(tag)).unwrap();
        let (wd, rd) = (w.join(tag), r.join(tag));
        let published = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        counts.push((tag, published.clone(), reads.clone()));
        let p2 = published.clone();
        threads.push(race.spawn(format!("creator {tag}"), move |race| {
            let mut i = 0;
            while race.running() {
                i += 1;
                let p = wd.join(format!("f{i}"));
                fs::write(&p, i.to_string()).map_err(|e| format!("create {}: {e}", p.display()))?;
                p2.store(i, Ordering::SeqCst);
            }
            Ok(())
        }));
        for k in 0..READERS {
            let (rd, published, reads) = (rd.clone(), published.clone(), reads.clone());
            threads.push(race.spawn(format!("looker {tag} #{k}"), move |race| {
                let mut n = 0u64;
                while race.running() {
                    let v = published.load(Ordering::SeqCst);
                    if v == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    let p = rd.join(format!("f{v}"));
                    nix::sys::stat::lstat(&p).map_err(|e| {
                        format!(
                            "lstat {}: {e}, but it was created through the other mount before",
                            p.display()
                        )
                    })?;
                    let got = fs::read(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
                    if got != v.to_string().as_bytes() {
                        return Err(format!(
                            "{} holds {:?}, want {v}",
                            p.display(),
                            String::from_utf8_lossy(&got)
                        ));
                    }
                    let _ = nix::sys::stat::lstat(&rd.join(format!("f{}", v + 1)));
                    if n % 64 == 0 {
                        let listed: BTreeSet<String> = fs::read_dir(&rd)
                            .map_err(|e| format!("readdir {}: {e}", rd.display()))?
                            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                            .collect::<Result<_, _>>()
                            .map_err(|e| format!("readdir {}: {e}", rd.display()))?;
                        if !listed.contains(&format!("f{v}")) || (listed.len() as u64) < v {
                            return Err(format!(
                                "readdir {} lists {} names and f{v} {}; f1..=f{v} were \
                                 created through the other mount before",
                                rd.display(),
                                listed.len(),
                                if listed.contains(&format!("f{v}")) {
                                    "is among them"
                                } else {
                                    "is not among them"
                                }
                            ));
                        }
                    }
                    n += 1;
                }
                reads.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }));
        }
    }
    race.finish(threads);
    for (tag, created, reads) in counts {
        let (c, r) = (
            created.load(Ordering::Relaxed),
            reads.load(Ordering::Relaxed),
        );
        assert!(
            c >= 10 && r >= 10,
            "{tag}: only {c} creates and {r} lookups ran"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// mounts added after another one cached things
// ---------------------------------------------------------------------------------------------

/// A caches everything while it is the only mount; then B is mounted and changes all of it.
#[test]
fn writes_through_a_later_mount_are_seen_by_a_mount_that_cached_first() {
    let mut tv = TestVolume::new();
    let a = tv.mnt().to_path_buf();
    let len = 3 * 4096 + 5;
    let mut want = pattern(len, 7);
    write_file(&a.join("f"), &want);
    fs::create_dir(a.join("d")).unwrap();
    write_file(&a.join("d/x"), b"x");
    write_file(&a.join("victim"), b"v");
    let ra = File::open(a.join("f")).unwrap();
    assert_bytes_eq(&read_at(&ra, 0, len + 10), &want, "A's first read");
    assert_eq!(perm(&a.join("f")), 0o644);
    assert_eq!(names(&a), ["d", "f", "victim"]);
    assert_eq!(names(&a.join("d")), ["x"]);
    assert_eq!(read(&a.join("victim")), b"v");
    gone(&a.join("new"), "A before B exists");
    assert_errno!(getxattr(&a.join("f"), "user.k"), ENODATA);

    let b = tv.mount_again(false);
    let page = pattern(4096, 8);
    open_rw(&b.join("f")).write_all_at(&page, 4096).unwrap();
    want[4096..8192].copy_from_slice(&page);
    assert_bytes_eq(
        &read_at(&ra, 0, len + 10),
        &want,
        "A's pread (fd opened before B existed) after B's pwrite",
    );
    assert_bytes_eq(&read(&a.join("f")), &want, "A's read after B's pwrite");

    let more = pattern(1000, 9);
    open_append(&b.join("f")).write_all(&more).unwrap();
    want.extend_from_slice(&more);
    assert_eq!(
        fst(&ra).st_size as usize,
        want.len(),
        "A's fstat after B's append"
    );
    assert_eq!(
        st(&a.join("f")).st_size as usize,
        want.len(),
        "A's stat after B's append"
    );
    assert_bytes_eq(
        &read_at(&ra, 0, want.len() + 10),
        &want,
        "A's pread after B's append",
    );

    chmod(&b.join("f"), 0o600);
    assert_eq!(perm(&a.join("f")), 0o600, "A's mode after B's chmod");
    setxattr(&b.join("f"), "user.k", b"from b", 0).unwrap();
    assert_eq!(getxattr(&a.join("f"), "user.k").unwrap(), b"from b");
    same_attrs(&b.join("f"), &a.join("f"), "f after B's changes");

    write_file(&b.join("new"), b"new");
    assert_eq!(read(&a.join("new")), b"new", "A's read of a name B created");
    fs::remove_file(b.join("d/x")).unwrap();
    gone(&a.join("d/x"), "after B's unlink");
    assert!(names(&a.join("d")).is_empty(), "A still lists d/x");
    fs::rename(b.join("victim"), b.join("renamed")).unwrap();
    gone(&a.join("victim"), "after B's rename");
    assert_eq!(read(&a.join("renamed")), b"v");
    assert_eq!(names(&a), ["d", "f", "new", "renamed"]);
    same_attrs(&b, &a, "root after B's changes");
}

/// A (read-write) and then R (read-only) cache things; a third, read-write mount C comes
/// last and changes them: both earlier mounts see it.
#[test]
fn writes_through_a_third_mount_are_seen_by_earlier_rw_and_ro_mounts() {
    let mut tv = TestVolume::new();
    let a = tv.mnt().to_path_buf();
    let data = pattern(2 * 4096, 10);
    write_file(&a.join("f"), &data);
    let ra = File::open(a.join("f")).unwrap();
    assert_bytes_eq(&read_at(&ra, 0, 3 * 4096), &data, "A's first read");
    let r = tv.mount_again(true);
    let rr = File::open(r.join("f")).unwrap();
    assert_bytes_eq(&read_at(&rr, 0, 3 * 4096), &data, "R's first read");
    gone(&a.join("g"), "A before C exists");
    gone(&r.join("g"), "R before C exists");

    let c = tv.mount_again(false);
    let new = pattern(2 * 4096, 11);
    open_rw(&c.join("f")).write_all_at(&new, 0).unwrap();
    assert_bytes_eq(
        &read_at(&ra, 0, 3 * 4096),
        &new,
        "A's pread after C's pwrite",
    );
    assert_bytes_eq(
        &read_at(&rr, 0, 3 * 4096),
        &new,
        "R's pread after C's pwrite",
    );
    write_file(&c.join("g"), b"g");
    assert_eq!(read(&a.join("g")), b"g");
    assert_eq!(read(&r.join("g")), b"g");
    chmod(&c.join("f"), 0o600);
    assert_eq!(perm(&a.join("f")), 0o600);
    assert_eq!(perm(&r.join("f")), 0o600);
    same_attrs(&c.join("f"), &a.join("f"), "A's f after C's changes");
    same_attrs(&c.join("f"), &r.join("f"), "R's f after C's changes");
}

both!(writes_made_before_a_mount_are_seen_by_it);

/// A writes (through a descriptor it keeps open, so nothing forces its data out) and changes
/// attributes while it is alone; a mount made afterwards sees all of it at once.
fn writes_made_before_a_mount_are_seen_by_it(b_read_only: bool) {
    let mut tv = TestVolume::new();
    let a = tv.mnt().to_path_buf();
    let wa = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(a.join("f"))
        .unwrap();
    let mut want = pattern(3 * 4096 + 7, 12);
    wa.write_all_at(&want, 0).unwrap();
    wa.write_all_at(b"LATE", 100).unwrap();
    want[100..104].copy_from_slice(b"LATE");
    chmod(&a.join("f"), 0o640);
    setxattr(&a.join("f"), "user.k", b"v", 0).unwrap();

    let b = tv.mount_again(b_read_only);
    assert_bytes_eq(&read(&b.join("f")), &want, "the new mount's read");
    assert_eq!(st(&b.join("f")).st_size as usize, want.len());
    assert_eq!(perm(&b.join("f")), 0o640);
    assert_eq!(getxattr(&b.join("f"), "user.k").unwrap(), b"v");
    same_attrs(&a.join("f"), &b.join("f"), "f, as A left it");

    // And A's next writes through the same descriptor, now that B exists.
    let rb = File::open(b.join("f")).unwrap();
    wa.write_all_at(b"AFTER", 4096).unwrap();
    want[4096..4101].copy_from_slice(b"AFTER");
    wa.write_all_at(b"TAIL", want.len() as u64).unwrap();
    want.extend_from_slice(b"TAIL");
    assert_bytes_eq(
        &read_at(&rb, 0, want.len() + 10),
        &want,
        "B after A's later writes",
    );
    same_attrs(&a.join("f"), &b.join("f"), "f after A's later writes");
}

// ---------------------------------------------------------------------------------------------
// read-only mounts
// ---------------------------------------------------------------------------------------------

/// Everything observable about one entry (not atime).
#[derive(Debug, PartialEq, Eq)]
struct Node {
    attrs: Attrs,
    /// Contents of a regular file, target of a symlink.
    data: Option<Vec<u8>>,
    /// Extended attributes of a regular file or directory.
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Every entry under `root` (`""` is `root` itself), read through that mount.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let s = st(&p);
        let kind = s.st_mode & libc::S_IFMT;
        let data = match kind {
            libc::S_IFREG => Some(read(&p)),
            libc::S_IFLNK => Some(fs::read_link(&p).unwrap().into_os_string().into_vec()),
            _ => None,
        };
        let xattrs = if kind == libc::S_IFREG || kind == libc::S_IFDIR {
            listxattr(&p)
                .unwrap()
                .into_iter()
                .map(|n| {
                    let v = getxattr(&p, &n).unwrap();
                    (n, v)
                })
                .collect()
        } else {
            Vec::new()
        };
        if kind == libc::S_IFDIR {
            stack.extend(names(&p).into_iter().map(|n| rel.join(n)));
        }
        out.insert(
            rel,
            Node {
                attrs: attrs_of(&s),
                data,
                xattrs,
            },
        );
    }
    out
}

#[track_caller]
fn assert_tree(before: &BTreeMap<PathBuf, Node>, root: &Path, what: &str) {
    let now = snapshot(root);
    let keys: BTreeSet<&PathBuf> = before.keys().chain(now.keys()).collect();
    for k in keys {
        let (x, y) = (before.get(k), now.get(k));
        assert!(
            x == y,
            "after `{what}`, /{} as seen through {} changed:\nbefore: {x:?}\nnow:    {y:?}",
            k.display(),
            root.display()
        );
    }
}

/// A read-write mount `a` with some content and a read-only mount `r` of the same volume, with
/// the volume's state as both see it.
struct RoSetup {
    a: PathBuf,
    r: PathBuf,
    before: BTreeMap<PathBuf, Node>,
    _tv: TestVolume,
}

impl RoSetup {
    fn new() -> RoSetup {
        let mut tv = TestVolume::new();
        let a = tv.mnt().to_path_buf();
        write_file(&a.join("f"), b"read me");
        write_file(&a.join("big"), &pattern(10_000, 13));
        setxattr(&a.join("f"), "user.k", b"v", 0).unwrap();
        fs::create_dir_all(a.join("d/sub")).unwrap();
        fs::create_dir(a.join("d/full")).unwrap();
        write_file(&a.join("d/full/x"), b"x");
        write_file(&a.join("d/inner"), b"inner");
        symlink("f", a.join("l")).unwrap();
        nix::unistd::mkfifo(&a.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        mkdir_world_writable(&a.join("pub"));
        write_file(&a.join("pub/mine"), b"mine");
        chown(&a.join("pub/mine"), 1234, 1234);
        write_file(&a.join("pub/roots"), b"roots");
        chmod(&a.join("pub/roots"), 0o600);
        // Nothing of A's left to send later (times, dirty pages): the state is final.
        for p in ["f", "big", "d/full/x", "d/inner", "pub/mine", "pub/roots"] {
            File::open(a.join(p)).unwrap().sync_all().unwrap();
        }
        let r = tv.mount_again(true);
        let before = snapshot(&a);
        assert_tree(&before, &r, "mounting read-only (R must see what A sees)");
        RoSetup {
            a,
            r,
            before,
            _tv: tv,
        }
    }

    /// The volume is as it was, seen through both mounts.
    #[track_caller]
    fn unchanged(&self, what: &str) {
        assert_tree(&self.before, &self.a, what);
        assert_tree(&self.before, &self.r, what);
    }
}

/// `refused!(setup, call, ERRNO)`: `call` fails with exactly that errno and the volume is
/// unchanged afterwards.
macro_rules! refused {
    ($s:expr, $e:expr, $($err:ident)|+ $(,)?) => {{
        assert_errno!($e, $($err)|+);
        $s.unchanged(stringify!($e));
    }};
}

/// Extends `read_only_mount_refuses_every_change_with_erofs` (posix_persist): more variants of
/// each call (O_RDONLY|O_TRUNC, O_RDONLY|O_CREAT, O_TMPFILE, directories, symlinks without
/// following, descriptor-based calls, no-op changes, renames and links from or to the other
/// mount) and a check after every single refusal that nothing changed, seen from both mounts.
#[test]
fn read_only_mount_refusals_leave_the_volume_unchanged() {
    let s = RoSetup::new();
    let r = s.r.clone();
    let (f, d, l) = (r.join("f"), r.join("d"), r.join("l"));
    let t = TimeSpec::new(5, 5);
    let open = |o: &mut OpenOptions, p: &Path| o.open(p);

    // open
    refused!(s, open(OpenOptions::new().write(true), &f), EROFS);
    refused!(
        s,
        open(OpenOptions::new().read(true).write(true), &f),
        EROFS
    );
    refused!(s, open(OpenOptions::new().append(true), &f), EROFS);
    refused!(s, open(OpenOptions::new().write(true), &l), EROFS);
    refused!(
        s,
        open(
            OpenOptions::new().read(true).custom_flags(libc::O_TRUNC),
            &f
        ),
        EROFS
    );
    refused!(
        s,
        open(
            OpenOptions::new().write(true).truncate(true),
            &r.join("big")
        ),
        EROFS
    );
    refused!(
        s,
        open(
            OpenOptions::new().write(true).create(true).truncate(true),
            &f
        ),
        EROFS
    );
    refused!(
        s,
        open(
            OpenOptions::new().write(true).create(true).truncate(true),
            &r.join("new")
        ),
        EROFS
    );
    refused!(
        s,
        open(
            OpenOptions::new().read(true).custom_flags(libc::O_CREAT),
            &r.join("new")
        ),
        EROFS
    );
    refused!(
        s,
        open(
            OpenOptions::new().write(true).create_new(true),
            &d.join("new")
        ),
        EROFS
    );
    refused!(
        s,
        open(
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE),
            &d
        ),
        EROFS
    );

    // new names
    refused!(
        s,
        nix::unistd::mkfifo(&r.join("fifo2"), Mode::from_bits_truncate(0o644)),
        EROFS
    );
    refused!(
        s,
        nix::sys::stat::mknod(
            &d.join("reg"),
            SFlag::S_IFREG,
            Mode::from_bits_truncate(0o644),
            0
        ),
        EROFS
    );
    refused!(s, fs::create_dir(r.join("nd")), EROFS);
    refused!(s, fs::create_dir(d.join("sub/nd")), EROFS);
    refused!(s, symlink("f", d.join("sl")), EROFS);
    refused!(s, fs::hard_link(&f, d.join("hl")), EROFS);
    refused!(s, fs::hard_link(r.join("big"), r.join("hl")), EROFS);

    // removals
    refused!(s, fs::remove_file(&f), EROFS);
    refused!(s, fs::remove_file(&l), EROFS);
    refused!(s, fs::remove_file(r.join("fifo")), EROFS);
    refused!(s, fs::remove_file(d.join("full/x")), EROFS);
    refused!(s, fs::remove_dir(d.join("sub")), EROFS);
    refused!(s, fs::remove_dir(d.join("full")), EROFS);

    // renames within the read-only mount
    refused!(s, fs::rename(&f, r.join("g")), EROFS);
    refused!(s, fs::rename(&f, d.join("g")), EROFS);
    refused!(s, fs::rename(&f, r.join("big")), EROFS);
    refused!(s, fs::rename(d.join("sub"), r.join("sub2")), EROFS);
    refused!(s, fs::rename(d.join("full"), d.join("sub")), EROFS);
    refused!(
        s,
        nix::fcntl::renameat2(None, &f, None, &r.join("g"), RenameFlags::RENAME_NOREPLACE),
        EROFS
    );
    refused!(
        s,
        nix::fcntl::renameat2(
            None,
            &d.join("sub"),
            None,
            &d.join("full"),
            RenameFlags::RENAME_EXCHANGE
        ),
        EROFS
    );
    // Between the two mounts the kernel answers before volfs is asked: rename checks for two
    // mounts (EXDEV) first; link creates the new name first, which the read-only mount
    // refuses (EROFS), and checks for two mounts only then.
    refused!(s, fs::rename(s.a.join("f"), r.join("g")), EXDEV);
    refused!(s, fs::rename(s.a.join("f"), r.join("big")), EXDEV);
    refused!(s, fs::rename(&f, s.a.join("g")), EXDEV);
    refused!(s, fs::hard_link(s.a.join("f"), r.join("hl")), EROFS);
    refused!(s, fs::hard_link(&f, s.a.join("hl")), EXDEV);

    // attributes, by path
    let mode = |m: u32| Mode::from_bits_truncate(m);
    refused!(
        s,
        nix::sys::stat::fchmodat(None, &d, mode(0o700), FchmodatFlags::FollowSymlink),
        EROFS
    );
    refused!(
        s,
        nix::sys::stat::fchmodat(None, &f, mode(0o644), FchmodatFlags::FollowSymlink),
        EROFS
    );
    refused!(
        s,
        nix::unistd::chown(&f, Some(Uid::from_raw(0)), Some(Gid::from_raw(0))),
        EROFS
    );
    refused!(
        s,
        nix::unistd::fchownat(
            None,
            &l,
            Some(Uid::from_raw(7)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW
        ),
        EROFS
    );
    refused!(
        s,
        nix::unistd::chown(&d, None, Some(Gid::from_raw(7))),
        EROFS
    );
    refused!(
        s,
        nix::sys::stat::utimensat(None, &l, &t, &t, UtimensatFlags::NoFollowSymlink),
        EROFS
    );
    refused!(
        s,
        nix::sys::stat::utimensat(
            None,
            &d,
            &TimeSpec::UTIME_NOW,
            &TimeSpec::UTIME_OMIT,
            UtimensatFlags::FollowSymlink
        ),
        EROFS
    );
    refused!(s, nix::unistd::truncate(&r.join("big"), 0), EROFS);
    refused!(s, nix::unistd::truncate(&f, 1 << 20), EROFS);
    refused!(s, nix::unistd::truncate(&f, 7), EROFS);
    refused!(s, setxattr(&f, "user.k", b"v", libc::XATTR_REPLACE), EROFS);
    refused!(s, setxattr(&f, "user.n", b"v", libc::XATTR_CREATE), EROFS);
    refused!(s, setxattr(&d, "user.n", b"v", 0), EROFS);
    refused!(s, lsetxattr(&l, "trusted.n", b"v", 0), EROFS);
    refused!(
        s,
        setxattr(&d, "system.posix_acl_default", &acl_granting(7), 0),
        EROFS
    );
    refused!(s, removexattr(&f, "user.k"), EROFS);
    refused!(s, removexattr(&f, "user.missing"), EROFS);
    refused!(s, nix::unistd::access(&d, AccessFlags::W_OK), EROFS);

    // attributes and data, through a descriptor (the only kind a read-only mount hands out)
    let fd = File::open(&f).unwrap();
    let raw = fd.as_raw_fd();
    refused!(s, nix::sys::stat::fchmod(raw, mode(0o600)), EROFS);
    refused!(
        s,
        nix::unistd::fchown(raw, Some(Uid::from_raw(7)), None),
        EROFS
    );
    refused!(s, nix::sys::stat::futimens(raw, &t, &t), EROFS);
    refused!(s, fsetxattr(&fd, "user.n", b"v"), EROFS);
    refused!(s, fremovexattr(&fd, "user.k"), EROFS);
    // Not open for writing: the kernel answers before volfs is asked (EBADF for write, EINVAL
    // for ftruncate); fallocate's EBADF is covered in posix_persist.
    refused!(s, fd.write_at(b"x", 0), EBADF);
    refused!(s, nix::unistd::ftruncate(&fd, 0), EINVAL);
    drop(fd);

    // Reads still work, and the read-write mount still writes.
    assert_eq!(read(&f), b"read me");
    assert_eq!(read(&l), b"read me");
    assert_eq!(getxattr(&f, "user.k").unwrap(), b"v");
    write_file(&s.a.join("f"), b"changed via A");
    assert_eq!(read(&f), b"changed via A", "R's read after A's write");
}

/// EROFS, not EACCES or EPERM, for an unprivileged owner and for a user who would be refused
/// for lack of permission anyway; reads keep their permission checks.
#[test]
fn read_only_mount_refuses_owners_and_other_users_with_erofs() {
    let s = RoSetup::new();
    let p = s.r.join("pub");
    run_as(1234, 1234, || {
        let (mine, roots) = (p.join("mine"), p.join("roots"));
        let t = TimeSpec::new(9, 9);
        assert_eq!(fs::read(&mine).unwrap(), b"mine");
        assert_errno!(fs::read(&roots), EACCES);
        // The owner.
        assert_errno!(OpenOptions::new().write(true).open(&mine), EROFS);
        assert_errno!(
            nix::sys::stat::fchmodat(
                None,
                &mine,
                Mode::from_bits_truncate(0o600),
                FchmodatFlags::FollowSymlink
            ),
            EROFS
        );
        assert_errno!(
            nix::unistd::chown(&mine, Some(Uid::from_raw(1234)), Some(Gid::from_raw(1234))),
            EROFS
        );
        assert_errno!(
            nix::sys::stat::utimensat(None, &mine, &t, &t, UtimensatFlags::FollowSymlink),
            EROFS
        );
        assert_errno!(nix::unistd::truncate(&mine, 0), EROFS);
        assert_errno!(setxattr(&mine, "user.k", b"v", 0), EROFS);
        assert_errno!(fs::rename(&mine, p.join("x")), EROFS);
        assert_errno!(fs::remove_file(&mine), EROFS);
        assert_errno!(fs::hard_link(&mine, p.join("hl")), EROFS);
        // New names in a world-writable directory.
        assert_errno!(fs::write(p.join("new"), b"n"), EROFS);
        assert_errno!(fs::create_dir(p.join("nd")), EROFS);
        assert_errno!(symlink("mine", p.join("sl")), EROFS);
        assert_errno!(
            nix::unistd::mkfifo(&p.join("ff"), Mode::from_bits_truncate(0o644)),
            EROFS
        );
        // Someone else's file: EROFS comes before the permission check.
        assert_errno!(OpenOptions::new().write(true).open(&roots), EROFS);
        assert_errno!(
            nix::sys::stat::fchmodat(
                None,
                &roots,
                Mode::from_bits_truncate(0o666),
                FchmodatFlags::FollowSymlink
            ),
            EROFS
        );
        assert_errno!(
            nix::sys::stat::utimensat(
                None,
                &roots,
                &TimeSpec::UTIME_NOW,
                &TimeSpec::UTIME_NOW,
                UtimensatFlags::FollowSymlink
            ),
            EROFS
        );
        assert_errno!(fs::remove_file(&roots), EROFS);
    });
    s.unchanged("the refused calls of uid 1234");
}

/// Read-write, read-only, read-write: the middle mount's flag touches neither neighbour.
#[test]
fn read_only_flag_belongs_to_one_mount_not_to_the_volume() {
    let mut tv = TestVolume::new();
    let a = tv.mnt().to_path_buf();
    write_file(&a.join("f"), b"f");
    let r = tv.mount_again(true);
    let c = tv.mount_again(false);
    let rdonly = |p: &Path| {
        nix::sys::statvfs::statvfs(p)
            .unwrap()
            .flags()
            .contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
    };
    assert_eq!((rdonly(&a), rdonly(&r), rdonly(&c)), (false, true, false));
    let ls = tv.daemon().cli_ok(&["ls"]);
    let ro_marked = |p: &Path| ls.contains(&format!("{} (ro)", p.display()));
    assert_eq!(
        (ro_marked(&a), ro_marked(&r), ro_marked(&c)),
        (false, true, false),
        "`volfs ls`: {ls}"
    );

    // Both read-write mounts write; the read-only one refuses, and sees the new names.
    write_file(&a.join("from_a"), b"a");
    write_file(&c.join("from_c"), b"c");
    fs::rename(a.join("from_a"), a.join("a2")).unwrap();
    assert_errno!(fs::write(r.join("from_r"), b"r"), EROFS);
    assert_errno!(fs::remove_file(r.join("f")), EROFS);
    for m in [&a, &r, &c] {
        let what = format!("through {}", m.display());
        assert_eq!(names(m), ["a2", "f", "from_c"], "names {what}");
        assert_eq!(read(&m.join("a2")), b"a", "a2 {what}");
        assert_eq!(read(&m.join("from_c")), b"c", "from_c {what}");
        assert_eq!(read(&m.join("f")), b"f", "f {what}");
    }

    // Without the read-only mount the others go on as before; another read-only mount
    // refuses again.
    tv.daemon().umount(&r);
    fs::remove_file(c.join("a2")).unwrap();
    write_file(&a.join("later"), b"l");
    gone(&c.join("a2"), "C after its unlink");
    assert_eq!(read(&c.join("later")), b"l");
    let r2 = tv.mount_again(true);
    assert_errno!(fs::remove_file(r2.join("later")), EROFS);
    assert_eq!(read(&r2.join("later")), b"l");
    fs::remove_file(a.join("later")).unwrap();
    gone(&r2.join("later"), "R2 after A's unlink");

    // Last (the coherence tests above cover this in detail): a change to a file every mount
    // has read reaches all of them.
    assert_eq!(read(&r2.join("f")), b"f");
    open_append(&c.join("f")).write_all(b"+c").unwrap();
    chmod(&c.join("f"), 0o600);
    for m in [&a, &r2, &c] {
        let what = format!("through {}", m.display());
        assert_eq!(read(&m.join("f")), b"f+c", "f after C's append, {what}");
        assert_eq!(perm(&m.join("f")), 0o600, "f after C's chmod, {what}");
    }
}
