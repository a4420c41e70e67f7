//! Crash harness: a mixed workload on two volumes (files written, fsynced, renamed into
//! place, truncated, given xattrs, unlinked; snapshots taken) while the daemon is killed
//! with SIGKILL at random points and started again. The mounts outlive the daemon (the
//! keeper holds them), so the workload just waits out each gap. Afterwards every operation
//! that returned is there, exact; every snapshot that was acknowledged holds what was
//! acknowledged before it was taken; every file is one the workload could have written.
//!
//! Snapshots are taken every 150 ms and the oldest removed beyond eight, so layer merges
//! are crashed into as well.
//!
//! `VOLFS_CRASH_CYCLES` sets the kill cycles (20 by default; `scripts/crash-loop N` runs
//! long series), `VOLFS_CRASH_SEED` the random seed.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::util::*;

/// A file's content: a header naming it, then bytes derived from the seed. A file read
/// back is either exactly this for some seed and length, or the workload never wrote it.
fn content(name: &str, seed: u64, len: usize) -> Vec<u8> {
    xorshift_fill(format!("{name} {seed} {len}\n").into_bytes(), seed | 1, len)
}

/// Whether `data`, found in file `name` (or `name.tmp`), is a prefix of something the
/// workload writes: its header names the file, and the rest follows from the seed.
fn plausible(name: &str, data: &[u8]) -> bool {
    let head = format!("{name} ");
    if data.len() <= head.len() {
        return head.as_bytes().starts_with(data);
    }
    if !data.starts_with(head.as_bytes()) {
        return false;
    }
    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
        return true; // cut inside the header
    };
    let header = String::from_utf8_lossy(&data[..nl]).into_owned();
    let mut parts = header.split(' ').skip(1);
    match (
        parts.next().and_then(|s| s.parse::<u64>().ok()),
        parts.next().and_then(|s| s.parse::<usize>().ok()),
    ) {
        (Some(seed), Some(len)) => {
            data.len() <= len && content(name, seed, len)[..data.len()] == *data
        }
        _ => false,
    }
}

/// One acknowledged file: written whole as `content(name, seed, written)`, then maybe cut
/// to `len`, and maybe given an xattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct File {
    seed: u64,
    written: usize,
    len: usize,
    xattr: Option<u64>,
}

impl File {
    fn bytes(&self, name: &str) -> Vec<u8> {
        let mut v = content(name, self.seed, self.written);
        v.truncate(self.len);
        v
    }
}

/// What one worker knows it did, for every operation that returned.
type Acked = BTreeMap<String, File>;

/// A snapshot acknowledged: (volume index, name, what each of its workers had acknowledged
/// before it was asked for).
type Taken = (usize, String, Vec<(usize, Acked)>);

struct Worker {
    dir: PathBuf,
    acked: Arc<Mutex<Acked>>,
    /// Calls that failed (each then retried until it succeeded).
    errors: Arc<Mutex<Vec<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Worker {
    /// Runs `op` until it succeeds. A call in flight when the daemon is killed may fail
    /// with EIO (the kernel fails a request it was handing to the dying daemon), having
    /// taken effect or not: every op here is idempotent, so it is simply done again.
    fn retry(&self, what: &str, mut op: impl FnMut() -> std::io::Result<()>) {
        loop {
            match op() {
                Ok(()) => return,
                Err(e) => {
                    lock(&self.errors).push(format!("{what}: {e}"));
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn work(w: &Worker, seed: u64, stop: &AtomicBool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let names: Vec<String> = lock(&w.acked).keys().cloned().collect();
        let pick = |rng: &mut rand::rngs::StdRng| names[rng.gen_range(0..names.len())].clone();
        // Past 300 files a create becomes an unlink: long runs stay bounded in size.
        let op = match rng.gen_range(0..10) {
            0..=4 if names.len() >= 300 => 8,
            op => op,
        };
        match op {
            0..=4 => {
                n += 1;
                let name = format!("f{n}");
                let s: u64 = rng.r#gen();
                let len = rng.gen_range(64..200_000);
                let data = content(&name, s, len);
                let tmp = w.dir.join(format!("{name}.tmp"));
                let sync = rng.gen_bool(0.3);
                w.retry(&format!("writing {name}"), || {
                    let mut f = fs::File::create(&tmp)?;
                    f.write_all(&data)?;
                    if sync {
                        f.sync_all()?;
                    }
                    drop(f);
                    match fs::rename(&tmp, w.dir.join(&name)) {
                        // Done by the call that failed.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        r => r,
                    }
                });
                let f = File {
                    seed: s,
                    written: len,
                    len,
                    xattr: None,
                };
                lock(&w.acked).insert(name, f);
            }
            5 | 6 if !names.is_empty() => {
                let name = pick(&mut rng);
                let file = lock(&w.acked)[&name];
                let new = rng.gen_range(0..=file.len);
                w.retry(&format!("truncating {name}"), || {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(w.dir.join(&name))?
                        .set_len(new as u64)
                });
                lock(&w.acked).insert(name, File { len: new, ..file });
            }
            7 if !names.is_empty() => {
                let name = pick(&mut rng);
                let v: u64 = rng.r#gen();
                w.retry(&format!("setxattr {name}"), || {
                    xattr::set(w.dir.join(&name), "user.v", &v.to_le_bytes())
                });
                if let Some(e) = lock(&w.acked).get_mut(&name) {
                    e.xattr = Some(v);
                }
            }
            8 if names.len() > 20 => {
                let name = pick(&mut rng);
                // Forgotten first: a snapshot taken meanwhile may or may not hold it.
                lock(&w.acked).remove(&name);
                w.retry(&format!("unlinking {name}"), || {
                    match fs::remove_file(w.dir.join(&name)) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        r => r,
                    }
                });
            }
            _ if !names.is_empty() => {
                // A read of an acknowledged file, checked.
                let name = pick(&mut rng);
                let want = lock(&w.acked).get(&name).copied();
                if let (Some(f), Ok(got)) = (want, fs::read(w.dir.join(&name))) {
                    if got != f.bytes(&name) {
                        lock(&w.errors).push(format!("{name} read back wrong while running"));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Checks `dir` holds exactly `acked` (plus at most leftover `.tmp` files of writes a crash
/// cut short, which must be prefixes of what the workload writes).
fn check_dir(dir: &Path, acked: &Acked, what: &str) -> Result<(), String> {
    let mut seen = 0;
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{what}: readdir {}: {e}", dir.display()))
    {
        let e = e.expect("dirent");
        let name = e.file_name().into_string().expect("utf-8 name");
        let data = fs::read(e.path()).unwrap_or_else(|e| panic!("{what}: read {name}: {e}"));
        if let Some(base) = name.strip_suffix(".tmp") {
            assert!(
                plausible(base, &data),
                "{what}: {name} holds bytes the workload never wrote"
            );
            continue;
        }
        let Some(f) = acked.get(&name) else {
            return Err(format!(
                "{what}: {name} exists but was never acknowledged (or was unlinked)"
            ));
        };
        if data != f.bytes(&name) {
            return Err(format!(
                "{what}: {name} differs from what was acknowledged ({} bytes, want {} of {})",
                data.len(),
                f.len,
                f.written
            ));
        }
        let got = xattr::get(e.path(), "user.v").expect("getxattr");
        assert_eq!(
            got,
            f.xattr.map(|v| v.to_le_bytes().to_vec()),
            "{what}: xattr of {name}"
        );
        seen += 1;
    }
    if seen != acked.len() {
        return Err(format!("{what}: acknowledged files missing"));
    }
    Ok(())
}

/// The warning and error lines of a daemon log.
fn problems(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn kill9_cycles_lose_nothing_acknowledged_and_keep_every_snapshot() {
    let cycles: usize = std::env::var("VOLFS_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("VOLFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            t.map_or(1, |t| t.as_nanos() as u64) ^ u64::from(std::process::id())
        });
    eprintln!("crash harness: {cycles} cycles, VOLFS_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d = Daemon::start();
    let vols = ["crash1", "crash2"];
    let mut mounts = Vec::new();
    for v in vols {
        d.create(v);
        let dir = open_tempdir();
        d.mount(v, dir.path(), false);
        mounts.push(dir);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    let mut threads = Vec::new();
    for i in 0..4 {
        let dir = mounts[i % 2].path().join(format!("w{i}"));
        fs::create_dir(&dir).expect("worker dir");
        let w = Arc::new(Worker {
            dir,
            acked: Arc::new(Mutex::new(Acked::new())),
            errors: errors.clone(),
        });
        workers.push(w.clone());
        let (stop, s) = (stop.clone(), seed.wrapping_add(i as u64 + 1));
        threads.push(std::thread::spawn(move || work(&w, s, &stop)));
    }
    let snaps: Arc<Mutex<Vec<Taken>>> = Arc::default();
    let snapper = {
        let (stop, snaps, workers) = (stop.clone(), snaps.clone(), workers.clone());
        let socket = d.socket().to_path_buf();
        std::thread::spawn(move || {
            let mut k = 0;
            let off = std::env::var("VOLFS_CRASH_SNAPSHOTS").is_ok_and(|v| v == "0");
            while !stop.load(Ordering::Relaxed) && !off {
                std::thread::sleep(Duration::from_millis(150));
                k += 1;
                let v = k % 2;
                let before: Vec<(usize, Acked)> = (0..workers.len())
                    .filter(|i| i % 2 == v)
                    .map(|i| {
                        (
                            i,
                            workers[i]
                                .acked
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone(),
                        )
                    })
                    .collect();
                let name = format!("s{k}");
                let mut cmd = CleanCommand::new(VOLFS);
                cmd.arg("--socket")
                    .arg(&socket)
                    .args(["snapshot", "create", vols[v], &name]);
                if let Some(out) = run_within(cmd, Duration::from_secs(60)) {
                    if out.status.success() {
                        snaps
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((v, name, before));
                    }
                }
                // Keep the newest few: removals (layer merges) get crashed into too.
                let oldest = {
                    let l = snaps.lock().unwrap_or_else(|p| p.into_inner());
                    (l.len() > 8).then(|| (l[0].0, l[0].1.clone()))
                };
                if let Some((v, name)) = oldest {
                    let target = format!("{}@{name}", vols[v]);
                    let mut cmd = CleanCommand::new(VOLFS);
                    cmd.arg("--socket")
                        .arg(&socket)
                        .args(["snapshot", "rm", &target]);
                    // Dropped from the list first: a removal a crash cut short may or may
                    // not have happened, and is not checked.
                    snaps.lock().unwrap_or_else(|p| p.into_inner()).remove(0);
                    let _ = run_within(cmd, Duration::from_secs(60));
                }
            }
        })
    };
    let t0 = Instant::now();
    for c in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        d.kill9();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..100)));
        d.restart();
        let bad: Vec<String> = lock(&errors)
            .iter()
            .filter(|e| !e.ends_with("(os error 5)"))
            .cloned()
            .collect();
        assert!(
            bad.is_empty(),
            "cycle {c}: the workload saw errors: {bad:?}; daemon warnings and errors:\n{}",
            problems(&d.log())
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("worker");
    }
    snapper.join().expect("snapshot thread");
    eprintln!(
        "crash harness: {cycles} kill cycles in {:.1}s, {} snapshots, {} files acknowledged",
        t0.elapsed().as_secs_f64(),
        snaps.lock().unwrap_or_else(|p| p.into_inner()).len(),
        workers
            .iter()
            .map(|w| w.acked.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum::<usize>()
    );
    // At most the calls in flight at each kill failed (and were retried).
    let failed = lock(&errors).len();
    eprintln!("crash harness: {failed} calls in flight at a kill failed with EIO and were retried");
    assert!(failed <= 4 * cycles, "{:?}", lock(&errors));
    let check = |d: &Daemon, when: &str| {
        for (i, w) in workers.iter().enumerate() {
            if let Err(e) = check_dir(&w.dir, &lock(&w.acked), &format!("{when}, worker {i}")) {
                // Is it the store or this mount's kernel cache? A fresh mount tells.
                let fresh = open_tempdir();
                d.mount(vols[i % 2], fresh.path(), true);
                let again = check_dir(
                    &fresh.path().join(format!("w{i}")),
                    &lock(&w.acked),
                    "a fresh mount",
                );
                panic!(
                    "{e}\n{again:?}\ndaemon warnings and errors:\n{}",
                    problems(&d.log())
                );
            }
        }
    };
    check(&d, "before the last kill");
    // Once more, then check everything.
    d.kill9();
    d.restart();
    check(&d, "after the last restart");
    // Every invariant of the store holds, in the volumes and in their snapshots.
    // It reads every chunk of every view: give it time after long runs.
    let fsck = d.cli_within(&["fsck", "--all"], Duration::from_secs(900));
    assert!(
        fsck.status.success(),
        "fsck --all after the crashes: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let snaps = snaps.lock().unwrap_or_else(|p| p.into_inner());
    let off = std::env::var("VOLFS_CRASH_SNAPSHOTS").is_ok_and(|v| v == "0");
    assert!(off || !snaps.is_empty(), "no snapshot was taken");
    for (v, name, before) in snaps.iter() {
        let dir = open_tempdir();
        d.mount(&format!("{}@{name}", vols[*v]), dir.path(), true);
        for (i, acked) in before {
            // Files acknowledged before the snapshot and not changed since must be exact;
            // the snapshot may also hold later files: each must be a valid one.
            let sdir = dir.path().join(format!("w{i}"));
            for (f, was) in acked {
                let now = workers[*i]
                    .acked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(f)
                    .copied();
                if now.map(|n| (n.seed, n.len)) == Some((was.seed, was.len)) {
                    let got = fs::read(sdir.join(f)).unwrap_or_else(|e| {
                        panic!("{}@{name}: {f} acknowledged before it: {e}", vols[*v])
                    });
                    assert!(got == was.bytes(f), "{}@{name}: {f} differs", vols[*v]);
                }
            }
            for e in fs::read_dir(&sdir).expect("readdir snapshot") {
                let e = e.expect("dirent");
                let n = e.file_name().into_string().expect("utf-8");
                let data = fs::read(e.path()).expect("read snapshot file");
                let base = n.strip_suffix(".tmp").unwrap_or(&n);
                assert!(
                    plausible(base, &data),
                    "{}@{name}: {n} holds bytes the workload never wrote",
                    vols[*v]
                );
            }
        }
        d.umount(dir.path());
    }
}
