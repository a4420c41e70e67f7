//! A daemon restart that breaks nobody.
//!
//! `volfs-mountd` keeps its mount table in its store and hands every mount's `/dev/fuse`
//! descriptor to a keeper process (`volfs-mountd --keeper`, pid in `ROOT/keeper.pid`). When
//! the daemon stops (SIGTERM/SIGINT: a clean stop for a restart) or dies (`kill -9`), its
//! mounts stay: accesses wait in the kernel, and the next daemon on the same root resumes
//! every mount at the same path with the same read-only flag. What was blocked or in flight
//! completes without an error; processes whose cwd is inside a mount, and open files and
//! directories, just go on. If the keeper died too, the mounts are dead (ENOTCONN) and the
//! next start replaces them with fresh mounts from the table. `volfs shutdown` unmounts
//! everything (keeping the table) and stops the keeper and the daemon.
//!
//! Each test runs under a 60 s watchdog (it kills the daemon and the keeper, so that a hang
//! turns into ENOTCONN failures) and bounds every wait on a blocked access.
#![allow(unsafe_code)] // File::from_raw_fd of the fd openat() returned

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tempfile::TempDir;

use crate::util::*;

/// Per-test watchdog: far above a normal run (a few seconds), far below CI's patience.
const WATCHDOG: Duration = Duration::from_secs(60);
/// How long a test leaves its mounts without a daemon.
const DOWN_TIME: Duration = Duration::from_millis(600);
/// Limit for any one access that has to wait for the next daemon.
const BLOCKED_LIMIT: Duration = Duration::from_secs(15);

const HELLO: &[u8] = b"hello from vola\n";

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn mountpoint() -> (TempDir, PathBuf) {
    let dir = open_tempdir();
    let p = fs::canonicalize(dir.path()).expect("canonicalize");
    (dir, p)
}

/// Deterministic bytes, different for every `seed`.
fn pat(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The log without ANSI colour sequences.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Writes `data` to a new file `p` and fsyncs it and its directory.
fn write_durably(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
    File::open(p.parent().expect("parent"))
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
}

/// Reads `p` past the kernel's page cache (so the bytes come from the daemon).
fn read_uncached(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(p)?;
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// A child process (started through the clean spawner, see `util`) that is SIGKILLed if the
/// test ends without waiting for it.
struct ChildGuard(CleanChild);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait_timeout(Duration::from_secs(10));
    }
}

impl ChildGuard {
    #[track_caller]
    fn wait_exit(&mut self, limit: Duration, what: &str, d: &Daemon) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                t0.elapsed() < limit,
                "{what} has not exited after {limit:?}; daemon log tail:\n{}",
                tail(&plain(&d.log()), 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits (bounded) for a thread that may be blocked on a mount.
#[track_caller]
fn join_within<T>(h: JoinHandle<T>, limit: Duration, what: &str, d: &Daemon) -> T {
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(
            t0.elapsed() < limit,
            "{what} still blocked {limit:?} after the restart; daemon log tail:\n{}",
            tail(&plain(&d.log()), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    h.join().unwrap_or_else(|_| panic!("{what} panicked"))
}

/// How the daemon goes away.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Down {
    /// SIGTERM: a clean stop for a restart.
    Sigterm,
    /// kill -9 of the daemon (the keeper lives on).
    Kill9,
}

/// Takes the daemon down; asserts that its mounts `all` stay in place as `fuse.volfs` mounts
/// and that its keeper `keeper` lives on.
#[track_caller]
fn take_down(d: &mut Daemon, how: Down, all: &[(PathBuf, bool)], keeper: i32) {
    match how {
        Down::Sigterm => d.stop(), // asserts exit 0 and the socket removed
        Down::Kill9 => d.kill9(),
    }
    for (p, _) in all {
        assert_eq!(
            mount_fstype(p).as_deref(),
            Some("fuse.volfs"),
            "after {how:?} of the daemon, {} is no longer a fuse.volfs mount in \
             /proc/self/mountinfo; daemon log:\n{}",
            p.display(),
            plain(&d.log())
        );
    }
    assert!(
        pid_alive(keeper),
        "the keeper (pid {keeper}) did not survive {how:?} of the daemon"
    );
}

#[track_caller]
fn expect_keeper(d: &Daemon) -> i32 {
    d.keeper_pid().unwrap_or_else(|| {
        panic!(
            "no keeper: {}/keeper.pid names no live `volfs-mountd --keeper` of this root; \
             daemon log:\n{}",
            d.root().display(),
            plain(&d.log())
        )
    })
}

/// Exactly one `fuse.volfs` mount at `p`.
#[track_caller]
fn assert_one_volfs_mount(p: &Path) {
    let here: Vec<String> = mounts()
        .into_iter()
        .filter(|(mp, _)| mp == p)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        here,
        ["fuse.volfs"],
        "mounts at {} in /proc/self/mountinfo",
        p.display()
    );
}

// ---------------------------------------------------------------------------------------------
// a reader and a writer that keep going across the restart
// ---------------------------------------------------------------------------------------------

const STATIC_LEN: usize = 256 * 1024;

fn record(i: u64) -> String {
    format!("record {i:06}\n")
}

struct Io {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    appends: Arc<AtomicU64>,
    reader: JoinHandle<Result<(), String>>,
    writer: JoinHandle<Result<(), String>>,
    log: PathBuf,
}

/// Starts, in `dir` (on a mount): a reader thread looping on O_DIRECT `pread`s (each one a
/// request to the daemon) and `stat`s of one file, checking every byte; and a writer thread
/// appending numbered records to another file, each `write` followed by `fdatasync`. Returns
/// once both are looping. Any error stops the thread and is reported by [`Io::finish`].
fn start_io(dir: &Path) -> Io {
    let data = pat(STATIC_LEN, 77);
    let stat_path = dir.join("static");
    write_durably(&stat_path, &data);
    let log = dir.join("appended");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let appends = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, p) = (stop.clone(), reads.clone(), stat_path.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&p)
                .map_err(|e| format!("open O_DIRECT: {e}"))?;
            let mut buf = vec![0u8; STATIC_LEN];
            while !stop.load(Ordering::SeqCst) {
                let n = reads.load(Ordering::SeqCst);
                let mut got = 0;
                while got < STATIC_LEN {
                    match f.read_at(&mut buf[got..], got as u64) {
                        Ok(0) => return Err(format!("read {n}: EOF at {got}")),
                        Ok(k) => got += k,
                        Err(e) => return Err(format!("read {n} at {got}: {e}")),
                    }
                }
                if buf != data {
                    return Err(format!("read {n}: wrong bytes"));
                }
                let md = fs::metadata(&p).map_err(|e| format!("stat {n}: {e}"))?;
                if md.len() != STATIC_LEN as u64 {
                    return Err(format!("stat {n}: size {}", md.len()));
                }
                reads.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    let writer = {
        let (stop, appends, p) = (stop.clone(), appends.clone(), log.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&p)
                .map_err(|e| format!("open O_APPEND: {e}"))?;
            while !stop.load(Ordering::SeqCst) {
                let i = appends.load(Ordering::SeqCst);
                f.write_all(record(i).as_bytes())
                    .map_err(|e| format!("append {i}: {e}"))?;
                f.sync_data().map_err(|e| format!("fdatasync {i}: {e}"))?;
                appends.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    let io = Io {
        stop,
        reads,
        appends,
        reader,
        writer,
        log,
    };
    io.wait_progress(3, 3, Duration::from_secs(10), "before the restart");
    io
}

impl Io {
    fn counts(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::SeqCst),
            self.appends.load(Ordering::SeqCst),
        )
    }

    /// Waits until both threads did `r` reads and `a` appends more than now.
    #[track_caller]
    fn wait_progress(&self, r: u64, a: u64, limit: Duration, when: &str) {
        let (r0, a0) = self.counts();
        let t0 = Instant::now();
        loop {
            let (rn, an) = self.counts();
            if rn >= r0 + r && an >= a0 + a {
                return;
            }
            assert!(
                !self.reader.is_finished() && !self.writer.is_finished(),
                "{when}: the reader or the writer stopped ({rn} reads, {an} appends)"
            );
            assert!(
                t0.elapsed() < limit,
                "{when}: no progress in {limit:?}: {} reads and {} appends (want +{r} / +{a})",
                rn - r0,
                an - a0
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops both threads (bounded), asserts neither saw an error, and that the appended
    /// file holds exactly every record, in order (read from the daemon, not the page cache).
    #[track_caller]
    fn finish(self, d: &Daemon, how: Down) {
        self.stop.store(true, Ordering::SeqCst);
        let r = join_within(self.reader, BLOCKED_LIMIT, "the reader thread", d);
        let w = join_within(self.writer, BLOCKED_LIMIT, "the writer thread", d);
        let (reads, appends) = (
            self.reads.load(Ordering::SeqCst),
            self.appends.load(Ordering::SeqCst),
        );
        assert!(
            r.is_ok() && w.is_ok(),
            "across a {how:?} restart: reader {r:?} (after {reads} good reads), writer {w:?} \
             (after {appends} appends); daemon log tail:\n{}",
            tail(&plain(&d.log()), 40)
        );
        let want: String = (0..appends).map(record).collect();
        let log = self.log.clone();
        let got = bounded("reading the appended file", BLOCKED_LIMIT, move || {
            read_uncached(&log)
        })
        .expect("read the appended file");
        if got != want.as_bytes() {
            let first = got.iter().zip(want.as_bytes()).position(|(a, b)| a != b);
            panic!(
                "across a {how:?} restart: the appended file has {} bytes, want {} ({appends} \
                 records); first difference at {first:?}",
                got.len(),
                want.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the main scenario
// ---------------------------------------------------------------------------------------------

/// Two volumes, three mounts (one read-only). Before the daemon goes away: a shell whose cwd
/// is a directory inside a mount waits on a FIFO on the host, then does `cat file; echo x >
/// newfile; ls`; the test holds an O_DIRECTORY fd and a read-write file fd on the mounts;
/// with `io`, a reader and a writer thread keep working. Then the daemon goes away (`how`),
/// the mounts must stay, a daemon is started again, and everybody must just go on.
fn everyone_goes_on(how: Down, io: bool) {
    let (_t1, m1) = mountpoint();
    let (_t2, m2) = mountpoint();
    let (_t3, m3) = mountpoint();
    let host = open_tempdir();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vola");
    d.create("volb");
    d.mount("vola", &m1, false);
    d.mount("vola", &m2, true);
    d.mount("volb", &m3, false);
    let all = vec![(m1.clone(), false), (m2.clone(), true), (m3.clone(), false)];
    let work = m1.join("work");
    fs::create_dir(&work).unwrap();
    write_durably(&work.join("file"), HELLO);
    write_durably(&m3.join("held"), b"0123456789");

    // The shell: cwd inside the mount, blocked on a FIFO on the host.
    let fifo = host.path().join("go");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let out_p = host.path().join("out");
    let err_p = host.path().join("err");
    let script = format!(
        "set -e; read go < '{}'; test \"$go\" = go; cat file; echo x > newfile; ls",
        fifo.display()
    );
    let mut child = ChildGuard(
        CleanCommand::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .current_dir(&work)
            .stdout(File::create(&out_p).unwrap())
            .stderr(File::create(&err_p).unwrap())
            .spawn()
            .expect("spawn sh"),
    );

    // Held descriptors.
    let dir = nix::dir::Dir::open(
        &work,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .expect("open the directory");
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m3.join("held"))
        .unwrap();
    let io = io.then(|| start_io(&m3));

    let keeper = expect_keeper(&d);
    take_down(&mut d, how, &all, keeper);
    std::thread::sleep(DOWN_TIME);
    if let Some(io) = &io {
        assert!(
            !io.reader.is_finished() && !io.writer.is_finished(),
            "with no daemon running, the reader or the writer stopped (an error instead of \
             waiting for the next daemon)"
        );
    }
    d.restart();
    d.assert_mounts(&all);
    let io_after = io.as_ref().map(|io| io.counts());

    // The shell goes on: release it and check everything it did.
    {
        let fifo = fifo.clone();
        bounded(
            "opening the FIFO to release the shell",
            BLOCKED_LIMIT,
            move || {
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(&fifo)
                    .expect("open FIFO");
                f.write_all(b"go\n").expect("write FIFO");
            },
        );
    }
    let st = child.wait_exit(BLOCKED_LIMIT, "the shell with its cwd in the mount", &d);
    let out = fs::read_to_string(&out_p).unwrap();
    let err = fs::read_to_string(&err_p).unwrap();
    assert!(
        st.success() && err.is_empty(),
        "after the {how:?} restart, the shell whose cwd is in the mount failed ({st}): \
         stdout {out:?}, stderr {err:?}; daemon log tail:\n{}",
        tail(&plain(&d.log()), 40)
    );
    assert_eq!(
        out,
        format!("{}file\nnewfile\n", String::from_utf8_lossy(HELLO)),
        "output of `cat file; echo x > newfile; ls` after the {how:?} restart"
    );
    assert_eq!(fs::read(work.join("newfile")).unwrap(), b"x\n");

    // The held directory fd: readdir and openat through it.
    let mut dir = dir;
    let names: BTreeSet<String> = dir
        .iter()
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_else(|e| panic!("readdir on the held directory fd: {e}"))
        })
        .filter(|n| n != "." && n != "..")
        .collect();
    assert_eq!(
        names,
        ["file", "newfile"].iter().map(|s| s.to_string()).collect(),
        "readdir on the directory fd held across the {how:?} restart"
    );
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        "file",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("openat(held dir fd, \"file\") after the {how:?} restart: {e}"));
    // SAFETY: openat just returned this fd; the File owns it from here on.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let mut s = Vec::new();
    f.read_to_end(&mut s).expect("read through openat");
    assert_eq!(s, HELLO);
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        "made-via-dirfd",
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap_or_else(|e| panic!("openat(held dir fd, O_CREAT) after the {how:?} restart: {e}"));
    // SAFETY: as above.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(b"y").expect("write through openat");
    drop(f);
    assert_eq!(fs::read(work.join("made-via-dirfd")).unwrap(), b"y");

    // The held read-write file fd.
    let mut b = [0u8; 10];
    held.read_exact_at(&mut b, 0)
        .unwrap_or_else(|e| panic!("pread on the file fd held across the {how:?} restart: {e}"));
    assert_eq!(&b, b"0123456789");
    held.write_all_at(b"ABC", 10)
        .unwrap_or_else(|e| panic!("pwrite on the file fd held across the {how:?} restart: {e}"));
    held.sync_all().expect("fsync the held file");
    let mut b = [0u8; 13];
    held.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"0123456789ABC");
    assert_eq!(read_uncached(&m3.join("held")).unwrap(), b"0123456789ABC");

    // The read-only mount is still read-only, and serves the volume.
    assert_errno!(fs::write(m2.join("nope"), b"x"), EROFS);
    assert_errno!(
        OpenOptions::new().write(true).open(m2.join("work/file")),
        EROFS
    );
    assert_eq!(fs::read(m2.join("work/file")).unwrap(), HELLO);
    assert_eq!(fs::read(m2.join("work/newfile")).unwrap(), b"x\n");

    if let Some(io) = io {
        let (r0, a0) = io_after.expect("counts");
        io.wait_progress(3, 3, BLOCKED_LIMIT, "after the restart");
        let (r1, a1) = io.counts();
        assert!(r1 > r0 && a1 > a0);
        io.finish(&d, how);
    }

    // `volfs ls` lists the three mounts; one fuse.volfs mount per path, nothing stacked.
    d.assert_mounts(&all);
    for (p, _) in &all {
        assert_one_volfs_mount(p);
    }
    assert!(
        d.keeper_pid().is_some(),
        "no keeper after the restart: the next kill -9 would take the mounts with it"
    );
    drop(dir);
    drop(held);
}

#[test]
fn sigterm_then_start_resumes_every_mount_and_nobody_notices() {
    everyone_goes_on(Down::Sigterm, false);
}

#[test]
fn kill9_then_start_resumes_every_mount_and_readers_and_writers_go_on() {
    everyone_goes_on(Down::Kill9, true);
}

#[test]
fn sigterm_then_start_with_a_reader_and_a_writer_running() {
    everyone_goes_on(Down::Sigterm, true);
}

// ---------------------------------------------------------------------------------------------
// a request made while no daemon runs
// ---------------------------------------------------------------------------------------------

/// A `stat` and a read issued while no daemon runs (of a name this mount never looked up, so
/// that they must reach the daemon) block, and complete successfully once a daemon is back.
fn request_while_no_daemon_runs(how: Down) {
    let (_ta, ma) = mountpoint();
    let (_tb, mb) = mountpoint();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vol");
    d.mount("vol", &ma, false);
    d.mount("vol", &mb, false);
    let all = vec![(ma.clone(), false), (mb.clone(), false)];
    let data = pat(100_000, 9);
    write_durably(&ma.join("fresh"), &data);
    let keeper = expect_keeper(&d);
    take_down(&mut d, how, &all, keeper);

    let p = mb.join("fresh");
    let h = std::thread::spawn(move || -> Result<(u64, Vec<u8>), String> {
        let md = fs::metadata(&p).map_err(|e| format!("stat: {e}"))?;
        let v = fs::read(&p).map_err(|e| format!("read: {e}"))?;
        Ok((md.len(), v))
    });
    std::thread::sleep(Duration::from_millis(800));
    if h.is_finished() {
        let r = h.join().expect("join");
        panic!(
            "with no daemon running, a stat on the mount returned at once ({:?}) instead of \
             waiting for the next daemon",
            r.map(|(n, _)| n)
        );
    }
    d.restart();
    d.assert_mounts(&all);
    let r = join_within(h, BLOCKED_LIMIT, "the stat issued while no daemon ran", &d);
    match r {
        Ok((n, v)) => {
            assert_eq!(n, data.len() as u64, "size from the stat");
            assert!(v == data, "bytes read by the blocked reader differ");
        }
        Err(e) => panic!(
            "the request issued while no daemon ran ({how:?}) failed: {e}; daemon log tail:\n{}",
            tail(&plain(&d.log()), 40)
        ),
    }
}

#[test]
fn a_request_made_while_no_daemon_runs_after_kill9_completes_after_the_start() {
    request_while_no_daemon_runs(Down::Kill9);
}

#[test]
fn a_request_made_while_no_daemon_runs_after_sigterm_completes_after_the_start() {
    request_while_no_daemon_runs(Down::Sigterm);
}

// ---------------------------------------------------------------------------------------------
// the keeper died too
// ---------------------------------------------------------------------------------------------

#[test]
fn kill9_of_daemon_and_keeper_leaves_dead_mounts_that_the_next_start_replaces() {
    let (_t1, m1) = mountpoint();
    let (_t2, m2) = mountpoint();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vol");
    d.mount("vol", &m1, false);
    d.mount("vol", &m2, true);
    let all = vec![(m1.clone(), false), (m2.clone(), true)];
    let data = pat(300_000, 5);
    write_durably(&m1.join("data"), &data);
    let old_keeper = expect_keeper(&d);
    let killed = d.kill9_all();
    assert_eq!(
        killed,
        Some(old_keeper),
        "kill9_all found no keeper to kill"
    );

    // Dead: every access that reaches the filesystem fails with ENOTCONN.
    for m in [&m1, &m2] {
        let mm = m.clone();
        let (open, list) = bounded("accessing a dead mount", BLOCKED_LIMIT, move || {
            (
                File::open(mm.join("data"))
                    .map(drop)
                    .map_err(|e| e.raw_os_error()),
                fs::read_dir(&mm).map(drop).map_err(|e| e.raw_os_error()),
            )
        });
        assert_eq!(
            open,
            Err(Some(libc::ENOTCONN)),
            "open on {} after kill -9 of daemon and keeper",
            m.display()
        );
        assert_eq!(
            list,
            Err(Some(libc::ENOTCONN)),
            "opendir of {} after kill -9 of daemon and keeper",
            m.display()
        );
    }

    // The next start detaches the dead mounts and mounts the table afresh at the same paths.
    d.restart();
    d.assert_mounts(&all); // also: exactly one fuse.volfs mount per path
    let (a, b) = (m1.clone(), m2.clone());
    let (got1, got2) = bounded("reading the remounted volume", BLOCKED_LIMIT, move || {
        (fs::read(a.join("data")), fs::read(b.join("data")))
    });
    assert!(
        got1.as_deref().ok() == Some(&data[..]),
        "data at {} after the restart: {:?}",
        m1.display(),
        got1.map(|v| v.len())
    );
    assert!(
        got2.as_deref().ok() == Some(&data[..]),
        "data at {} (read-only) after the restart: {:?}",
        m2.display(),
        got2.map(|v| v.len())
    );
    assert_errno!(fs::write(m2.join("nope"), b"x"), EROFS);
    fs::write(m1.join("new"), b"works").expect("write on the fresh mount");
    assert_eq!(fs::read(m2.join("new")).unwrap(), b"works");
    for (p, _) in &all {
        assert_one_volfs_mount(p);
    }
    let k = d.keeper_pid();
    assert!(
        k.is_some() && k != Some(old_keeper),
        "the new daemon has no keeper of its own ({k:?}, old {old_keeper})"
    );
}

// ---------------------------------------------------------------------------------------------
// the mount table
// ---------------------------------------------------------------------------------------------

#[test]
fn a_table_entry_whose_directory_is_gone_is_dropped_with_a_warning() {
    let host = open_tempdir();
    let gone = fs::canonicalize(host.path()).unwrap().join("gone");
    fs::create_dir(&gone).unwrap();
    let (_tk, keep) = mountpoint();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vol");
    d.mount("vol", &gone, false);
    d.mount("vol", &keep, true);
    write_durably(&gone.join("f"), b"data");
    d.shutdown();
    fs::remove_dir(&gone).expect("remove the unmounted mount point");

    let log_before = d.log().len();
    d.restart(); // must start (panics if the daemon exits)
    d.assert_mounts(&[(keep.clone(), true)]);
    assert_eq!(fs::read(keep.join("f")).unwrap(), b"data");
    let log = plain(&d.log()[log_before..]);
    let g = gone.to_str().unwrap();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains(g)),
        "no warning naming {g} in the log of the start:\n{log}"
    );

    // Dropped from the table: even with the directory back, the next start leaves it alone.
    fs::create_dir(&gone).unwrap();
    d.restart();
    d.assert_mounts(&[(keep.clone(), true)]);
    assert!(!is_mounted(&gone), "{g} was mounted again");
}

#[test]
fn a_mount_removed_with_volfs_umount_is_not_resumed() {
    let (_t1, m1) = mountpoint();
    let (_t2, m2) = mountpoint();
    let (_t3, m3) = mountpoint();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vol");
    for m in [&m1, &m2, &m3] {
        d.mount("vol", m, false);
    }
    fs::write(m3.join("f"), b"three").unwrap();
    d.umount(&m1);
    assert!(!is_mounted(&m1));
    d.stop();
    d.restart();
    d.assert_mounts(&[(m2.clone(), false), (m3.clone(), false)]);
    assert!(
        !is_mounted(&m1),
        "unmounted with `volfs umount`, resumed after SIGTERM"
    );

    // Table changes are durable at once: also across a kill -9.
    d.umount(&m2);
    d.mount("vol", &m1, true);
    d.kill9();
    d.restart();
    d.assert_mounts(&[(m1.clone(), true), (m3.clone(), false)]);
    assert!(
        !is_mounted(&m2),
        "unmounted with `volfs umount`, resumed after kill -9"
    );
    assert_errno!(fs::write(m1.join("nope"), b"x"), EROFS);
    assert_eq!(fs::read(m1.join("f")).unwrap(), b"three");
}

#[test]
fn volfs_shutdown_unmounts_everything_and_the_next_start_mounts_the_table_again() {
    let (_t1, m1) = mountpoint();
    let (_t2, m2) = mountpoint();
    let (_t3, m3) = mountpoint();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vola");
    d.create("volb");
    d.mount("vola", &m1, false);
    d.mount("vola", &m2, true);
    d.mount("volb", &m3, false);
    let all = vec![(m1.clone(), false), (m2.clone(), true), (m3.clone(), false)];
    let a = pat(70_000, 1);
    let b = pat(50_000, 2);
    write_durably(&m1.join("a"), &a);
    write_durably(&m3.join("b"), &b);
    expect_keeper(&d);
    d.shutdown(); // asserts: command ok, exit 0, no mount left, keeper gone
    for (p, _) in &all {
        assert!(
            !is_mounted(p),
            "{} still mounted after shutdown",
            p.display()
        );
    }
    d.restart();
    d.assert_mounts(&all);
    assert!(
        fs::read(m1.join("a")).unwrap() == a,
        "a after shutdown + start"
    );
    assert!(
        fs::read(m2.join("a")).unwrap() == a,
        "a (ro) after shutdown + start"
    );
    assert!(
        fs::read(m3.join("b")).unwrap() == b,
        "b after shutdown + start"
    );
    assert_errno!(fs::write(m2.join("nope"), b"x"), EROFS);
    expect_keeper(&d);
}

#[test]
fn the_keeper_exits_by_itself_once_it_holds_no_live_mount_and_no_daemon_runs() {
    let (_t, m) = mountpoint();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vol");
    d.mount("vol", &m, false);
    fs::write(m.join("f"), b"x").unwrap();
    let k = expect_keeper(&d);
    d.kill9();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        pid_alive(k),
        "the keeper exited although it holds a live mount for the next daemon"
    );
    lazy_umount(&m);
    assert!(
        wait_pid_gone(k, BLOCKED_LIMIT),
        "the keeper (pid {k}) still runs {BLOCKED_LIMIT:?} after its only mount went away \
         with no daemon attached"
    );
}

// ---------------------------------------------------------------------------------------------
// repeated
// ---------------------------------------------------------------------------------------------

#[test]
fn five_kill9_restarts_under_a_process_appending_through_one_open_file() {
    let (_t, m) = mountpoint();
    let host = open_tempdir();
    let mut d = Daemon::start();
    d.set_watchdog(WATCHDOG);
    d.create("vol");
    d.mount("vol", &m, false);
    let all = vec![(m.clone(), false)];
    write_durably(&m.join("log"), b"");
    let err_p = host.path().join("err");
    // One shell, its cwd in the mount, one O_APPEND fd held for the whole test: every line
    // read from stdin is appended, then acknowledged with "ok" on stdout.
    let script = "exec 3>>log || exit 2; \
                  while IFS= read -r line; do printf '%s\\n' \"$line\" >&3 || exit 3; echo ok; done";
    let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    let mut child = ChildGuard(
        CleanCommand::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .current_dir(&m)
            .stdin(in_r)
            .stdout(out_w)
            .stderr(File::create(&err_p).unwrap())
            .spawn()
            .expect("spawn sh"),
    );
    let pid = child.0.id();
    let mut stdin = File::from(in_w);
    let stdout = File::from(out_r);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // fsync through a descriptor of our own: it writes back what the shell appended.
    let syncer = File::open(m.join("log")).unwrap();
    let mut want = String::new();
    let mut send = |line: String, want: &mut String| {
        writeln!(stdin, "{line}").expect("write to the shell");
        stdin.flush().expect("flush");
        want.push_str(&line);
        want.push('\n');
    };
    let ack = |what: &str, d: &Daemon| match rx.recv_timeout(BLOCKED_LIMIT) {
        Ok(l) if l == "ok" => {}
        other => panic!(
            "{what}: the appending shell answered {other:?}; stderr {:?}; daemon log tail:\n{}",
            fs::read_to_string(&err_p).unwrap_or_default(),
            tail(&plain(&d.log()), 40)
        ),
    };
    let sync = |what: &str, d: &Daemon| {
        if let Err(e) = syncer.sync_all() {
            panic!(
                "{what}: fsync of the appended file: {e}; daemon log tail:\n{}",
                tail(&plain(&d.log()), 40)
            );
        }
    };
    for c in 0..5 {
        send(format!("cycle {c}: before the kill"), &mut want);
        ack(&format!("cycle {c}: before the kill"), &d);
        sync(&format!("cycle {c}: before the kill"), &d);
        let keeper = expect_keeper(&d);
        take_down(&mut d, Down::Kill9, &all, keeper);
        send(format!("cycle {c}: while no daemon runs"), &mut want);
        std::thread::sleep(Duration::from_millis(300));
        d.restart();
        d.assert_mounts(&all);
        ack(&format!("cycle {c}: appended while no daemon ran"), &d);
        sync(&format!("cycle {c}: after the restart"), &d);
        send(format!("cycle {c}: after the restart"), &mut want);
        ack(&format!("cycle {c}: after the restart"), &d);
        assert!(
            matches!(child.0.try_wait(), Ok(None)),
            "the appending shell {pid} exited in cycle {c}"
        );
    }
    sync("at the end", &d);
    drop(stdin);
    let st = child.wait_exit(BLOCKED_LIMIT, "the appending shell", &d);
    assert!(
        st.success(),
        "the appending shell exited with {st}; stderr {:?}",
        fs::read_to_string(&err_p).unwrap_or_default()
    );
    let got = read_uncached(&m.join("log")).expect("read the log");
    assert_eq!(
        String::from_utf8_lossy(&got),
        want,
        "the file appended to across five kill -9 restarts"
    );
    assert_one_volfs_mount(&m);
}
