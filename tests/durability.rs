//! Crash-durability tests: `kill -9` of the daemon must lose nothing that was fsynced, and the
//! store must reopen consistent afterwards.
//!
//! * [`kill9_loses_nothing_fsynced`]: a writer thread creates files with unique deterministic
//!   content, fsyncs each file and its directory, and records the name only after both fsyncs
//!   returned. After a random 0.2-2 s, either the daemon alone is `kill -9`ed (even cycles: its
//!   keeper keeps the mount, the writer's requests wait for the next daemon and must all
//!   succeed) or the daemon and its keeper (odd cycles: the mount dies, the writer stops at
//!   ENOTCONN and the next start mounts afresh); then a daemon is started on the same root and
//!   every recorded file (of every cycle so far) must read back exactly, with the kernel's
//!   cached pages dropped first so that the bytes come from the store. Six cycles, then the
//!   volume must still work.
//! * [`kill9_leaves_consistent_tree`]: two threads churn a tree (mkdir, create, write, append,
//!   truncate, rename, unlink, rmdir, symlink, hard link) without fsync; after each `kill -9`
//!   (alternately of the daemon alone, which the churners must not notice, and of the daemon
//!   and its keeper) and restart the whole tree must walk without error: every listed entry
//!   stats, every file reads to exactly its size, every symlink reads. Five cycles.
//!
//! `VOLFS_TEST_SEED` replays a run (the kill moments still vary with scheduling).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::integrity::test_seed;
use crate::util::{Daemon, open_tempdir};

/// `f_type` of a FUSE filesystem (statfs(2)).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
const VOL: &str = "dur";
const CYCLES: u64 = 6;

/// Is the open file or directory `f` on a FUSE filesystem? Used by the writers so that
/// nothing is recorded that went to the directory under a dead mount point after the next
/// daemon detached it.
fn on_fuse(f: &File) -> io::Result<bool> {
    let st = nix::sys::statfs::fstatfs(f).map_err(io::Error::from)?;
    Ok(st.filesystem_type().0 as i64 == FUSE_SUPER_MAGIC)
}

/// A daemon with volume `VOL` mounted at a directory that outlives restarts.
struct Setup {
    daemon: Daemon,
    mnt: PathBuf,
    _mnt_dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let daemon = Daemon::start();
        // A mount whose daemon never comes back makes accesses wait: fail instead of hanging.
        daemon.set_watchdog(Duration::from_secs(240));
        daemon.create(VOL);
        let dir = open_tempdir();
        let mnt = fs::canonicalize(dir.path()).expect("canonicalize");
        daemon.mount(VOL, &mnt, false);
        Setup {
            daemon,
            mnt,
            _mnt_dir: dir,
        }
    }

    /// kill -9 the daemon alone (`keeper` true: the mount lives on, its requests wait) or the
    /// daemon and its keeper (the mount dies).
    fn kill9(&mut self, keeper: bool) {
        if keeper {
            self.daemon.kill9();
        } else {
            self.daemon.kill9_all();
        }
    }

    /// Start the daemon again on the same root (stopping it first if it runs); it resumes the
    /// mount, or mounts afresh if the mount died.
    fn start(&mut self) {
        self.daemon.restart();
        self.daemon.assert_mounts(&[(self.mnt.clone(), false)]);
    }
}

/// Join `h`, panicking if it has not finished within `limit` (a request that never completes
/// after the restart).
fn join_within<T>(h: JoinHandle<T>, limit: Duration, what: &str, daemon: &Daemon) -> T {
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(
            t0.elapsed() < limit,
            "{what} still blocked {limit:?} after the restart; daemon log tail:\n{}",
            tail_lines(&daemon.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    h.join().expect("thread panicked")
}

/// Have the kernel drop its cached pages of `f`, so that the next read asks the daemon.
fn drop_cached_pages(f: &File) {
    let _ = nix::fcntl::posix_fadvise(
        std::os::fd::AsRawFd::as_raw_fd(f),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Deterministic content of version `version` of the file called `name`.
fn content(seed: u64, name: &str, version: u32) -> Vec<u8> {
    let mut h: u64 = seed ^ 0x9e37_79b9_7f4a_7c15 ^ (u64::from(version) << 40);
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = StdRng::seed_from_u64(h);
    let len = match rng.gen_range(0..20) {
        0 => 0,
        1..=8 => rng.gen_range(1..=4096),
        9..=16 => rng.gen_range(4097..=140_000),
        17..=18 => rng.gen_range(60_000..=300_000),
        _ => rng.gen_range(300_000..=1_200_000),
    };
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    // Name and version at the start so a misplaced file is easy to recognise in a hexdump.
    let tag = format!("{name} v{version} ");
    let n = tag.len().min(v.len());
    v[..n].copy_from_slice(&tag.as_bytes()[..n]);
    v
}

/// A file the writer fsynced: (name relative to the mount, content version).
type Rec = (String, u32);

/// What the writer of one cycle did.
struct WriterEnd {
    /// The error that stopped it (after a kill of the daemon and its keeper: ENOTCONN / EIO /
    /// ECONNABORTED; after a kill of the daemon alone: none).
    error: Option<String>,
    attempted: u64,
    overwrites: u64,
}

/// Write `data` with several write calls of uneven sizes.
fn write_pieces(f: &mut File, data: &[u8], salt: usize) -> io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        let n = (data.len() - off).min(1 + (salt * 7919 + off) % 90_000);
        f.write_all(&data[off..off + n])?;
        off += n;
    }
    Ok(())
}

/// Write files `c{cycle}/...` until an error or `stop`; push each (name, version) to `done`
/// only after the file and its directory were fsynced on the FUSE mount. Every fourth step
/// instead overwrites a recorded file of this cycle in place with a new version (new length,
/// shorter or longer): it leaves `done` while in flight and comes back after its fsync.
fn writer(
    mnt: PathBuf,
    seed: u64,
    cycle: u64,
    done: Arc<Mutex<Vec<Rec>>>,
    stop: Arc<AtomicBool>,
) -> WriterEnd {
    let mut attempted = 0;
    let mut overwrites = 0;
    let res = (|| -> Result<(), String> {
        let root = File::open(&mnt).map_err(|e| format!("open mount root: {e}"))?;
        if !on_fuse(&root).map_err(|e| format!("statfs root: {e}"))? {
            return Err("mount root is not on FUSE".into());
        }
        let cdir = mnt.join(format!("c{cycle}"));
        fs::create_dir(&cdir).map_err(|e| format!("mkdir c{cycle}: {e}"))?;
        root.sync_all().map_err(|e| format!("fsync root: {e}"))?;
        let lock = || done.lock().unwrap_or_else(|e| e.into_inner());
        let mut sub = String::new();
        let mut i = 0u64;
        let mut step = 0u64;
        while !stop.load(Ordering::SeqCst) {
            step += 1;
            attempted += 1;
            if step % 4 == 0 && !lock().is_empty() {
                // Overwrite a recorded file in place.
                let (name, version) = {
                    let mut d = lock();
                    let j = (step as usize).wrapping_mul(2_654_435_761) % d.len();
                    d.swap_remove(j)
                };
                let data = content(seed, &name, version + 1);
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(mnt.join(&name))
                    .map_err(|e| format!("open {name} for overwrite: {e}"))?;
                write_pieces(&mut f, &data, step as usize)
                    .map_err(|e| format!("overwrite {name}: {e}"))?;
                f.set_len(data.len() as u64)
                    .map_err(|e| format!("ftruncate {name}: {e}"))?;
                f.sync_all()
                    .map_err(|e| format!("fsync overwritten {name}: {e}"))?;
                if !on_fuse(&f).map_err(|e| format!("statfs {name}: {e}"))? {
                    return Err(format!("{name} is not on the FUSE mount any more"));
                }
                lock().push((name, version + 1));
                overwrites += 1;
                continue;
            }
            // A new subdirectory every 25 files, fsynced into its parent before use.
            if i % 25 == 0 {
                sub = format!("c{cycle}/d{:03}", i / 25);
                fs::create_dir(mnt.join(&sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
                let parent = File::open(&cdir).map_err(|e| format!("open c{cycle}: {e}"))?;
                parent
                    .sync_all()
                    .map_err(|e| format!("fsync dir c{cycle}: {e}"))?;
            }
            let name = format!("{sub}/f{i:05}");
            let data = content(seed, &name, 0);
            let dir = File::open(mnt.join(&sub)).map_err(|e| format!("open {sub}: {e}"))?;
            // Every third file is written the atomic-replace way: tmp file, fsync, rename.
            let via_rename = i % 3 == 2;
            let wpath = if via_rename {
                mnt.join(format!("{name}.tmp"))
            } else {
                mnt.join(&name)
            };
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&wpath)
                .map_err(|e| format!("create {}: {e}", wpath.display()))?;
            write_pieces(&mut f, &data, i as usize).map_err(|e| format!("write {name}: {e}"))?;
            f.sync_all().map_err(|e| format!("fsync {name}: {e}"))?;
            if via_rename {
                fs::rename(&wpath, mnt.join(&name))
                    .map_err(|e| format!("rename {name}.tmp: {e}"))?;
            }
            dir.sync_all()
                .map_err(|e| format!("fsync dir {sub}: {e}"))?;
            // Only record what provably went through the FUSE mount (not to the directory
            // under a dead mount point after the kill's lazy unmount).
            if !(on_fuse(&f).map_err(|e| format!("statfs {name}: {e}"))?
                && on_fuse(&dir).map_err(|e| format!("statfs {sub}: {e}"))?)
            {
                return Err(format!("{name} is not on the FUSE mount any more"));
            }
            lock().push((name, 0));
            i += 1;
        }
        Ok(())
    })();
    WriterEnd {
        error: res.err(),
        attempted,
        overwrites,
    }
}

/// Every recorded file must exist with exactly its content (read past the kernel's page
/// cache, which may have survived the restart with the mount).
#[track_caller]
fn verify_recorded(mnt: &Path, seed: u64, names: &[Rec], when: &str, daemon: &Daemon) {
    let mut bad = Vec::new();
    for (name, version) in names {
        let want = content(seed, name, *version);
        let read = File::open(mnt.join(name)).and_then(|mut f| {
            drop_cached_pages(&f);
            let mut v = Vec::new();
            f.read_to_end(&mut v).map(|_| v)
        });
        match read {
            Ok(got) if got == want => {}
            Ok(got) => {
                let first = got.iter().zip(&want).position(|(a, b)| a != b);
                bad.push(format!(
                    "{name} (version {version}): {} bytes, want {}; first difference at {first:?}",
                    got.len(),
                    want.len()
                ));
            }
            Err(e) => bad.push(format!("{name} (version {version}): {e}")),
        }
    }
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(20);
        panic!(
            "{when}: {n} of {} fsynced files are wrong or missing (replay with \
             VOLFS_TEST_SEED={seed}):\n  {}\ndaemon log tail:\n{}",
            names.len(),
            bad.join("\n  "),
            tail_lines(&daemon.log(), 40)
        );
    }
}

fn tail_lines(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Is `e` one of the errors a syscall on a FUSE mount whose daemon was killed may return?
fn is_expected_crash_error(e: &str) -> bool {
    [
        "Transport endpoint is not connected",
        "Input/output error",
        "Software caused connection abort",
        "No such file or directory",
        "is not on the FUSE mount",
        "No such device",
    ]
    .iter()
    .any(|s| e.contains(s))
}

#[test]
fn kill9_loses_nothing_fsynced() {
    let seed = test_seed();
    println!("durability: seed {seed} (replay with VOLFS_TEST_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Setup::new();
    let mut all: Vec<Rec> = Vec::new();
    let t0 = Instant::now();
    for cycle in 0..CYCLES {
        let done = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let h: JoinHandle<WriterEnd> = {
            let (mnt, done, stop) = (s.mnt.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || writer(mnt, seed, cycle, done, stop))
        };
        let delay = Duration::from_millis(rng.gen_range(200..=2000));
        std::thread::sleep(delay);
        let keeper = cycle % 2 == 0;
        let what = if keeper {
            "kill -9 of the daemon"
        } else {
            "kill -9 of the daemon and its keeper"
        };
        s.kill9(keeper);
        // The writer stops at its first error; `stop` only matters if it saw none. With the
        // keeper alive its current request waits for the next daemon.
        stop.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        s.start();
        let end = join_within(h, Duration::from_secs(20), "the writer", &s.daemon);
        let names = std::mem::take(&mut *done.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(e) = &end.error {
            assert!(
                !keeper && is_expected_crash_error(e),
                "cycle {cycle}: after a {what}, the writer failed with {e}\ndaemon log tail:\n{}",
                tail_lines(&s.daemon.log(), 40)
            );
        }
        all.extend(names.iter().cloned());
        verify_recorded(
            &s.mnt,
            seed,
            &all,
            &format!("cycle {cycle}: after a {what} at {delay:?} and restart"),
            &s.daemon,
        );
        println!(
            "durability: cycle {cycle}: {what} after {delay:?}; {} files fsynced and recorded \
             ({} steps, {} in-place overwrites), writer stopped by: {}; all {} recorded files \
             intact",
            names.len(),
            end.attempted,
            end.overwrites,
            end.error.as_deref().unwrap_or("-"),
            all.len()
        );
    }
    assert!(
        !all.is_empty(),
        "no file was ever fsynced in {CYCLES} cycles (fsync too slow?)"
    );

    // The volume still works: create, write, fsync, read back, also after a clean restart.
    let p = s.mnt.join("after-crashes.txt");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    {
        let mut f = File::create(&p).expect("create after crashes");
        f.write_all(&data).expect("write after crashes");
        f.sync_all().expect("fsync after crashes");
    }
    assert_eq!(fs::read(&p).expect("read after crashes"), data);
    let (first, last) = (all[0].clone(), all[all.len() - 1].clone());
    fs::remove_file(s.mnt.join(&first.0)).expect("unlink a recovered file");
    fs::rename(s.mnt.join(&last.0), s.mnt.join("renamed")).expect("rename");
    s.daemon.shutdown(); // unmounted: nothing the kernel cached survives
    s.start();
    assert_eq!(
        fs::read(&p).expect("read after clean restart"),
        data,
        "after-crashes.txt after a clean restart"
    );
    assert!(!s.mnt.join(&first.0).exists(), "unlinked file came back");
    assert_eq!(
        fs::read(s.mnt.join("renamed")).expect("read renamed"),
        content(seed, &last.0, last.1)
    );
    verify_recorded(
        &s.mnt,
        seed,
        &all[1..all.len() - 1],
        "after a final clean restart",
        &s.daemon,
    );
    println!(
        "durability: {} files verified over {CYCLES} kill -9 cycles in {:.1?}",
        all.len(),
        t0.elapsed()
    );
}

/// One random tree operation under `base` (errors other than crash errors are ignored: the
/// threads race each other on purpose).
fn churn_op(rng: &mut StdRng, base: &Path) -> io::Result<()> {
    let d = base.join(format!("d{}", rng.gen_range(0..6)));
    let name = |rng: &mut StdRng| format!("n{}", rng.gen_range(0..40));
    match rng.gen_range(0..20) {
        0 => fs::create_dir(&d),
        1 => fs::create_dir(d.join(format!("s{}", rng.gen_range(0..3)))),
        2..=6 => {
            let mut f = OpenOptions::new()
                .create(true)
                .append(rng.gen_bool(0.3))
                .write(true)
                .open(d.join(name(rng)))?;
            let mut buf = vec![0u8; rng.gen_range(0..150_000)];
            rng.fill_bytes(&mut buf);
            f.write_all(&buf)
        }
        7 => OpenOptions::new()
            .write(true)
            .open(d.join(name(rng)))?
            .set_len(rng.gen_range(0..300_000)),
        8..=9 => fs::rename(
            d.join(name(rng)),
            base.join(format!("d{}", rng.gen_range(0..6)))
                .join(name(rng)),
        ),
        10..=11 => fs::remove_file(d.join(name(rng))),
        12 => fs::remove_dir(d.join(format!("s{}", rng.gen_range(0..3)))),
        13 => std::os::unix::fs::symlink(format!("../d0/{}", name(rng)), d.join(name(rng))),
        14 => fs::hard_link(d.join(name(rng)), d.join(name(rng))),
        15 => fs::set_permissions(
            d.join(name(rng)),
            fs::Permissions::from_mode(rng.gen_range(0o400..0o777)),
        ),
        16 => {
            let mut f = File::create(d.join(name(rng)))?;
            f.write_all(b"small")?;
            if rng.gen_bool(0.5) {
                f.sync_all()?;
            }
            Ok(())
        }
        _ => {
            let mut s = String::new();
            File::open(d.join(name(rng)))?
                .read_to_string(&mut s)
                .map(drop)
        }
    }
}

/// Walk the whole tree: every entry must stat, files must read to exactly their size,
/// directories must list, symlinks must read. Returns (dirs, files, symlinks, bytes).
fn walk(root: &Path, errors: &mut Vec<String>) -> (u64, u64, u64, u64) {
    let mut stack = vec![root.to_path_buf()];
    let (mut nd, mut nf, mut ns, mut nb) = (0, 0, 0, 0);
    while let Some(dir) = stack.pop() {
        nd += 1;
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                errors.push(format!("readdir {}: {e}", dir.display()));
                continue;
            }
        };
        for ent in rd {
            let ent = match ent {
                Ok(e) => e,
                Err(e) => {
                    errors.push(format!("readdir entry in {}: {e}", dir.display()));
                    continue;
                }
            };
            let p = ent.path();
            let md = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) => {
                    errors.push(format!("lstat {} (listed by readdir): {e}", p.display()));
                    continue;
                }
            };
            match ent.file_type() {
                Ok(t) if t == md.file_type() => {}
                Ok(t) => errors.push(format!(
                    "{}: readdir type {t:?} but lstat type {:?}",
                    p.display(),
                    md.file_type()
                )),
                Err(e) => errors.push(format!("d_type {}: {e}", p.display())),
            }
            if md.is_dir() {
                stack.push(p);
            } else if md.is_symlink() {
                ns += 1;
                if let Err(e) = fs::read_link(&p) {
                    errors.push(format!("readlink {}: {e}", p.display()));
                }
            } else if md.is_file() {
                nf += 1;
                if md.nlink() == 0 {
                    errors.push(format!("{}: listed but nlink 0", p.display()));
                }
                let read = File::open(&p).and_then(|mut f| {
                    drop_cached_pages(&f);
                    let mut v = Vec::new();
                    f.read_to_end(&mut v).map(|_| v)
                });
                match read {
                    Ok(data) if data.len() as u64 == md.len() => nb += md.len(),
                    Ok(data) => errors.push(format!(
                        "{}: stat size {} but read {} bytes",
                        p.display(),
                        md.len(),
                        data.len()
                    )),
                    Err(e) => errors.push(format!("read {}: {e}", p.display())),
                }
            }
        }
    }
    (nd, nf, ns, nb)
}

#[test]
fn kill9_leaves_consistent_tree() {
    let seed = test_seed().wrapping_add(1);
    println!(
        "consistency: seed {seed} (replay with VOLFS_TEST_SEED={})",
        seed.wrapping_sub(1)
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Setup::new();
    for cycle in 0..5u64 {
        let stop = Arc::new(AtomicBool::new(false));
        // Each worker returns (operations, the connection error that stopped it).
        let workers: Vec<JoinHandle<(u64, Option<io::Error>)>> = (0..2u64)
            .map(|w| {
                let (base, stop) = (s.mnt.clone(), stop.clone());
                let wseed = seed ^ (cycle << 8) ^ w;
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(wseed);
                    let mut n = 0;
                    // Bounded so a daemon that never dies cannot make this loop forever.
                    while !stop.load(Ordering::SeqCst) && n < 1_000_000 {
                        n += 1;
                        if let Err(e) = churn_op(&mut rng, &base) {
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV)
                            ) {
                                return (n, Some(e));
                            }
                        }
                    }
                    (n, None)
                })
            })
            .collect();
        let delay = Duration::from_millis(rng.gen_range(300..=2000));
        std::thread::sleep(delay);
        // Even cycles: the daemon alone (the keeper holds the mount; the workers' requests
        // wait and then succeed). Odd cycles: the daemon and its keeper (the mount dies; the
        // workers stop at ENOTCONN before the next start mounts afresh).
        let keeper = cycle % 2 == 0;
        s.kill9(keeper);
        stop.store(true, Ordering::SeqCst);
        let mut ended = Vec::new();
        if !keeper {
            for h in workers {
                ended.push(join_within(
                    h,
                    Duration::from_secs(20),
                    "a churn thread",
                    &s.daemon,
                ));
            }
            s.start();
        } else {
            std::thread::sleep(Duration::from_millis(200));
            s.start();
            for h in workers {
                ended.push(join_within(
                    h,
                    Duration::from_secs(20),
                    "a churn thread",
                    &s.daemon,
                ));
            }
        }
        let ops: u64 = ended.iter().map(|(n, _)| n).sum();
        if keeper {
            let errs: Vec<String> = ended
                .iter()
                .filter_map(|(_, e)| e.as_ref().map(|e| e.to_string()))
                .collect();
            assert!(
                errs.is_empty(),
                "cycle {cycle}: the daemon alone was killed (its keeper holds the mount), yet \
                 churn threads failed with {errs:?}\ndaemon log tail:\n{}",
                tail_lines(&s.daemon.log(), 40)
            );
        }
        let mut errors = Vec::new();
        let (nd, nf, ns, nb) = walk(&s.mnt, &mut errors);
        assert!(
            errors.is_empty(),
            "cycle {cycle}: tree inconsistent after kill -9 ({}) at {delay:?} and restart \
             ({} problems; replay with VOLFS_TEST_SEED={}):\n  {}\ndaemon log tail:\n{}",
            if keeper {
                "daemon alone"
            } else {
                "daemon and keeper"
            },
            errors.len(),
            seed.wrapping_sub(1),
            errors[..errors.len().min(20)].join("\n  "),
            tail_lines(&s.daemon.log(), 40)
        );
        // The volume is usable: every directory can take a new file.
        let probe = s.mnt.join(format!("probe{cycle}"));
        fs::write(&probe, b"probe").expect("write probe after restart");
        assert_eq!(fs::read(&probe).expect("read probe"), b"probe");
        println!(
            "consistency: cycle {cycle}: {ops} ops, killed after {delay:?}; walked {nd} dirs, \
             {nf} files ({nb} bytes), {ns} symlinks without error"
        );
    }
    // Still consistent after a clean stop and start (SIGTERM: the mount stays), and after a
    // shutdown and start (a fresh mount: everything from the store).
    s.start();
    let mut errors = Vec::new();
    walk(&s.mnt, &mut errors);
    assert!(
        errors.is_empty(),
        "tree inconsistent after a final clean restart:\n  {}",
        errors[..errors.len().min(20)].join("\n  ")
    );
    s.daemon.shutdown();
    s.start();
    let mut errors = Vec::new();
    walk(&s.mnt, &mut errors);
    assert!(
        errors.is_empty(),
        "tree inconsistent after a final shutdown and start:\n  {}",
        errors[..errors.len().min(20)].join("\n  ")
    );
}
