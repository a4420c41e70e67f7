//! Snapshots through the real CLI, daemon and kernel: point-in-time consistency while
//! writers run, read-only snapshot mounts, exact preservation of every kind of inode and
//! attribute, `snapshot create/ls/rm` (names, formats, refusals), rollback (refused over
//! writable mounts unless `--force`, kernel caches dropped), clone, the space removal gives
//! back, restarts and crashes, and how long writers stall while a snapshot is taken.
//! Everything is read back through a mount with ordinary syscalls and compared exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::Uid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;

use crate::util::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A mount point directory; whatever is mounted there is lazily unmounted before the
/// directory is removed, so it may be dropped in any order relative to its daemon.
struct Mp {
    path: PathBuf,
    _dir: TempDir,
}

impl Drop for Mp {
    fn drop(&mut self) {
        lazy_umount(&self.path);
    }
}

fn mp() -> Mp {
    let dir = open_tempdir();
    let path = fs::canonicalize(dir.path()).expect("canonicalize");
    Mp { path, _dir: dir }
}

fn mp_str(m: &Mp) -> &str {
    m.path.to_str().expect("utf-8 mount point")
}

/// Mount `target` (`VOL` or `VOL@SNAP`) at a fresh directory.
#[track_caller]
fn mount_at_new(d: &Daemon, target: &str, read_only: bool) -> Mp {
    let m = mp();
    d.mount(target, &m.path, read_only);
    m
}

/// `volfs ARGS` must exit 1 with every one of `says` in its message (and not panic).
#[track_caller]
fn refused(d: &Daemon, args: &[&str], says: &[&str]) -> String {
    let o = d.cli(args);
    let err = stderr_of(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "volfs {args:?}: exit status {}, expected 1; stdout {:?} stderr {err:?}",
        o.status,
        stdout_of(&o)
    );
    for s in says {
        assert!(
            err.contains(s),
            "volfs {args:?}: the message lacks {s:?}: {err:?}"
        );
    }
    assert!(!err.contains("panicked"), "volfs {args:?} panicked: {err}");
    err
}

/// The objects printed by `volfs snapshot ls VOL --format json` (one per line).
#[track_caller]
fn snap_ls_json(d: &Daemon, vol: &str) -> Vec<Value> {
    d.cli_ok(&["snapshot", "ls", vol, "--format", "json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("snapshot ls json {l:?}: {e}")))
        .collect()
}

#[track_caller]
fn snap_names(d: &Daemon, vol: &str) -> Vec<String> {
    snap_ls_json(d, vol)
        .iter()
        .map(|v| v["name"].as_str().expect("name is a string").to_string())
        .collect()
}

/// `volfs snapshot create VOL NAME`; asserts it prints `VOL@NAME`.
#[track_caller]
fn snap(d: &Daemon, vol: &str, name: &str) {
    let out = d.cli_ok(&["snapshot", "create", vol, name]);
    assert_eq!(out, format!("{vol}@{name}\n"), "snapshot create's output");
}

#[track_caller]
fn store_bytes(d: &Daemon) -> u64 {
    let out = d.cli_ok(&["info", "--format", "json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("info {out}: {e}"));
    v["store_bytes"].as_u64().expect("store_bytes")
}

/// Run a tool through the clean spawner; asserts it succeeds; returns stdout.
#[track_caller]
fn tool(prog: &str, args: &[&str]) -> String {
    let mut cmd = CleanCommand::new(prog);
    cmd.args(args);
    let out = run_within(cmd, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{prog} {args:?} did not finish within 30 s"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}): {}{}",
        out.status,
        stdout_of(&out),
        stderr_of(&out)
    );
    stdout_of(&out)
}

fn p2s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn set_mtime(p: &Path, secs: i64, nsecs: i64) {
    let t = TimeSpec::new(secs, nsecs);
    nix::sys::stat::utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// Ask the kernel to drop the cached pages of every regular file under `root`, so the
/// next read asks the daemon.
fn drop_page_cache(root: &Path) {
    for (rel, n) in listing(root) {
        if n.kind == "file" {
            if let Ok(f) = File::open(root.join(&rel)) {
                let _ = nix::fcntl::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// recorded listings
// ---------------------------------------------------------------------------------------------

/// What a tree shows through syscalls for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    rdev: u64,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// Length and hash of a regular file's bytes.
    data: Option<(usize, u64)>,
}

type Listing = BTreeMap<String, Node>;

fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Every path under `root` (`.` for itself) with its type, mode, owner, size, mtime, link
/// count, device, link target, xattrs (ACLs included) and content hash.
#[track_caller]
fn listing(root: &Path) -> Listing {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[track_caller]
fn walk(root: &Path, p: &Path, out: &mut Listing) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_socket() {
        "socket"
    } else {
        "?"
    };
    let mut xattrs = BTreeMap::new();
    for name in xattr::list(p).unwrap_or_else(|e| panic!("listxattr {}: {e}", p.display())) {
        let key = name.to_string_lossy().into_owned();
        let v = xattr::get(p, &name)
            .unwrap_or_else(|e| panic!("getxattr {} {key}: {e}", p.display()))
            .unwrap_or_default();
        xattrs.insert(key, v);
    }
    let data = (kind == "file").then(|| {
        let b = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        (b.len(), hash_bytes(&b))
    });
    let link = (kind == "symlink")
        .then(|| fs::read_link(p).unwrap_or_else(|e| panic!("readlink {}: {e}", p.display())));
    let rel = p.strip_prefix(root).expect("under root");
    let rel = if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.to_string_lossy().into_owned()
    };
    out.insert(
        rel,
        Node {
            kind,
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            nlink: m.nlink(),
            rdev: m.rdev(),
            link,
            xattrs,
            data,
        },
    );
    if kind == "dir" {
        let mut names: Vec<PathBuf> = fs::read_dir(p)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
            .map(|e| e.expect("readdir entry").path())
            .collect();
        names.sort();
        for c in names {
            walk(root, &c, out);
        }
    }
}

/// Panics listing (at most 20 of) the paths missing, extra or different in `got`.
#[track_caller]
fn assert_same(what: &str, want: &Listing, got: &Listing) {
    if want == got {
        return;
    }
    let mut diffs = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {k}: {w:?}")),
            Some(g) if g != w => diffs.push(format!("{k}:\n    want {w:?}\n    got  {g:?}")),
            _ => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diffs.push(format!("extra {k}: {g:?}"));
        }
    }
    let n = diffs.len();
    diffs.truncate(20);
    panic!("{what}: {n} differences:\n  {}", diffs.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// 1. point-in-time consistency under concurrent writers
// ---------------------------------------------------------------------------------------------

/// Accounts of the bank: files moved between directories by `rename`, one at a time, so
/// every instant holds each account exactly once. About 4/5 of them sit in `d0` (more than
/// one page of a snapshot's range read), the rest in the others.
const BANK_DIRS: usize = 3;
const BANK_ACCOUNTS: usize = 360;
/// Width of a generation record of the pairs (`%019d\n`).
const GEN_WIDTH: usize = 20;
/// Length of one log record (`%010d %020d\n`).
const REC_LEN: usize = 32;
const SNAPSHOTS: usize = 30;
/// Each writer pauses this long after each step, so that on a small machine the daemon
/// still has time for the snapshots and their readers; they still make hundreds of steps
/// between two snapshots.
const WRITER_PAUSE: Duration = Duration::from_micros(300);

/// Where account `i` starts: 4/5 in d0.
fn first_dir(i: usize) -> usize {
    if i % 5 != 0 {
        0
    } else {
        1 + i / 5 % (BANK_DIRS - 1)
    }
}

fn account(i: usize) -> String {
    format!("acct{i:04}")
}

fn gen_record(g: u64) -> Vec<u8> {
    let r = format!("{g:019}\n").into_bytes();
    assert_eq!(r.len(), GEN_WIDTH);
    r
}

fn log_record(i: u64) -> Vec<u8> {
    let r = format!("{i:010} {:020}\n", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).into_bytes();
    assert_eq!(r.len(), REC_LEN);
    r
}

#[track_caller]
fn parse_gen(what: &str, b: &[u8]) -> u64 {
    assert!(
        b.len() == GEN_WIDTH && b[GEN_WIDTH - 1] == b'\n',
        "{what}: not one generation record: {:?}",
        String::from_utf8_lossy(b)
    );
    std::str::from_utf8(&b[..GEN_WIDTH - 1])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: bad generation {:?}", String::from_utf8_lossy(b)))
}

/// The state of the three invariants in one tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    gen_a: u64,
    gen_b: u64,
    records: u64,
}

/// Checks the invariants of the writers' tree at `root` (a snapshot mount) whose listing is
/// `list`:
/// - bank: every account exactly once across the directories, holding its own name;
/// - pairs: gen(A) - gen(B) is 0 or 1 (A is written before B);
/// - log: whole records 0, 1, 2, ... with no gap and no torn record.
#[track_caller]
fn check_invariants(root: &Path, list: &Listing, what: &str) -> Seen {
    let mut all = Vec::new();
    for (path, node) in list.range("bank/".to_string()..) {
        let Some(rel) = path.strip_prefix("bank/") else {
            break;
        };
        match rel.split_once('/') {
            None => assert!(
                node.kind == "dir" && rel.starts_with('d'),
                "{what}: bank/{rel} is not one of the bank's directories"
            ),
            Some((_, name)) => {
                assert_eq!(
                    node.data,
                    Some((name.len(), hash_bytes(name.as_bytes()))),
                    "{what}: bank/{rel} does not hold its own name"
                );
                all.push(name.to_string());
            }
        }
    }
    all.sort();
    let want: Vec<String> = (0..BANK_ACCOUNTS).map(account).collect();
    if all != want {
        let have: BTreeSet<&String> = all.iter().collect();
        let missing: Vec<&String> = want.iter().filter(|a| !have.contains(a)).collect();
        let mut dups = all.clone();
        dups.dedup();
        panic!(
            "{what}: the bank holds {} accounts, expected {BANK_ACCOUNTS}: missing {missing:?}, \
             {} duplicated",
            all.len(),
            all.len() - dups.len()
        );
    }

    let a = fs::read(root.join("pairs/A")).unwrap_or_else(|e| panic!("{what}: read A: {e}"));
    let b = fs::read(root.join("pairs/B")).unwrap_or_else(|e| panic!("{what}: read B: {e}"));
    let (gen_a, gen_b) = (parse_gen(what, &a), parse_gen(what, &b));
    assert!(
        gen_a == gen_b || gen_a == gen_b + 1,
        "{what}: pairs out of step: gen(A) = {gen_a}, gen(B) = {gen_b} (A is always written \
         first, so a point-in-time image has gen(A) - gen(B) in {{0, 1}})"
    );

    let log = fs::read(root.join("log/records")).unwrap_or_else(|e| panic!("{what}: log: {e}"));
    assert_eq!(
        log.len() % REC_LEN,
        0,
        "{what}: the log ends in a torn record ({} bytes)",
        log.len()
    );
    for (i, rec) in log.chunks(REC_LEN).enumerate() {
        if rec != log_record(i as u64).as_slice() {
            panic!(
                "{what}: log record {i} of {} is {:?}, expected {:?}",
                log.len() / REC_LEN,
                String::from_utf8_lossy(rec),
                String::from_utf8_lossy(&log_record(i as u64))
            );
        }
    }
    Seen {
        gen_a,
        gen_b,
        records: (log.len() / REC_LEN) as u64,
    }
}

/// Joins a writer, re-raising its panic.
fn join<T>(h: JoinHandle<T>) -> T {
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

#[test]
fn snapshots_are_point_in_time_while_writers_run() {
    let t_setup = Instant::now();
    let v = TestVolume::new();
    let d = v.daemon();
    let root = v.mnt().to_path_buf();
    for i in 0..BANK_DIRS {
        fs::create_dir_all(root.join(format!("bank/d{i}"))).expect("mkdir bank");
    }
    for i in 0..BANK_ACCOUNTS {
        let a = account(i);
        let d = first_dir(i);
        fs::write(root.join(format!("bank/d{d}/{a}")), &a).expect("account");
    }
    fs::create_dir(root.join("pairs")).expect("mkdir pairs");
    fs::write(root.join("pairs/A"), gen_record(0)).expect("A");
    fs::write(root.join("pairs/B"), gen_record(0)).expect("B");
    fs::create_dir(root.join("log")).expect("mkdir log");
    File::create(root.join("log/records")).expect("log");

    let stop = Arc::new(AtomicBool::new(false));
    let mut bank = Vec::new();
    for t in 0..2usize {
        let (stop, root) = (stop.clone(), root.clone());
        bank.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(t as u64);
            let mine: Vec<usize> = (t..BANK_ACCOUNTS).step_by(2).collect();
            let mut at: Vec<usize> = mine.iter().map(|i| first_dir(*i)).collect();
            let mut moves = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let j = rng.gen_range(0..mine.len());
                // Out of d0 one time in four, back to d0 always: 4/5 stay in d0.
                let to = if at[j] != 0 {
                    0
                } else if rng.gen_range(0..4) == 0 {
                    rng.gen_range(1..BANK_DIRS)
                } else {
                    continue;
                };
                let a = account(mine[j]);
                fs::rename(
                    root.join(format!("bank/d{}/{a}", at[j])),
                    root.join(format!("bank/d{to}/{a}")),
                )
                .unwrap_or_else(|e| panic!("bank writer {t}: rename {a}: {e}"));
                at[j] = to;
                moves += 1;
                std::thread::sleep(WRITER_PAUSE);
            }
            moves
        }));
    }
    let pairs = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let a = OpenOptions::new()
                .write(true)
                .open(root.join("pairs/A"))
                .expect("open A");
            let b = OpenOptions::new()
                .write(true)
                .open(root.join("pairs/B"))
                .expect("open B");
            let mut g = 0u64;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                let r = gen_record(g);
                // One write() each: the kernel sends it as one WRITE.
                assert_eq!(a.write_at(&r, 0).expect("write A"), GEN_WIDTH);
                assert_eq!(b.write_at(&r, 0).expect("write B"), GEN_WIDTH);
                std::thread::sleep(WRITER_PAUSE);
            }
            g
        })
    };
    let log = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let mut f = OpenOptions::new()
                .append(true)
                .open(root.join("log/records"))
                .expect("open log");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(f.write(&log_record(i)).expect("append"), REC_LEN);
                i += 1;
                std::thread::sleep(WRITER_PAUSE);
            }
            i
        })
    };

    // The first snapshot stays mounted the whole time; a reader lists its bank over and
    // over (readdir reaches the daemon each time) while the others are taken and removed.
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    snap(d, VOLUME, "s00");
    let first = mount_at_new(d, &format!("{VOLUME}@s00"), false);
    let first_list = listing(&first.path);
    let first_seen = check_invariants(&first.path, &first_list, "s00");
    let reader = {
        let (stop, root) = (stop.clone(), first.path.clone());
        let want = bank_dirs(&first_list);
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let got = bank_dirs(&listing_of_bank(&root));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let lost: Vec<&String> = w.difference(g).take(5).collect();
                    let more: Vec<&String> = g.difference(w).take(5).collect();
                    assert!(
                        lost.is_empty() && more.is_empty(),
                        "s00's bank/d{i} changed while mounted (round {rounds}): {} accounts \
                         instead of {}, lost {lost:?}..., gained {more:?}...",
                        g.len(),
                        w.len()
                    );
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            rounds
        })
    };
    let mut taken: Vec<(String, Seen, Listing)> = vec![("s00".into(), first_seen, first_list)];
    let mut removed = Vec::new();
    let mut cloned = None;
    for k in 1..SNAPSHOTS {
        std::thread::sleep(Duration::from_millis(20));
        let name = format!("s{k:02}");
        snap(d, VOLUME, &name);
        let m = mount_at_new(d, &format!("{VOLUME}@{name}"), false);
        let list = listing(&m.path);
        let seen = check_invariants(&m.path, &list, &name);
        d.umount(&m.path);
        let prev = taken.last().expect("one snapshot").1;
        assert!(
            seen.gen_b >= prev.gen_b && seen.gen_a >= prev.gen_a && seen.records >= prev.records,
            "{name} shows an older state than the snapshot before it: {seen:?} after {prev:?}"
        );
        if k == SNAPSHOTS / 2 {
            // A clone made while the writers go on is that snapshot, exactly.
            assert_eq!(
                d.cli_ok(&["clone", &format!("{VOLUME}@{name}"), "mid"]),
                "mid\n"
            );
            let c = mount_at_new(d, "mid", false);
            assert_same(&format!("clone of {name}"), &list, &listing(&c.path));
            d.umount(&c.path);
            cloned = Some(name.clone());
        }
        taken.push((name, seen, list));
        if k % 5 == 4 {
            // Remove the one before, while the writers go on: its layer merges into the
            // next older one, whose content must not change.
            let (gone, _, _) = taken.remove(taken.len() - 2);
            let out = d.cli_ok(&["snapshot", "rm", &format!("{VOLUME}@{gone}")]);
            assert_eq!(out, format!("{VOLUME}@{gone}\n"));
            removed.push(gone);
        }
    }
    let snap_secs = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let moves: u64 = bank.into_iter().map(join).sum();
    let gens = join(pairs);
    let records = join(log);
    let rounds = join(reader);
    eprintln!(
        "{SNAPSHOTS} snapshots in {snap_secs:.1?} while writers made {moves} renames, {gens} \
         pair generations, {records} log records; s00's bank read {rounds} times meanwhile"
    );

    // The snapshots were taken while the writers were busy, not before or after them.
    let distinct: BTreeSet<u64> = taken.iter().map(|(_, s, _)| s.gen_b).collect();
    let last = taken.last().expect("snapshots").1;
    assert!(
        distinct.len() >= taken.len() / 2 && last.records > first_seen.records,
        "the writers barely moved during the snapshots: generations {distinct:?}, records \
         {} .. {}",
        first_seen.records,
        last.records
    );
    assert!(rounds > 0, "the reader of s00 never ran");
    assert_eq!(
        snap_names(d, VOLUME),
        taken.iter().map(|t| t.0.clone()).collect::<Vec<_>>(),
        "snapshot ls after removing {removed:?}"
    );
    // d0 held more than one page of a range read at some instant.
    let biggest = taken
        .iter()
        .map(|(_, _, l)| bank_dirs(l)[0].len())
        .max()
        .unwrap_or(0);
    assert!(
        biggest > 256,
        "bank/d0 never held more than 256 accounts ({biggest})"
    );

    // More writes that touch everything the snapshots hold.
    fs::remove_dir_all(root.join("bank")).expect("rm -r bank");
    fs::write(root.join("pairs/A"), b"overwritten").expect("A");
    fs::remove_file(root.join("pairs/B")).expect("rm B");
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(root.join("log/records"))
        .expect("truncate log")
        .write_all(&pat(300 * KIB, 1))
        .expect("write log");
    fs::write(root.join("new"), b"new").expect("new file");

    // Every snapshot (and the clone) still shows exactly what it showed when it was taken.
    let t_final = Instant::now();
    assert_same(
        "s00 (mounted throughout)",
        &taken[0].2,
        &listing(&first.path),
    );
    for (name, seen, list) in &taken {
        let m = mount_at_new(d, &format!("{VOLUME}@{name}"), true);
        let now = listing(&m.path);
        assert_eq!(
            check_invariants(&m.path, &now, name),
            *seen,
            "{name}: the invariants' state changed"
        );
        assert_same(&format!("{name} read again at the end"), list, &now);
        d.umount(&m.path);
        if cloned.as_ref() == Some(name) {
            let c = mount_at_new(d, "mid", true);
            assert_same("the clone at the end", list, &listing(&c.path));
            d.umount(&c.path);
        }
    }
    d.umount(&first.path);
    eprintln!(
        "setup {:.1?}, snapshots {snap_secs:.1?}, final check {:.1?}",
        t0 - t_setup,
        t_final.elapsed()
    );
}

/// The account names in each bank directory of a listing.
fn bank_dirs(list: &Listing) -> Vec<BTreeSet<String>> {
    let mut dirs = vec![BTreeSet::new(); BANK_DIRS];
    for path in list.keys() {
        if let Some((d, name)) = path.strip_prefix("bank/d").and_then(|r| r.split_once('/')) {
            let i: usize = d.parse().expect("bank directory number");
            dirs[i].insert(name.to_string());
        }
    }
    dirs
}

/// A listing of only the names in the bank's directories (one readdir each).
fn listing_of_bank(root: &Path) -> Listing {
    let mut out = Listing::new();
    let node = Node {
        kind: "file",
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: (0, 0),
        nlink: 0,
        rdev: 0,
        link: None,
        xattrs: BTreeMap::new(),
        data: None,
    };
    for d in 0..BANK_DIRS {
        let dir = root.join(format!("bank/d{d}"));
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let name = e.expect("readdir entry").file_name();
            out.insert(
                format!("bank/d{d}/{}", name.to_string_lossy()),
                node.clone(),
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 2. snapshot mounts are read-only
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_mounts_refuse_every_change_with_erofs_even_for_root() {
    let v = TestVolume::new();
    let d = v.daemon();
    fs::create_dir(v.path("dir")).expect("mkdir");
    fs::write(v.path("dir/f"), b"snapshot bytes").expect("write");
    fs::write(v.path("g"), b"g").expect("write");
    xattr::set(v.path("g"), "user.k", b"v").expect("setxattr");
    snap(d, VOLUME, "ro");
    let want = listing(&v.path(""));

    let plain = mount_at_new(d, &format!("{VOLUME}@ro"), false);
    let flagged = mount_at_new(d, &format!("{VOLUME}@ro"), true);
    let ls = d.cli_ok(&["ls"]);
    for m in [&plain, &flagged] {
        let shown = format!("{} (ro @ro)", m.path.display());
        assert!(
            ls.lines()
                .any(|l| l.starts_with(VOLUME) && l.contains(&shown)),
            "`volfs ls` does not show {shown:?}: {ls}"
        );
    }
    assert!(
        ls.lines()
            .any(|l| l.starts_with(VOLUME) && l.contains(&format!("{}", v.mnt().display()))),
        "`volfs ls` lost the writable mount: {ls}"
    );

    for m in [&plain, &flagged] {
        let p = |rel: &str| m.path.join(rel);
        let what = m.path.display().to_string();
        assert_errno!(OpenOptions::new().write(true).open(p("dir/f")), EROFS);
        assert_errno!(OpenOptions::new().append(true).open(p("g")), EROFS);
        assert_errno!(File::create(p("new")), EROFS);
        assert_errno!(File::create(p("dir/f")), EROFS);
        assert_errno!(fs::remove_file(p("g")), EROFS);
        assert_errno!(fs::remove_dir_all(p("dir")), EROFS);
        assert_errno!(fs::create_dir(p("newdir")), EROFS);
        assert_errno!(fs::rename(p("g"), p("h")), EROFS);
        assert_errno!(symlink("g", p("sl")), EROFS);
        assert_errno!(fs::hard_link(p("g"), p("hl")), EROFS);
        assert_errno!(
            nix::unistd::mkfifo(&p("fifo"), Mode::from_bits_truncate(0o644)),
            EROFS
        );
        assert_errno!(
            nix::sys::stat::fchmodat(
                None,
                &p("g"),
                Mode::from_bits_truncate(0o600),
                FchmodatFlags::FollowSymlink
            ),
            EROFS
        );
        assert_errno!(
            nix::unistd::chown(&p("g"), Some(Uid::from_raw(7)), None),
            EROFS
        );
        assert_errno!(xattr::set(p("g"), "user.k", b"w"), EROFS);
        assert_errno!(xattr::remove(p("g"), "user.k"), EROFS);
        assert_errno!(nix::unistd::truncate(&p("dir/f"), 0), EROFS);
        let t = TimeSpec::new(1, 0);
        assert_errno!(
            nix::sys::stat::utimensat(None, &p("g"), &t, &t, UtimensatFlags::FollowSymlink),
            EROFS
        );
        // A descriptor opened for reading cannot write either.
        let f = File::open(p("dir/f")).expect("open for reading");
        assert_errno!(f.write_at(b"x", 0), EBADF);
        drop(f);
        assert_same(
            &format!("{what} after refused changes"),
            &want,
            &listing(&m.path),
        );
    }
    d.umount(&plain.path);
    d.umount(&flagged.path);
}

// ---------------------------------------------------------------------------------------------
// 3. exactness
// ---------------------------------------------------------------------------------------------

/// Entries of the `many` directory of the rich tree.
const MANY: usize = 400;

/// Builds a tree with every kind of inode and attribute under `m`.
fn build_rich_tree(m: &Path) {
    let p = |rel: &str| m.join(rel);
    fs::create_dir_all(p("a/b/c")).expect("mkdir");
    fs::create_dir(p("sticky")).expect("mkdir");
    fs::write(p("big"), pat(MIB + 300 * KIB + 123, 7)).expect("big");
    {
        let f = File::create(p("sparse")).expect("sparse");
        f.set_len(9 * MIB as u64).expect("set_len");
        f.write_all_at(b"island", 4 * MIB as u64 + 7)
            .expect("island");
    }
    fs::write(p("a/one"), b"one\n").expect("one");
    fs::write(p("a/b/two"), pat(5000, 2)).expect("two");
    fs::write(p("setuid"), b"#!/bin/sh\n").expect("setuid");
    fs::write(p("empty"), b"").expect("empty");
    fs::hard_link(p("a/one"), p("hardlink")).expect("link");
    symlink("a/one", p("symlink")).expect("symlink");
    symlink("/nowhere/at all", p("dangling")).expect("symlink");
    nix::unistd::mkfifo(&p("fifo"), Mode::from_bits_truncate(0o640)).expect("mkfifo");
    nix::sys::stat::mknod(
        &p("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        libc::makedev(1, 3),
    )
    .expect("mknod chr");
    nix::sys::stat::mknod(
        &p("a/blk"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        libc::makedev(8, 17),
    )
    .expect("mknod blk");
    chmod(&p("setuid"), 0o4755);
    chmod(&p("a/b"), 0o2770);
    chmod(&p("sticky"), 0o1777);
    chmod(&p("a/b/two"), 0o640);
    lchown(&p("a/b/two"), 1234, 5678);
    lchown(&p("a/b"), 1000, 1001);
    lchown(&p("symlink"), 42, 43);
    lchown(&p("fifo"), 7, 8);
    xattr::set(p("a/one"), "user.color", b"blue").expect("setxattr");
    xattr::set(p("a"), "user.bin", &[0u8, 1, 2, 255]).expect("setxattr");
    xattr::set(p("big"), "trusted.t", b"root only").expect("setxattr");
    tool("setfacl", &["-m", "u:1234:rwx,g:99:r", p2s(&p("a/b/two"))]);
    tool("setfacl", &["-d", "-m", "u:1234:rx", p2s(&p("a/b"))]);
    // More entries than one page of a snapshot's range read.
    fs::create_dir(p("many")).expect("mkdir");
    for i in 0..MANY {
        fs::write(p(&format!("many/e{i:03}")), i.to_string()).expect("many");
    }
    // Times last: creating entries changes a directory's mtime.
    set_mtime(&p("big"), 1_600_000_000, 123_456_789);
    set_mtime(&p("a/b/two"), 1_000_000_001, 1);
    set_mtime(&p("symlink"), 1_234_567_890, 999_999_999);
    set_mtime(&p("a/b/c"), 1_500_000_000, 500);
    set_mtime(&p("a"), 1_400_000_000, 42);
}

/// Changes everything `build_rich_tree` made.
fn change_rich_tree(m: &Path) {
    let p = |rel: &str| m.join(rel);
    let f = OpenOptions::new()
        .write(true)
        .open(p("big"))
        .expect("open big");
    f.write_all_at(&pat(200 * KIB, 99), MIB as u64)
        .expect("overwrite big");
    drop(f);
    fs::write(p("a/one"), b"ONE, rewritten\n").expect("rewrite one");
    nix::unistd::truncate(&p("sparse"), 100).expect("truncate sparse");
    fs::remove_file(p("hardlink")).expect("unlink hardlink");
    fs::rename(p("a/b/two"), p("two-moved")).expect("rename");
    fs::remove_dir_all(p("a/b")).expect("rm -r a/b");
    chmod(&p("setuid"), 0o644);
    chmod(&p("sticky"), 0o755);
    lchown(&p("big"), 7, 7);
    lchown(&p("symlink"), 0, 0);
    xattr::set(p("a/one"), "user.color", b"red").expect("setxattr");
    xattr::remove(p("a"), "user.bin").expect("removexattr");
    tool("setfacl", &["-b", p2s(&p("two-moved"))]);
    fs::remove_file(p("fifo")).expect("rm fifo");
    fs::remove_file(p("dangling")).expect("rm dangling");
    symlink("big", p("dangling")).expect("symlink again");
    fs::remove_file(p("null")).expect("rm null");
    fs::write(p("null"), b"now a file").expect("file over a device's name");
    set_mtime(&p("empty"), 5, 5);
    fs::write(p("brand-new"), pat(3 * KIB, 3)).expect("new");
    // Entries removed in every page and at the end, new ones between them.
    for i in (0..MANY).filter(|i| i % 3 == 0 || *i >= MANY - 50) {
        fs::remove_file(p(&format!("many/e{i:03}"))).expect("rm many");
    }
    for i in (0..MANY).step_by(7) {
        fs::write(p(&format!("many/e{i:03}x")), b"new").expect("new many");
    }
    fs::write(p("many/e001"), b"rewritten").expect("rewrite many");
}

#[test]
fn snapshot_mount_shows_exactly_the_tree_of_its_instant() {
    let v = TestVolume::new();
    let d = v.daemon();
    build_rich_tree(v.mnt());
    let before = listing(v.mnt());
    // The recorded listing really holds what it should (so the comparison can fail).
    assert_eq!(before["a/one"].nlink, 2);
    assert_eq!(before["setuid"].mode & 0o7777, 0o4755);
    assert_eq!(before["big"].mtime, (1_600_000_000, 123_456_789));
    assert_eq!(before["null"].rdev, libc::makedev(1, 3));
    assert_eq!(before["sparse"].size, 9 * MIB as u64);
    assert!(
        before["a/b/two"]
            .xattrs
            .contains_key("system.posix_acl_access")
    );
    assert!(
        before["a/b"]
            .xattrs
            .contains_key("system.posix_acl_default")
    );
    assert_eq!(before["a/one"].xattrs["user.color"], b"blue");

    snap(d, VOLUME, "exact");
    let early = mount_at_new(d, &format!("{VOLUME}@exact"), false);
    assert_same(
        "snapshot right after it was taken",
        &before,
        &listing(&early.path),
    );

    change_rich_tree(v.mnt());
    let after = listing(v.mnt());
    let changed = [
        "big",
        "a/one",
        "sparse",
        "setuid",
        "symlink",
        "a",
        "null",
        "empty",
        "many/e001",
    ];
    for k in changed {
        assert_ne!(
            before.get(k),
            after.get(k),
            "{k} did not change in the volume"
        );
    }
    for k in [
        "hardlink",
        "a/b",
        "a/b/two",
        "fifo",
        "many/e000",
        "many/e399",
    ] {
        assert!(!after.contains_key(k), "{k} still exists in the volume");
    }

    // A snapshot mounted before the changes (its kernel may have cached) and a fresh one.
    drop_page_cache(&early.path);
    assert_same(
        "snapshot mounted before the changes",
        &before,
        &listing(&early.path),
    );
    let fresh = mount_at_new(d, &format!("{VOLUME}@exact"), true);
    assert_same(
        "snapshot mounted after the changes",
        &before,
        &listing(&fresh.path),
    );
    assert_same("the volume itself", &after, &listing(v.mnt()));
    // The ACL reads back as an ACL through the snapshot mount.
    let acl = tool("getfacl", &["-c", p2s(&fresh.path.join("a/b/two"))]);
    assert!(
        acl.contains("user:1234:rwx") && acl.contains("group:99:r--"),
        "getfacl through the snapshot: {acl}"
    );
    d.umount(&early.path);
    d.umount(&fresh.path);
}

/// Stores `data` through a shared writable mapping of `f` (no msync: the pages stay dirty in
/// the kernel until written back); the mapping lasts until the returned guard is dropped.
#[allow(unsafe_code)]
fn write_through_mapping(f: &File, data: &[u8]) -> impl Drop {
    struct Mapping(*mut libc::c_void, usize);
    impl Drop for Mapping {
        #[allow(unsafe_code)]
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping made below, which nothing else refers to.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }
    // SAFETY: a fresh shared mapping of `data.len()` bytes of an open file that is at least
    // that long; only this function writes through it, within its bounds.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(f),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>(), data.len());
        Mapping(p, data.len())
    }
}

/// The daemon syncs every writable mount of the volume before it records a snapshot
/// (`Registry::snapshot_create`), so pages a program dirtied through a shared mapping and has
/// not msync()ed yet belong to the snapshot.
#[test]
fn snapshot_takes_what_a_shared_mapping_wrote_without_msync() {
    let v = TestVolume::new();
    let d = v.daemon();
    let data = pat(8 * MIB, 11);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(v.path("mapped"))
        .expect("create");
    f.set_len(data.len() as u64).expect("set_len");
    let map = write_through_mapping(&f, &data);
    snap(d, VOLUME, "mapped");
    drop(map);
    f.sync_all().expect("fsync");
    drop(f);
    assert!(
        fs::read(v.path("mapped")).expect("read") == data,
        "the volume lacks the bytes"
    );
    let s = mount_at_new(d, "testvol@mapped", true);
    let got = fs::read(s.path.join("mapped")).expect("read");
    assert!(
        got == data,
        "the snapshot lacks what the mapping wrote: {} of {} bytes differ",
        got.iter().zip(&data).filter(|(a, b)| a != b).count(),
        data.len()
    );
    d.umount(&s.path);
}

// ---------------------------------------------------------------------------------------------
// 4. snapshot create / ls / rm
// ---------------------------------------------------------------------------------------------

/// `date -u -d @SECS +%Y%m%d-%H%M%S`.
fn utc_name(secs: i64) -> String {
    tool("date", &["-u", "-d", &format!("@{secs}"), "+%Y%m%d-%H%M%S"])
        .trim()
        .to_string()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

#[test]
fn snapshot_create_names_and_refusals() {
    let v = TestVolume::new();
    let d = v.daemon();
    fs::write(v.path("f"), b"x").expect("write");

    // Default names: the UTC time; a second one in the same second gets `.2`.
    let mut same_second = false;
    for _ in 0..10 {
        let t_before = now_secs();
        let a = d.cli_ok(&["snapshot", "create", VOLUME]);
        let b = d.cli_ok(&["snapshot", "create", VOLUME]);
        let t_after = now_secs();
        let a = a
            .trim()
            .strip_prefix(&format!("{VOLUME}@"))
            .unwrap_or_else(|| panic!("snapshot create printed {a:?}"))
            .to_string();
        let b = b
            .trim()
            .strip_prefix(&format!("{VOLUME}@"))
            .unwrap_or_else(|| panic!("snapshot create printed {b:?}"))
            .to_string();
        let allowed: Vec<String> = (t_before..=t_after).map(utc_name).collect();
        // `BASE` is the first of its second, `BASE.N` the N-th.
        let split = |n: &str| -> (String, u32) {
            match n.split_once('.') {
                Some((base, k)) => (
                    base.to_string(),
                    k.parse()
                        .unwrap_or_else(|_| panic!("default name {n:?}: bad suffix")),
                ),
                None => (n.to_string(), 1),
            }
        };
        let ((base_a, k_a), (base_b, k_b)) = (split(&a), split(&b));
        for base in [&base_a, &base_b] {
            assert!(
                allowed.contains(base),
                "default names {a:?}, {b:?}: expected the UTC time, one of {allowed:?}"
            );
        }
        if base_a == base_b {
            assert_eq!(k_b, k_a + 1, "two snapshots in one second: {a}, then {b}");
            if k_a == 1 {
                assert_eq!(b, format!("{a}.2"));
                same_second = true;
                // `created` of the JSON listing is that same second.
                let created = snap_ls_json(d, VOLUME)
                    .iter()
                    .find(|s| s["name"] == a.as_str())
                    .map(|s| s["created"].as_i64().expect("created"))
                    .expect("listed");
                assert_eq!(utc_name(created), a, "created of {a}");
                break;
            }
        } else {
            assert_eq!(k_b, 1, "the first snapshot of its second is suffixed: {b}");
        }
    }
    assert!(
        same_second,
        "never took two snapshots in one second in 10 tries"
    );

    // Duplicates and bad names are refused and change nothing.
    snap(d, VOLUME, "dup");
    let listed = snap_names(d, VOLUME);
    refused(
        d,
        &["snapshot", "create", VOLUME, "dup"],
        &["testvol@dup", "exists already"],
    );
    let long = "a".repeat(129);
    for bad in ["../x", "a/b", "", long.as_str(), ".hidden", "a b", "x@y"] {
        refused(
            d,
            &["snapshot", "create", VOLUME, bad],
            &["invalid snapshot name"],
        );
    }
    assert_eq!(
        snap_names(d, VOLUME),
        listed,
        "refused creates changed the list"
    );
    let max = "b".repeat(128);
    snap(d, VOLUME, &max);

    // Unknown volumes and snapshots: named in the message, exit 1, nothing created.
    refused(d, &["snapshot", "create", "nosuchvol"], &["nosuchvol"]);
    refused(d, &["snapshot", "create", "nosuchvol", "s"], &["nosuchvol"]);
    refused(d, &["snapshot", "ls", "nosuchvol"], &["nosuchvol"]);
    refused(d, &["snapshot", "rm", "nosuchvol@s"], &["nosuchvol"]);
    refused(
        d,
        &["snapshot", "rm", "testvol@nosnap"],
        &["testvol@nosnap"],
    );
    refused(d, &["snapshot", "rm", "testvol"], &["VOLUME@SNAPSHOT"]);
    let m = mp();
    refused(
        d,
        &["mount", "testvol@nosnap", mp_str(&m)],
        &["testvol@nosnap"],
    );
    assert!(!is_mounted(&m.path));
    refused(d, &["rollback", "testvol@nosnap"], &["testvol@nosnap"]);
    refused(d, &["rollback", "nosuchvol@s"], &["nosuchvol"]);
    refused(
        d,
        &["clone", "testvol@nosnap", "newvol"],
        &["testvol@nosnap"],
    );
    refused(d, &["clone", "nosuchvol@s", "newvol"], &["nosuchvol"]);
    assert!(
        !d.cli_ok(&["ls", "-q"]).lines().any(|l| l == "newvol"),
        "a refused clone created its volume"
    );
    let mut want = listed.clone();
    want.push(max);
    assert_eq!(snap_names(d, VOLUME), want);
}

#[test]
fn snapshot_ls_reports_size_and_inodes_of_its_instant() {
    let v = TestVolume::new();
    let d = v.daemon();
    fs::create_dir(v.path("d")).expect("mkdir");
    fs::write(v.path("d/f"), pat(100_000, 1)).expect("write");
    fs::write(v.path("g"), b"12345").expect("write");
    let usage = |d: &Daemon| {
        let out = d.cli_ok(&["inspect", VOLUME]);
        let v: Value = serde_json::from_str(&out).expect("inspect json");
        let u = &v[0]["Usage"];
        (
            u["Bytes"].as_u64().expect("Bytes"),
            u["Inodes"].as_u64().expect("Inodes"),
        )
    };
    let u1 = usage(d);
    assert_eq!(u1.0, 100_005, "usage before the first snapshot");
    snap(d, VOLUME, "first");
    fs::write(v.path("h"), pat(50_000, 2)).expect("write");
    fs::create_dir(v.path("e")).expect("mkdir");
    let u2 = usage(d);
    snap(d, VOLUME, "second");
    fs::remove_file(v.path("d/f")).expect("rm");
    let t0 = Instant::now();
    while usage(d).0 != 50_005 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let u3 = usage(d);
    assert_eq!(u3.0, 50_005, "usage after removing d/f");
    // Unmounted, the daemon counts the volume itself.
    d.umount(v.mnt());
    snap(d, VOLUME, "third");

    let list = snap_ls_json(d, VOLUME);
    assert_eq!(list.len(), 3, "{list:?}");
    for (s, (name, u)) in list
        .iter()
        .zip([("first", u1), ("second", u2), ("third", u3)])
    {
        assert_eq!(s["volume"], VOLUME);
        assert_eq!(s["name"], name);
        assert_eq!(s["bytes"].as_u64(), Some(u.0), "bytes of {name}: {s}");
        assert_eq!(s["inodes"].as_u64(), Some(u.1), "inodes of {name}: {s}");
        let created = s["created"].as_i64().expect("created");
        assert!((now_secs() - created).abs() < 120, "created of {name}: {s}");
    }
    assert!(
        list[0]["created"].as_i64() <= list[1]["created"].as_i64()
            && list[1]["created"].as_i64() <= list[2]["created"].as_i64(),
        "snapshot ls is not oldest first: {list:?}"
    );

    let table = d.cli_ok(&["snapshot", "ls", VOLUME]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    let head: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(head, ["SNAPSHOT", "CREATED", "SIZE", "INODES"], "{table}");
    for (line, s) in lines[1..].iter().zip(&list) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.first().copied(), s["name"].as_str(), "{table}");
        assert_eq!(cols.last().copied(), Some(s["inodes"].to_string().as_str()));
        // CREATED is RFC 3339 of the same second.
        let secs: i64 = tool("date", &["-u", "-d", cols[1], "+%s"])
            .trim()
            .parse()
            .expect("epoch");
        assert_eq!(Some(secs), s["created"].as_i64(), "{table}");
    }
    // An empty list is a header only.
    d.create("other");
    assert_eq!(
        d.cli_ok(&["snapshot", "ls", "other", "--format", "json"]),
        ""
    );
    assert_eq!(d.cli_ok(&["snapshot", "ls", "other"]).lines().count(), 1);
}

#[test]
fn snapshot_rm_is_refused_while_mounted_and_volume_rm_takes_the_snapshots() {
    let v = TestVolume::new();
    let d = v.daemon();
    fs::write(v.path("f"), b"kept").expect("write");
    snap(d, VOLUME, "held");
    snap(d, VOLUME, "other");
    let m = mount_at_new(d, "testvol@held", false);
    refused(
        d,
        &["snapshot", "rm", "testvol@held"],
        &["testvol@held", mp_str(&m), "mounted"],
    );
    assert_eq!(snap_names(d, VOLUME), ["held", "other"]);
    assert_eq!(fs::read(m.path.join("f")).expect("read"), b"kept");
    // Several targets: the mounted one fails, the other goes, exit 1.
    let o = d.cli(&["snapshot", "rm", "testvol@held", "testvol@other"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert_eq!(stdout_of(&o), "testvol@other\n");
    assert!(stderr_of(&o).contains(mp_str(&m)), "{}", stderr_of(&o));
    assert_eq!(snap_names(d, VOLUME), ["held"]);
    d.umount(&m.path);
    assert_eq!(
        d.cli_ok(&["snapshot", "rm", "testvol@held"]),
        "testvol@held\n"
    );
    assert!(snap_names(d, VOLUME).is_empty());
    let m2 = mp();
    refused(
        d,
        &["mount", "testvol@held", mp_str(&m2)],
        &["testvol@held"],
    );

    // Removing a volume removes its snapshots: a new volume of that name has none.
    d.create("vol2");
    let w = mount_at_new(d, "vol2", false);
    fs::write(w.path.join("x"), pat(200 * KIB, 5)).expect("write");
    d.umount(&w.path);
    snap(d, "vol2", "s1");
    snap(d, "vol2", "s2");
    let sm = mount_at_new(d, "vol2@s1", false);
    refused(d, &["rm", "vol2"], &["vol2", mp_str(&sm)]);
    d.umount(&sm.path);
    assert_eq!(d.cli_ok(&["rm", "vol2"]), "vol2\n");
    refused(d, &["snapshot", "ls", "vol2"], &["vol2"]);
    d.create("vol2");
    assert!(
        snap_names(d, "vol2").is_empty(),
        "the new vol2 has snapshots"
    );
    refused(d, &["mount", "vol2@s1", mp_str(&m2)], &["vol2@s1"]);
    let w = mount_at_new(d, "vol2", false);
    assert_eq!(
        fs::read_dir(&w.path).expect("readdir").count(),
        0,
        "the new vol2 is not empty"
    );
    d.umount(&w.path);
}

#[test]
fn removals_leave_no_snapshot_keys_in_the_store() {
    let mut d = Daemon::start();
    for vol in ["gone", "kept"] {
        d.create(vol);
        let w = mount_at_new(&d, vol, false);
        for i in 0..3u64 {
            fs::write(w.path.join("f"), pat(300 * KIB, i)).expect("write");
            fs::write(w.path.join(format!("g{i}")), b"g").expect("write");
            snap(&d, vol, &format!("s{i}"));
        }
        fs::remove_file(w.path.join("g0")).expect("rm");
        d.umount(&w.path);
    }
    assert_eq!(d.cli_ok(&["rm", "gone"]), "gone\n");
    d.create("gone");
    for s in ["kept@s0", "kept@s2"] {
        assert_eq!(d.cli_ok(&["snapshot", "rm", s]), format!("{s}\n"));
    }
    d.shutdown();

    let store = volfs::store::Store::open(d.root()).expect("open the stopped daemon's store");
    let mut ids = BTreeMap::new();
    for item in store.volumes.iter() {
        let (k, v) = item.expect("read a volume record");
        let rec = volfs::store::VolumeRecord::decode(&v).expect("volume record");
        ids.insert(rec.id, String::from_utf8_lossy(&k).into_owned());
    }
    // (volume, tag) -> keys; snapshot ids of the layers and records.
    let mut count: BTreeMap<(String, char), usize> = BTreeMap::new();
    let mut layer_ids: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for k in store.fs.iter().keys() {
        let k = k.expect("read a key");
        let vol = u64::from_be_bytes(k[..8].try_into().expect("8-byte volume prefix"));
        let name = ids
            .get(&vol)
            .cloned()
            .unwrap_or_else(|| format!("unreachable volume {vol}"));
        let tag = k[8];
        if tag == volfs::store::TAG_LAYER || tag == volfs::store::TAG_SNAPSHOT {
            let id = u64::from_be_bytes(k[9..17].try_into().expect("snapshot id"));
            layer_ids.entry(name.clone()).or_default().insert(id);
        }
        *count.entry((name, tag as char)).or_default() += 1;
    }
    assert!(
        count.keys().all(|(n, _)| !n.starts_with("unreachable")),
        "keys of removed volumes remain: {count:?}"
    );
    for tag in ['S', 'T'] {
        assert_eq!(
            count.get(&("gone".to_string(), tag)),
            None,
            "the new volume `gone` has snapshot keys ({tag}): {count:?}"
        );
    }
    assert_eq!(
        count.get(&("kept".to_string(), 'T')),
        Some(&1),
        "`kept` should have one snapshot record left: {count:?}"
    );
    assert_eq!(
        layer_ids.get("kept").map(BTreeSet::len),
        Some(1),
        "layer keys of removed snapshots remain: {layer_ids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. rollback
// ---------------------------------------------------------------------------------------------

/// Writes version `n` of a small tree (names, sizes and bytes all differ between versions).
fn write_version(m: &Path, n: u64) {
    fs::create_dir_all(m.join("dir")).expect("mkdir");
    for i in 0..n + 2 {
        fs::write(
            m.join(format!("dir/f{i}")),
            pat(1000 * (n as usize + 1) + i as usize, n * 100 + i),
        )
        .expect("write");
    }
    fs::write(m.join("version"), format!("version {n}\n")).expect("write");
    let big = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(m.join("big"))
        .expect("open big");
    big.write_all_at(
        &pat(300 * KIB, n + 77),
        (n * 100 * KIB as u64) % (600 * KIB as u64),
    )
    .expect("write big");
    drop(big);
    fs::write(m.join(format!("only-in-{n}")), b"x").expect("write");
    // Same size and mtime in every version: only the bytes tell them apart.
    fs::write(m.join("same"), pat(8 * KIB, n)).expect("write");
    set_mtime(&m.join("same"), 1_000_000, 0);
    let _ = fs::remove_file(m.join(format!("only-in-{}", n.wrapping_sub(1))));
}

/// Reads everything through `m` (so its kernel caches hold it).
fn warm(m: &Path) -> Listing {
    listing(m)
}

#[test]
fn rollback_is_refused_over_writable_mounts_unless_forced_and_keeps_other_snapshots() {
    let mut v = TestVolume::new();
    let mnt = v.mnt().to_path_buf();
    write_version(&mnt, 1);
    snap(v.daemon(), VOLUME, "v1");
    let l1 = listing(&mnt);
    write_version(&mnt, 2);
    snap(v.daemon(), VOLUME, "v2");
    let l2 = listing(&mnt);
    write_version(&mnt, 3);
    snap(v.daemon(), VOLUME, "v3");
    let l3 = listing(&mnt);
    write_version(&mnt, 4);
    let l4 = listing(&mnt);
    assert_ne!(l1, l2);
    assert_ne!(l3, l4);
    assert_eq!(l2["same"].size, l4["same"].size);
    assert_eq!(l2["same"].mtime, l4["same"].mtime);
    assert_ne!(l2["same"].data, l4["same"].data);
    let d = v.daemon();

    // Refused while mounted writable: exit 1, the mount named, nothing changes.
    refused(
        d,
        &["rollback", "testvol@v1"],
        &["testvol", p2s(&mnt), "--force"],
    );
    assert_same("the volume after a refused rollback", &l4, &listing(&mnt));

    // --force while mounted: the only mount (its kernel holds version 4 with long TTLs and
    // kept pages, `same` with the same size and mtime in both) shows version 2 at once.
    warm(&mnt);
    let out = d.cli_ok(&["rollback", "--force", "testvol@v2"]);
    assert!(
        out.starts_with("rolled testvol back to testvol@v2"),
        "{out}"
    );
    assert_same(
        "the writable mount right after rollback --force",
        &l2,
        &listing(&mnt),
    );

    // Writing after the rollback works, and a snapshot takes it.
    fs::write(mnt.join("after"), b"written after the rollback").expect("write");
    fs::write(mnt.join("version"), b"2+").expect("write");
    fs::remove_file(mnt.join("dir/f0")).expect("rm");
    write_version(&mnt, 5);
    let l5 = listing(&mnt);
    snap(d, VOLUME, "v5");
    let ro = v.mount_again(true);
    let d = v.daemon();
    assert_same("a read-only mount after the rollback", &l5, &listing(&ro));

    // Unmounted (only the read-only mount left, its kernel warm): works without --force.
    d.umount(&mnt);
    warm(&ro);
    let out = d.cli_ok(&["rollback", "testvol@v1"]);
    assert!(
        out.starts_with("rolled testvol back to testvol@v1"),
        "{out}"
    );
    assert_same(
        "the read-only mount after rollback to v1",
        &l1,
        &listing(&ro),
    );
    d.umount(&ro);
    let m = mount_at_new(d, VOLUME, false);
    assert_same("a fresh mount after rollback to v1", &l1, &listing(&m.path));
    fs::write(m.path.join("version"), b"1+").expect("write after rollback");
    assert_eq!(fs::read(m.path.join("version")).expect("read"), b"1+");

    // Every snapshot, older and newer than the rollback targets, is unchanged.
    for (name, want) in [("v1", &l1), ("v2", &l2), ("v3", &l3), ("v5", &l5)] {
        let s = mount_at_new(d, &format!("testvol@{name}"), true);
        assert_same(
            &format!("snapshot {name} after rollbacks"),
            want,
            &listing(&s.path),
        );
        d.umount(&s.path);
    }
    assert_eq!(snap_names(d, VOLUME), ["v1", "v2", "v3", "v5"]);
    d.umount(&m.path);
}

// ---------------------------------------------------------------------------------------------
// 6. clone
// ---------------------------------------------------------------------------------------------

#[test]
fn clone_is_an_independent_writable_copy_of_the_snapshot() {
    let v = TestVolume::new();
    let d = v.daemon();
    build_rich_tree(v.mnt());
    let want = listing(v.mnt());
    snap(d, VOLUME, "base");
    fs::write(v.path("after-snapshot"), b"not in the clone").expect("write");

    assert_eq!(d.cli_ok(&["clone", "testvol@base", "copy"]), "copy\n");
    refused(
        d,
        &["clone", "testvol@base", "copy"],
        &["copy", "exists already"],
    );
    refused(
        d,
        &["clone", "testvol@base", VOLUME],
        &[VOLUME, "exists already"],
    );
    refused(d, &["clone", "testvol@base", "bad/name"], &["bad/name"]);
    assert!(snap_names(d, "copy").is_empty(), "a clone has no snapshots");

    let c = mount_at_new(d, "copy", false);
    assert_same("the clone", &want, &listing(&c.path));

    // Writes to the clone touch neither the volume nor the snapshot, and the other way round.
    fs::write(c.path.join("a/one"), b"clone's own").expect("write clone");
    fs::remove_file(c.path.join("big")).expect("rm in clone");
    fs::write(c.path.join("clone-only"), b"c").expect("write clone");
    let clone_now = listing(&c.path);
    let live_before = listing(v.mnt());
    assert!(live_before.contains_key("big") && !live_before.contains_key("clone-only"));
    assert_eq!(fs::read(v.path("a/one")).expect("read"), b"one\n");

    change_rich_tree(v.mnt());
    assert_same(
        "the clone after the volume changed",
        &clone_now,
        &listing(&c.path),
    );
    let s = mount_at_new(d, "testvol@base", true);
    assert_same("the snapshot after both changed", &want, &listing(&s.path));
    d.umount(&s.path);

    // The snapshot can go; the clone stays.
    assert_eq!(
        d.cli_ok(&["snapshot", "rm", "testvol@base"]),
        "testvol@base\n"
    );
    d.umount(&c.path);
    let c2 = mount_at_new(d, "copy", false);
    assert_same(
        "the clone after its source snapshot was removed",
        &clone_now,
        &listing(&c2.path),
    );
    d.umount(&c2.path);
}

// ---------------------------------------------------------------------------------------------
// 7. space
// ---------------------------------------------------------------------------------------------

#[test]
fn removing_a_snapshot_frees_what_only_it_held() {
    const SIZE: usize = 64 * MIB;
    let v = TestVolume::new();
    let d = v.daemon();
    let write_all = |seed: u64| {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(v.path("data"))
            .expect("open");
        for (i, chunk) in pat(SIZE, seed).chunks(MIB).enumerate() {
            f.write_all_at(chunk, (i * MIB) as u64).expect("write");
        }
        f.sync_all().expect("fsync");
    };
    let settle = |d: &Daemon| {
        // Released chunk bytes are punched out after a sync; give it a moment.
        std::thread::sleep(Duration::from_millis(1500));
        store_bytes(d)
    };
    write_all(1);
    let s0 = settle(d);
    snap(d, VOLUME, "held");
    write_all(2);
    let s1 = settle(d);
    assert!(
        s1 >= s0 + (SIZE as u64) * 3 / 4,
        "overwriting {SIZE} bytes under a snapshot grew the store only from {s0} to {s1}"
    );
    let out = d.cli_ok(&["snapshot", "rm", "testvol@held"]);
    assert_eq!(out, "testvol@held\n");
    let t0 = Instant::now();
    let bound = s0 + 16 * MIB as u64;
    let mut last;
    loop {
        last = store_bytes(d);
        if last <= bound || t0.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "store bytes: {s0} after writing {SIZE}, {s1} after overwriting it under a snapshot, \
         {last} {:.1?} after removing the snapshot",
        t0.elapsed()
    );
    assert!(
        last <= bound,
        "removing the snapshot left the store at {last} bytes after 30 s (before the \
         snapshot: {s0}, with it: {s1}; bound {bound})"
    );
    assert_eq!(fs::read(v.path("data")).expect("read"), pat(SIZE, 2));
}

/// Writes `len` bytes of `pat(.., seed)` at `off` of `path` in 1 MiB writes, then fsyncs.
fn write_pattern(path: &Path, off: usize, len: usize, seed: u64) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .expect("open");
    for (i, chunk) in pat(len, seed).chunks(MIB).enumerate() {
        f.write_all_at(chunk, (off + i * MIB) as u64)
            .expect("write");
    }
    f.sync_all().expect("fsync");
}

#[test]
fn snapshot_keeps_its_bytes_when_their_segment_is_compacted() {
    // Segment 1 ends up with A's live chunks, A's pre-snapshot chunks that only the snapshot
    // holds, and B's dead first versions (more than half): the compactor must move the
    // snapshot's chunks along with the live ones.
    let v = TestVolume::new();
    let d = v.daemon();
    let (a, b) = (v.path("a"), v.path("b"));
    write_pattern(&a, 0, 24 * MIB, 1);
    snap(d, VOLUME, "before");
    write_pattern(&b, 0, 40 * MIB, 3);
    write_pattern(&b, 0, 40 * MIB, 4);
    write_pattern(&a, 0, 16 * MIB, 2);
    let t0 = Instant::now();
    while !d.log().contains("compacted segments") && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("segment compaction after {:.1?}", t0.elapsed());
    assert!(
        d.log().contains("compacted segments"),
        "no segment was compacted within 30 s; daemon log:\n{}",
        d.log()
    );
    let s = mount_at_new(d, "testvol@before", true);
    let got = fs::read(s.path.join("a")).expect("read a in the snapshot");
    assert!(
        got == pat(24 * MIB, 1),
        "the snapshot's a changed after compaction ({} bytes, {} differ)",
        got.len(),
        got.iter()
            .zip(pat(24 * MIB, 1))
            .filter(|(x, y)| *x != y)
            .count()
    );
    assert!(!s.path.join("b").exists(), "b is in the snapshot");
    d.umount(&s.path);
    let mut want = pat(16 * MIB, 2);
    want.extend_from_slice(&pat(24 * MIB, 1)[16 * MIB..]);
    assert!(fs::read(&a).expect("read a") == want, "the volume's a");
    assert!(
        fs::read(&b).expect("read b") == pat(40 * MIB, 4),
        "the volume's b"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. restart
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshots_and_snapshot_mounts_survive_restarts_and_kill9() {
    let mut d = Daemon::start();
    d.create(VOLUME);
    let live = mp();
    d.mount(VOLUME, &live.path, false);
    build_rich_tree(&live.path);
    snap(&d, VOLUME, "one");
    let l1 = listing(&live.path);
    change_rich_tree(&live.path);
    let sm = mount_at_new(&d, "testvol@one", false);
    assert_same("snapshot one", &l1, &listing(&sm.path));
    let ls1 = snap_ls_json(&d, VOLUME);
    let want_mounts = vec![(live.path.clone(), false), (sm.path.clone(), true)];
    d.assert_mounts(&want_mounts);

    for how in ["SIGTERM", "SIGKILL"] {
        if how == "SIGTERM" {
            d.stop();
        } else {
            d.kill9();
        }
        d.restart();
        d.assert_mounts(&want_mounts);
        assert_eq!(
            snap_ls_json(&d, VOLUME),
            ls1,
            "snapshot ls after a {how} restart"
        );
        drop_page_cache(&sm.path);
        assert_same(
            &format!("the snapshot mount after a {how} restart"),
            &l1,
            &listing(&sm.path),
        );
        let fresh = mount_at_new(&d, "testvol@one", true);
        assert_same(
            &format!("a fresh snapshot mount after a {how} restart"),
            &l1,
            &listing(&fresh.path),
        );
        d.umount(&fresh.path);
    }

    // A snapshot is durable when `snapshot create` returns: kill -9 right after it.
    fs::write(live.path.join("last"), pat(70 * KIB, 9)).expect("write");
    let l2 = listing(&live.path);
    snap(&d, VOLUME, "two");
    d.kill9();
    d.restart();
    d.assert_mounts(&want_mounts);
    assert_eq!(snap_names(&d, VOLUME), ["one", "two"]);
    let two = mount_at_new(&d, "testvol@two", true);
    assert_same("snapshot two after kill -9", &l2, &listing(&two.path));
    d.umount(&two.path);
    assert_same("snapshot one at the end", &l1, &listing(&sm.path));
}

// ---------------------------------------------------------------------------------------------
// 9. writer stall
// ---------------------------------------------------------------------------------------------

#[test]
fn writers_stall_briefly_while_a_snapshot_of_20000_files_is_taken() {
    const FILES: usize = 20_000;
    let src = tempfile::tempdir().expect("tempdir");
    for dir in 0..20 {
        let p = src.path().join(format!("d{dir:02}"));
        fs::create_dir(&p).expect("mkdir");
        for i in 0..FILES / 20 {
            fs::write(p.join(format!("f{i:04}")), format!("{dir}/{i}\n")).expect("write");
        }
    }
    let d = Daemon::start();
    let from = format!("from={}", src.path().display());
    assert_eq!(d.cli_ok(&["create", "many", "--opt", &from]), "many\n");
    let m = mount_at_new(&d, "many", false);
    assert_eq!(
        fs::read_dir(m.path.join("d07")).expect("readdir").count(),
        FILES / 20
    );

    let stop = Arc::new(AtomicBool::new(false));
    let gaps: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
    let writer = {
        let (stop, gaps, path) = (stop.clone(), gaps.clone(), m.path.join("writer"));
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o644)
                .open(&path)
                .expect("open writer");
            let mut last = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&pat(64, i), (i % 1024) * 64).expect("write");
                let now = Instant::now();
                lock_gaps(&gaps).push((now, now - last));
                last = now;
                i += 1;
            }
            i
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut windows = Vec::new();
    for k in 0..5 {
        let t = Instant::now();
        snap(&d, "many", &format!("s{k}"));
        windows.push((t, Instant::now()));
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = join(writer);
    let gaps = lock_gaps(&gaps).clone();
    let in_window = |t: Instant, gap: Duration| {
        windows
            .iter()
            .any(|(a, b)| t >= *a && t.checked_sub(gap).is_some_and(|s| s <= *b))
    };
    let during = gaps
        .iter()
        .filter(|(t, g)| in_window(*t, *g))
        .map(|(_, g)| *g)
        .max()
        .unwrap_or_default();
    let outside = gaps
        .iter()
        .filter(|(t, g)| !in_window(*t, *g))
        .map(|(_, g)| *g)
        .max()
        .unwrap_or_default();
    let create: Vec<String> = windows
        .iter()
        .map(|(a, b)| format!("{:.0?}", *b - *a))
        .collect();
    eprintln!(
        "snapshot of {FILES} files: `volfs snapshot create` took {create:?}; {writes} writes; \
         max gap between writes during a snapshot {during:.1?}, otherwise {outside:.1?}"
    );
    assert!(writes > 100, "the writer made only {writes} writes");
    assert!(
        gaps.iter().any(|(t, g)| in_window(*t, *g)),
        "no write completed during a snapshot"
    );
    assert!(
        during < Duration::from_secs(1),
        "a writer stalled {during:?} while a snapshot of {FILES} files was taken"
    );
    // Every snapshot holds all the files.
    let s = mount_at_new(&d, "many@s4", true);
    let n: usize = (0..20)
        .map(|i| {
            fs::read_dir(s.path.join(format!("d{i:02}")))
                .expect("readdir")
                .count()
        })
        .sum();
    assert_eq!(n, FILES);
    assert_eq!(
        fs::read(s.path.join("d13/f0999")).expect("read"),
        b"13/999\n"
    );
    d.umount(&s.path);
    d.umount(&m.path);
}

fn lock_gaps<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
