//! Persistence and mount-level behaviour through real volfs mounts: a whole tree (contents,
//! modes, owners, times, xattrs, ACLs, symlinks, hard links, special files) survives a daemon
//! restart (the mounts kept by the keeper, and mounted afresh after a shutdown); open-unlinked
//! files stay usable across a restart and are reclaimed at their last close, or at the restart
//! if their mount died; read-only mounts refuse every change with EROFS.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, symlink};
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, RenameFlags};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{AccessFlags, Gid, Uid};

use crate::posix::*;
use crate::util::*;

const MIB: usize = 1024 * 1024;

/// Everything observable about one entry, except file contents.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: i64,
    nlink: u64,
    ino: u64,
    rdev: u64,
    atime: (i64, i64),
    mtime: (i64, i64),
    ctime: (i64, i64),
    link: Option<Vec<u8>>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Metadata of every entry below `root` (relative path -> Meta), without reading contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Meta> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let s = st(&p);
        let ty = s.st_mode & libc::S_IFMT;
        let link = (ty == libc::S_IFLNK)
            .then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec());
        let xattrs = if ty == libc::S_IFLNK {
            Vec::new()
        } else {
            listxattr(&p)
                .unwrap()
                .into_iter()
                .map(|n| {
                    let v = getxattr(&p, &n).unwrap();
                    (n, v)
                })
                .collect()
        };
        if ty == libc::S_IFDIR {
            for n in names(&p) {
                stack.push(rel.join(n));
            }
        }
        out.insert(
            rel,
            Meta {
                mode: s.st_mode,
                uid: s.st_uid,
                gid: s.st_gid,
                size: s.st_size,
                nlink: s.st_nlink,
                ino: s.st_ino,
                rdev: s.st_rdev,
                atime: (s.st_atime, s.st_atime_nsec),
                mtime: (s.st_mtime, s.st_mtime_nsec),
                ctime: (s.st_ctime, s.st_ctime_nsec),
                link,
                xattrs,
            },
        );
    }
    out
}

/// Build a tree with every kind of entry and attribute; returns (relative path, contents) of
/// every regular file.
fn build_tree(m: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut add = |rel: &str, data: Vec<u8>| {
        write_file(&m.join(rel), &data);
        files.push((PathBuf::from(rel), data));
    };
    fs::create_dir_all(m.join("a/b/c")).unwrap();
    fs::create_dir(m.join("empty_dir")).unwrap();
    add("a/small", b"small file\n".to_vec());
    add("a/b/big", pattern(3 * MIB + 4321, 40));
    add("a/b/c/empty", Vec::new());
    add("setuid", b"#!/bin/sh\n".to_vec());
    add("name with spaces", b"odd".to_vec());
    // A sparse file: data at 2 MiB, size 5 MiB.
    let sparse = m.join("a/sparse");
    let f = File::create(&sparse).unwrap();
    f.write_all_at(b"island", 2 * MIB as u64).unwrap();
    f.set_len(5 * MIB as u64).unwrap();
    drop(f);
    let mut sp = vec![0u8; 5 * MIB];
    sp[2 * MIB..2 * MIB + 6].copy_from_slice(b"island");
    files.push((PathBuf::from("a/sparse"), sp));
    fs::hard_link(m.join("a/small"), m.join("a/b/hardlink")).unwrap();
    fs::hard_link(m.join("a/small"), m.join("hardlink2")).unwrap();
    files.push((PathBuf::from("a/b/hardlink"), b"small file\n".to_vec()));
    symlink("b/big", m.join("a/rel_link")).unwrap();
    symlink("/absolute/dangling target", m.join("dangling")).unwrap();
    nix::unistd::mkfifo(&m.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
    nix::sys::stat::mknod(
        &m.join("chardev"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        libc::makedev(10, 229),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &m.join("blockdev"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o640),
        libc::makedev(259, 70_000),
    )
    .unwrap();
    // Owners and modes.
    lchown(&m.join("a/b"), 1000, 1001);
    chmod(&m.join("a/b"), 0o2750);
    lchown(&m.join("a/b/big"), 1000, 1001);
    chmod(&m.join("a/b/big"), 0o640);
    chmod(&m.join("setuid"), 0o4755);
    chmod(&m.join("empty_dir"), 0o1777);
    lchown(&m.join("dangling"), 33, 44);
    // xattrs and ACLs.
    setxattr(&m.join("a/small"), "user.mime", b"text/plain", 0).unwrap();
    setxattr(&m.join("a/small"), "trusted.x", &pattern(300, 41), 0).unwrap();
    setxattr(&m.join("a/b"), "security.label", b"system_u:object_r", 0).unwrap();
    setxattr(&m.join("fifo"), "trusted.on_fifo", b"", 0).unwrap();
    run_ok(
        "setfacl",
        &[
            OsStr::new("-m"),
            OsStr::new("u:1234:r"),
            m.join("a/b/big").as_os_str(),
        ],
    );
    run_ok(
        "setfacl",
        &[
            OsStr::new("-d"),
            OsStr::new("-m"),
            OsStr::new("g:55:rx"),
            m.join("a/b/c").as_os_str(),
        ],
    );
    // Explicit times last (setting times changes only the entry's own ctime). Access times lie
    // in the future so that relatime never updates them when the snapshot reads directories.
    let future = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 10 * 86_400;
    let mut i = 0;
    for e in snapshot(m).keys() {
        i += 1;
        let a = TimeSpec::new(future + i, 100 + i);
        let mt = TimeSpec::new(1_400_000_000 + i, 999_999_000 + i);
        nix::sys::stat::utimensat(None, &m.join(e), &a, &mt, UtimensatFlags::NoFollowSymlink)
            .unwrap();
    }
    files
}

fn check_contents(m: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for (rel, data) in files {
        assert_bytes_eq(
            &fs::read(m.join(rel)).unwrap(),
            data,
            &format!("contents of {rel:?}"),
        );
    }
    assert_eq!(
        fs::read(m.join("a/rel_link")).unwrap().len(),
        3 * MIB + 4321
    );
}

#[test]
fn tree_survives_a_clean_restart_identically() {
    let mut tv = TestVolume::new();
    // A mount whose daemon never comes back makes accesses wait: fail instead of hanging.
    tv.daemon().set_watchdog(std::time::Duration::from_secs(90));
    let files = build_tree(tv.mnt());
    let before = snapshot(tv.mnt());
    assert!(before.len() >= 18, "tree too small: {:?}", before.keys());
    tv.restart();
    let after = snapshot(tv.mnt());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "set of names after restart"
    );
    for (k, b) in &before {
        assert_eq!(&after[k], b, "metadata of {k:?} after restart");
    }
    check_contents(tv.mnt(), &files);
    // And the volume is fully usable afterwards.
    write_file(&tv.path("a/after_restart"), b"ok");
    fs::remove_file(tv.path("hardlink2")).unwrap();
    assert_eq!(st(&tv.path("a/small")).st_nlink, 2);
}

/// A clean restart (the mount kept), then `volfs shutdown` and start (mounted afresh from the
/// table: everything now comes from the store), then `volfs umount` and `volfs mount`.
#[test]
fn tree_survives_two_restarts_and_a_remount() {
    let mut tv = TestVolume::new();
    // A mount whose daemon never comes back makes accesses wait: fail instead of hanging.
    tv.daemon().set_watchdog(std::time::Duration::from_secs(90));
    let files = build_tree(tv.mnt());
    let before = snapshot(tv.mnt());
    tv.restart();
    tv.shutdown_and_restart();
    assert_eq!(
        snapshot(tv.mnt()),
        before,
        "tree after a restart and a shutdown and start"
    );
    let mnt = tv.mnt().to_path_buf();
    tv.daemon().umount(&mnt);
    assert!(!is_mounted(&mnt), "still mounted after `volfs umount`");
    tv.daemon().mount(VOLUME, &mnt, false);
    assert_eq!(
        snapshot(tv.mnt()),
        before,
        "tree after two restarts and a remount"
    );
    check_contents(tv.mnt(), &files);
}

fn used_bytes_and_inodes(p: &Path) -> (u64, u64) {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    let used = (s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64;
    (used, (s.files() - s.files_free()) as u64)
}

#[test]
fn closing_an_unlinked_file_frees_its_space() {
    let tv = TestVolume::new();
    write_file(&tv.path("keeper"), b"k");
    let (used0, inodes0) = used_bytes_and_inodes(tv.mnt());
    let mut f = File::create(tv.path("big")).unwrap();
    f.write_all(&pattern(8 * MIB, 42)).unwrap();
    f.sync_all().unwrap();
    let (used1, inodes1) = used_bytes_and_inodes(tv.mnt());
    assert!(
        used1 >= used0 + 8 * MIB as u64,
        "used bytes {used0} -> {used1} after 8 MiB"
    );
    assert_eq!(inodes1, inodes0 + 1, "used inodes after one create");
    fs::remove_file(tv.path("big")).unwrap();
    let (used2, _) = used_bytes_and_inodes(tv.mnt());
    assert!(
        used2 >= used0 + 8 * MIB as u64,
        "space freed while the file is still open"
    );
    drop(f);
    // Release is asynchronous in FUSE: poll briefly.
    let t0 = std::time::Instant::now();
    loop {
        let (used3, inodes3) = used_bytes_and_inodes(tv.mnt());
        if used3 <= used0 && inodes3 == inodes0 {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 10,
            "after the last close: used {used3} (was {used0}), inodes {inodes3} (was {inodes0})"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How the daemon goes away in [`open_unlinked_across_a_restart`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Down {
    /// SIGTERM: the mount stays.
    Sigterm,
    /// kill -9 of the daemon: the keeper keeps the mount.
    Kill9,
    /// kill -9 of the daemon and its keeper: the mount dies.
    Kill9All,
}

fn open_unlinked_across_a_restart(down: Down) {
    let mut tv = TestVolume::new();
    // A mount whose daemon never comes back makes accesses wait: fail instead of hanging.
    tv.daemon().set_watchdog(std::time::Duration::from_secs(90));
    fs::create_dir(tv.path("d")).unwrap();
    write_file(&tv.path("d/keeper"), b"keep me");
    let (used0, inodes0) = used_bytes_and_inodes(tv.mnt());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(tv.path("d/ghost"))
        .unwrap();
    let mut want = pattern(8 * MIB, 43);
    f.write_all(&want).unwrap();
    f.sync_all().unwrap();
    fs::remove_file(tv.path("d/ghost")).unwrap();
    f.write_all(b"still open").unwrap();
    want.extend_from_slice(b"still open");
    f.sync_all().unwrap();
    let (used1, _) = used_bytes_and_inodes(tv.mnt());
    assert!(
        used1 >= used0 + 8 * MIB as u64,
        "used bytes {used0} -> {used1}"
    );
    match down {
        Down::Sigterm => tv.restart(),
        Down::Kill9 => tv.kill_and_restart(),
        Down::Kill9All => tv.kill_all_and_restart(),
    }
    assert_eq!(names(tv.mnt()), vec![OsString::from("d")]);
    assert_eq!(names(&tv.path("d")), vec![OsString::from("keeper")]);
    assert_eq!(fs::read(tv.path("d/keeper")).unwrap(), b"keep me");
    assert_errno!(nix::sys::stat::lstat(&tv.path("d/ghost")), ENOENT);
    if down == Down::Kill9All {
        // Its mount died with the keeper: the file is closed for good, and the new daemon
        // reclaimed it when it started.
        drop(f); // closing must not disturb the new daemon
        let (used2, inodes2) = used_bytes_and_inodes(tv.mnt());
        assert!(
            used2 <= used0,
            "open-unlinked file of a dead mount not reclaimed after restart: used bytes \
             {used0} before, {used2} after"
        );
        assert_eq!(inodes2, inodes0, "used inodes after restart");
    } else {
        // The mount lived on: the open file still works, with all its bytes (read from the
        // new daemon, not the page cache), and is only reclaimed at its last close.
        nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, 0)
            .unwrap_or_else(|e| panic!("{down:?}: reading the open-unlinked file: {e}"));
        assert!(
            got == want,
            "{down:?}: the open-unlinked file's bytes differ after the restart"
        );
        f.write_all_at(b"and more", want.len() as u64)
            .unwrap_or_else(|e| panic!("{down:?}: writing the open-unlinked file: {e}"));
        f.sync_all().unwrap();
        let (used2, _) = used_bytes_and_inodes(tv.mnt());
        assert!(
            used2 >= used0 + 8 * MIB as u64,
            "{down:?}: the open-unlinked file was reclaimed while still open ({used0} -> {used2})"
        );
        drop(f);
        // Release is asynchronous in FUSE: poll briefly.
        let t0 = std::time::Instant::now();
        loop {
            let (used3, inodes3) = used_bytes_and_inodes(tv.mnt());
            if used3 <= used0 && inodes3 == inodes0 {
                break;
            }
            assert!(
                t0.elapsed().as_secs() < 10,
                "{down:?}: after the last close: used {used3} (was {used0}), inodes {inodes3} \
                 (was {inodes0})"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    // The name can be reused.
    write_file(&tv.path("d/ghost"), b"new");
    assert_eq!(fs::read(tv.path("d/ghost")).unwrap(), b"new");
}

#[test]
fn open_unlinked_file_survives_a_kill9_restart_and_is_reclaimed_at_close() {
    open_unlinked_across_a_restart(Down::Kill9);
}

#[test]
fn open_unlinked_file_survives_a_clean_restart_and_is_reclaimed_at_close() {
    open_unlinked_across_a_restart(Down::Sigterm);
}

#[test]
fn open_unlinked_file_of_a_dead_mount_is_reclaimed_at_restart() {
    open_unlinked_across_a_restart(Down::Kill9All);
}

#[test]
fn mount_is_listed_as_fuse_volfs() {
    let tv = TestVolume::new();
    assert_eq!(
        mount_fstype(tv.mnt()).as_deref(),
        Some("fuse.volfs"),
        "fstype in mountinfo"
    );
    let out = tv.daemon().cli_ok(&["ls"]);
    assert!(
        out.contains(VOLUME),
        "`volfs ls` does not list the volume: {out}"
    );
    assert!(
        out.contains(tv.mnt().to_str().unwrap()),
        "`volfs ls` does not list the mount point: {out}"
    );
}

// ---------------------------------------------------------------------------------------------
// read-only mounts
// ---------------------------------------------------------------------------------------------

/// A volume with some content, plus a second, read-only mount of it; returns that mount point.
fn ro_setup(tv: &mut TestVolume) -> PathBuf {
    fs::create_dir_all(tv.path("d/sub")).unwrap();
    write_file(&tv.path("f"), b"read me");
    write_file(&tv.path("d/inner"), b"inner");
    symlink("f", tv.path("l")).unwrap();
    setxattr(&tv.path("f"), "user.k", b"v", 0).unwrap();
    tv.mount_again(true)
}

#[test]
fn read_only_mount_serves_reads() {
    let mut tv = TestVolume::new();
    let r = ro_setup(&mut tv);
    assert_eq!(fs::read(r.join("f")).unwrap(), b"read me");
    assert_eq!(fs::read(r.join("d/inner")).unwrap(), b"inner");
    assert_eq!(fs::read(r.join("l")).unwrap(), b"read me");
    assert_eq!(fs::read_link(r.join("l")).unwrap(), Path::new("f"));
    assert_eq!(names(&r), names(tv.mnt()));
    assert_eq!(getxattr(&r.join("f"), "user.k").unwrap(), b"v");
    assert_eq!(st(&r.join("f")).st_ino, st(&tv.path("f")).st_ino);
    // The read-write mount still writes; new names show up in the read-only one.
    write_file(&tv.path("later"), b"later");
    assert_eq!(fs::read(r.join("later")).unwrap(), b"later");
}

#[test]
fn read_only_mount_refuses_every_change_with_erofs() {
    let mut tv = TestVolume::new();
    let r = ro_setup(&mut tv);
    let f = r.join("f");
    let t = TimeSpec::new(5, 5);
    assert_errno!(OpenOptions::new().write(true).open(&f), EROFS);
    assert_errno!(OpenOptions::new().read(true).write(true).open(&f), EROFS);
    assert_errno!(OpenOptions::new().append(true).open(&f), EROFS);
    assert_errno!(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(r.join("new")),
        EROFS
    );
    assert_errno!(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(r.join("new")),
        EROFS
    );
    assert_errno!(
        OpenOptions::new().write(true).truncate(true).open(&f),
        EROFS
    );
    assert_errno!(fs::create_dir(r.join("newdir")), EROFS);
    assert_errno!(fs::remove_file(&f), EROFS);
    assert_errno!(fs::remove_dir(r.join("d/sub")), EROFS);
    assert_errno!(fs::rename(&f, r.join("g")), EROFS);
    assert_errno!(fs::rename(r.join("d/inner"), r.join("d/sub/inner")), EROFS);
    assert_errno!(
        nix::fcntl::renameat2(None, &f, None, &r.join("l"), RenameFlags::RENAME_EXCHANGE),
        EROFS
    );
    assert_errno!(
        nix::sys::stat::fchmodat(
            None,
            &f,
            Mode::from_bits_truncate(0o777),
            FchmodatFlags::FollowSymlink
        ),
        EROFS
    );
    assert_errno!(nix::unistd::chown(&f, Some(Uid::from_raw(5)), None), EROFS);
    assert_errno!(nix::unistd::chown(&f, None, Some(Gid::from_raw(5))), EROFS);
    assert_errno!(
        nix::sys::stat::utimensat(None, &f, &t, &t, UtimensatFlags::FollowSymlink),
        EROFS
    );
    assert_errno!(
        nix::sys::stat::utimensat(
            None,
            &f,
            &TimeSpec::UTIME_NOW,
            &TimeSpec::UTIME_NOW,
            UtimensatFlags::FollowSymlink
        ),
        EROFS
    );
    assert_errno!(nix::unistd::truncate(&f, 0), EROFS);
    assert_errno!(setxattr(&f, "user.new", b"1", 0), EROFS);
    assert_errno!(setxattr(&f, "user.k", b"2", 0), EROFS);
    assert_errno!(removexattr(&f, "user.k"), EROFS);
    assert_errno!(
        setxattr(&f, "system.posix_acl_access", &acl_xattr_user_rwx(1234), 0),
        EROFS
    );
    assert_errno!(symlink("x", r.join("newlink")), EROFS);
    assert_errno!(fs::hard_link(&f, r.join("newlink")), EROFS);
    assert_errno!(
        nix::sys::stat::mknod(
            &r.join("dev"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            libc::makedev(1, 3)
        ),
        EROFS
    );
    assert_errno!(
        nix::unistd::mkfifo(&r.join("fifo"), Mode::from_bits_truncate(0o600)),
        EROFS
    );
    assert_errno!(
        std::os::unix::net::UnixListener::bind(r.join("sock")),
        EROFS
    );
    // fallocate needs a writable descriptor, which a read-only mount never hands out.
    let ro = File::open(&f).unwrap();
    assert_errno!(
        nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&ro),
            FallocateFlags::empty(),
            0,
            4096
        ),
        EBADF
    );
    // Nothing changed, as seen through the read-write mount.
    assert_eq!(fs::read(tv.path("f")).unwrap(), b"read me");
    assert_eq!(perm(&tv.path("f")), 0o644);
    assert_eq!(getxattr(&tv.path("f"), "user.k").unwrap(), b"v");
    assert_eq!(
        names(tv.mnt()),
        [OsString::from("d"), "f".into(), "l".into()]
    );
}

#[test]
fn read_only_mount_is_read_only_for_the_kernel() {
    let mut tv = TestVolume::new();
    let r = ro_setup(&mut tv);
    let s = nix::sys::statvfs::statvfs(&r).unwrap();
    assert!(
        s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        "statvfs of a --read-only mount lacks ST_RDONLY: {:?}",
        s.flags()
    );
    assert_errno!(nix::unistd::access(&r.join("f"), AccessFlags::W_OK), EROFS);
    let w = nix::sys::statvfs::statvfs(tv.mnt()).unwrap();
    assert!(
        !w.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        "rw mount is ST_RDONLY"
    );
    nix::unistd::access(&tv.path("f"), AccessFlags::W_OK).unwrap();
}

/// The `system.posix_acl_access` xattr value for `u::rw-,u:UID:rwx,g::r--,m::rwx,o::r--`.
fn acl_xattr_user_rwx(uid: u32) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec(); // POSIX_ACL_XATTR_VERSION
    let mut e = |tag: u16, perm: u16, id: u32| {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    };
    e(0x01, 6, u32::MAX); // ACL_USER_OBJ
    e(0x02, 7, uid); // ACL_USER
    e(0x04, 4, u32::MAX); // ACL_GROUP_OBJ
    e(0x10, 7, u32::MAX); // ACL_MASK
    e(0x20, 4, u32::MAX); // ACL_OTHER
    v
}

#[test]
fn acl_set_as_raw_xattr_is_read_back_by_getfacl() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    setxattr(&p, "system.posix_acl_access", &acl_xattr_user_rwx(4321), 0).unwrap();
    let out = run_ok(
        "getfacl",
        &[
            OsStr::new("-n"),
            OsStr::new("--omit-header"),
            OsStr::new("-E"),
            p.as_os_str(),
        ],
    );
    assert_eq!(
        out,
        "user::rw-\nuser:4321:rwx\ngroup::r--\nmask::rwx\nother::r--\n\n"
    );
    assert_eq!(perm(&p), 0o674, "mode follows the ACL (group bits = mask)");
    assert_eq!(
        getxattr(&p, "system.posix_acl_access").unwrap(),
        acl_xattr_user_rwx(4321)
    );
}
