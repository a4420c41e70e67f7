//! `volfs fsck` and `volfs scrub` against a real daemon: a tree built through the kernel
//! (with snapshots) checks clean; damage done to the store while the daemon is stopped is
//! named by both, reads of the damaged chunk fail with EIO, and `fsck --repair` fixes a
//! wrong link count but is refused while the volume is mounted.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use volfs::chunks::ChunkPtr;
use volfs::store::{self, InodeRecord, Store};

use crate::util::*;

const CHUNK: usize = 16 * 1024;

fn mountpoint() -> (TempDir, PathBuf) {
    let dir = open_tempdir();
    let p = fs::canonicalize(dir.path()).expect("canonicalize");
    (dir, p)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).expect("create");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// A tree of some variety: nested directories, files of several sizes (a hole, an
/// overwrite, a truncation), hard links, a symlink, a fifo, xattrs, renames and removals.
fn build_tree(mnt: &Path) {
    fs::create_dir_all(mnt.join("a/b/c")).expect("mkdir");
    fs::create_dir(mnt.join("empty")).expect("mkdir");
    write_file(&mnt.join("a/small"), b"hello");
    write_file(&mnt.join("a/b/big"), &pattern(300_000, 1));
    write_file(&mnt.join("hard"), &pattern(20_000, 2));
    fs::hard_link(mnt.join("hard"), mnt.join("a/b/c/hard2")).expect("link");
    symlink("a/small", mnt.join("sym")).expect("symlink");
    nix::unistd::mkfifo(
        &mnt.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");
    xattr::set(mnt.join("a/small"), "user.k", b"v").expect("xattr");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(mnt.join("sparse"))
        .expect("open");
    f.write_all_at(b"end", 1_000_000).expect("sparse write");
    f.write_all_at(&[7u8; 40_000], 10_000).expect("overwrite");
    f.set_len(500_000).expect("truncate");
    f.sync_all().expect("fsync");
    for i in 0..20 {
        write_file(
            &mnt.join(format!("a/b/c/f{i}")),
            &pattern(i * 1000, i as u8),
        );
    }
    fs::rename(mnt.join("a/b/c/f3"), mnt.join("empty/moved")).expect("rename");
    fs::rename(mnt.join("a/b/c"), mnt.join("c")).expect("rename dir");
    fs::remove_file(mnt.join("c/f4")).expect("unlink");
}

fn volume_id(store: &Store, name: &str) -> u64 {
    store.volume(name).expect("read").expect("volume").id
}

#[test]
fn fsck_and_scrub_name_offline_damage_and_repair_fixes_a_link_count() {
    let (_mdir, mnt) = mountpoint();
    let mut d = Daemon::start();
    d.create("fsckvol");
    d.mount("fsckvol", &mnt, false);
    build_tree(&mnt);
    d.cli_ok(&["snapshot", "create", "fsckvol", "s1"]);
    write_file(&mnt.join("a/b/big"), &pattern(100_000, 9));
    fs::remove_file(mnt.join("c/f5")).expect("unlink");
    fs::create_dir(mnt.join("after")).expect("mkdir");
    d.cli_ok(&["snapshot", "create", "fsckvol", "s2"]);
    write_file(&mnt.join("after/x"), &pattern(50_000, 3));
    // Changed since the snapshots: the damage below is in the live volume only (a key
    // the snapshots share with it would be damaged in them too).
    write_file(&mnt.join("hard"), &pattern(25_000, 4));

    // Clean, while mounted and in use.
    let out = d.cli_ok(&["fsck", "fsckvol"]);
    assert!(out.contains("fsckvol: clean ("), "{out}");
    let out = d.cli_ok(&["fsck", "--all"]);
    assert!(out.contains("fsckvol: clean ("), "{out}");
    let out = d.cli_ok(&["scrub"]);
    assert!(out.contains("no corrupt chunk"), "{out}");
    // No repair under a mount.
    let o = d.cli(&["fsck", "--repair", "fsckvol"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout_of(&o));
    assert!(
        stderr_of(&o).contains(&format!("mounted at {}", mnt.display())),
        "{}",
        stderr_of(&o)
    );
    // Nothing of fsck's temporary snapshots is left.
    let snaps = d.cli_ok(&["snapshot", "ls", "fsckvol"]);
    assert!(!snaps.contains("fsck-"), "{snaps}");

    let hard = fs::metadata(mnt.join("hard")).expect("stat").ino();
    let big = fs::metadata(mnt.join("a/b/big")).expect("stat").ino();
    let big_data = fs::read(mnt.join("a/b/big")).expect("read");
    d.shutdown();

    // Offline damage: a link count, and one byte of chunk 1 of `big` on disk.
    {
        let store = Store::open(d.root()).expect("open the stopped daemon's store");
        let vol = volume_id(&store, "fsckvol");
        let k = store::inode_key(vol, hard);
        let mut r = InodeRecord::decode(&store.fs.get(&k).unwrap().unwrap()).unwrap();
        assert_eq!(r.nlink, 2);
        r.nlink = 7;
        store.fs.insert(k, r.encode()).unwrap();
        let v = store
            .fs
            .get(store::chunk_key(vol, big, 1))
            .unwrap()
            .unwrap();
        let ptr = ChunkPtr::decode(&v).unwrap();
        let seg = d.root().join(format!("data/{:016x}.seg", ptr.seg));
        let f = OpenOptions::new().read(true).write(true).open(seg).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, ptr.off + 100).unwrap();
        assert_eq!(b[0], big_data[CHUNK + 100], "found the wrong chunk");
        f.write_all_at(&[b[0] ^ 0x40], ptr.off + 100).unwrap();
        f.sync_all().unwrap();
        store.sync().unwrap();
    }
    d.restart();
    d.assert_mounts(&[(mnt.clone(), false)]);

    let o = d.cli(&["fsck", "fsckvol"]);
    let text = stdout_of(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "fsckvol: inode {hard} (/hard): link count 7, but 2 entries name it"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "fsckvol: inode {big} (/a/b/big): chunk at offset {CHUNK}: checksum mismatch"
        )),
        "{text}"
    );
    assert!(
        stderr_of(&o).contains("2 problem(s) found"),
        "{}",
        stderr_of(&o)
    );

    let o = d.cli(&["scrub", "fsckvol"]);
    let text = stdout_of(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "fsckvol: inode {big} offset {CHUNK}: checksum mismatch"
        )),
        "{text}"
    );
    assert!(text.contains("1 corrupt chunk(s)"), "{text}");

    // The kernel gets EIO for the damaged chunk, and the other chunks still read.
    let f = File::open(mnt.join("a/b/big")).expect("open");
    let mut buf = vec![0u8; 100];
    let e = f
        .read_at(&mut buf, CHUNK as u64 + 50)
        .expect_err("corrupt chunk read");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    f.read_exact_at(&mut buf, 0).expect("chunk 0 reads");
    assert_eq!(buf, big_data[..100]);
    drop(f);

    // Repaired once unmounted; the corrupt chunk is left, and said so.
    d.umount(&mnt);
    let o = d.cli(&["fsck", "--repair", "fsckvol"]);
    let text = stdout_of(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "fsckvol: repaired: inode {hard}: link count 7 -> 2"
        )),
        "{text}"
    );
    assert!(text.contains("checksum mismatch"), "{text}");
    assert!(!text.contains("link count 7, but"), "{text}");
    assert!(
        stderr_of(&o).contains("1 problem(s) left after the repair"),
        "{}",
        stderr_of(&o)
    );
    d.mount("fsckvol", &mnt, false);
    assert_eq!(fs::metadata(mnt.join("hard")).expect("stat").nlink(), 2);
    // Snapshot s2 shares the damaged chunk (big is unchanged since): rewriting the file
    // leaves it there, where fsck still finds it, until the snapshot goes.
    write_file(&mnt.join("a/b/big"), &big_data);
    let o = d.cli(&["fsck", "fsckvol"]);
    let text = stdout_of(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "fsckvol: inode {big}: chunk at offset {CHUNK} in snapshot s2: checksum mismatch"
        )),
        "{text}"
    );
    d.cli_ok(&["snapshot", "rm", "fsckvol@s2"]);
    let out = d.cli_ok(&["fsck", "fsckvol"]);
    assert!(out.contains("fsckvol: clean ("), "{out}");
}
