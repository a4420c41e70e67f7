//! POSIX namespace behaviour through a real volfs mount: directories, rename/renameat2, hard
//! links, symlinks, FIFOs, unix sockets, device nodes, NAME_MAX, readdir under concurrent change.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, symlink};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;

use nix::fcntl::RenameFlags;
use nix::sys::stat::{Mode, SFlag};

use crate::posix::*;
use crate::util::*;

fn renameat2(a: &Path, b: &Path, flags: RenameFlags) -> nix::Result<()> {
    nix::fcntl::renameat2(None, a, None, b, flags)
}

fn nlink(p: &Path) -> u64 {
    st(p).st_nlink
}

// ---------------------------------------------------------------------------------------------
// directories and basic errnos
// ---------------------------------------------------------------------------------------------

#[test]
fn mkdir_of_existing_name_is_eexist() {
    let tv = TestVolume::new();
    fs::create_dir(tv.path("d")).unwrap();
    assert_errno!(fs::create_dir(tv.path("d")), EEXIST);
    write_file(&tv.path("f"), b"x");
    assert_errno!(fs::create_dir(tv.path("f")), EEXIST);
    symlink("nowhere", tv.path("l")).unwrap();
    assert_errno!(fs::create_dir(tv.path("l")), EEXIST);
}

#[test]
fn rmdir_of_non_empty_directory_is_enotempty() {
    let tv = TestVolume::new();
    fs::create_dir_all(tv.path("d/sub")).unwrap();
    assert_errno!(fs::remove_dir(tv.path("d")), ENOTEMPTY | EEXIST);
    fs::remove_dir(tv.path("d/sub")).unwrap();
    write_file(&tv.path("d/f"), b"x");
    assert_errno!(fs::remove_dir(tv.path("d")), ENOTEMPTY | EEXIST);
    fs::remove_file(tv.path("d/f")).unwrap();
    fs::remove_dir(tv.path("d")).unwrap();
    assert!(names(tv.mnt()).is_empty());
}

#[test]
fn unlink_of_directory_is_eisdir() {
    let tv = TestVolume::new();
    fs::create_dir(tv.path("d")).unwrap();
    assert_errno!(fs::remove_file(tv.path("d")), EISDIR);
    assert!(st(&tv.path("d")).st_mode & libc::S_IFMT == libc::S_IFDIR);
}

#[test]
fn rmdir_of_file_is_enotdir() {
    let tv = TestVolume::new();
    write_file(&tv.path("f"), b"x");
    assert_errno!(fs::remove_dir(tv.path("f")), ENOTDIR);
    symlink(".", tv.path("l")).unwrap();
    assert_errno!(fs::remove_dir(tv.path("l")), ENOTDIR);
    assert_eq!(fs::read(tv.path("f")).unwrap(), b"x");
}

#[test]
fn path_through_a_file_is_enotdir() {
    let tv = TestVolume::new();
    write_file(&tv.path("f"), b"x");
    assert_errno!(fs::read(tv.path("f/x")), ENOTDIR);
    assert_errno!(fs::create_dir(tv.path("f/x")), ENOTDIR);
    assert_errno!(File::create(tv.path("f/x")), ENOTDIR);
    assert_errno!(nix::sys::stat::stat(&tv.path("f/")), ENOTDIR);
}

#[test]
fn missing_names_are_enoent() {
    let tv = TestVolume::new();
    assert_errno!(File::open(tv.path("nope")), ENOENT);
    assert_errno!(fs::remove_file(tv.path("nope")), ENOENT);
    assert_errno!(fs::remove_dir(tv.path("nope")), ENOENT);
    assert_errno!(fs::rename(tv.path("nope"), tv.path("x")), ENOENT);
    assert_errno!(File::create(tv.path("nodir/x")), ENOENT);
    assert_errno!(fs::read_link(tv.path("nope")), ENOENT);
}

#[test]
fn directory_nlink_is_two_plus_subdirectories() {
    let tv = TestVolume::new();
    let root0 = nlink(tv.mnt());
    assert_eq!(root0, 2, "nlink of the empty volume root");
    let d = tv.path("d");
    fs::create_dir(&d).unwrap();
    assert_eq!(nlink(&d), 2, "empty dir");
    assert_eq!(nlink(tv.mnt()), 3, "root after mkdir d");
    for s in ["a", "b", "c"] {
        fs::create_dir(d.join(s)).unwrap();
    }
    write_file(&d.join("file"), b"x");
    symlink("a", d.join("link")).unwrap();
    assert_eq!(
        nlink(&d),
        5,
        "dir with 3 subdirs (files/symlinks do not count)"
    );
    fs::remove_dir(d.join("a")).unwrap();
    assert_eq!(nlink(&d), 4, "after rmdir of one subdir");
    fs::rename(d.join("b"), tv.path("b")).unwrap();
    assert_eq!(nlink(&d), 3, "after moving a subdir out");
    assert_eq!(nlink(tv.mnt()), 4, "root after a subdir moved in");
    fs::rename(tv.path("b"), d.join("c")).unwrap(); // replaces the empty dir c
    assert_eq!(nlink(&d), 3, "after a subdir replaced another");
    assert_eq!(nlink(tv.mnt()), 3);
}

#[test]
fn readdir_lists_every_kind_with_its_type_and_inode() {
    let tv = TestVolume::new();
    let d = tv.path("d");
    fs::create_dir(&d).unwrap();
    write_file(&d.join("file"), b"x");
    fs::create_dir(d.join("dir")).unwrap();
    symlink("file", d.join("link")).unwrap();
    nix::unistd::mkfifo(&d.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    let _l = UnixListener::bind(d.join("sock")).unwrap();
    nix::sys::stat::mknod(
        &d.join("chr"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o644),
        libc::makedev(1, 3),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &d.join("blk"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o644),
        libc::makedev(7, 0),
    )
    .unwrap();
    let want: HashMap<&[u8], u8> = [
        (&b"."[..], libc::DT_DIR),
        (b"..", libc::DT_DIR),
        (b"file", libc::DT_REG),
        (b"dir", libc::DT_DIR),
        (b"link", libc::DT_LNK),
        (b"fifo", libc::DT_FIFO),
        (b"sock", libc::DT_SOCK),
        (b"chr", libc::DT_CHR),
        (b"blk", libc::DT_BLK),
    ]
    .into_iter()
    .collect();
    let ents = read_dir_all(&d);
    let mut seen: Vec<&[u8]> = ents.iter().map(|e| &e.name[..]).collect();
    seen.sort();
    let mut wantn: Vec<&[u8]> = want.keys().copied().collect();
    wantn.sort();
    assert_eq!(seen, wantn, "readdir names");
    for e in &ents {
        let t = want[&e.name[..]];
        assert!(
            e.dtype == t || e.dtype == libc::DT_UNKNOWN,
            "d_type of {:?} is {}, want {t}",
            String::from_utf8_lossy(&e.name),
            e.dtype
        );
        if e.name != b".." {
            let ino = st(&d.join(std::ffi::OsStr::from_bytes(&e.name))).st_ino;
            assert_eq!(
                e.ino,
                ino,
                "d_ino of {:?} differs from st_ino",
                String::from_utf8_lossy(&e.name)
            );
        }
    }
}

#[test]
fn readdir_neither_skips_nor_repeats_while_the_directory_changes() {
    let tv = TestVolume::new();
    let d = tv.path("d");
    fs::create_dir(&d).unwrap();
    const N: usize = 2000;
    const CHURN_STEPS: usize = 150;
    let orig: Vec<String> = (0..N).map(|i| format!("orig-{i:05}")).collect();
    for n in &orig {
        File::create(d.join(n)).unwrap();
    }
    // Static listing first.
    let listed: HashSet<OsString> = names(&d).into_iter().collect();
    assert_eq!(listed.len(), N, "static readdir of {N} files");
    // The churn thread creates fresh names (never reused) and removes some of them and some
    // originals, in steps interleaved with small getdents64 batches of the reader.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<Vec<String>>();
    let dd = d.clone();
    let churn = std::thread::spawn(move || {
        let mut step = 0usize;
        let mut created: Vec<String> = Vec::new();
        while go_rx.recv().is_ok() {
            let mut removed = Vec::new();
            if step >= CHURN_STEPS {
                // Stop changing the directory eventually: in a directory that grows forever
                // the reader may legitimately never reach the end.
                done_tx.send(removed).unwrap();
                continue;
            }
            for k in 0..6 {
                let n = format!("new-{step:04}-{k}");
                File::create(dd.join(&n)).unwrap();
                created.push(n);
            }
            for _ in 0..3 {
                if created.len() > 10 {
                    let n = created.remove(created.len() / 2);
                    fs::remove_file(dd.join(&n)).unwrap();
                }
            }
            // Remove an original (every 7th by step) so deletions hit already-read and
            // not-yet-read positions alike.
            let victim = format!("orig-{:05}", (step * 7919) % N);
            if fs::remove_file(dd.join(&victim)).is_ok() {
                removed.push(victim);
            }
            step += 1;
            done_tx.send(removed).unwrap();
        }
    });
    let f = File::open(&d).unwrap();
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut removed: HashSet<String> = HashSet::new();
    let mut batches = 0;
    loop {
        let batch = getdents(&f, 512).expect("getdents64");
        if batch.is_empty() {
            break;
        }
        batches += 1;
        for e in batch {
            *seen.entry(e.name).or_default() += 1;
        }
        go_tx.send(()).unwrap();
        removed.extend(done_rx.recv().unwrap());
        assert!(batches < 100_000, "readdir never ends");
    }
    drop(go_tx);
    churn.join().unwrap();
    assert!(
        batches > 20,
        "only {batches} getdents batches: buffer too large for the test"
    );
    let dup: Vec<_> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, c)| (String::from_utf8_lossy(n).into_owned(), *c))
        .collect();
    assert!(dup.is_empty(), "names seen more than once: {dup:?}");
    let missing: Vec<&String> = orig
        .iter()
        .filter(|n| !removed.contains(*n) && !seen.contains_key(n.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} original names never removed were skipped, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for n in seen.keys() {
        let s = String::from_utf8_lossy(n);
        assert!(
            s == "." || s == ".." || s.starts_with("orig-") || s.starts_with("new-"),
            "readdir returned a name never created: {s:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// rename
// ---------------------------------------------------------------------------------------------

#[test]
fn rename_over_existing_file_replaces_it() {
    let tv = TestVolume::new();
    write_file(&tv.path("a"), b"new contents");
    write_file(&tv.path("b"), b"old");
    let ino_a = st(&tv.path("a")).st_ino;
    let victim = File::open(tv.path("b")).unwrap();
    fs::rename(tv.path("a"), tv.path("b")).unwrap();
    assert_errno!(nix::sys::stat::lstat(&tv.path("a")), ENOENT);
    assert_eq!(fs::read(tv.path("b")).unwrap(), b"new contents");
    assert_eq!(
        st(&tv.path("b")).st_ino,
        ino_a,
        "target now has the source inode"
    );
    assert_eq!(names(tv.mnt()), vec![OsString::from("b")]);
    // The replaced file stays readable through an open descriptor, with nlink 0.
    assert_eq!(read_at(&victim, 0, 100), b"old");
    assert_eq!(
        fst(&victim).st_nlink,
        0,
        "nlink of a replaced, still open file"
    );
}

#[test]
fn rename_dir_over_empty_dir_replaces_it() {
    let tv = TestVolume::new();
    fs::create_dir_all(tv.path("src/inner")).unwrap();
    write_file(&tv.path("src/inner/f"), b"data");
    fs::create_dir(tv.path("dst")).unwrap();
    fs::rename(tv.path("src"), tv.path("dst")).unwrap();
    assert_eq!(names(tv.mnt()), vec![OsString::from("dst")]);
    assert_eq!(fs::read(tv.path("dst/inner/f")).unwrap(), b"data");
    assert_eq!(nlink(tv.mnt()), 3);
}

#[test]
fn rename_dir_over_non_empty_dir_is_enotempty() {
    let tv = TestVolume::new();
    fs::create_dir(tv.path("src")).unwrap();
    fs::create_dir(tv.path("dst")).unwrap();
    write_file(&tv.path("dst/keep"), b"k");
    assert_errno!(
        fs::rename(tv.path("src"), tv.path("dst")),
        ENOTEMPTY | EEXIST
    );
    assert_eq!(fs::read(tv.path("dst/keep")).unwrap(), b"k");
    assert!(tv.path("src").is_dir());
}

#[test]
fn rename_file_over_dir_is_eisdir() {
    let tv = TestVolume::new();
    write_file(&tv.path("f"), b"x");
    fs::create_dir(tv.path("d")).unwrap();
    assert_errno!(fs::rename(tv.path("f"), tv.path("d")), EISDIR);
    assert!(tv.path("f").is_file() && tv.path("d").is_dir());
}

#[test]
fn rename_dir_over_file_is_enotdir() {
    let tv = TestVolume::new();
    write_file(&tv.path("f"), b"x");
    fs::create_dir(tv.path("d")).unwrap();
    assert_errno!(fs::rename(tv.path("d"), tv.path("f")), ENOTDIR);
    assert!(tv.path("f").is_file() && tv.path("d").is_dir());
}

#[test]
fn rename_dir_into_its_own_subdirectory_is_einval() {
    let tv = TestVolume::new();
    fs::create_dir_all(tv.path("a/b")).unwrap();
    assert_errno!(fs::rename(tv.path("a"), tv.path("a/b/c")), EINVAL);
    assert!(tv.path("a/b").is_dir());
}

#[test]
fn rename_onto_itself_or_another_hard_link_is_a_no_op() {
    let tv = TestVolume::new();
    write_file(&tv.path("f"), b"x");
    fs::rename(tv.path("f"), tv.path("f")).unwrap();
    fs::hard_link(tv.path("f"), tv.path("g")).unwrap();
    fs::rename(tv.path("f"), tv.path("g")).unwrap();
    assert_eq!(
        names(tv.mnt()),
        vec![OsString::from("f"), OsString::from("g")]
    );
    assert_eq!(nlink(&tv.path("f")), 2);
}

#[test]
fn renameat2_noreplace_onto_existing_name_is_eexist() {
    let tv = TestVolume::new();
    write_file(&tv.path("a"), b"a");
    write_file(&tv.path("b"), b"b");
    assert_errno!(
        renameat2(&tv.path("a"), &tv.path("b"), RenameFlags::RENAME_NOREPLACE),
        EEXIST
    );
    assert_eq!(fs::read(tv.path("a")).unwrap(), b"a");
    assert_eq!(fs::read(tv.path("b")).unwrap(), b"b");
    fs::create_dir(tv.path("d")).unwrap();
    assert_errno!(
        renameat2(&tv.path("a"), &tv.path("d"), RenameFlags::RENAME_NOREPLACE),
        EEXIST
    );
    renameat2(&tv.path("a"), &tv.path("c"), RenameFlags::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(tv.path("c")).unwrap(), b"a");
    assert!(!tv.path("a").exists());
}

#[test]
fn renameat2_exchange_swaps_both_names() {
    let tv = TestVolume::new();
    fs::create_dir_all(tv.path("x/dir")).unwrap();
    fs::create_dir(tv.path("y")).unwrap();
    write_file(&tv.path("x/dir/inner"), b"inner");
    write_file(&tv.path("x/a"), b"contents of a");
    write_file(&tv.path("y/b"), b"contents of b");
    let (ia, ib) = (st(&tv.path("x/a")).st_ino, st(&tv.path("y/b")).st_ino);
    renameat2(
        &tv.path("x/a"),
        &tv.path("y/b"),
        RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(fs::read(tv.path("x/a")).unwrap(), b"contents of b");
    assert_eq!(fs::read(tv.path("y/b")).unwrap(), b"contents of a");
    assert_eq!(
        (st(&tv.path("x/a")).st_ino, st(&tv.path("y/b")).st_ino),
        (ib, ia)
    );
    // File <-> directory across directories: parent link counts follow the directory.
    assert_eq!((nlink(&tv.path("x")), nlink(&tv.path("y"))), (3, 2));
    renameat2(
        &tv.path("x/dir"),
        &tv.path("y/b"),
        RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(fs::read(tv.path("y/b/inner")).unwrap(), b"inner");
    assert_eq!(fs::read(tv.path("x/dir")).unwrap(), b"contents of a");
    assert_eq!((nlink(&tv.path("x")), nlink(&tv.path("y"))), (2, 3));
    assert_eq!(
        st(&tv.path("y/b/..")).st_ino,
        st(&tv.path("y")).st_ino,
        "'..' of moved dir"
    );
    // Exchange with a missing name fails and changes nothing.
    assert_errno!(
        renameat2(
            &tv.path("x/a"),
            &tv.path("y/zz"),
            RenameFlags::RENAME_EXCHANGE
        ),
        ENOENT
    );
    assert_eq!(fs::read(tv.path("x/a")).unwrap(), b"contents of b");
}

#[test]
fn rename_across_directories_moves_the_subtree_and_never_exdev() {
    let tv = TestVolume::new();
    fs::create_dir_all(tv.path("a/b/moved/deep")).unwrap();
    fs::create_dir_all(tv.path("x/y")).unwrap();
    write_file(&tv.path("a/b/moved/deep/f"), &pattern(100_000, 20));
    write_file(&tv.path("a/file"), b"file");
    setxattr(&tv.path("a/file"), "user.travels", b"along", 0).unwrap();
    setxattr(&tv.path("a/b/moved"), "user.dir", b"too", 0).unwrap();
    let ino = st(&tv.path("a/file")).st_ino;
    fs::rename(tv.path("a/b/moved"), tv.path("x/y/moved")).unwrap();
    fs::rename(tv.path("a/file"), tv.path("x/y/moved/deep/file2")).unwrap();
    assert_bytes_eq(
        &fs::read(tv.path("x/y/moved/deep/f")).unwrap(),
        &pattern(100_000, 20),
        "moved file",
    );
    assert_eq!(fs::read(tv.path("x/y/moved/deep/file2")).unwrap(), b"file");
    assert_eq!(
        st(&tv.path("x/y/moved/deep/file2")).st_ino,
        ino,
        "rename keeps the inode"
    );
    assert_eq!(
        getxattr(&tv.path("x/y/moved/deep/file2"), "user.travels").unwrap(),
        b"along"
    );
    assert_eq!(getxattr(&tv.path("x/y/moved"), "user.dir").unwrap(), b"too");
    assert_eq!(
        st(&tv.path("x/y/moved/..")).st_ino,
        st(&tv.path("x/y")).st_ino,
        "'..' of a moved directory points at the new parent"
    );
    assert!(names(&tv.path("a/b")).is_empty());
    assert_eq!(nlink(&tv.path("a/b")), 2);
    assert_eq!(nlink(&tv.path("x/y")), 3);
}

// ---------------------------------------------------------------------------------------------
// hard links
// ---------------------------------------------------------------------------------------------

#[test]
fn hard_links_share_the_inode_and_count_nlink() {
    let tv = TestVolume::new();
    fs::create_dir(tv.path("d")).unwrap();
    write_file(&tv.path("f"), b"shared");
    fs::hard_link(tv.path("f"), tv.path("g")).unwrap();
    fs::hard_link(tv.path("f"), tv.path("d/h")).unwrap();
    let (a, b, c) = (st(&tv.path("f")), st(&tv.path("g")), st(&tv.path("d/h")));
    assert_eq!(
        (a.st_ino, a.st_ino),
        (b.st_ino, c.st_ino),
        "hard links share the inode"
    );
    assert_eq!((a.st_nlink, b.st_nlink, c.st_nlink), (3, 3, 3));
    // A write through one name is visible through the others.
    OpenOptions::new()
        .append(true)
        .open(tv.path("d/h"))
        .unwrap()
        .write_all(b"+more")
        .unwrap();
    assert_eq!(fs::read(tv.path("g")).unwrap(), b"shared+more");
    fs::remove_file(tv.path("f")).unwrap();
    assert_eq!(nlink(&tv.path("g")), 2);
    assert_eq!(fs::read(tv.path("d/h")).unwrap(), b"shared+more");
    fs::remove_file(tv.path("g")).unwrap();
    assert_eq!(nlink(&tv.path("d/h")), 1);
    assert_eq!(fs::read(tv.path("d/h")).unwrap(), b"shared+more");
}

#[test]
fn hard_link_to_a_directory_is_eperm_and_to_an_existing_name_eexist() {
    let tv = TestVolume::new();
    fs::create_dir(tv.path("d")).unwrap();
    write_file(&tv.path("f"), b"x");
    write_file(&tv.path("g"), b"y");
    assert_errno!(fs::hard_link(tv.path("d"), tv.path("d2")), EPERM);
    assert_errno!(fs::hard_link(tv.path("f"), tv.path("g")), EEXIST);
    assert_errno!(fs::hard_link(tv.path("missing"), tv.path("h")), ENOENT);
    assert_eq!(nlink(&tv.path("f")), 1);
}

// ---------------------------------------------------------------------------------------------
// symlinks
// ---------------------------------------------------------------------------------------------

#[test]
fn readlink_returns_the_exact_target() {
    let tv = TestVolume::new();
    let long: String = "a/".repeat(2047) + "z"; // 4095 bytes, the longest allowed target
    let targets: Vec<Vec<u8>> = vec![
        b"plain".to_vec(),
        b"/absolute/elsewhere".to_vec(),
        b"../../up/and/away".to_vec(),
        b"with space and \n newline".to_vec(),
        vec![0xff, 0xfe, b'/', 0x80],
        b"trailing/".to_vec(),
        long.into_bytes(),
    ];
    for (i, t) in targets.iter().enumerate() {
        let l = tv.path(format!("l{i}"));
        symlink(std::ffi::OsStr::from_bytes(t), &l).unwrap();
        assert_eq!(
            fs::read_link(&l).unwrap().as_os_str().as_bytes(),
            &t[..],
            "readlink l{i}"
        );
        let s = st(&l);
        assert_eq!(
            s.st_mode & libc::S_IFMT,
            libc::S_IFLNK,
            "lstat type of l{i}"
        );
        assert_eq!(s.st_size as usize, t.len(), "lstat size of l{i}");
    }
    assert_errno!(fs::read_link(tv.mnt()), EINVAL);
}

#[test]
fn symlinks_are_followed_and_errors_are_exact() {
    let tv = TestVolume::new();
    fs::create_dir(tv.path("d")).unwrap();
    write_file(&tv.path("d/target"), b"through the link");
    symlink("d/target", tv.path("rel")).unwrap();
    symlink(tv.path("d"), tv.path("abs_dir")).unwrap();
    symlink("missing", tv.path("dangling")).unwrap();
    symlink("loop2", tv.path("loop1")).unwrap();
    symlink("loop1", tv.path("loop2")).unwrap();
    assert_eq!(fs::read(tv.path("rel")).unwrap(), b"through the link");
    assert_eq!(
        fs::read(tv.path("abs_dir/target")).unwrap(),
        b"through the link"
    );
    assert_eq!(st(&tv.path("rel")).st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        nix::sys::stat::stat(&tv.path("rel")).unwrap().st_ino,
        st(&tv.path("d/target")).st_ino
    );
    assert_errno!(File::open(tv.path("dangling")), ENOENT);
    assert_errno!(File::open(tv.path("loop1")), ELOOP);
    assert_errno!(
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tv.path("rel")),
        ELOOP
    );
    assert_errno!(symlink("x", tv.path("rel")), EEXIST);
    // Writing through a dangling symlink creates its target.
    write_file(&tv.path("dangling"), b"created");
    assert_eq!(fs::read(tv.path("missing")).unwrap(), b"created");
    // Removing the link leaves the target.
    fs::remove_file(tv.path("rel")).unwrap();
    assert_eq!(fs::read(tv.path("d/target")).unwrap(), b"through the link");
}

use std::os::unix::fs::OpenOptionsExt;

// ---------------------------------------------------------------------------------------------
// special files
// ---------------------------------------------------------------------------------------------

#[test]
fn fifo_passes_data_from_writer_to_reader() {
    let tv = TestVolume::new();
    let p = tv.path("fifo");
    nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o640)).unwrap();
    let s = st(&p);
    assert_eq!(s.st_mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(s.st_mode & 0o7777, 0o640);
    let pw = p.clone();
    let writer = std::thread::spawn(move || {
        let mut w = OpenOptions::new().write(true).open(&pw).unwrap();
        w.write_all(&pattern(200_000, 21)).unwrap();
    });
    let mut got = Vec::new();
    File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_bytes_eq(&got, &pattern(200_000, 21), "bytes through the FIFO");
    assert_eq!(st(&p).st_size, 0, "a FIFO has size 0");
}

#[test]
fn unix_socket_can_be_bound_and_connected_through_the_mount() {
    let tv = TestVolume::new();
    let p = tv.path("sock");
    let l = UnixListener::bind(&p).unwrap();
    assert_eq!(ftype(&p), libc::S_IFSOCK);
    let pc = p.clone();
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&pc).unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        b
    });
    let (mut s, _) = l.accept().unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    assert_eq!(&client.join().unwrap(), b"pong");
    // mknod(S_IFSOCK) also makes a socket inode.
    nix::sys::stat::mknod(
        &tv.path("sock2"),
        SFlag::S_IFSOCK,
        Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    assert_eq!(ftype(&tv.path("sock2")), libc::S_IFSOCK);
    // Binding an existing name is EADDRINUSE.
    assert_errno!(UnixListener::bind(&p), EADDRINUSE);
}

#[test]
fn mknod_char_and_block_devices_keep_type_mode_and_rdev() {
    let tv = TestVolume::new();
    let cases = [
        (
            "null",
            SFlag::S_IFCHR,
            libc::S_IFCHR,
            0o666,
            libc::makedev(1, 3),
        ),
        (
            "tty",
            SFlag::S_IFCHR,
            libc::S_IFCHR,
            0o620,
            libc::makedev(4, 1),
        ),
        (
            "big",
            SFlag::S_IFCHR,
            libc::S_IFCHR,
            0o600,
            libc::makedev(511, 1_048_575),
        ),
        (
            "sda1",
            SFlag::S_IFBLK,
            libc::S_IFBLK,
            0o660,
            libc::makedev(8, 1),
        ),
        (
            "nvme",
            SFlag::S_IFBLK,
            libc::S_IFBLK,
            0o640,
            libc::makedev(259, 65_539),
        ),
    ];
    // Create with umask 0 (in a forked child: umask is per process) so modes are exact.
    let mnt = tv.mnt().to_path_buf();
    run_as(0, 0, || {
        nix::sys::stat::umask(Mode::empty());
        for (name, kind, _, mode, dev) in cases {
            nix::sys::stat::mknod(&mnt.join(name), kind, Mode::from_bits_truncate(mode), dev)
                .unwrap_or_else(|e| panic!("mknod {name}: {e}"));
        }
    });
    for (name, _, ifmt, mode, dev) in cases {
        let s = st(&tv.path(name));
        assert_eq!(s.st_mode & libc::S_IFMT, ifmt, "{name}: type");
        assert_eq!(s.st_mode & 0o7777, mode, "{name}: mode");
        assert_eq!(
            (libc::major(s.st_rdev), libc::minor(s.st_rdev)),
            (libc::major(dev), libc::minor(dev)),
            "{name}: st_rdev"
        );
        assert_eq!(s.st_size, 0, "{name}: size");
    }
    let m = fs::metadata(tv.path("nvme")).unwrap();
    assert_eq!(m.rdev(), libc::makedev(259, 65_539));
}

// ---------------------------------------------------------------------------------------------
// NAME_MAX
// ---------------------------------------------------------------------------------------------

#[test]
fn name_of_255_bytes_works_and_256_bytes_is_enametoolong() {
    let tv = TestVolume::new();
    let ok = |c: &str| tv.path(c.repeat(255));
    let long = |c: &str| tv.path(c.repeat(256));
    write_file(&tv.path("src"), b"s");
    // 255 bytes: every kind of creation works.
    write_file(&ok("f"), b"x");
    fs::create_dir(ok("d")).unwrap();
    symlink("src", ok("s")).unwrap();
    fs::hard_link(tv.path("src"), ok("h")).unwrap();
    nix::unistd::mkfifo(&ok("p"), Mode::from_bits_truncate(0o644)).unwrap();
    write_file(&tv.path("mv"), b"m");
    fs::rename(tv.path("mv"), ok("r")).unwrap();
    assert_eq!(fs::read(ok("f")).unwrap(), b"x");
    assert_eq!(fs::read(ok("r")).unwrap(), b"m");
    assert_eq!(names(tv.mnt()).len(), 7);
    // A 4-byte UTF-8 character repeated: 252 bytes fine, 256 bytes too long.
    write_file(&tv.path("😀".repeat(63)), b"u");
    // 256 bytes: ENAMETOOLONG everywhere.
    assert_errno!(File::create(long("f")), ENAMETOOLONG);
    assert_errno!(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(long("f")),
        ENAMETOOLONG
    );
    assert_errno!(fs::create_dir(long("d")), ENAMETOOLONG);
    assert_errno!(symlink("src", long("s")), ENAMETOOLONG);
    assert_errno!(fs::hard_link(tv.path("src"), long("h")), ENAMETOOLONG);
    assert_errno!(
        nix::unistd::mkfifo(&long("p"), Mode::from_bits_truncate(0o644)),
        ENAMETOOLONG
    );
    assert_errno!(fs::rename(tv.path("src"), long("r")), ENAMETOOLONG);
    assert_errno!(nix::sys::stat::lstat(&long("x")), ENAMETOOLONG);
    assert_errno!(File::create(tv.path("😀".repeat(64))), ENAMETOOLONG);
    assert_eq!(
        names(tv.mnt()).len(),
        8,
        "a failed create left something behind"
    );
    assert_eq!(fs::read(tv.path("src")).unwrap(), b"s");
}

#[test]
fn seeking_a_directory_to_a_returned_offset_resumes_after_that_entry() {
    let tv = TestVolume::new();
    let d = tv.path("d");
    fs::create_dir(&d).unwrap();
    for i in 0..300 {
        File::create(d.join(format!("entry-{i:03}"))).unwrap();
    }
    let f = File::open(&d).unwrap();
    let mut all = Vec::new();
    loop {
        let b = getdents(&f, 400).unwrap();
        if b.is_empty() {
            break;
        }
        all.extend(b);
    }
    assert_eq!(all.len(), 302);
    for k in [0usize, 1, 2, 57, 150, 299] {
        nix::unistd::lseek(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            all[k].off,
            nix::unistd::Whence::SeekSet,
        )
        .unwrap();
        let next = getdents(&f, 400).unwrap();
        assert_eq!(
            next.first().map(|e| &e.name),
            Some(&all[k + 1].name),
            "after seeking to d_off of entry {k}"
        );
    }
    // Rewinding sees entries created since.
    File::create(d.join("late")).unwrap();
    nix::unistd::lseek(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        0,
        nix::unistd::Whence::SeekSet,
    )
    .unwrap();
    let mut again = Vec::new();
    loop {
        let b = getdents(&f, 4096).unwrap();
        if b.is_empty() {
            break;
        }
        again.extend(b);
    }
    assert_eq!(again.len(), 303);
    assert!(again.iter().any(|e| e.name == b"late"));
}

#[test]
fn open_file_keeps_working_after_its_directory_is_renamed() {
    let tv = TestVolume::new();
    fs::create_dir_all(tv.path("a/b")).unwrap();
    let mut f = File::create(tv.path("a/b/f")).unwrap();
    f.write_all(b"one ").unwrap();
    fs::create_dir(tv.path("z")).unwrap();
    fs::rename(tv.path("a"), tv.path("z/renamed")).unwrap();
    f.write_all(b"two").unwrap();
    drop(f);
    assert_eq!(fs::read(tv.path("z/renamed/b/f")).unwrap(), b"one two");
    assert!(!tv.path("a").exists());
}
