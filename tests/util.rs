//! Shared helpers for the real-mount integration tests.
//!
//! Stable API (used by several test modules):
//!
//! * [`Daemon`]: one `volfs-mountd` process on its own root and socket.
//!   `Daemon::start()`, `Daemon::start_at(root)`, `Daemon::start_with(args)`, `cli`, `cli_ok`, `create`, `mount`,
//!   `umount`, `stop`, `kill9`, `restart`, `root`, `socket`, `pid`, `log`.
//!   Dropping it SIGKILLs the daemon and lazily unmounts whatever it left; it never panics.
//! * [`TestVolume`]: a daemon plus volume [`VOLUME`] (`"testvol"`: volume names need at least
//!   2 characters) mounted read-write at a fresh directory.
//!   `new`, `mnt`, `path`, `daemon`, `mount_again(read_only)`, `restart`, `kill_and_restart`.
//! * [`errno`], [`ToErrno`], [`assert_errno!`]: turn a failed `nix` / `std::io` result into its
//!   `Errno` (panicking on success).
//! * [`run_as`]: run a closure in a forked child as another uid/gid (no supplementary groups);
//!   a panic (failed assertion) in the child is re-raised in the parent with its message.
//! * [`is_mounted`], [`mount_fstype`], [`mounts`], [`lazy_umount`]: mount-table helpers;
//!   [`open_tempdir`]: a temp dir (mode 0755) that non-root users can traverse.
//!
//! Every test should build its own `TestVolume` (or `Daemon`), so tests run in parallel.
//! A watchdog SIGKILLs a daemon that is still alive after `VOLFS_TEST_WATCHDOG_SECS`
//! (default 600) so that a deadlocked filesystem fails the test (ENOTCONN) instead of hanging CI.
#![allow(dead_code)]
#![allow(unsafe_code)] // fork() in run_as

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// Path of the `volfs` CLI binary.
pub const VOLFS: &str = env!("CARGO_BIN_EXE_volfs");
/// Path of the `volfs-mountd` daemon binary.
pub const MOUNTD: &str = env!("CARGO_BIN_EXE_volfs-mountd");

/// How long to wait for the daemon to answer `ls` after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `stop()` waits for the daemon to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// errno helpers
// ---------------------------------------------------------------------------------------------

/// The errno of a failed `nix` call; panics if the call succeeded.
#[track_caller]
pub fn errno<T>(r: nix::Result<T>) -> Errno {
    match r {
        Ok(_) => panic!("expected an error, but the call succeeded"),
        Err(e) => e,
    }
}

/// Anything that can fail with an errno: `nix::Result<T>` and `std::io::Result<T>`.
pub trait ToErrno {
    /// The errno of the failure; panics (naming `what`) if it succeeded.
    fn to_errno(self, what: &str) -> Errno;
}

impl<T> ToErrno for nix::Result<T> {
    #[track_caller]
    fn to_errno(self, what: &str) -> Errno {
        match self {
            Ok(_) => panic!("expected `{what}` to fail, but it succeeded"),
            Err(e) => e,
        }
    }
}

impl<T> ToErrno for std::io::Result<T> {
    #[track_caller]
    fn to_errno(self, what: &str) -> Errno {
        match self {
            Ok(_) => panic!("expected `{what}` to fail, but it succeeded"),
            Err(e) => match e.raw_os_error() {
                Some(n) => Errno::from_raw(n),
                None => panic!("`{what}` failed without an OS errno: {e}"),
            },
        }
    }
}

/// `assert_errno!(expr, EXXX)` or `assert_errno!(expr, EXXX | EYYY)`: `expr` (a `nix::Result`
/// or `std::io::Result`) must fail with one of the listed errnos (names from `nix::errno::Errno`).
#[macro_export]
macro_rules! assert_errno {
    ($e:expr, $($err:ident)|+ $(,)?) => {{
        let got = $crate::util::ToErrno::to_errno($e, stringify!($e));
        let allowed = [$(::nix::errno::Errno::$err),+];
        assert!(
            allowed.contains(&got),
            "`{}` failed with {:?}, expected {}",
            stringify!($e),
            got,
            stringify!($($err)|+)
        );
    }};
}

// ---------------------------------------------------------------------------------------------
// run_as
// ---------------------------------------------------------------------------------------------

/// Run `f` in a forked child process with uid `uid`, gid `gid` and no supplementary groups, and
/// return its result (sent back as JSON). A panic in `f` (e.g. a failed `assert!`) makes this
/// panic in the parent with the child's message. Keep `f` simple: it runs in a fork of a
/// multi-threaded process (allocation is fine with glibc; do not print or take test locks).
#[track_caller]
pub fn run_as<T, F>(uid: u32, gid: u32, f: F) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    F: FnOnce() -> T,
{
    let (rd, wr) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only runs `f` and then _exits; it never returns into the test harness.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let mut out = File::from(wr);
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))
                    .map_err(|e| format!("setgid({gid}): {e}"))?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))
                    .map_err(|e| format!("setuid({uid}): {e}"))?;
                serde_json::to_string(&f()).map_err(|e| format!("serialize: {e}"))
            }));
            let (code, msg) = match res {
                Ok(Ok(json)) => (0, json),
                Ok(Err(msg)) => (2, msg),
                Err(p) => (
                    1,
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "non-string panic".into()),
                ),
            };
            let _ = out.write_all(msg.as_bytes());
            drop(out);
            // SAFETY: plain process exit without running the parent's atexit/destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut buf = String::new();
            let _ = File::from(rd).read_to_string(&mut buf);
            let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => serde_json::from_str(&buf)
                    .unwrap_or_else(|e| panic!("run_as: bad result {buf:?}: {e}")),
                nix::sys::wait::WaitStatus::Exited(_, 1) => {
                    panic!("run_as(uid={uid}, gid={gid}) child panicked: {buf}")
                }
                nix::sys::wait::WaitStatus::Exited(_, _) => {
                    panic!("run_as(uid={uid}, gid={gid}) could not switch user: {buf}")
                }
                other => panic!("run_as(uid={uid}, gid={gid}) child died: {other:?} {buf}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mount table
// ---------------------------------------------------------------------------------------------

/// Decode the octal escapes (`\040` etc.) of a /proc/self/mountinfo field.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(mount point, fstype)` of every mount visible to this process, in mount order.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            let mp = unescape_mount_field(f.get(4)?);
            let ty = f.get(dash + 1)?.to_string();
            Some((PathBuf::from(mp), ty))
        })
        .collect()
}

/// The fstype of the topmost mount exactly at `path`, if `path` is a mount point.
pub fn mount_fstype(path: &Path) -> Option<String> {
    mounts()
        .into_iter()
        .rev()
        .find(|(mp, _)| mp == path)
        .map(|(_, t)| t)
}

/// Is `path` (absolute, canonical) currently a mount point?
pub fn is_mounted(path: &Path) -> bool {
    mount_fstype(path).is_some()
}

/// `umount2(path, MNT_DETACH)` until `path` is no longer a mount point. Never panics.
pub fn lazy_umount(path: &Path) {
    for _ in 0..8 {
        if !is_mounted(path) {
            return;
        }
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
}

// ---------------------------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------------------------

/// A running (or stopped) `volfs-mountd` with its own socket and log.
pub struct Daemon {
    child: Option<Child>,
    /// pid of the live child, 0 when none; read by the watchdog.
    pid: Arc<AtomicI32>,
    watchdog_done: Arc<AtomicBool>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// Mount points created through this daemon that may still be mounted.
    mounts: Mutex<Vec<PathBuf>>,
    /// Arguments given to every start after `--root` and `--socket`.
    extra_args: Vec<String>,
    /// Holds the socket and log (and the root, for `start()`); dropped last.
    _dir: TempDir,
}

/// A temp dir that other users can traverse (tempfile creates 0700 dirs).
pub fn open_tempdir() -> TempDir {
    let d = tempfile::Builder::new()
        .prefix("volfs-test-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    d
}

impl Daemon {
    /// Start a daemon on a fresh, empty root (in a temp dir that lives as long as the `Daemon`).
    pub fn start() -> Daemon {
        let dir = open_tempdir();
        let root = dir.path().join("root");
        fs::create_dir(&root).expect("mkdir root");
        Self::spawn(dir, root, &[])
    }

    /// Start a daemon on a fresh, empty root with more arguments (kept for restarts), e.g.
    /// `--plugin-socket PATH`.
    pub fn start_with(args: &[&str]) -> Daemon {
        let dir = open_tempdir();
        let root = dir.path().join("root");
        fs::create_dir(&root).expect("mkdir root");
        Self::spawn(dir, root, args)
    }

    /// Start a daemon on an existing root (e.g. one from a stopped or killed daemon). The
    /// caller keeps `root` alive.
    pub fn start_at(root: &Path) -> Daemon {
        Self::spawn(open_tempdir(), root.to_path_buf(), &[])
    }

    fn spawn(dir: TempDir, root: PathBuf, extra_args: &[&str]) -> Daemon {
        let mut d = Daemon {
            child: None,
            pid: Arc::new(AtomicI32::new(0)),
            watchdog_done: Arc::new(AtomicBool::new(false)),
            socket: dir.path().join("volfs.sock"),
            log: dir.path().join("daemon.log"),
            root,
            mounts: Mutex::new(Vec::new()),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            _dir: dir,
        };
        d.start_process();
        d.start_watchdog();
        d
    }

    fn start_watchdog(&self) {
        let secs: u64 = std::env::var("VOLFS_TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600);
        let pid = self.pid.clone();
        let done = self.watchdog_done.clone();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < deadline {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let p = pid.load(Ordering::SeqCst);
            if p > 0 && !done.load(Ordering::SeqCst) {
                eprintln!(
                    "volfs test watchdog: daemon {p} still alive after {secs}s; SIGKILL (log {})",
                    log.display()
                );
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        });
    }

    fn start_process(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let mut logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let _ = writeln!(logf, "----- volfs-mountd --root {}", self.root.display());
        let child = Command::new(MOUNTD)
            .arg("--root")
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra_args)
            // Docker's plugin socket is one per machine: only tests that ask for it get one.
            .args(
                (!self.extra_args.iter().any(|a| a == "--plugin-socket")).then_some("--no-plugin"),
            )
            .env_remove("VOLFS_SOCKET")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {MOUNTD}: {e}"));
        self.pid.store(child.id() as i32, Ordering::SeqCst);
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                self.pid.store(0, Ordering::SeqCst);
                panic!(
                    "volfs-mountd exited during startup ({st}); log:\n{}",
                    self.log()
                );
            }
            if self.cli(&["ls"]).status.success() {
                return;
            }
            if t0.elapsed() > READY_TIMEOUT {
                self.kill_child();
                panic!(
                    "volfs-mountd not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's data root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// pid of the running daemon (None when stopped/killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything the daemon(s) of this `Daemon` wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run `volfs --socket SOCKET args...` and return its output (whatever the exit status).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(VOLFS)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("VOLFS_SOCKET")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {VOLFS}: {e}"))
    }

    /// Like [`Daemon::cli`] but panics (with stderr and the daemon log) unless it exits 0;
    /// returns stdout.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        if !out.status.success() {
            panic!(
                "volfs {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `volfs create NAME`.
    #[track_caller]
    pub fn create(&self, name: &str) {
        self.cli_ok(&["create", name]);
    }

    /// `volfs mount NAME MOUNTPOINT [--read-only]`; asserts the mount is then live.
    #[track_caller]
    pub fn mount(&self, name: &str, mountpoint: &Path, read_only: bool) {
        let mp = mountpoint.to_str().expect("utf-8 mountpoint");
        let mut args = vec!["mount", name, mp];
        if read_only {
            args.push("--read-only");
        }
        self.cli_ok(&args);
        let canon = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(canon.clone());
        assert!(
            is_mounted(&canon),
            "`volfs mount {name} {mp}` returned but {} is not in the mount table; log:\n{}",
            canon.display(),
            self.log()
        );
    }

    /// `volfs umount MOUNTPOINT`.
    #[track_caller]
    pub fn umount(&self, mountpoint: &Path) {
        self.cli_ok(&["umount", mountpoint.to_str().expect("utf-8 mountpoint")]);
        let canon = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|m| *m != canon);
    }

    fn lazy_umount_all(&self) {
        let list = std::mem::take(&mut *self.mounts.lock().unwrap_or_else(|e| e.into_inner()));
        for m in list {
            if mount_fstype(&m).is_some_and(|t| t.starts_with("fuse")) {
                lazy_umount(&m);
            }
        }
    }

    fn kill_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    /// SIGTERM the daemon and wait; asserts it exits 0 and left none of its mounts behind.
    #[track_caller]
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("stop(): daemon not running");
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = c.try_wait().expect("wait daemon") {
                break st;
            }
            if t0.elapsed() > STOP_TIMEOUT {
                let _ = c.kill();
                let _ = c.wait();
                self.pid.store(0, Ordering::SeqCst);
                self.lazy_umount_all();
                panic!(
                    "volfs-mountd did not exit {STOP_TIMEOUT:?} after SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.pid.store(0, Ordering::SeqCst);
        let left: Vec<PathBuf> = self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|m| is_mounted(m))
            .cloned()
            .collect();
        self.lazy_umount_all();
        assert!(
            status.success(),
            "volfs-mountd exited with {status} (signal {:?}) after SIGTERM; log:\n{}",
            status.signal(),
            self.log()
        );
        assert!(
            left.is_empty(),
            "volfs-mountd exited after SIGTERM but left mounts {left:?}; log:\n{}",
            self.log()
        );
        assert!(
            !self.socket.exists(),
            "volfs-mountd exited after SIGTERM but left its socket"
        );
    }

    /// SIGKILL the daemon, wait for it, then lazily unmount the dead mounts it left.
    pub fn kill9(&mut self) {
        self.kill_child();
        self.lazy_umount_all();
        // A killed daemon leaves its socket file behind; the next daemon must cope with that.
    }

    /// Start the daemon again on the same root and socket (after `stop` or `kill9`).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.start_process();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.watchdog_done.store(true, Ordering::SeqCst);
        self.kill_child();
        self.lazy_umount_all();
    }
}

// ---------------------------------------------------------------------------------------------
// TestVolume
// ---------------------------------------------------------------------------------------------

/// A daemon with volume [`VOLUME`] mounted read-write at a fresh directory (plus any extra mounts
/// made with [`TestVolume::mount_again`]).
pub struct TestVolume {
    daemon: Option<Daemon>,
    /// (mount point, read_only) of every mount, the primary first.
    mounts: Vec<(PathBuf, bool)>,
    /// Holds the mount point directories; dropped after the daemon.
    _dirs: Vec<TempDir>,
}

/// The volume name used by [`TestVolume`].
pub const VOLUME: &str = "testvol";

impl TestVolume {
    /// New daemon, `volfs create testvol`, mount read-write at a fresh directory.
    pub fn new() -> TestVolume {
        let daemon = Daemon::start();
        daemon.create(VOLUME);
        let dir = open_tempdir();
        let mnt = fs::canonicalize(dir.path()).expect("canonicalize");
        daemon.mount(VOLUME, &mnt, false);
        TestVolume {
            daemon: Some(daemon),
            mounts: vec![(mnt, false)],
            _dirs: vec![dir],
        }
    }

    /// The primary (read-write) mount point.
    pub fn mnt(&self) -> &Path {
        &self.mounts[0].0
    }

    /// `mnt().join(rel)`.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt().join(rel)
    }

    /// The daemon serving the volume.
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon")
    }

    /// Mount the same volume a second time at a fresh directory; returns that mount point.
    pub fn mount_again(&mut self, read_only: bool) -> PathBuf {
        let dir = open_tempdir();
        let mp = fs::canonicalize(dir.path()).expect("canonicalize");
        self.daemon().mount(VOLUME, &mp, read_only);
        self.mounts.push((mp.clone(), read_only));
        self._dirs.push(dir);
        mp
    }

    fn remount_all(&self) {
        for (mp, ro) in &self.mounts {
            self.daemon().mount(VOLUME, mp, *ro);
        }
    }

    /// Stop the daemon cleanly (SIGTERM, exit 0), start a new one on the same root and remount
    /// every mount at the same place.
    pub fn restart(&mut self) {
        self.daemon.as_mut().expect("daemon").restart();
        self.remount_all();
    }

    /// SIGKILL the daemon, lazily unmount its dead mounts, start a new one on the same root and
    /// remount every mount at the same place.
    pub fn kill_and_restart(&mut self) {
        let d = self.daemon.as_mut().expect("daemon");
        d.kill9();
        d.restart();
        self.remount_all();
    }
}

impl Default for TestVolume {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestVolume {
    fn drop(&mut self) {
        // Kill the daemon and unmount before the mount point directories are removed.
        drop(self.daemon.take());
        for (mp, _) in &self.mounts {
            lazy_umount(mp);
        }
    }
}

// Self-tests of the helpers that need no daemon.
#[test]
fn util_run_as_switches_user_and_returns_value() {
    let ids: (u32, u32, Vec<u32>) = run_as(1234, 5678, || {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
            nix::unistd::getgroups()
                .unwrap()
                .iter()
                .map(|g| g.as_raw())
                .collect(),
        )
    });
    assert_eq!(ids.0, 1234);
    assert_eq!(ids.1, 5678);
    assert!(
        ids.2.is_empty() || ids.2 == vec![5678],
        "groups {:?}",
        ids.2
    );
}

#[test]
#[should_panic(expected = "child panicked: boom 42")]
fn util_run_as_reraises_child_panic() {
    run_as(1234, 1234, || -> () { panic!("boom {}", 42) });
}

#[test]
fn util_assert_errno_accepts_listed_errnos() {
    assert_errno!(fs::read("/nonexistent/x"), ENOENT);
    assert_errno!(fs::remove_dir("/nonexistent/x"), ENOTDIR | ENOENT);
    assert_eq!(errno(nix::unistd::chdir("/nonexistent")), Errno::ENOENT);
}
