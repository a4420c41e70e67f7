//! POSIX attributes through a real volfs mount: permission bits and owners under
//! `default_permissions` (checked as non-root users via `run_as`), setuid/setgid clearing,
//! sticky and setgid directories, timestamps and utimensat, xattrs, POSIX ACLs.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{AccessFlags, Gid, Uid};

use crate::posix::*;
use crate::util::*;

const U1: u32 = 1000;
const U2: u32 = 2000;

fn chmod(p: &Path, mode: u32) {
    nix::sys::stat::fchmodat(
        None,
        p,
        Mode::from_bits_truncate(mode),
        FchmodatFlags::FollowSymlink,
    )
    .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, p.display()));
}

fn chown(p: &Path, uid: u32, gid: u32) {
    nix::unistd::chown(p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", p.display()));
}

fn times(p: &Path) -> [(i64, i64); 3] {
    let s = st(p);
    [
        (s.st_atime, s.st_atime_nsec),
        (s.st_mtime, s.st_mtime_nsec),
        (s.st_ctime, s.st_ctime_nsec),
    ]
}

fn now() -> (i64, i64) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (d.as_secs() as i64, d.subsec_nanos() as i64)
}

/// A named operation for the timestamp tests.
type Op<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn tick() {
    std::thread::sleep(Duration::from_millis(15));
}

// ---------------------------------------------------------------------------------------------
// permission bits and owners
// ---------------------------------------------------------------------------------------------

#[test]
fn new_files_are_owned_by_the_creating_uid_and_gid() {
    let tv = TestVolume::new();
    mkdir_world_writable(&tv.path("pub"));
    let pubd = tv.path("pub");
    run_as(U1, 1500, || {
        write_file(&pubd.join("f"), b"x");
        fs::create_dir(pubd.join("d")).unwrap();
        symlink("f", pubd.join("l")).unwrap();
        nix::unistd::mkfifo(&pubd.join("p"), Mode::from_bits_truncate(0o600)).unwrap();
    });
    for n in ["f", "d", "l", "p"] {
        let s = st(&pubd.join(n));
        assert_eq!(
            (s.st_uid, s.st_gid),
            (U1, 1500),
            "owner of {n} created by {U1}:1500"
        );
    }
    let s = st(tv.mnt());
    assert_eq!((s.st_uid, s.st_gid), (0, 0), "volume root owned by root");
}

#[test]
fn create_mode_is_masked_by_umask_without_default_acl() {
    let tv = TestVolume::new();
    let m = tv.mnt().to_path_buf();
    run_as(0, 0, || {
        nix::sys::stat::umask(Mode::from_bits_truncate(0o027));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(m.join("f"))
            .unwrap();
        fs::create_dir(m.join("d")).unwrap(); // std uses 0777
        nix::unistd::mkfifo(&m.join("p"), Mode::from_bits_truncate(0o666)).unwrap();
        nix::sys::stat::umask(Mode::empty());
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o7777)
            .open(m.join("all"))
            .unwrap();
        nix::unistd::mkdir(&m.join("dall"), Mode::from_bits_truncate(0o1777)).unwrap();
    });
    assert_eq!(perm(&tv.path("f")), 0o640, "file 0666 & ~027");
    assert_eq!(perm(&tv.path("d")), 0o750, "dir 0777 & ~027");
    assert_eq!(perm(&tv.path("p")), 0o640, "fifo 0666 & ~027");
    assert_eq!(perm(&tv.path("all")), 0o7777, "file 07777 with umask 0");
    assert_eq!(perm(&tv.path("dall")), 0o1777, "dir 01777 with umask 0");
}

#[test]
fn chmod_sets_exact_mode_bits_and_keeps_the_type() {
    let tv = TestVolume::new();
    write_file(&tv.path("f"), b"x");
    fs::create_dir(tv.path("d")).unwrap();
    for mode in [0o0, 0o7777, 0o4755, 0o2711, 0o1777, 0o644, 0o400, 0o070] {
        chmod(&tv.path("f"), mode);
        assert_eq!(perm(&tv.path("f")), mode, "file mode {mode:o}");
        assert_eq!(ftype(&tv.path("f")), libc::S_IFREG);
        chmod(&tv.path("d"), mode);
        assert_eq!(perm(&tv.path("d")), mode, "dir mode {mode:o}");
        assert_eq!(ftype(&tv.path("d")), libc::S_IFDIR);
    }
}

#[test]
fn permission_bits_are_enforced_for_non_root_users() {
    let tv = TestVolume::new();
    let m = tv.mnt().to_path_buf();
    write_file(&m.join("secret"), b"s");
    chmod(&m.join("secret"), 0o600);
    write_file(&m.join("readable"), b"r");
    chmod(&m.join("readable"), 0o644);
    write_file(&m.join("group_rw"), b"g");
    chown(&m.join("group_rw"), 0, 1500);
    chmod(&m.join("group_rw"), 0o660);
    fs::create_dir(m.join("closed")).unwrap();
    write_file(&m.join("closed/inner"), b"i");
    chmod(&m.join("closed/inner"), 0o666);
    chmod(&m.join("closed"), 0o700);
    fs::create_dir(m.join("ro_dir")).unwrap();
    chmod(&m.join("ro_dir"), 0o555);
    fs::create_dir(m.join("list_only")).unwrap();
    write_file(&m.join("list_only/x"), b"x");
    chmod(&m.join("list_only"), 0o744);
    run_as(U1, U1, || {
        assert_errno!(File::open(m.join("secret")), EACCES);
        assert_errno!(
            OpenOptions::new().write(true).open(m.join("secret")),
            EACCES
        );
        assert_eq!(fs::read(m.join("readable")).unwrap(), b"r");
        assert_errno!(
            OpenOptions::new().write(true).open(m.join("readable")),
            EACCES
        );
        assert_errno!(nix::unistd::truncate(&m.join("readable"), 0), EACCES);
        assert_errno!(File::open(m.join("group_rw")), EACCES);
        // No search (x) permission on a directory: no lookup inside it.
        assert_errno!(File::open(m.join("closed/inner")), EACCES);
        assert_errno!(nix::sys::stat::stat(&m.join("closed/inner")), EACCES);
        assert_errno!(fs::read_dir(m.join("closed")), EACCES);
        // No write permission on a directory: no create, unlink or rename in it.
        assert_errno!(File::create(m.join("ro_dir/new")), EACCES);
        assert_errno!(fs::create_dir(m.join("ro_dir/new")), EACCES);
        assert_errno!(fs::remove_file(m.join("readable")), EACCES); // root dir is 0755
        assert_errno!(fs::rename(m.join("readable"), m.join("ro_dir/x")), EACCES);
        // r without x: names can be listed but not looked up.
        assert_eq!(
            names(&m.join("list_only")),
            vec![std::ffi::OsString::from("x")]
        );
        assert_errno!(nix::sys::stat::stat(&m.join("list_only/x")), EACCES);
        assert_errno!(
            nix::unistd::access(&m.join("secret"), AccessFlags::R_OK),
            EACCES
        );
        nix::unistd::access(&m.join("readable"), AccessFlags::R_OK).unwrap();
    });
    // A member of the file's group gets the group bits.
    run_as(U1, 1500, || {
        assert_eq!(fs::read(m.join("group_rw")).unwrap(), b"g");
        OpenOptions::new()
            .write(true)
            .open(m.join("group_rw"))
            .unwrap()
            .write_all(b"G")
            .unwrap();
    });
    assert_eq!(fs::read(m.join("group_rw")).unwrap(), b"G");
    // The owner bits apply to the owner even when they are stricter than group/other.
    chown(&m.join("readable"), U1, U1);
    chmod(&m.join("readable"), 0o077);
    run_as(U1, U1, || {
        assert_errno!(File::open(m.join("readable")), EACCES)
    });
    // root bypasses permission bits (except exec, not tested here).
    assert_eq!(fs::read(m.join("secret")).unwrap(), b"s");
    chmod(&m.join("secret"), 0o000);
    assert_eq!(fs::read(m.join("secret")).unwrap(), b"s");
}

#[test]
fn chmod_and_chown_by_non_owner_are_eperm() {
    let tv = TestVolume::new();
    let m = tv.mnt().to_path_buf();
    write_file(&m.join("mine"), b"x");
    chown(&m.join("mine"), U1, U1);
    write_file(&m.join("roots"), b"x");
    chmod(&m.join("roots"), 0o666);
    run_as(U1, U1, || {
        let mode = |m| Mode::from_bits_truncate(m);
        let chm = |p: &Path, md| {
            nix::sys::stat::fchmodat(None, p, mode(md), FchmodatFlags::FollowSymlink)
        };
        assert_errno!(chm(&m.join("roots"), 0o777), EPERM);
        assert_errno!(
            nix::unistd::chown(&m.join("roots"), Some(Uid::from_raw(U1)), None),
            EPERM
        );
        assert_errno!(
            nix::unistd::chown(&m.join("mine"), Some(Uid::from_raw(U2)), None),
            EPERM
        );
        // The owner may chgrp only to a group it is in.
        assert_errno!(
            nix::unistd::chown(&m.join("mine"), None, Some(Gid::from_raw(4242))),
            EPERM
        );
        nix::unistd::chown(&m.join("mine"), None, Some(Gid::from_raw(U1))).unwrap();
        // Utimes to explicit values needs ownership; to "now" needs write permission.
        let t = TimeSpec::new(1000, 0);
        assert_errno!(
            nix::sys::stat::utimensat(
                None,
                &m.join("roots"),
                &t,
                &t,
                UtimensatFlags::FollowSymlink
            ),
            EPERM
        );
        nix::sys::stat::utimensat(
            None,
            &m.join("roots"),
            &TimeSpec::UTIME_NOW,
            &TimeSpec::UTIME_NOW,
            UtimensatFlags::FollowSymlink,
        )
        .unwrap();
        chm(&m.join("mine"), 0o640).unwrap();
    });
    assert_eq!(perm(&m.join("mine")), 0o640);
    assert_eq!(perm(&m.join("roots")), 0o666);
    let s = st(&m.join("roots"));
    assert_eq!((s.st_uid, s.st_gid), (0, 0));
}

#[test]
fn chown_by_root_sets_owner_and_group() {
    let tv = TestVolume::new();
    write_file(&tv.path("f"), b"x");
    fs::create_dir(tv.path("d")).unwrap();
    symlink("f", tv.path("l")).unwrap();
    chown(&tv.path("f"), 1234, 5678);
    chown(&tv.path("d"), 4_000_000_000, 4_000_000_001);
    nix::unistd::fchownat(
        None,
        &tv.path("l"),
        Some(Uid::from_raw(77)),
        Some(Gid::from_raw(88)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let (f, d, l) = (st(&tv.path("f")), st(&tv.path("d")), st(&tv.path("l")));
    assert_eq!((f.st_uid, f.st_gid), (1234, 5678));
    assert_eq!((d.st_uid, d.st_gid), (4_000_000_000, 4_000_000_001));
    assert_eq!(
        (l.st_uid, l.st_gid),
        (77, 88),
        "lchown changes the link itself"
    );
    assert_eq!(
        st(&tv.path("f")).st_uid,
        1234,
        "lchown must not touch the target"
    );
    // Only the group.
    nix::unistd::chown(&tv.path("f"), None, Some(Gid::from_raw(9))).unwrap();
    assert_eq!(
        (st(&tv.path("f")).st_uid, st(&tv.path("f")).st_gid),
        (1234, 9)
    );
}

#[test]
fn write_by_non_root_clears_setuid_and_setgid() {
    let tv = TestVolume::new();
    let m = tv.mnt().to_path_buf();
    for (name, mode) in [("both", 0o6777), ("sgid_noexec", 0o2766), ("suid", 0o4766)] {
        write_file(&m.join(name), b"original");
        chown(&m.join(name), U1, U1);
        chmod(&m.join(name), mode);
    }
    run_as(U1, U1, || {
        for name in ["both", "sgid_noexec", "suid"] {
            OpenOptions::new()
                .write(true)
                .open(m.join(name))
                .unwrap()
                .write_all(b"X")
                .unwrap();
        }
    });
    assert_eq!(
        perm(&m.join("both")),
        0o777,
        "setuid+setgid(g+x) after write by owner"
    );
    assert_eq!(
        perm(&m.join("sgid_noexec")),
        0o2766,
        "setgid without group-exec is not a privilege bit and stays"
    );
    assert_eq!(perm(&m.join("suid")), 0o766, "setuid after write by owner");
    assert_eq!(fs::read(m.join("both")).unwrap(), b"Xriginal");
    // Truncation by a non-root user clears them too.
    chmod(&m.join("both"), 0o6777);
    run_as(U1, U1, || {
        nix::unistd::truncate(&m.join("both"), 3).unwrap()
    });
    assert_eq!(
        perm(&m.join("both")),
        0o777,
        "setuid+setgid after truncate by owner"
    );
}

#[test]
fn write_by_root_keeps_setuid_and_setgid() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    chown(&p, U1, U1);
    chmod(&p, 0o6755);
    OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all(b"root wrote")
        .unwrap();
    assert_eq!(
        perm(&p),
        0o6755,
        "root (CAP_FSETID) keeps setuid/setgid on write"
    );
}

#[test]
fn chown_of_a_regular_file_clears_setuid_and_group_exec_setgid() {
    let tv = TestVolume::new();
    let m = tv.mnt().to_path_buf();
    for (name, mode) in [("both", 0o6755), ("sgid_noexec", 0o2745), ("suid", 0o4711)] {
        write_file(&m.join(name), b"x");
        chmod(&m.join(name), mode);
        chown(&m.join(name), U1, U1);
    }
    assert_eq!(
        perm(&m.join("both")),
        0o755,
        "chown clears setuid and setgid (g+x)"
    );
    assert_eq!(
        perm(&m.join("sgid_noexec")),
        0o2745,
        "chown keeps setgid without g+x"
    );
    assert_eq!(perm(&m.join("suid")), 0o711, "chown clears setuid");
    // Directories keep both bits on chown.
    fs::create_dir(m.join("d")).unwrap();
    chmod(&m.join("d"), 0o6755);
    chown(&m.join("d"), U1, U1);
    assert_eq!(
        perm(&m.join("d")),
        0o6755,
        "chown of a directory keeps setuid/setgid"
    );
}

#[test]
fn sticky_directory_stops_non_owners_from_removing_others_files() {
    let tv = TestVolume::new();
    let t = tv.path("tmp");
    fs::create_dir(&t).unwrap();
    chmod(&t, 0o1777);
    let tt = t.clone();
    run_as(U1, U1, || {
        write_file(&tt.join("u1file"), b"1");
        fs::create_dir(tt.join("u1dir")).unwrap();
    });
    run_as(U2, U2, || {
        assert_errno!(fs::remove_file(tt.join("u1file")), EPERM);
        assert_errno!(fs::remove_dir(tt.join("u1dir")), EPERM);
        assert_errno!(fs::rename(tt.join("u1file"), tt.join("stolen")), EPERM);
        write_file(&tt.join("u2file"), b"2");
        assert_errno!(fs::rename(tt.join("u2file"), tt.join("u1file")), EPERM);
        fs::remove_file(tt.join("u2file")).unwrap();
    });
    assert_eq!(fs::read(t.join("u1file")).unwrap(), b"1");
    // The file's owner may remove it; so may root.
    run_as(U1, U1, || fs::remove_file(tt.join("u1file")).unwrap());
    fs::remove_dir(t.join("u1dir")).unwrap();
    assert!(names(&t).is_empty());
    // Without the sticky bit anyone with write permission may remove.
    chmod(&t, 0o777);
    run_as(U1, U1, || write_file(&tt.join("u1file"), b"1"));
    run_as(U2, U2, || fs::remove_file(tt.join("u1file")).unwrap());
}

#[test]
fn setgid_directory_passes_its_group_to_new_entries() {
    let tv = TestVolume::new();
    let d = tv.path("shared");
    fs::create_dir(&d).unwrap();
    chown(&d, 0, 4242);
    chmod(&d, 0o2777);
    let dd = d.clone();
    run_as(U1, U1, || {
        write_file(&dd.join("f"), b"x");
        fs::create_dir(dd.join("sub")).unwrap();
    });
    let f = st(&d.join("f"));
    assert_eq!(
        (f.st_uid, f.st_gid),
        (U1, 4242),
        "file in setgid dir gets the dir's group"
    );
    let s = st(&d.join("sub"));
    assert_eq!(
        (s.st_uid, s.st_gid),
        (U1, 4242),
        "subdir in setgid dir gets the dir's group"
    );
    assert_eq!(
        s.st_mode & 0o2000,
        0o2000,
        "subdir of a setgid dir is setgid"
    );
    assert_eq!(f.st_mode & 0o2000, 0, "plain file does not become setgid");
}

// ---------------------------------------------------------------------------------------------
// timestamps
// ---------------------------------------------------------------------------------------------

#[test]
fn utimensat_explicit_nanosecond_times_read_back_exactly() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    fs::create_dir(tv.path("d")).unwrap();
    symlink("f", tv.path("l")).unwrap();
    let cases = [
        ((1, 999_999_999), (2, 1)),
        ((1_700_000_000, 123_456_789), (1_600_000_000, 987_654_321)),
        ((0, 0), (0, 0)),
        ((4_102_444_800, 500_000_000), (4_102_444_801, 5)), // year 2100
    ];
    for ((a_s, a_ns), (m_s, m_ns)) in cases {
        for (path, flag) in [
            (&p, UtimensatFlags::FollowSymlink),
            (&tv.path("d"), UtimensatFlags::FollowSymlink),
            (&tv.path("l"), UtimensatFlags::NoFollowSymlink),
        ] {
            nix::sys::stat::utimensat(
                None,
                path,
                &TimeSpec::new(a_s, a_ns),
                &TimeSpec::new(m_s, m_ns),
                flag,
            )
            .unwrap();
            let t = times(path);
            assert_eq!(t[0], (a_s, a_ns), "atime of {}", path.display());
            assert_eq!(t[1], (m_s, m_ns), "mtime of {}", path.display());
        }
    }
    assert_eq!(
        times(&p)[1],
        (4_102_444_801, 5),
        "lutimes must not touch the target"
    );
}

#[test]
fn utime_now_and_utime_omit() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    let old = TimeSpec::new(1_000_000_000, 111);
    nix::sys::stat::utimensat(None, &p, &old, &old, UtimensatFlags::FollowSymlink).unwrap();
    let before = now();
    nix::sys::stat::utimensat(
        None,
        &p,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::UTIME_NOW,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let after = now();
    let t = times(&p);
    assert_eq!(t[0], (1_000_000_000, 111), "UTIME_OMIT left atime alone");
    assert!(
        t[1] >= (before.0 - 1, before.1) && t[1] <= (after.0 + 1, after.1),
        "UTIME_NOW mtime {:?} not now ({before:?}..{after:?})",
        t[1]
    );
    nix::sys::stat::utimensat(
        None,
        &p,
        &TimeSpec::UTIME_NOW,
        &TimeSpec::UTIME_OMIT,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let t2 = times(&p);
    assert_eq!(t2[1], t[1], "UTIME_OMIT left mtime alone");
    assert!(
        t2[0].0 >= before.0 - 1 && t2[0].0 <= now().0 + 1,
        "UTIME_NOW atime {:?}",
        t2[0]
    );
    // Both omitted: nothing changes, not even ctime.
    tick();
    let c = times(&p)[2];
    nix::sys::stat::utimensat(
        None,
        &p,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::UTIME_OMIT,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    assert_eq!(times(&p)[2], c);
}

#[test]
fn timestamps_have_nanosecond_resolution() {
    let tv = TestVolume::new();
    let mut nonzero_ns = 0;
    for i in 0..20 {
        let p = tv.path(format!("f{i}"));
        write_file(&p, b"x");
        let t = times(&p);
        if t[1].1 % 1000 != 0 {
            nonzero_ns += 1;
        }
        std::thread::sleep(Duration::from_micros(137));
    }
    assert!(
        nonzero_ns >= 10,
        "only {nonzero_ns}/20 new files have sub-microsecond mtime digits"
    );
}

#[test]
fn write_and_truncate_update_mtime_and_ctime() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    let t0 = times(&p);
    tick();
    OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all(b"y")
        .unwrap();
    let t1 = times(&p);
    assert!(
        t1[1] > t0[1],
        "write did not advance mtime: {:?} -> {:?}",
        t0[1],
        t1[1]
    );
    assert!(
        t1[2] > t0[2],
        "write did not advance ctime: {:?} -> {:?}",
        t0[2],
        t1[2]
    );
    tick();
    nix::unistd::truncate(&p, 100).unwrap();
    let t2 = times(&p);
    assert!(t2[1] > t1[1], "truncate did not advance mtime");
    assert!(t2[2] > t1[2], "truncate did not advance ctime");
    assert!(t2[2] >= t2[1], "ctime older than mtime");
}

#[test]
fn chmod_chown_link_and_xattr_change_ctime_but_not_mtime() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    let mut prev = times(&p);
    let ops: Vec<Op> = vec![
        ("chmod", Box::new(|| chmod(&p, 0o600))),
        ("chown", Box::new(|| chown(&p, 5, 5))),
        (
            "link",
            Box::new(|| fs::hard_link(&p, tv.path("g")).unwrap()),
        ),
        (
            "setxattr",
            Box::new(|| setxattr(&p, "user.k", b"v", 0).unwrap()),
        ),
        (
            "unlink of other name",
            Box::new(|| fs::remove_file(tv.path("g")).unwrap()),
        ),
    ];
    for (what, op) in ops {
        tick();
        op();
        let t = times(&p);
        assert_eq!(t[1], prev[1], "{what} changed mtime");
        assert!(
            t[2] > prev[2],
            "{what} did not advance ctime: {:?} -> {:?}",
            prev[2],
            t[2]
        );
        prev = t;
    }
}

#[test]
fn creating_renaming_and_removing_entries_update_the_parent_mtime_and_ctime() {
    let tv = TestVolume::new();
    let d = tv.path("d");
    let e = tv.path("e");
    fs::create_dir(&d).unwrap();
    fs::create_dir(&e).unwrap();
    let mut prev = times(&d);
    let ops: Vec<Op> = vec![
        ("create", Box::new(|| write_file(&d.join("f"), b"x"))),
        ("mkdir", Box::new(|| fs::create_dir(d.join("sub")).unwrap())),
        ("symlink", Box::new(|| symlink("f", d.join("l")).unwrap())),
        (
            "rename within",
            Box::new(|| fs::rename(d.join("f"), d.join("f2")).unwrap()),
        ),
        ("unlink", Box::new(|| fs::remove_file(d.join("l")).unwrap())),
        ("rmdir", Box::new(|| fs::remove_dir(d.join("sub")).unwrap())),
        (
            "rename out",
            Box::new(|| fs::rename(d.join("f2"), e.join("f2")).unwrap()),
        ),
        (
            "rename in",
            Box::new(|| fs::rename(e.join("f2"), d.join("f3")).unwrap()),
        ),
    ];
    for (what, op) in ops {
        tick();
        op();
        let t = times(&d);
        assert!(t[1] > prev[1], "{what} did not advance the parent's mtime");
        assert!(t[2] > prev[2], "{what} did not advance the parent's ctime");
        prev = t;
    }
    // Writing to a file changes the file, not its directory.
    tick();
    OpenOptions::new()
        .write(true)
        .open(d.join("f3"))
        .unwrap()
        .write_all(b"data")
        .unwrap();
    assert_eq!(
        times(&d)[1..],
        prev[1..],
        "a write to d/f3 changed d's mtime/ctime"
    );
}

#[test]
fn new_entries_get_current_atime_mtime_and_ctime() {
    let tv = TestVolume::new();
    let before = now();
    File::create(tv.path("f")).unwrap();
    fs::create_dir(tv.path("d")).unwrap();
    symlink("f", tv.path("l")).unwrap();
    nix::unistd::mkfifo(&tv.path("p"), Mode::from_bits_truncate(0o600)).unwrap();
    let after = now();
    for n in ["f", "d", "l", "p"] {
        for (i, t) in times(&tv.path(n)).into_iter().enumerate() {
            assert!(
                t >= (before.0 - 1, 0) && t <= (after.0 + 1, 999_999_999),
                "{} of new {n} is {t:?}, not between {before:?} and {after:?}",
                ["atime", "mtime", "ctime"][i]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// xattrs
// ---------------------------------------------------------------------------------------------

#[test]
fn xattrs_in_user_trusted_and_security_namespaces_set_get_list_remove() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    let binary: Vec<u8> = (0..=255u8).collect();
    let big = pattern(4000, 30);
    let attrs: Vec<(&str, &[u8])> = vec![
        ("user.plain", b"value"),
        ("user.empty", b""),
        ("user.binary", &binary),
        ("user.big", &big),
        ("trusted.overlay.opaque", b"y"),
        ("security.test", b"label\0with nul"),
    ];
    for (n, v) in &attrs {
        setxattr(&p, n, v, 0).unwrap_or_else(|e| panic!("setxattr {n}: {e}"));
    }
    for (n, v) in &attrs {
        assert_eq!(
            &getxattr(&p, n).unwrap_or_else(|e| panic!("getxattr {n}: {e}"))[..],
            *v,
            "value of {n}"
        );
    }
    let mut want: Vec<String> = attrs.iter().map(|(n, _)| n.to_string()).collect();
    want.sort();
    assert_eq!(listxattr(&p).unwrap(), want);
    // Overwrite, then remove.
    setxattr(&p, "user.plain", b"second value", 0).unwrap();
    assert_eq!(getxattr(&p, "user.plain").unwrap(), b"second value");
    for (n, _) in &attrs {
        removexattr(&p, n).unwrap_or_else(|e| panic!("removexattr {n}: {e}"));
    }
    assert!(
        listxattr(&p).unwrap().is_empty(),
        "left: {:?}",
        listxattr(&p).unwrap()
    );
    // Directories carry xattrs too.
    fs::create_dir(tv.path("d")).unwrap();
    setxattr(&tv.path("d"), "user.dir", b"d", 0).unwrap();
    assert_eq!(getxattr(&tv.path("d"), "user.dir").unwrap(), b"d");
}

#[test]
fn xattr_flags_and_missing_names_give_exact_errnos() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    setxattr(&p, "user.a", b"1", libc::XATTR_CREATE).unwrap();
    assert_errno!(setxattr(&p, "user.a", b"2", libc::XATTR_CREATE), EEXIST);
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"1");
    assert_errno!(setxattr(&p, "user.b", b"2", libc::XATTR_REPLACE), ENODATA);
    assert_errno!(getxattr(&p, "user.b"), ENODATA);
    setxattr(&p, "user.a", b"3", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"3");
    assert_errno!(getxattr(&p, "user.missing"), ENODATA);
    assert_errno!(removexattr(&p, "user.missing"), ENODATA);
    // A buffer that is too small is ERANGE; an exact one works.
    setxattr(&p, "user.long", b"0123456789", 0).unwrap();
    assert_errno!(getxattr_sized(&p, "user.long", 5), ERANGE);
    assert_eq!(getxattr_sized(&p, "user.long", 10).unwrap(), b"0123456789");
    assert_eq!(getxattr_sized(&p, "user.long", 100).unwrap(), b"0123456789");
    // User xattrs are not allowed on symlinks (EPERM); get on a symlink is ENODATA.
    symlink("f", tv.path("l")).unwrap();
    assert_errno!(lsetxattr(&tv.path("l"), "user.x", b"1", 0), EPERM);
    assert_errno!(lgetxattr(&tv.path("l"), "user.x"), ENODATA);
    // Following the link reaches the target's xattrs.
    assert_eq!(getxattr(&tv.path("l"), "user.a").unwrap(), b"3");
}

#[test]
fn xattr_permissions_for_non_root_users() {
    let tv = TestVolume::new();
    let m = tv.mnt().to_path_buf();
    write_file(&m.join("f"), b"x");
    chmod(&m.join("f"), 0o644);
    setxattr(&m.join("f"), "user.r", b"readable", 0).unwrap();
    setxattr(&m.join("f"), "trusted.t", b"secret", 0).unwrap();
    run_as(U1, U1, || {
        assert_eq!(getxattr(&m.join("f"), "user.r").unwrap(), b"readable");
        assert_errno!(setxattr(&m.join("f"), "user.w", b"1", 0), EACCES);
        assert_errno!(removexattr(&m.join("f"), "user.r"), EACCES);
        assert_errno!(setxattr(&m.join("f"), "trusted.x", b"1", 0), EPERM);
        assert_errno!(getxattr(&m.join("f"), "trusted.t"), ENODATA);
    });
}

// ---------------------------------------------------------------------------------------------
// POSIX ACLs
// ---------------------------------------------------------------------------------------------

fn getfacl(p: &Path, default: bool) -> String {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("-n"),
        OsStr::new("--omit-header"),
        OsStr::new("-E"),
    ];
    args.push(OsStr::new(if default { "-d" } else { "-a" }));
    args.push(p.as_os_str());
    run_ok("getfacl", &args)
}

fn setfacl(args: &[&str], p: &Path) {
    let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    a.push(p.as_os_str());
    run_ok("setfacl", &a);
}

#[test]
fn setfacl_named_user_entry_reads_back_and_syncs_the_mode() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    chmod(&p, 0o600);
    setfacl(&["-m", "u:1234:rwx"], &p);
    assert_eq!(
        getfacl(&p, false),
        "user::rw-\nuser:1234:rwx\ngroup::---\nmask::rwx\nother::---\n\n"
    );
    assert_eq!(perm(&p), 0o670, "group bits show the ACL mask");
    let raw = getxattr(&p, "system.posix_acl_access").unwrap();
    assert_eq!(raw.len(), 4 + 5 * 8, "xattr of a 5-entry ACL: {raw:?}");
    assert!(
        listxattr(&p)
            .unwrap()
            .contains(&"system.posix_acl_access".to_string())
    );
}

#[test]
fn acl_named_user_entry_is_enforced_by_the_kernel() {
    let tv = TestVolume::new();
    let m = tv.mnt().to_path_buf();
    write_file(&m.join("f"), b"root only");
    write_file(&m.join("f"), b"xxxxxxxx!");
    chmod(&m.join("f"), 0o600);
    setfacl(&["-m", "u:1234:rw"], &m.join("f"));
    run_as(1234, 1234, || {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("f"))
            .unwrap();
        f.write_all(b"ACL user").unwrap();
    });
    assert_eq!(fs::read(m.join("f")).unwrap(), b"ACL user!");
    run_as(1235, 1235, || {
        assert_errno!(File::open(m.join("f")), EACCES);
    });
    // chmod rewrites the mask: g-rw takes the named user's rights away.
    chmod(&m.join("f"), 0o600);
    assert_eq!(
        getfacl(&m.join("f"), false),
        "user::rw-\nuser:1234:rw-\ngroup::---\nmask::---\nother::---\n\n"
    );
    run_as(1234, 1234, || {
        assert_errno!(OpenOptions::new().write(true).open(m.join("f")), EACCES);
    });
    // A named-group entry works for members of that group.
    setfacl(&["-m", "g:777:r,m::r"], &m.join("f"));
    run_as(U1, 777, || {
        assert_eq!(fs::read(m.join("f")).unwrap(), b"ACL user!")
    });
    run_as(U1, U1, || assert_errno!(File::open(m.join("f")), EACCES));
}

#[test]
fn default_acl_is_inherited_by_new_files_and_directories() {
    let tv = TestVolume::new();
    let d = tv.path("d");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o750);
    setfacl(&["-d", "-m", "u:1234:rwx"], &d);
    assert_eq!(
        getfacl(&d, true),
        "user::rwx\nuser:1234:rwx\ngroup::r-x\nmask::rwx\nother::---\n\n"
    );
    let dd = d.clone();
    run_as(0, 0, || {
        // The umask is ignored when a default ACL exists.
        nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(dd.join("f"))
            .unwrap();
        nix::unistd::mkdir(&dd.join("sub"), Mode::from_bits_truncate(0o777)).unwrap();
    });
    // File: access ACL = default ACL masked by the create mode 0666 (mask rw-).
    assert_eq!(
        getfacl(&d.join("f"), false),
        "user::rw-\nuser:1234:rwx\ngroup::r-x\nmask::rw-\nother::---\n\n"
    );
    assert_eq!(perm(&d.join("f")), 0o660);
    // Directory: access ACL as for files (mode 0777) plus the default ACL itself.
    assert_eq!(
        getfacl(&d.join("sub"), false),
        "user::rwx\nuser:1234:rwx\ngroup::r-x\nmask::rwx\nother::---\n\n"
    );
    assert_eq!(getfacl(&d.join("sub"), true), getfacl(&d, true));
    assert_eq!(perm(&d.join("sub")), 0o770);
    assert!(getxattr(&d.join("sub"), "system.posix_acl_default").is_ok());
    // And the inherited entry is enforced.
    let f = d.join("f");
    chmod(&d, 0o755);
    run_as(1234, 1234, || {
        OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .write_all(b"inherited")
            .unwrap();
    });
    assert_eq!(fs::read(&f).unwrap(), b"inherited");
}

#[test]
fn setfacl_b_removes_the_acl_and_keeps_base_permissions() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    chmod(&p, 0o640);
    setfacl(&["-m", "u:1234:rw"], &p);
    setfacl(&["-b"], &p);
    assert_eq!(getfacl(&p, false), "user::rw-\ngroup::r--\nother::---\n\n");
    assert_errno!(getxattr(&p, "system.posix_acl_access"), ENODATA);
    assert_eq!(perm(&p), 0o640);
    fs::create_dir(tv.path("d")).unwrap();
    setfacl(&["-d", "-m", "u:1234:rw"], &tv.path("d"));
    setfacl(&["-k"], &tv.path("d"));
    assert_eq!(getfacl(&tv.path("d"), true), "");
    assert_errno!(getxattr(&tv.path("d"), "system.posix_acl_default"), ENODATA);
}

#[test]
fn xattr_value_of_64_kib_works_and_larger_is_e2big() {
    let tv = TestVolume::new();
    let p = tv.path("f");
    write_file(&p, b"x");
    let max = pattern(65_536, 31);
    setxattr(&p, "user.max", &max, 0).expect("setxattr of XATTR_SIZE_MAX bytes");
    assert_bytes_eq(
        &getxattr(&p, "user.max").unwrap(),
        &max,
        "64 KiB xattr value",
    );
    assert_errno!(setxattr(&p, "user.toobig", &pattern(65_537, 32), 0), E2BIG);
    let name255 = format!("user.{}", "n".repeat(250));
    setxattr(&p, &name255, b"v", 0).expect("xattr name of 255 bytes");
    assert_eq!(getxattr(&p, &name255).unwrap(), b"v");
    assert_errno!(
        setxattr(&p, &format!("user.{}", "n".repeat(251)), b"v", 0),
        ERANGE
    );
}

#[test]
fn creator_may_write_a_new_file_whose_mode_forbids_writing() {
    let tv = TestVolume::new();
    mkdir_world_writable(&tv.path("pub"));
    let p = tv.path("pub/ro");
    let pc = p.clone();
    run_as(U1, U1, || {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&pc)
            .expect("O_CREAT|O_RDWR with mode 0444 by the creator");
        f.write_all(b"written anyway").unwrap();
        drop(f);
        // But a second open for writing is refused.
        assert_errno!(OpenOptions::new().write(true).open(&pc), EACCES);
    });
    assert_eq!(fs::read(&p).unwrap(), b"written anyway");
    assert_eq!(perm(&p) & 0o222, 0);
}
