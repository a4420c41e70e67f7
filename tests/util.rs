//! Shared helpers for the real-mount integration tests.
//!
//! Stable API (used by several test modules):
//!
//! * [`Daemon`]: one `volfs-mountd` process on its own root and socket.
//!   `Daemon::start()`, `Daemon::start_at(root)`, `Daemon::start_with(args)`, `cli`, `cli_ok`, `create`, `mount`,
//!   `umount`, `listed_mounts`, `assert_mounts`, `root`, `socket`, `pid`, `keeper_pid`, `log`,
//!   `set_watchdog`, and the ways to end a daemon:
//!   - `stop()`: SIGTERM, a clean stop *for a restart*: exit 0, socket removed, every mount
//!     left in place (its keeper holds it; accesses wait for the next daemon);
//!   - `shutdown()`: `volfs shutdown`: everything unmounted (the table is kept), keeper and
//!     daemon gone, exit 0;
//!   - `kill9()`: SIGKILL of the daemon only; the mounts live on in the keeper;
//!   - `kill9_all()`: SIGKILL of the daemon and its keeper; the mounts are left dead (ENOTCONN);
//!   - `restart()`: start again on the same root (stopping a running daemon first); the daemon
//!     resumes the mounts of its table by itself.
//!
//!   Dropping it SIGKILLs the daemon and its keeper and lazily unmounts every mount it made or
//!   listed; it never panics.
//! * [`TestVolume`]: a daemon plus volume [`VOLUME`] (`"testvol"`: volume names need at least
//!   2 characters) mounted read-write at a fresh directory.
//!   `new`, `mnt`, `path`, `daemon`, `mount_again(read_only)`, and `restart`,
//!   `kill_and_restart`, `kill_all_and_restart`, `shutdown_and_restart`, which each assert that
//!   every mount is back (listed by `volfs ls`, one `fuse.volfs` mount per path).
//! * [`errno`], [`ToErrno`], [`assert_errno!`]: turn a failed `nix` / `std::io` result into its
//!   `Errno` (panicking on success).
//! * [`run_as`]: run a closure in a forked child as another uid/gid (no supplementary groups);
//!   a panic (failed assertion) in the child is re-raised in the parent with its message.
//! * [`is_mounted`], [`mount_fstype`], [`mount_count`], [`mounts`], [`lazy_umount`]: mount-table
//!   helpers; [`open_tempdir`]: a temp dir (mode 0755) that non-root users can traverse.
//! * [`keeper_pid`], [`kill_keeper`], [`pid_alive`], [`wait_pid_gone`]: the keeper process
//!   (`ROOT/keeper.pid`, believed only for a `--keeper` process of that root).
//! * [`bounded`]: run something that may block on a mount with a time limit.
//! * [`CleanCommand`] / [`CleanChild`], [`run_within`]: start a process through a spawner
//!   forked before `main`, which holds no descriptor on any mount. Any process this binary
//!   spawns the usual way closes, in `execve`, its copies of every file this binary holds open
//!   on a FUSE mount, and each such close waits (uninterruptibly) for that mount's daemon to
//!   answer FLUSH: while a daemon is away, spawning its successor that way deadlocks. Daemons,
//!   `volfs` commands and the restart tests' shells are all started through it.
//!
//! Every test should build its own `TestVolume` (or `Daemon`), so tests run in parallel.
//! A watchdog SIGKILLs the daemon and its keeper if the test still runs
//! `VOLFS_TEST_WATCHDOG_SECS` (default 600) after the start (or at `set_watchdog`'s deadline),
//! so that a deadlocked filesystem fails the test (ENOTCONN) instead of hanging CI.
#![allow(dead_code)]
#![allow(unsafe_code)] // fork() in run_as

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
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
/// How long `stop()` / `shutdown()` wait for the daemon to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a keeper may take to be gone after SIGKILL or `volfs shutdown`.
const KEEPER_GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a restarted daemon may take until `volfs ls` lists every resumed mount.
const RESUME_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one `volfs` command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

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
// clean spawner
// ---------------------------------------------------------------------------------------------
//
// Why: closing a descriptor of a regular file on a FUSE mount sends FLUSH to its daemon, and
// the kernel waits for the answer uninterruptibly. `execve` closes every close-on-exec
// descriptor the child copied from its parent, so a process spawned by this test binary
// while it holds files open on a mount whose daemon is away (a test keeping files open across
// a restart, or any other test running in parallel) is stuck in `execve` until a daemon
// serves that mount again. If the process being spawned *is* that daemon, nothing ever does.
// So daemons (and the CLI, and the shells of the restart tests) are started by a spawner
// process forked before `main`, when this process holds no descriptor on any mount.

mod spawner {
    use std::ffi::{CString, OsString};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::sync::atomic::{AtomicI32, Ordering};

    use nix::sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
        sendmsg, socketpair,
    };

    /// Our end of the request socket (SOCK_SEQPACKET), -1 if the spawner could not start.
    pub(super) static SOCK: AtomicI32 = AtomicI32::new(-1);

    #[used]
    #[unsafe(link_section = ".init_array")]
    static START: extern "C" fn() = start;

    /// Runs before `main` (still single-threaded, no mount touched yet): forks the spawner.
    extern "C" fn start() {
        let Ok((ours, theirs)) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ) else {
            return;
        };
        // SAFETY: single-threaded at this point; the child only runs `serve` and `_exit`s.
        match unsafe { libc::fork() } {
            0 => {
                drop(ours);
                // SAFETY: plain syscalls.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                serve(theirs);
                // SAFETY: exit without running the test binary's destructors.
                unsafe { libc::_exit(0) }
            }
            -1 => {}
            _ => {
                drop(theirs);
                SOCK.store(ours.as_raw_fd(), Ordering::SeqCst);
                std::mem::forget(ours);
            }
        }
    }

    /// One request: NUL-separated `cwd`, `argc`, argv..., env... (`cwd` empty: inherit), with
    /// the fds stdin, stdout, stderr and the reply socket. The reply socket gets `P` + pid
    /// (i32 LE) at once and `S` + wait status (i32 LE) when the process exits, or `E` + errno.
    struct Req {
        cwd: Option<CString>,
        argv: Vec<CString>,
        env: Vec<CString>,
        fds: Vec<OwnedFd>,
    }

    fn parse(buf: &[u8], fds: Vec<OwnedFd>) -> Option<Req> {
        let mut it = buf.split(|b| *b == 0);
        let cwd = it.next()?;
        let argc: usize = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
        let mut argv = Vec::new();
        for _ in 0..argc {
            argv.push(CString::new(it.next()?).ok()?);
        }
        let env = it
            .filter(|e| !e.is_empty())
            .map(|e| CString::new(e).ok())
            .collect::<Option<Vec<_>>>()?;
        (fds.len() == 4 && !argv.is_empty()).then(|| Req {
            cwd: (!cwd.is_empty()).then(|| CString::new(cwd).ok()).flatten(),
            argv,
            env,
            fds,
        })
    }

    fn reply(fd: RawFd, tag: u8, v: i32) {
        let mut m = vec![tag];
        m.extend_from_slice(&v.to_le_bytes());
        // SAFETY: plain send on a socket we own.
        unsafe {
            libc::send(fd, m.as_ptr().cast(), m.len(), libc::MSG_NOSIGNAL);
        }
    }

    fn serve(sock: OwnedFd) {
        let mut running: Vec<(i32, OwnedFd)> = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        // SIGCHLD through a signalfd, so that exits are reported at once.
        // SAFETY: plain signal-mask calls on a zeroed sigset.
        let sfd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        loop {
            let mut pfd = [
                libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: sfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, 1000) };
            if n > 0 && pfd[1].revents != 0 {
                let mut info = [0u8; 128];
                // SAFETY: drains the signalfd into a buffer of the right size.
                while unsafe { libc::read(sfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
            }
            let pfd = pfd[0];
            if n > 0 && pfd.revents & libc::POLLIN != 0 {
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let got = recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                );
                let (len, fds) = match got {
                    Ok(m) => {
                        let mut fds = Vec::new();
                        if let Ok(c) = m.cmsgs() {
                            for c in c {
                                if let ControlMessageOwned::ScmRights(v) = c {
                                    // SAFETY: the kernel just gave us these descriptors.
                                    fds.extend(
                                        v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }),
                                    );
                                }
                            }
                        }
                        (m.bytes, fds)
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                };
                if len == 0 && fds.is_empty() {
                    return; // the test binary is gone
                }
                match parse(&buf[..len], fds) {
                    Some(req) => {
                        if let Some(r) = launch(req) {
                            running.push(r);
                        }
                    }
                    None => continue,
                }
            } else if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return;
            }
            loop {
                let mut st = 0;
                // SAFETY: plain waitpid.
                let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(i) = running.iter().position(|(p, _)| *p == pid) {
                    let (_, r) = running.swap_remove(i);
                    reply(r.as_raw_fd(), b'S', st);
                }
            }
        }
    }

    fn launch(req: Req) -> Option<(i32, OwnedFd)> {
        let Req {
            cwd,
            argv,
            env,
            mut fds,
        } = req;
        let reply_fd = fds.pop()?;
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
        env_p.push(std::ptr::null());
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: the spawner is single-threaded; the child only makes syscalls, then execs.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls only, on memory prepared before the fork.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, 0);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                // Move the three fds out of the way of 0..2 first, then into place.
                let mut hi = [0; 3];
                for (i, fd) in raw.iter().enumerate() {
                    hi[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                }
                for (i, fd) in hi.iter().enumerate() {
                    libc::dup2(*fd, i as i32);
                }
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                if let Some(c) = &cwd {
                    if libc::chdir(c.as_ptr()) != 0 {
                        let msg = b"volfs test spawner: chdir failed\n";
                        libc::write(2, msg.as_ptr().cast(), msg.len());
                        libc::_exit(127);
                    }
                }
                libc::execvpe(argv_p[0], argv_p.as_ptr(), env_p.as_ptr());
                let msg = b"volfs test spawner: exec failed\n";
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(127);
            }
        }
        if pid < 0 {
            reply(reply_fd.as_raw_fd(), b'E', nix::errno::Errno::last_raw());
            return None;
        }
        drop(fds);
        reply(reply_fd.as_raw_fd(), b'P', pid);
        Some((pid, reply_fd))
    }

    /// Sends one request; returns the reply socket.
    pub(super) fn request(
        cwd: Option<&std::path::Path>,
        argv: &[OsString],
        env: &[OsString],
        stdio: [&OwnedFd; 3],
    ) -> std::io::Result<OwnedFd> {
        let sock = SOCK.load(Ordering::SeqCst);
        if sock < 0 {
            return Err(std::io::Error::other("the test spawner is not running"));
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let mut msg: Vec<u8> = Vec::new();
        if let Some(c) = cwd {
            msg.extend_from_slice(c.as_os_str().as_bytes());
        }
        msg.push(0);
        msg.extend_from_slice(argv.len().to_string().as_bytes());
        for a in argv.iter().chain(env) {
            msg.push(0);
            msg.extend_from_slice(&a.clone().into_vec());
        }
        let fds = [
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
            stdio[2].as_raw_fd(),
            theirs.as_raw_fd(),
        ];
        sendmsg::<()>(
            sock,
            &[IoSlice::new(&msg)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )?;
        Ok(ours)
    }
}

/// A process started by the clean spawner (see above): not our child, so it is waited for
/// through the spawner, which reports its exit status on a socket.
pub struct CleanChild {
    pid: i32,
    reply: std::os::fd::OwnedFd,
    status: Option<std::process::ExitStatus>,
}

impl CleanChild {
    /// Its pid.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    fn recv_status(&mut self, block: bool) -> std::io::Result<Option<std::process::ExitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        let mut b = [0u8; 5];
        let flags = if block {
            nix::sys::socket::MsgFlags::empty()
        } else {
            nix::sys::socket::MsgFlags::MSG_DONTWAIT
        };
        match nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(&self.reply), &mut b, flags) {
            Ok(5) if b[0] == b'S' => {
                let st = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
                self.status = Some(std::process::ExitStatus::from_raw(st));
                Ok(self.status)
            }
            Ok(_) => Err(std::io::Error::other("the test spawner went away")),
            Err(Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Its exit status if it has exited (and been reaped by the spawner).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.recv_status(false)
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.recv_status(true)?
            .ok_or_else(|| std::io::Error::other("no exit status"))
    }

    /// Waits up to `limit` for it to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.try_wait() {
                return Some(st);
            }
            let left = limit.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.reply),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 1000) as i32) };
        }
    }

    /// SIGKILL it unless it has already exited (it is not reaped before the spawner saw its
    /// exit, so the pid is still its own).
    pub fn kill(&mut self) -> std::io::Result<()> {
        if self.try_wait()?.is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        Ok(())
    }
}

/// Like `std::process::Command`, but the process is started by the clean spawner (no copy of
/// any descriptor this test binary holds on a mount).
pub struct CleanCommand {
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    env: std::collections::BTreeMap<std::ffi::OsString, std::ffi::OsString>,
    cwd: Option<PathBuf>,
    stdio: [Option<std::os::fd::OwnedFd>; 3],
}

impl CleanCommand {
    /// `program` (a path, or a name looked up in PATH), with this process's environment.
    pub fn new(program: impl AsRef<std::ffi::OsStr>) -> CleanCommand {
        CleanCommand {
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            env: std::env::vars_os().collect(),
            cwd: None,
            stdio: [None, None, None],
        }
    }

    pub fn arg(&mut self, a: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        for a in args {
            self.arg(a);
        }
        self
    }

    pub fn env(
        &mut self,
        k: impl AsRef<std::ffi::OsStr>,
        v: impl AsRef<std::ffi::OsStr>,
    ) -> &mut Self {
        self.env
            .insert(k.as_ref().to_os_string(), v.as_ref().to_os_string());
        self
    }

    pub fn env_remove(&mut self, k: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.env.remove(k.as_ref());
        self
    }

    pub fn current_dir(&mut self, d: impl AsRef<Path>) -> &mut Self {
        self.cwd = Some(d.as_ref().to_path_buf());
        self
    }

    /// Standard input/output/error from a file or pipe end (default: /dev/null).
    pub fn stdin(&mut self, f: impl Into<std::os::fd::OwnedFd>) -> &mut Self {
        self.stdio[0] = Some(f.into());
        self
    }

    pub fn stdout(&mut self, f: impl Into<std::os::fd::OwnedFd>) -> &mut Self {
        self.stdio[1] = Some(f.into());
        self
    }

    pub fn stderr(&mut self, f: impl Into<std::os::fd::OwnedFd>) -> &mut Self {
        self.stdio[2] = Some(f.into());
        self
    }

    /// Starts it (consuming the stdio descriptors given).
    pub fn spawn(&mut self) -> std::io::Result<CleanChild> {
        use std::os::unix::ffi::OsStringExt;
        let null = || -> std::io::Result<std::os::fd::OwnedFd> {
            Ok(OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into())
        };
        let stdio = [
            self.stdio[0].take().map_or_else(null, Ok)?,
            self.stdio[1].take().map_or_else(null, Ok)?,
            self.stdio[2].take().map_or_else(null, Ok)?,
        ];
        let mut argv = vec![self.program.clone()];
        argv.extend(self.args.iter().cloned());
        let env: Vec<std::ffi::OsString> = self
            .env
            .iter()
            .map(|(k, v)| {
                let mut e = k.clone().into_vec();
                e.push(b'=');
                e.extend_from_slice(v.as_bytes());
                std::ffi::OsString::from_vec(e)
            })
            .collect();
        let reply = spawner::request(
            self.cwd.as_deref(),
            &argv,
            &env,
            [&stdio[0], &stdio[1], &stdio[2]],
        )?;
        drop(stdio);
        let mut b = [0u8; 5];
        let n = nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&reply),
            &mut b,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        let v = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
        match (n, b[0]) {
            (5, b'P') => Ok(CleanChild {
                pid: v,
                reply,
                status: None,
            }),
            (5, b'E') => Err(std::io::Error::from_raw_os_error(v)),
            _ => Err(std::io::Error::other("bad answer from the test spawner")),
        }
    }

    /// Runs it with stdout and stderr captured; `None` (after SIGKILLing it) if it has not
    /// exited within `limit`.
    pub fn output_within(&mut self, limit: Duration) -> std::io::Result<Option<Output>> {
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        self.stdout(out_w).stderr(err_w);
        let mut child = self.spawn()?;
        let reader = |fd: std::os::fd::OwnedFd| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = File::from(fd).read_to_end(&mut v);
                v
            })
        };
        let (ro, re) = (reader(out_r), reader(err_r));
        match child.wait_timeout(limit) {
            Some(status) => Ok(Some(Output {
                status,
                stdout: ro.join().unwrap_or_default(),
                stderr: re.join().unwrap_or_default(),
            })),
            None => {
                let _ = child.kill();
                Ok(None)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// processes and the keeper
// ---------------------------------------------------------------------------------------------

/// Is process `pid` alive (a zombie counts as dead: a killed keeper that was not our child may
/// stay a zombie until its new parent reaps it)?
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(s) => {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Waits up to `limit` for `pid` to be gone; returns whether it is.
pub fn wait_pid_gone(pid: i32, limit: Duration) -> bool {
    let t0 = Instant::now();
    while pid_alive(pid) {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The arguments of process `pid` (empty if it is gone).
fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Inodes of the unix sockets bound to `path` (from /proc/net/unix; listening and accepted).
fn unix_socket_inodes(path: &Path) -> Vec<u64> {
    let want = path.to_string_lossy();
    fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[7] == want).then(|| f[6].parse().ok())?
        })
        .collect()
}

/// Inodes of the sockets process `pid` has open.
fn fd_socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let link = fs::read_link(e.ok()?.path()).ok()?;
        let s = link.to_str()?;
        s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// The pid of the live keeper of `root` (`ROOT/keeper.pid`), if there is one. The pid is only
/// believed if that process is a `volfs-mountd --keeper` of this very root (named in its
/// arguments, or holding a socket bound at `ROOT/keeper.sock`): pids are reused, and tests on
/// other roots run in parallel.
pub fn keeper_pid(root: &Path) -> Option<i32> {
    let text = fs::read_to_string(root.join("keeper.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    if pid <= 1 || !pid_alive(pid) {
        return None;
    }
    let args = cmdline(pid);
    if !args.iter().any(|a| a == "--keeper") {
        return None;
    }
    let mut roots = vec![root.to_path_buf()];
    if let Ok(c) = fs::canonicalize(root) {
        roots.push(c);
    }
    for r in &roots {
        let rs = r.to_string_lossy();
        let sock = r.join("keeper.sock");
        let ss = sock.to_string_lossy();
        let named = args.iter().any(|a| {
            *a == *rs
                || *a == *ss
                || a.ends_with(&format!("={rs}"))
                || a.ends_with(&format!("={ss}"))
        });
        if named {
            return Some(pid);
        }
        let inodes = unix_socket_inodes(&sock);
        if !inodes.is_empty() && fd_socket_inodes(pid).iter().any(|i| inodes.contains(i)) {
            return Some(pid);
        }
    }
    None
}

/// SIGKILL the keeper of `root` (if [`keeper_pid`] finds one) and wait up to 10 s for it to
/// be gone. Returns its pid. Never panics.
pub fn kill_keeper(root: &Path) -> Option<i32> {
    let pid = keeper_pid(root)?;
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    wait_pid_gone(pid, KEEPER_GONE_TIMEOUT);
    Some(pid)
}

/// Run `f` on a helper thread and return its result, or panic naming `what` if it has not
/// returned after `limit` (the thread is left behind, blocked; the `Daemon`'s drop kills the
/// keeper and unmounts, which unblocks it). A panic in `f` is re-raised here.
#[track_caller]
pub fn bounded<T, F>(what: &str, limit: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("{what}: still blocked after {limit:?}"),
    }
}

/// Run `cmd` through the clean spawner (stdin null, output captured); `None` (after
/// SIGKILLing it) if it has not exited within `limit`.
#[track_caller]
pub fn run_within(mut cmd: CleanCommand, limit: Duration) -> Option<Output> {
    cmd.output_within(limit)
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.program))
}

/// Parse the output of `volfs ls` into `(volume, mount point, read_only)`. A snapshot mount,
/// listed as `PATH (ro, @SNAP)`, counts as a read-only mount of its volume.
pub fn parse_ls(out: &str) -> Vec<(String, PathBuf, bool)> {
    let mut v = Vec::new();
    for line in out.lines().skip(1) {
        let line = line.trim_end();
        let Some((name, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let rest = rest.trim();
        if rest.is_empty() {
            continue;
        }
        for m in rest.split(", ") {
            // `PATH (ro @SNAP)`: snapshot SNAP of the volume, mounted at PATH.
            let snapshot = m
                .strip_suffix(')')
                .and_then(|m| m.rsplit_once(" (ro @"))
                .map(|(p, s)| (format!("{name}@{s}"), PathBuf::from(p), true));
            match (snapshot, m.strip_suffix(" (ro)")) {
                (Some(t), _) => v.push(t),
                (None, Some(p)) => v.push((name.to_string(), PathBuf::from(p), true)),
                (None, None) => v.push((name.to_string(), PathBuf::from(m), false)),
            }
        }
    }
    v
}

/// How many mounts (of any type) sit exactly at `path` in /proc/self/mountinfo.
pub fn mount_count(path: &Path) -> usize {
    mounts().iter().filter(|(p, _)| p == path).count()
}

// ---------------------------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------------------------

/// A running (or stopped) `volfs-mountd` with its own socket and log.
pub struct Daemon {
    child: Option<CleanChild>,
    /// pid of the live child, 0 when none; read by the watchdog.
    pid: Arc<AtomicI32>,
    watchdog_done: Arc<AtomicBool>,
    watchdog_deadline: Arc<Mutex<Instant>>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// Every mount point this daemon mounted or listed: lazily unmounted on drop (they
    /// outlive the daemon process now, so this is never shrunk except by `umount`).
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
        let secs: u64 = std::env::var("VOLFS_TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600);
        let mut d = Daemon {
            child: None,
            pid: Arc::new(AtomicI32::new(0)),
            watchdog_done: Arc::new(AtomicBool::new(false)),
            watchdog_deadline: Arc::new(Mutex::new(Instant::now() + Duration::from_secs(secs))),
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

    /// The watchdog fires `after` from now (instead of `VOLFS_TEST_WATCHDOG_SECS` after the
    /// start): it SIGKILLs the daemon and its keeper, so that accesses blocked on a mount fail
    /// (ENOTCONN) and the test ends instead of hanging.
    pub fn set_watchdog(&self, after: Duration) {
        *self
            .watchdog_deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now() + after;
    }

    fn start_watchdog(&self) {
        let pid = self.pid.clone();
        let done = self.watchdog_done.clone();
        let deadline = self.watchdog_deadline.clone();
        let log = self.log.clone();
        let root = self.root.clone();
        std::thread::spawn(move || {
            loop {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                let d = *deadline.lock().unwrap_or_else(|e| e.into_inner());
                if Instant::now() >= d {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let p = pid.load(Ordering::SeqCst);
            eprintln!(
                "volfs test watchdog: test still running at its deadline; SIGKILL daemon {p} and \
                 the keeper of {} (log {})",
                root.display(),
                log.display()
            );
            if p > 0 {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            kill_keeper(&root);
        });
    }

    fn record_mounts(&self, listed: &[(String, PathBuf, bool)]) {
        let mut m = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        for (_, p, _) in listed {
            if !m.contains(p) {
                m.push(p.clone());
            }
        }
    }

    fn start_process(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let mut logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let _ = writeln!(logf, "----- volfs-mountd --root {}", self.root.display());
        // Through the clean spawner: see `spawner` for why not `std::process::Command`.
        let child = CleanCommand::new(MOUNTD)
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
            let left = READY_TIMEOUT.saturating_sub(t0.elapsed()) + Duration::from_secs(1);
            let out = self.cli_within(&["ls"], left);
            if out.status.success() {
                // Resumed mounts: remember them so that drop cleans them up.
                self.record_mounts(&parse_ls(&String::from_utf8_lossy(&out.stdout)));
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

    /// pid of the live keeper of this daemon's root (see [`keeper_pid`]).
    pub fn keeper_pid(&self) -> Option<i32> {
        keeper_pid(&self.root)
    }

    /// Everything the daemon(s) of this `Daemon` wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run `volfs --socket SOCKET args...` and return its output (whatever the exit status).
    /// Panics (with the daemon log) if it has not returned after 30 s: a daemon that accepts a
    /// request and never answers must fail the test, not hang it.
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_within(args, CLI_TIMEOUT)
    }

    #[track_caller]
    pub fn cli_within(&self, args: &[&str], limit: Duration) -> Output {
        let mut cmd = CleanCommand::new(VOLFS);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("VOLFS_SOCKET");
        run_within(cmd, limit).unwrap_or_else(|| {
            panic!(
                "`volfs {args:?}` did not return within {limit:?}; daemon log:\n{}",
                self.log()
            )
        })
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

    /// `volfs ls`, parsed: `(volume, mount point, read_only)` of every mount the daemon lists.
    #[track_caller]
    pub fn listed_mounts(&self) -> Vec<(String, PathBuf, bool)> {
        let v = parse_ls(&self.cli_ok(&["ls"]));
        self.record_mounts(&v);
        v
    }

    /// Waits (up to 15 s: a restarted daemon may answer before it has resumed every mount)
    /// until `volfs ls` lists exactly the mounts `want` (`(mount point, read_only)`, in any
    /// order), and asserts that each of them is then exactly one `fuse.volfs` mount in
    /// /proc/self/mountinfo (not a new mount stacked on an old one).
    #[track_caller]
    pub fn assert_mounts(&self, want: &[(PathBuf, bool)]) {
        let mut want: Vec<(PathBuf, bool)> = want.to_vec();
        want.sort();
        let t0 = Instant::now();
        let mut got;
        loop {
            got = self
                .listed_mounts()
                .into_iter()
                .map(|(_, p, ro)| (p, ro))
                .collect::<Vec<_>>();
            got.sort();
            if got == want {
                break;
            }
            if t0.elapsed() > RESUME_TIMEOUT {
                panic!(
                    "`volfs ls` lists the mounts {got:?}, expected {want:?} (waited \
                     {RESUME_TIMEOUT:?}); daemon log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (p, _) in &want {
            let here: Vec<String> = mounts()
                .into_iter()
                .filter(|(mp, _)| mp == p)
                .map(|(_, t)| t)
                .collect();
            assert!(
                here == ["fuse.volfs"],
                "{} is listed by `volfs ls` but /proc/self/mountinfo has {here:?} there \
                 (expected exactly one fuse.volfs mount); daemon log:\n{}",
                p.display(),
                self.log()
            );
        }
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
        let canon = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        {
            let mut m = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            if !m.contains(&canon) {
                m.push(canon.clone());
            }
        }
        self.cli_ok(&args);
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
        let list = self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
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

    /// Waits for the daemon `c` to exit (up to 30 s; then SIGKILLs it and panics).
    #[track_caller]
    fn wait_exit(&mut self, mut c: CleanChild, after: &str) -> std::process::ExitStatus {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = c.try_wait().expect("wait daemon") {
                break st;
            }
            if t0.elapsed() > STOP_TIMEOUT {
                let _ = c.kill();
                let _ = c.wait();
                self.pid.store(0, Ordering::SeqCst);
                panic!(
                    "volfs-mountd did not exit {STOP_TIMEOUT:?} after {after}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.pid.store(0, Ordering::SeqCst);
        assert!(
            status.success(),
            "volfs-mountd exited with {status} (signal {:?}) after {after}; log:\n{}",
            status.signal(),
            self.log()
        );
        status
    }

    /// SIGTERM the daemon (a clean stop *for a restart*) and wait; asserts it exits 0, removed
    /// its socket and left every mount it listed in place (still a `fuse.volfs` mount: the
    /// keeper holds the connections, accesses wait for the next daemon).
    #[track_caller]
    pub fn stop(&mut self) {
        assert!(self.child.is_some(), "stop(): daemon not running");
        let before = self.listed_mounts();
        let c = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        self.wait_exit(c, "SIGTERM");
        assert!(
            !self.socket.exists(),
            "volfs-mountd exited after SIGTERM but left its socket"
        );
        let gone: Vec<&PathBuf> = before
            .iter()
            .filter(|(_, p, _)| mount_fstype(p).as_deref() != Some("fuse.volfs"))
            .map(|(_, p, _)| p)
            .collect();
        assert!(
            gone.is_empty(),
            "volfs-mountd exited after SIGTERM and took the mounts {gone:?} with it (they must \
             stay mounted for the next daemon); log:\n{}",
            self.log()
        );
    }

    /// `volfs shutdown`: asserts the command succeeds, the daemon exits 0, none of its mounts
    /// is left and its keeper is gone. The mount table is kept: the next start mounts again.
    #[track_caller]
    pub fn shutdown(&mut self) {
        assert!(self.child.is_some(), "shutdown(): daemon not running");
        let keeper = self.keeper_pid();
        let before = self.listed_mounts();
        let out = self.cli(&["shutdown"]);
        assert!(
            out.status.success(),
            "`volfs shutdown` failed ({}): stdout {:?} stderr {:?}; daemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let c = self.child.take().expect("running");
        self.wait_exit(c, "`volfs shutdown`");
        let mut paths: Vec<PathBuf> = before.into_iter().map(|(_, p, _)| p).collect();
        paths.extend(
            self.mounts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        let left: Vec<PathBuf> = paths
            .into_iter()
            .filter(|p| mount_fstype(p).as_deref() == Some("fuse.volfs"))
            .collect();
        assert!(
            left.is_empty(),
            "`volfs shutdown` left the mounts {left:?}; daemon log:\n{}",
            self.log()
        );
        if let Some(k) = keeper {
            assert!(
                wait_pid_gone(k, KEEPER_GONE_TIMEOUT),
                "the keeper (pid {k}) is still alive {KEEPER_GONE_TIMEOUT:?} after `volfs \
                 shutdown`; daemon log:\n{}",
                self.log()
            );
        }
        assert_eq!(
            self.keeper_pid(),
            None,
            "a keeper of {} still runs after `volfs shutdown`",
            self.root.display()
        );
    }

    /// SIGKILL the daemon and wait for it. Its mounts stay (the keeper holds them for the next
    /// daemon); a killed daemon also leaves its socket file behind.
    pub fn kill9(&mut self) {
        self.kill_child();
    }

    /// SIGKILL the daemon and then its keeper (pid from `ROOT/keeper.pid`), without unmounting:
    /// the mounts are left dead (ENOTCONN) for the next start to replace. Returns the keeper's
    /// pid if there was one.
    pub fn kill9_all(&mut self) -> Option<i32> {
        let keeper = self.keeper_pid();
        self.kill_child();
        let k = keeper?;
        let _ = kill(Pid::from_raw(k), Signal::SIGKILL);
        assert!(
            wait_pid_gone(k, KEEPER_GONE_TIMEOUT),
            "keeper {k} still alive {KEEPER_GONE_TIMEOUT:?} after SIGKILL"
        );
        Some(k)
    }

    /// Start the daemon again on the same root and socket (after `stop`, `shutdown`, `kill9`
    /// or `kill9_all`; a running daemon is `stop`ped first). It resumes the mounts of its
    /// table by itself.
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
        // The keeper first: then whatever still waits on a mount fails (ENOTCONN) instead of
        // hanging, and nothing keeps the connections alive.
        kill_keeper(&self.root);
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

    /// Every mount is listed again, with its read-only flag, exactly once in mountinfo.
    #[track_caller]
    fn assert_all_mounts(&self) {
        self.daemon().assert_mounts(&self.mounts);
    }

    /// Stop the daemon cleanly (SIGTERM, exit 0; the mounts stay), start a new one on the same
    /// root; it resumes every mount at the same place (asserted).
    #[track_caller]
    pub fn restart(&mut self) {
        self.daemon.as_mut().expect("daemon").restart();
        self.assert_all_mounts();
    }

    /// SIGKILL the daemon (the keeper keeps the mounts), start a new one on the same root; it
    /// resumes every mount at the same place (asserted).
    #[track_caller]
    pub fn kill_and_restart(&mut self) {
        let d = self.daemon.as_mut().expect("daemon");
        d.kill9();
        d.restart();
        self.assert_all_mounts();
    }

    /// SIGKILL the daemon and its keeper (the mounts die: ENOTCONN), start a new one on the
    /// same root; it mounts every mount of its table afresh at the same place (asserted).
    #[track_caller]
    pub fn kill_all_and_restart(&mut self) {
        let d = self.daemon.as_mut().expect("daemon");
        d.kill9_all();
        d.restart();
        self.assert_all_mounts();
    }

    /// `volfs shutdown` (everything unmounted, the kernel forgets all it cached), start a new
    /// daemon on the same root; it mounts every mount of its table afresh (asserted).
    #[track_caller]
    pub fn shutdown_and_restart(&mut self) {
        let d = self.daemon.as_mut().expect("daemon");
        d.shutdown();
        d.restart();
        self.assert_all_mounts();
    }
}

impl Default for TestVolume {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestVolume {
    fn drop(&mut self) {
        // Kill the daemon and its keeper and unmount before the mount point directories are
        // removed.
        drop(self.daemon.take());
        for (mp, _) in &self.mounts {
            lazy_umount(mp);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Data, output and metadata helpers
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), different for every `seed`.
pub fn pat(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `v` extended to exactly `len` bytes with xorshift (13, 7, 17) words from state `x`.
pub fn xorshift_fill(mut v: Vec<u8>, mut x: u64, len: usize) -> Vec<u8> {
    v.reserve(len.saturating_sub(v.len()) + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Sets the times of `p` itself (not of a symlink's target) with nanoseconds.
pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::utimensat(
        None,
        p,
        &TimeSpec::new(atime.0, atime.1),
        &TimeSpec::new(mtime.0, mtime.1),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// Sets the owner of `p` itself (not of a symlink's target).
pub fn lchown(p: &Path, uid: u32, gid: u32) {
    nix::unistd::fchownat(
        None,
        p,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
}

/// Sets the mode of `p` (of a symlink's target).
pub fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
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
