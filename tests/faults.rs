//! Faults and hostile input: a corrupt chunk on disk, a full host disk, names over NAME_MAX
//! (the calls `posix_namespace` does not cover), CLI and daemon edge cases (no daemon, bad
//! names, bad mounts, signals, a second daemon, garbage on the control socket), and odd
//! requests against one volume while another volume of the same daemon must stay intact.
#![allow(unsafe_code)] // thin wrappers over libc calls (mknod, xattrs, fallocate, ioctl, lseek)

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::util::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const CHUNK: usize = 16 * KIB;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// `pread` of up to `len` bytes at `off`, looping over short reads until EOF or an error.
/// On an error, returns the error together with the bytes read before it.
fn pread_all(f: &File, off: u64, len: usize) -> Result<Vec<u8>, (std::io::Error, Vec<u8>)> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                buf.truncate(got);
                return Err((e, buf));
            }
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// First differing offset of two byte slices (or the shorter length), for messages.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// The daemon log with ANSI colour codes removed (tracing colours its fields).
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

/// Last `n` lines of `s`, for failure messages.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Is process `pid` alive (exists and is not a zombie)?
fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Asserts the daemon process is alive and answers `volfs ls`.
#[track_caller]
fn assert_daemon_serving(d: &Daemon, when: &str) {
    let pid = d.pid().expect("daemon handle has no process");
    assert!(
        process_alive(pid),
        "{when}: volfs-mountd (pid {pid}) died; log:\n{}",
        tail(&plain(&d.log()), 40)
    );
    let out = d.cli(&["ls"]);
    assert!(
        out.status.success(),
        "{when}: `volfs ls` failed ({}): {}; log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        tail(&plain(&d.log()), 40)
    );
}

/// A fresh mount point directory (kept alive by the returned TempDir) and its canonical path.
fn mountpoint() -> (TempDir, PathBuf) {
    let dir = open_tempdir();
    let p = fs::canonicalize(dir.path()).expect("canonicalize");
    (dir, p)
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

fn sys(r: libc::c_int) -> nix::Result<libc::c_int> {
    Errno::result(r)
}

fn sys_size(r: libc::ssize_t) -> nix::Result<usize> {
    Errno::result(r).map(|n| n as usize)
}

fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) -> nix::Result<()> {
    let c = cstr(p);
    // SAFETY: valid NUL-terminated path.
    sys(unsafe { libc::mknod(c.as_ptr(), mode, dev) }).map(drop)
}

fn access(p: &Path) -> nix::Result<()> {
    let c = cstr(p);
    // SAFETY: valid NUL-terminated path.
    sys(unsafe { libc::access(c.as_ptr(), libc::F_OK) }).map(drop)
}

fn renameat2(a: &Path, b: &Path, flags: libc::c_uint) -> nix::Result<()> {
    let (ca, cb) = (cstr(a), cstr(b));
    // SAFETY: valid NUL-terminated paths.
    sys(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

fn path_setxattr(p: &Path, name: &str, value: &[u8]) -> nix::Result<()> {
    let (cp, cn) = (cstr(p), CString::new(name).expect("no NUL"));
    // SAFETY: valid strings and a buffer of value.len() bytes.
    sys(unsafe {
        libc::setxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

fn path_getxattr(p: &Path, name: &str) -> nix::Result<usize> {
    let (cp, cn) = (cstr(p), CString::new(name).expect("no NUL"));
    // SAFETY: size query with a null buffer.
    sys_size(unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) })
}

fn fsetxattr(fd: RawFd, name: &[u8], value: &[u8], flags: i32) -> nix::Result<()> {
    let cn = CString::new(name).expect("no NUL");
    // SAFETY: valid fd, NUL-terminated name, buffer of value.len() bytes.
    sys(unsafe { libc::fsetxattr(fd, cn.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
        .map(drop)
}

fn fgetxattr(fd: RawFd, name: &str, size: usize) -> nix::Result<Vec<u8>> {
    let cn = CString::new(name).expect("no NUL");
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: buffer of `size` bytes (or a size query with null).
    let n = sys_size(unsafe { libc::fgetxattr(fd, cn.as_ptr(), ptr, size) })?;
    buf.truncate(n.min(size));
    if size == 0 {
        buf = vec![0; n];
    }
    Ok(buf)
}

fn flistxattr(fd: RawFd, size: usize) -> nix::Result<usize> {
    let mut buf = vec![0u8; size.max(1)];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: buffer of `size` bytes (or a size query with null).
    sys_size(unsafe { libc::flistxattr(fd, ptr, size) })
}

fn fallocate(fd: RawFd, mode: i32, off: i64, len: i64) -> nix::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    sys(unsafe { libc::fallocate(fd, mode, off, len) }).map(drop)
}

fn ftruncate(fd: RawFd, len: i64) -> nix::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    sys(unsafe { libc::ftruncate(fd, len) }).map(drop)
}

fn lseek(fd: RawFd, off: i64, whence: i32) -> nix::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    Errno::result(unsafe { libc::lseek(fd, off, whence) })
}

fn pread_raw(fd: RawFd, off: i64, len: usize) -> nix::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: buffer of `len` bytes.
    let n = sys_size(unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, off) })?;
    buf.truncate(n);
    Ok(buf)
}

fn pwrite_raw(fd: RawFd, off: i64, data: &[u8]) -> nix::Result<usize> {
    // SAFETY: buffer of data.len() bytes.
    sys_size(unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off) })
}

fn fsync(fd: RawFd) -> nix::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    sys(unsafe { libc::fsync(fd) }).map(drop)
}

/// `(volume, ino, chunk index)` of a chunk key `vol:u64 'c' ino:u64 index:u64`.
fn parse_chunk_key(k: &[u8]) -> Option<(u64, u64, u64)> {
    if k.len() != 25 || k[8] != b'c' {
        return None;
    }
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    Some((be(&k[..8]), be(&k[9..17]), be(&k[17..25])))
}

/// Every stored version of chunk `index` of inode `ino`: `(segment file, data offset, data
/// length)`, found by scanning `ROOT/data/*.seg` with the record format
/// `"VCK1" | key_len u16 BE | key | data_len u32 BE | crc32 u32 BE | data`.
fn find_chunk_records(root: &Path, ino: u64, index: u64) -> Vec<(PathBuf, u64, u32)> {
    let mut found = Vec::new();
    let mut segs: Vec<PathBuf> = fs::read_dir(root.join("data"))
        .expect("read ROOT/data")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension() == Some(OsStr::new("seg")))
        .collect();
    segs.sort();
    for seg in segs {
        let b = fs::read(&seg).expect("read segment");
        let mut off = 0usize;
        while off + 6 <= b.len() && &b[off..off + 4] == b"VCK1" {
            let klen = u16::from_be_bytes([b[off + 4], b[off + 5]]) as usize;
            let kstart = off + 6;
            if kstart + klen + 8 > b.len() {
                break;
            }
            let key = &b[kstart..kstart + klen];
            let l = kstart + klen;
            let dlen = u32::from_be_bytes([b[l], b[l + 1], b[l + 2], b[l + 3]]);
            let data_off = l + 8;
            if data_off + dlen as usize > b.len() {
                break;
            }
            if let Some((_, i, idx)) = parse_chunk_key(key) {
                if i == ino && idx == index {
                    found.push((seg.clone(), data_off as u64, dlen));
                }
            }
            off = data_off + dlen as usize;
        }
    }
    found
}

/// Write `data` to a new file `p`, fsync and close it, reporting which step failed.
fn write_fsync_close(p: &Path, data: &[u8]) -> Result<(), (&'static str, std::io::Error)> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .map_err(|e| ("open", e))?;
    for piece in data.chunks(MIB) {
        f.write_all(piece).map_err(|e| ("write", e))?;
    }
    f.sync_all().map_err(|e| ("fsync", e))?;
    let fd = f.into_raw_fd();
    // SAFETY: we own fd (into_raw_fd) and close it exactly once.
    if unsafe { libc::close(fd) } != 0 {
        return Err(("close", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Unmounts (lazily) on drop, so a failing test never leaves its tmpfs behind.
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        lazy_umount(&self.0);
    }
}

/// A `volfs-mountd` started by hand (to send it SIGINT and see its exit status), stderr to
/// a log file. Dropping it SIGKILLs it and the keeper of its root and lazily unmounts `mounts`.
struct OwnDaemon {
    child: Option<CleanChild>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    mounts: Vec<PathBuf>,
}

impl OwnDaemon {
    fn spawn(root: &Path, socket: &Path, log: &Path) -> CleanChild {
        let logf = File::create(log).expect("create log");
        // Through the clean spawner, like util's `Daemon`: a process spawned while this test
        // binary holds files open on a mount whose daemon is away hangs in execve.
        CleanCommand::new(MOUNTD)
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .arg("--no-plugin")
            .env_remove("VOLFS_SOCKET")
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("spawn volfs-mountd")
    }

    fn start(dir: &Path) -> OwnDaemon {
        let root = dir.join("root");
        let socket = dir.join("sock/volfs.sock");
        let log = dir.join("own.log");
        let mut d = OwnDaemon {
            child: Some(Self::spawn(&root, &socket, &log)),
            root,
            socket,
            log,
            mounts: Vec::new(),
        };
        let t0 = Instant::now();
        while !d.cli(&["ls"]).status.success() {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("volfs-mountd exited at startup ({st}): {}", d.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "volfs-mountd not ready: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        plain(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn cli(&self, args: &[&str]) -> Output {
        volfs_cli(&self.socket, args)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `sig` and waits (up to 30 s) for the exit status.
    fn signal_and_wait(&mut self, sig: Signal) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        kill(Pid::from_raw(c.id() as i32), sig).expect("kill");
        wait_timeout(&mut c, Duration::from_secs(30)).unwrap_or_else(|| {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "volfs-mountd did not exit 30 s after {sig:?}; log:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for OwnDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_keeper(&self.root);
        for m in &self.mounts {
            lazy_umount(m);
        }
    }
}

fn volfs_cli(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = CleanCommand::new(VOLFS);
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("VOLFS_SOCKET");
    run_within(cmd, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("`volfs {args:?}` did not return within 30 s"))
}

fn wait_timeout(c: &mut CleanChild, t: Duration) -> Option<ExitStatus> {
    c.wait_timeout(t)
}

/// Runs a second `volfs-mountd` that is expected to refuse to start: returns its exit status
/// and output. Panics (after killing it) if it is still running after 20 s.
fn run_refused_daemon(root: &Path, socket: &Path, log: &Path) -> (ExitStatus, String) {
    let mut c = OwnDaemon::spawn(root, socket, log);
    let st = wait_timeout(&mut c, Duration::from_secs(20));
    let out = plain(&fs::read_to_string(log).unwrap_or_default());
    match st {
        Some(st) => (st, out),
        None => {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "a second volfs-mountd (--root {} --socket {}) kept running instead of refusing \
                 to start; its log:\n{out}",
                root.display(),
                socket.display()
            );
        }
    }
}

fn in_proc_mounts(p: &Path) -> bool {
    let text = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let want = p.to_string_lossy().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(1).is_some_and(|mp| mp == want))
}

// ---------------------------------------------------------------------------------------------
// 1. corrupt chunk
// ---------------------------------------------------------------------------------------------

#[test]
fn corrupt_chunk_reads_eio_is_logged_and_never_returns_wrong_bytes() {
    let (_mdir, mnt) = mountpoint();
    let mut d = Daemon::start();
    d.create("crcvol");
    d.mount("crcvol", &mnt, false);
    let data = pat(256 * KIB, 7);
    let p = mnt.join("f");
    write_fsync_close(&p, &data).expect("write the file");
    let ino = fs::metadata(&p).expect("stat").ino();
    d.shutdown(); // everything unmounted: no cache in the daemon or the kernel survives

    // Flip one byte in the middle of every stored version of chunk 1 (bytes 16..32 KiB).
    let recs = find_chunk_records(d.root(), ino, 1);
    assert!(
        !recs.is_empty(),
        "no record for chunk 1 of inode {ino} in {}/data/*.seg",
        d.root().display()
    );
    for (seg, off, len) in &recs {
        assert_eq!(*len as usize, CHUNK, "chunk 1 record length");
        let f = OpenOptions::new().read(true).write(true).open(seg).unwrap();
        let at = off + 1000;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        assert_eq!(b[0], data[CHUNK + 1000], "found the wrong record");
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
        f.sync_all().unwrap();
    }

    d.restart(); // mounts crcvol again at mnt, from the mount table
    d.assert_mounts(&[(mnt.clone(), false)]);
    let f = File::open(&p).expect("open the corrupt file");
    // The damaged chunk: EIO, whichever way it is read, and no bytes of it.
    for (off, len) in [(CHUNK, CHUNK), (CHUNK + 1000, 1), (CHUNK + 4096, 100)] {
        match pread_all(&f, off as u64, len) {
            Ok(got) => panic!(
                "pread({off}, {len}) inside the corrupt chunk succeeded with {} bytes{}",
                got.len(),
                if got[..] == data[off..off + got.len()] {
                    " (matching the original: the corruption went unnoticed)"
                } else {
                    " of WRONG data"
                }
            ),
            Err((e, before)) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EIO),
                    "pread({off}, {len}) in the corrupt chunk: {e}"
                );
                assert!(before.is_empty(), "bytes returned before the EIO");
            }
        }
    }
    // Every other chunk reads back exactly (the first one first, as the brief says).
    let first = pread_all(&f, 0, CHUNK).expect("pread of the first 16 KiB");
    assert!(first == data[..CHUNK], "first 16 KiB differ");
    let rest = pread_all(&f, 2 * CHUNK as u64, data.len() - 2 * CHUNK).expect("pread 32 KiB..");
    assert!(
        rest == data[2 * CHUNK..],
        "bytes after the corrupt chunk differ at +{:?}",
        first_diff(&rest, &data[2 * CHUNK..])
    );
    // A read that spans the damage returns at most the good bytes before it, then EIO.
    match pread_all(&f, 8 * KIB as u64, 16 * KIB) {
        Ok(got) => panic!(
            "pread across the corrupt chunk returned {} bytes",
            got.len()
        ),
        Err((e, before)) => {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "spanning pread: {e}");
            assert!(
                before[..] == data[8 * KIB..8 * KIB + before.len()] && before.len() <= 8 * KIB,
                "spanning pread returned {} bytes, not a prefix of the good data",
                before.len()
            );
        }
    }
    match fs::read(&p) {
        Ok(got) => panic!(
            "reading the whole corrupt file succeeded ({} bytes)",
            got.len()
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "whole-file read: {e}"),
    }
    // O_DIRECT goes straight to the daemon: same answer.
    let fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open O_DIRECT");
    assert_errno!(pread_raw(fd.as_raw_fd(), CHUNK as i64, CHUNK), EIO);
    assert_eq!(
        pread_raw(fd.as_raw_fd(), 3 * CHUNK as i64, CHUNK).expect("O_DIRECT good chunk"),
        data[3 * CHUNK..4 * CHUNK]
    );

    // The log names the problem, the volume, the inode and the offset.
    let log = plain(&d.log());
    let line = log
        .lines()
        .find(|l| l.contains("checksum mismatch"))
        .unwrap_or_else(|| panic!("no 'checksum mismatch' in the daemon log:\n{log}"));
    for want in [
        "crcvol".to_string(),
        format!("ino={ino}"),
        format!("offset={CHUNK}"),
    ] {
        assert!(line.contains(&want), "log line lacks {want:?}: {line}");
    }
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");

    // Still alive, and the volume still works.
    assert_daemon_serving(&d, "after reading a corrupt chunk");
    let fresh = pat(100 * KIB, 8);
    write_fsync_close(&mnt.join("g"), &fresh).expect("write a new file");
    assert!(
        fs::read(mnt.join("g")).unwrap() == fresh,
        "new file differs"
    );
    // Overwriting the damaged chunk whole heals the file.
    let fw = OpenOptions::new().write(true).open(&p).unwrap();
    fw.write_all_at(&data[CHUNK..2 * CHUNK], CHUNK as u64)
        .unwrap();
    fw.sync_all().unwrap();
    drop((f, fw, fd));
    d.umount(&mnt);
    d.mount("crcvol", &mnt, false);
    let healed = fs::read(&p).expect("read after overwriting the corrupt chunk");
    assert!(
        healed == data,
        "file after the overwrite differs at {:?}",
        first_diff(&healed, &data)
    );
}

// ---------------------------------------------------------------------------------------------
// 2. host disk full
// ---------------------------------------------------------------------------------------------

#[test]
fn host_disk_full_is_enospc_and_the_volume_recovers_after_freeing_space() {
    let host = open_tempdir();
    let disk = host.path().join("disk");
    fs::create_dir(&disk).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &disk,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64m,mode=0755"),
    )
    .expect("mount a 64 MiB tmpfs");
    let _unmount = UnmountOnDrop(disk.clone());
    let root = disk.join("root");
    fs::create_dir(&root).unwrap();
    let (_mdir, mnt) = mountpoint();
    let mut d = Daemon::start_at(&root);
    d.create("fullvol");
    d.mount("fullvol", &mnt, false);

    // One big file, then 4 MiB files, each fsynced, until the disk is full.
    let mut kept: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut failure = None;
    for i in 0..40u64 {
        let len = if i == 0 { 24 * MIB } else { 4 * MIB };
        let p = mnt.join(format!("f{i:02}"));
        let data = pat(len, 100 + i);
        match write_fsync_close(&p, &data) {
            Ok(()) => kept.push((p, data)),
            Err((step, e)) => {
                failure = Some((p, data, step, e));
                break;
            }
        }
    }
    let (failed_path, failed_data, step, e) =
        failure.expect("wrote 180 MiB onto a 64 MiB disk without an error");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "full host disk: {step} of {} failed with {e}, expected ENOSPC; log:\n{}",
        failed_path.display(),
        tail(&plain(&d.log()), 30)
    );
    assert!(kept.len() >= 5, "disk full after only {} files", kept.len());
    assert_daemon_serving(&d, "after ENOSPC");

    // Collect the rest of the problems so one run reports all of them.
    let mut problems: Vec<String> = Vec::new();
    let check = |kept: &[(PathBuf, Vec<u8>)], when: &str, problems: &mut Vec<String>| {
        for (p, data) in kept {
            match fs::read(p) {
                Ok(got) if got == *data => {}
                Ok(got) => problems.push(format!(
                    "{when}: {} differs (len {} vs {}, first diff {:?})",
                    p.display(),
                    got.len(),
                    data.len(),
                    first_diff(&got, data)
                )),
                Err(e) => problems.push(format!("{when}: reading {}: {e}", p.display())),
            }
        }
    };
    // Read through a fresh mount, so the bytes come from the daemon, not the page cache.
    d.umount(&mnt);
    d.mount("fullvol", &mnt, false);
    check(&kept, "disk full, remounted", &mut problems);
    // The file whose write failed holds only bytes that were written (or zeros): never junk.
    match fs::read(&failed_path) {
        Ok(got) => {
            let bad = got
                .iter()
                .enumerate()
                .position(|(i, b)| *b != 0 && failed_data.get(i) != Some(b));
            if let Some(i) = bad {
                problems.push(format!(
                    "the file whose write hit ENOSPC holds foreign bytes at {i} (len {})",
                    got.len()
                ));
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => problems.push(format!("reading the file that hit ENOSPC: {e}")),
    }
    // A listing and a stat of everything works.
    match fs::read_dir(&mnt) {
        Ok(rd) => {
            for ent in rd {
                match ent.and_then(|e| e.metadata()) {
                    Ok(_) => {}
                    Err(e) => problems.push(format!("stat while disk full: {e}")),
                }
            }
        }
        Err(e) => problems.push(format!("readdir while disk full: {e}")),
    }

    // Free space: delete the big file (and the partial one), then writing works again. The
    // daemon may reclaim host space in the background, so allow it some seconds.
    let big = kept.remove(0);
    if let Err(e) = fs::remove_file(&big.0) {
        problems.push(format!("unlink of the big file while disk full: {e}"));
    }
    let _ = fs::remove_file(&failed_path);
    let after = mnt.join("after-free");
    let after_data = pat(MIB, 999);
    let t0 = Instant::now();
    let mut last_err = String::new();
    let mut wrote = false;
    while t0.elapsed() < Duration::from_secs(25) {
        match write_fsync_close(&after, &after_data) {
            Ok(()) => {
                wrote = true;
                break;
            }
            Err((step, e)) => {
                last_err = format!("{step}: {e}");
                let _ = fs::remove_file(&after);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    if wrote {
        kept.push((after.clone(), after_data));
    } else {
        problems.push(format!(
            "after deleting a 24 MiB file, a 1 MiB write + fsync still fails 25 s later ({last_err}); \
             du of ROOT: {} bytes",
            du(&root)
        ));
    }
    if let Some(pid) = d.pid() {
        if !process_alive(pid) {
            problems.push("the daemon died after the disk filled up".into());
        }
    }

    // A new daemon on the same root serves the surviving files (after a shutdown, so that
    // they are read from the store, not from the kernel's cache of a mount kept alive).
    let restarted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        d.shutdown();
        d.restart();
        d.assert_mounts(&[(mnt.clone(), false)]);
    }));
    match restarted {
        Ok(()) => check(&kept, "after a restart", &mut problems),
        Err(p) => problems.push(format!(
            "restarting the daemon on the root of the full disk failed: {}",
            p.downcast_ref::<String>()
                .and_then(|s| plain(s)
                    .lines()
                    .find(|l| l.starts_with("volfs-mountd:"))
                    .map(str::to_string))
                .unwrap_or_else(|| "see the panic above".into())
        )),
    }
    let log = plain(&d.log());
    if log.contains("panicked") {
        problems.push("the daemon panicked".into());
    }
    assert!(
        problems.is_empty(),
        "disk-full problems:\n  {}\ndaemon log (tail):\n{}",
        problems.join("\n  "),
        tail(&log, 30)
    );
}

/// Bytes in regular files under `p`.
fn du(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += du(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// 3. names over NAME_MAX (posix_namespace covers create/mkdir/symlink/link/mkfifo/rename target
//    and lstat of 256-byte names; these are the remaining calls and longer names)
// ---------------------------------------------------------------------------------------------

#[test]
fn over_long_names_are_enametoolong_for_mknod_lookups_and_every_other_call() {
    let tv = TestVolume::new();
    let sub = tv.path("sub");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("src"), b"s").unwrap();
    // A symlink whose *target* has an over-long component is fine to create (the target is
    // just bytes); following it is ENAMETOOLONG.
    let far = "t".repeat(300);
    std::os::unix::fs::symlink(&far, sub.join("lnk")).expect("symlink to a long target");
    assert_eq!(
        fs::read_link(sub.join("lnk")).unwrap(),
        Path::new(&far),
        "readlink of a long target"
    );
    assert_errno!(fs::metadata(sub.join("lnk")), ENAMETOOLONG);
    let dirf = File::open(&sub).unwrap();

    // 256 and 1000 bytes go to the daemon (the kernel passes names up to 1024 bytes to FUSE);
    // 1500 bytes is refused by the kernel; 5000 bytes exceeds PATH_MAX.
    for len in [256usize, 1000, 1500, 5000] {
        let name = "n".repeat(len);
        let long = sub.join(&name);
        let src = sub.join("src");
        assert_errno!(mknod(&long, libc::S_IFREG | 0o644, 0), ENAMETOOLONG);
        assert_errno!(
            mknod(&long, libc::S_IFCHR | 0o600, libc::makedev(1, 3)),
            ENAMETOOLONG
        );
        assert_errno!(mknod(&long, libc::S_IFSOCK | 0o600, 0), ENAMETOOLONG);
        assert_errno!(mknod(&long, libc::S_IFIFO | 0o600, 0), ENAMETOOLONG);
        assert_errno!(fs::create_dir(&long), ENAMETOOLONG);
        assert_errno!(
            OpenOptions::new().write(true).create_new(true).open(&long),
            ENAMETOOLONG
        );
        assert_errno!(std::os::unix::fs::symlink("src", &long), ENAMETOOLONG);
        assert_errno!(fs::hard_link(&src, &long), ENAMETOOLONG);
        assert_errno!(fs::rename(&src, &long), ENAMETOOLONG);
        assert_errno!(renameat2(&src, &long, libc::RENAME_NOREPLACE), ENAMETOOLONG);
        assert_errno!(renameat2(&src, &long, libc::RENAME_EXCHANGE), ENAMETOOLONG);
        // Lookups.
        assert_errno!(fs::metadata(&long), ENAMETOOLONG);
        assert_errno!(fs::symlink_metadata(&long), ENAMETOOLONG);
        assert_errno!(File::open(&long), ENAMETOOLONG);
        assert_errno!(access(&long), ENAMETOOLONG);
        assert_errno!(fs::read_link(&long), ENAMETOOLONG);
        assert_errno!(fs::remove_file(&long), ENAMETOOLONG);
        assert_errno!(fs::remove_dir(&long), ENAMETOOLONG);
        assert_errno!(fs::rename(&long, sub.join("x")), ENAMETOOLONG);
        assert_errno!(fs::hard_link(&long, sub.join("x")), ENAMETOOLONG);
        assert_errno!(path_getxattr(&long, "user.a"), ENAMETOOLONG);
        assert_errno!(path_setxattr(&long, "user.a", b"v"), ENAMETOOLONG);
        assert_errno!(fs::read_dir(long.join("below")), ENAMETOOLONG);
        // Relative to a directory fd, with O_CREAT.
        let cname = CString::new(name.as_bytes()).unwrap();
        // SAFETY: valid dir fd and NUL-terminated name.
        let r = unsafe {
            libc::openat(
                dirf.as_raw_fd(),
                cname.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o644,
            )
        };
        assert_errno!(sys(r), ENAMETOOLONG);
    }
    let mut left: Vec<String> = fs::read_dir(&sub)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["lnk", "src"], "a failed call left something behind");
    assert_eq!(fs::read(sub.join("src")).unwrap(), b"s");
    assert_daemon_serving(tv.daemon(), "after over-long names");
}

// ---------------------------------------------------------------------------------------------
// 4. CLI and daemon edge cases
// ---------------------------------------------------------------------------------------------

#[test]
fn cli_without_a_daemon_says_it_is_not_running_and_how_to_start_it() {
    let dir = open_tempdir();
    let missing = dir.path().join("nothing.sock");
    // A socket file left behind by a dead daemon: nobody listens.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    for sock in [&missing, &stale] {
        for args in [
            &["ls"][..],
            &["create", "vol1"][..],
            &["umount", "/tmp"][..],
        ] {
            let o = volfs_cli(sock, args);
            let err = stderr_of(&o);
            assert!(
                !o.status.success(),
                "volfs {args:?} with nothing on {} succeeded",
                sock.display()
            );
            assert!(
                err.contains("not running") && err.contains("volfs-mountd"),
                "volfs {args:?} with nothing on {}: stderr does not say volfs-mountd is not \
                 running and how to start it: {err:?}",
                sock.display()
            );
            assert!(
                err.contains(&*sock.to_string_lossy()),
                "stderr does not name the socket {}: {err:?}",
                sock.display()
            );
        }
    }
}

#[test]
fn create_refuses_invalid_names_with_the_rule_and_recreating_keeps_the_data() {
    let d = Daemon::start();
    let too_long = "v".repeat(256);
    for bad in [
        "../x", "a/b", "a", "-x", "a\nb", "", ".x", "_x", "a b", "é1", &too_long,
    ] {
        // `--` so that "-x" reaches volfs as a name rather than as an option.
        let o = d.cli(&["create", "--", bad]);
        let err = stderr_of(&o);
        assert!(!o.status.success(), "volfs create {bad:?} succeeded");
        assert!(
            err.contains("[a-zA-Z0-9][a-zA-Z0-9_.-]+"),
            "volfs create {bad:?}: the message lacks the naming rule: {err:?}"
        );
        assert!(
            !err.contains("panicked"),
            "volfs create {bad:?} panicked: {err:?}"
        );
    }
    // Without `--`, "-x" is an unknown option: still a failure, never a volume.
    assert!(!d.cli(&["create", "-x"]).status.success());
    let ls = d.cli_ok(&["ls"]);
    assert_eq!(
        ls.lines().count(),
        1,
        "invalid names created volumes: {ls:?}"
    );

    // The longest valid name works; creating an existing volume again is a no-op.
    let longest = format!("v{}", "1".repeat(254));
    assert_eq!(d.cli_ok(&["create", &longest]).trim(), longest);
    d.create("keep");
    let (_m, mnt) = mountpoint();
    d.mount("keep", &mnt, false);
    fs::write(mnt.join("data"), b"precious").unwrap();
    nix::unistd::sync();
    assert_eq!(d.cli_ok(&["create", "keep"]).trim(), "keep");
    assert_eq!(fs::read(mnt.join("data")).unwrap(), b"precious");
    d.umount(&mnt);
    assert_eq!(d.cli_ok(&["create", "keep"]).trim(), "keep");
    d.mount("keep", &mnt, false);
    assert_eq!(
        fs::read(mnt.join("data")).expect("data after re-create"),
        b"precious"
    );
    let ls = d.cli_ok(&["ls"]);
    assert_eq!(
        ls.lines().filter(|l| l.starts_with("keep ")).count(),
        1,
        "ls after re-creating: {ls:?}"
    );
}

#[test]
fn bad_mounts_and_umounts_fail_clearly_and_change_nothing() {
    let d = Daemon::start();
    d.create("vol1");
    let (_m, mnt) = mountpoint();
    let ms = mnt.to_str().unwrap();

    let o = d.cli(&["mount", "nosuchvol", ms]);
    assert!(!o.status.success(), "mount of a missing volume succeeded");
    assert!(
        stderr_of(&o).contains("nosuchvol"),
        "mount of a missing volume: message does not name it: {:?}",
        stderr_of(&o)
    );
    assert!(!is_mounted(&mnt), "a failed mount left a mount");

    let ghost = mnt.join("does/not/exist");
    let o = d.cli(&["mount", "vol1", ghost.to_str().unwrap()]);
    let err = stderr_of(&o);
    assert!(
        !o.status.success(),
        "mount on a missing directory succeeded"
    );
    assert!(
        err.contains(ghost.to_str().unwrap())
            && (err.contains("No such file") || err.contains("not exist")),
        "mount on a missing directory: unclear message {err:?}"
    );

    let file = mnt.join("plain-file");
    fs::write(&file, b"x").unwrap();
    let o = d.cli(&["mount", "vol1", file.to_str().unwrap()]);
    assert!(!o.status.success(), "mount on a regular file succeeded");
    assert!(
        stderr_of(&o).contains("not a directory"),
        "mount on a file: {:?}",
        stderr_of(&o)
    );
    fs::remove_file(&file).unwrap();

    d.mount("vol1", &mnt, false);
    fs::write(mnt.join("f"), b"mounted").unwrap();
    // Twice on the same path (also spelled with a trailing slash): refused, first one intact.
    for spelling in [ms.to_string(), format!("{ms}/"), format!("{ms}/.")] {
        let o = d.cli(&["mount", "vol1", &spelling]);
        assert!(
            !o.status.success(),
            "second mount at {spelling:?} succeeded; mount table has {} entries there",
            mounts().iter().filter(|(p, _)| *p == mnt).count()
        );
        assert!(
            stderr_of(&o).contains("already"),
            "second mount at {spelling:?}: {:?}",
            stderr_of(&o)
        );
    }
    assert_eq!(
        mounts().iter().filter(|(p, _)| *p == mnt).count(),
        1,
        "mounts stacked at {}",
        mnt.display()
    );
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"mounted");

    // umount of things that are not volfs mounts.
    let (_o, other) = mountpoint();
    for p in [other.clone(), other.join("missing"), PathBuf::from("/")] {
        let o = d.cli(&["umount", p.to_str().unwrap()]);
        assert!(!o.status.success(), "umount of {} succeeded", p.display());
        assert!(
            stderr_of(&o).contains(p.to_str().unwrap()),
            "umount of {}: message does not name it: {:?}",
            p.display(),
            stderr_of(&o)
        );
    }
    assert!(
        is_mounted(&mnt),
        "a failed umount unmounted {}",
        mnt.display()
    );
    assert!(is_mounted(Path::new("/")));
    d.umount(&mnt);
    assert!(!is_mounted(&mnt));
    let o = d.cli(&["umount", ms]);
    assert!(!o.status.success(), "umount of an unmounted path succeeded");
    assert_daemon_serving(&d, "after bad mounts");
}

#[test]
fn mounting_again_through_another_path_to_the_same_directory_is_refused() {
    let d = Daemon::start();
    d.create("vol1");
    let (_m, mnt) = mountpoint();
    let (_l, links) = mountpoint();
    let alias = links.join("alias");
    std::os::unix::fs::symlink(&mnt, &alias).unwrap();
    let dotdot = mnt.join("..").join(mnt.file_name().unwrap());
    d.mount("vol1", &mnt, false);
    fs::write(mnt.join("f"), b"x").unwrap();
    let mut problems = Vec::new();
    for other in [&alias, &dotdot] {
        let o = d.cli(&["mount", "vol1", other.to_str().unwrap()]);
        let stacked = mounts().iter().filter(|(p, _)| *p == mnt).count();
        while mounts().iter().filter(|(p, _)| *p == mnt).count() > 1 {
            let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
        }
        if o.status.success() || stacked != 1 {
            problems.push(format!(
                "mounting vol1 again at {} succeeded and stacked {stacked} mounts at {}",
                other.display(),
                mnt.display()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "a mounted directory reached through another path is mounted again:\n  {}",
        problems.join("\n  ")
    );
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"x");
}

/// Start a daemon by hand, mount a volume, send `sig`: exit 0, socket gone, the mount kept
/// (for the next daemon, which resumes it); `volfs shutdown` then unmounts it and stops the
/// daemon and the keeper.
fn signal_stops_cleanly(sig: Signal) {
    let dir = open_tempdir();
    let mut d = OwnDaemon::start(dir.path());
    let meta = fs::symlink_metadata(&d.socket).expect("stat the control socket");
    assert!(
        meta.file_type().is_socket(),
        "control socket is not a socket"
    );
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "control socket mode {:o}",
        meta.permissions().mode() & 0o7777
    );
    assert!(d.cli(&["create", "sigvol"]).status.success(), "{}", d.log());
    let (_m, mnt) = mountpoint();
    let o = d.cli(&["mount", "sigvol", mnt.to_str().unwrap()]);
    assert!(o.status.success(), "mount: {}", stderr_of(&o));
    d.mounts.push(mnt.clone());
    assert!(
        in_proc_mounts(&mnt),
        "{} not in /proc/mounts",
        mnt.display()
    );
    fs::write(mnt.join("f"), b"before the signal").unwrap();
    let pid = d.pid();
    let st = d.signal_and_wait(sig);
    assert!(
        st.success(),
        "volfs-mountd exited with {st} after {sig:?}; log:\n{}",
        d.log()
    );
    assert!(
        !d.socket.exists(),
        "the control socket is still there after {sig:?}"
    );
    assert!(
        in_proc_mounts(&mnt),
        "{} is no longer in /proc/mounts after {sig:?}: a stop for restart keeps the mounts",
        mnt.display()
    );
    assert!(!process_alive(pid));
    // A new daemon on the same root resumes the mount and serves the data.
    let mut d2 = OwnDaemon::start(dir.path());
    let t0 = Instant::now();
    loop {
        let o = d2.cli(&["ls"]);
        let listed = String::from_utf8_lossy(&o.stdout).into_owned();
        if listed.contains(mnt.to_str().unwrap()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the new daemon does not list the resumed mount: {listed:?}; log:\n{}",
            d2.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d2.mounts.push(mnt.clone());
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"before the signal");
    let keeper = keeper_pid(&dir.path().join("root"));
    let o = d2.cli(&["shutdown"]);
    assert!(o.status.success(), "volfs shutdown: {}", stderr_of(&o));
    let mut c = d2.child.take().expect("running");
    let st = wait_timeout(&mut c, Duration::from_secs(30)).expect("exit after volfs shutdown");
    assert!(st.success(), "second daemon exit {st} after volfs shutdown");
    assert!(
        !in_proc_mounts(&mnt),
        "{} still in /proc/mounts after volfs shutdown",
        mnt.display()
    );
    if let Some(k) = keeper {
        assert!(
            wait_pid_gone(k, Duration::from_secs(10)),
            "keeper {k} alive after volfs shutdown"
        );
    }
}

#[test]
fn control_socket_is_0600_and_sigterm_exits_0_removing_socket_keeping_mounts() {
    signal_stops_cleanly(Signal::SIGTERM);
}

#[test]
fn sigint_exits_0_removing_socket_keeping_mounts() {
    signal_stops_cleanly(Signal::SIGINT);
}

#[test]
fn a_second_daemon_on_the_same_socket_or_root_refuses_and_leaves_the_first_alone() {
    let d = Daemon::start();
    d.create("first");
    let (_m, mnt) = mountpoint();
    d.mount("first", &mnt, false);
    fs::write(mnt.join("f"), b"one").unwrap();
    let scratch = open_tempdir();

    // Same socket, other root.
    let other_root = scratch.path().join("other-root");
    let (st, log) = run_refused_daemon(&other_root, d.socket(), &scratch.path().join("a.log"));
    assert!(!st.success(), "second daemon on the same socket exited 0");
    assert!(
        log.contains("another volfs-mountd"),
        "second daemon on the same socket: message does not say another volfs-mountd \
         answers: {log:?}"
    );
    assert!(d.socket().exists(), "the first daemon's socket was removed");
    assert_daemon_serving(&d, "after a second daemon tried its socket");

    // Same root, other socket: the store is locked.
    let other_sock = scratch.path().join("other.sock");
    let (st, log) = run_refused_daemon(d.root(), &other_sock, &scratch.path().join("b.log"));
    assert!(!st.success(), "second daemon on the same root exited 0");
    assert!(
        log.to_lowercase().contains("lock") || log.contains("another volfs-mountd"),
        "second daemon on the same root: message does not say the store is in use: {log:?}"
    );
    assert!(
        !other_sock.exists(),
        "the refused daemon left its socket behind"
    );

    // The first daemon and its mount are undisturbed: reads, writes, fsync, new mounts.
    assert_daemon_serving(&d, "after a second daemon tried its root");
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"one");
    let data = pat(3 * MIB, 5);
    write_fsync_close(&mnt.join("g"), &data).expect("write after the second daemon");
    d.create("second");
    let (_m2, mnt2) = mountpoint();
    d.mount("second", &mnt2, false);
    fs::write(mnt2.join("h"), b"two").unwrap();
    d.umount(&mnt);
    d.mount("first", &mnt, false);
    assert!(fs::read(mnt.join("g")).unwrap() == data, "g differs");
    assert!(!plain(&d.log()).contains("panicked"));
}

#[test]
fn garbage_on_the_control_socket_is_refused_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    d.create("gvol");
    // Idle connections never block other clients.
    let idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(d.socket()).unwrap())
        .collect();
    let half = UnixStream::connect(d.socket()).unwrap();
    (&half).write_all(b"{\"op\":\"l").unwrap();

    let ask = |payload: &[u8], close_write: bool| -> String {
        let s = UnixStream::connect(d.socket()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The daemon may answer and close before reading everything: EPIPE is fine.
        let _ = (&s).write_all(payload);
        if close_write {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut out = Vec::new();
        match (&s).read_to_end(&mut out) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
            Err(e) => panic!(
                "reading the answer to {} bytes of garbage: {e}",
                payload.len()
            ),
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let mut junk = pat(100 * KIB, 3);
    for b in &mut junk {
        if *b == b'\n' {
            *b = b'x';
        }
    }
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("{not json\\n", b"{not json\n".to_vec(), false),
        ("100 KiB of junk, no newline", junk.clone(), true),
        ("100 KiB of junk, no newline, left open", junk, false),
        (
            "unknown op",
            b"{\"op\":\"format\",\"name\":\"gvol\"}\n".to_vec(),
            false,
        ),
        (
            "misspelt mount option",
            b"{\"op\":\"mount\",\"name\":\"gvol\",\"path\":\"/tmp\",\"readonly\":true}\n".to_vec(),
            false,
        ),
        (
            "wrong type",
            b"{\"op\":\"create\",\"name\":7}\n".to_vec(),
            false,
        ),
        ("invalid UTF-8", b"\xff\xfe\xfd\n".to_vec(), false),
        ("empty line", b"\n".to_vec(), false),
        ("nothing at all", Vec::new(), true),
        ("NUL bytes", vec![0u8; 4096], true),
    ];
    for (what, payload, close) in cases {
        let answer = ask(&payload, close);
        if !answer.is_empty() {
            let v: serde_json::Value = serde_json::from_str(answer.trim())
                .unwrap_or_else(|e| panic!("{what}: answer is not JSON ({e}): {answer:?}"));
            assert_eq!(v["ok"], serde_json::Value::Bool(false), "{what}: {answer}");
            assert!(
                v["error"].as_str().is_some_and(|s| !s.is_empty()),
                "{what}: no error message: {answer}"
            );
        }
        assert_daemon_serving(&d, what);
    }
    // The valid request still works, idle connections or not.
    let answer = ask(b"{\"op\":\"ls\"}\n", false);
    assert!(
        answer.contains("\"ok\":true") && answer.contains("gvol"),
        "{answer}"
    );
    drop(idle);
    drop(half);
    let (_m, mnt) = mountpoint();
    d.mount("gvol", &mnt, false);
    fs::write(mnt.join("f"), b"ok").unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"ok");
    assert_daemon_serving(&d, "after garbage");
}

// ---------------------------------------------------------------------------------------------
// 5. odd requests on one volume; the other volume stays intact
// ---------------------------------------------------------------------------------------------

#[test]
fn odd_requests_on_one_volume_neither_crash_the_daemon_nor_touch_another() {
    let d = Daemon::start();
    d.create("vola");
    d.create("volb");
    let (_ma, a) = mountpoint();
    let (_mb, b) = mountpoint();
    d.mount("vola", &a, false);
    d.mount("volb", &b, false);
    let b_files: Vec<(PathBuf, Vec<u8>)> = (0..4u64)
        .map(|i| {
            (
                b.join(format!("b{i}")),
                pat(100 * KIB + i as usize * 7777, 50 + i),
            )
        })
        .collect();
    for (p, data) in &b_files {
        write_fsync_close(p, data).unwrap();
    }
    fs::create_dir(b.join("dir")).unwrap();
    fs::write(b.join("dir/x"), b"x").unwrap();

    let fa = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("odd"))
        .unwrap();
    let fd = fa.as_raw_fd();
    let small = pat(10 * KIB, 60);
    fa.write_all_at(&small, 0).unwrap();
    const MAX: i64 = i64::MAX;

    // Reads at absurd offsets: a negative offset, or one whose end passes i64::MAX, is EINVAL
    // (the kernel's rw_verify_area); far past EOF is EOF.
    assert_errno!(pread_raw(fd, -1, 4096), EINVAL);
    assert_errno!(pread_raw(fd, i64::MIN, 4096), EINVAL);
    assert_errno!(pread_raw(fd, MAX - 10, 4096), EINVAL);
    assert_errno!(pread_raw(fd, MAX, 1), EINVAL);
    assert_eq!(pread_raw(fd, MAX - 4096, 4096).unwrap(), b"");
    assert_eq!(pread_raw(fd, 1 << 62, 4096).unwrap(), b"");
    assert_eq!(
        fa.read_at(&mut [0u8; 8], u64::MAX - 5)
            .map_err(|e| e.raw_os_error()),
        Err(Some(libc::EINVAL))
    );

    // pwrite at 2^62: FUSE's s_maxbytes is MAX_LFS_FILESIZE (i64::MAX), so this must work.
    let far = pat(4096, 61);
    assert_eq!(pwrite_raw(fd, 1 << 62, &far).expect("pwrite at 2^62"), 4096);
    fsync(fd).expect("fsync after pwrite at 2^62");
    assert_eq!(fa.metadata().unwrap().len(), (1 << 62) + 4096);
    assert_eq!(pread_raw(fd, 1 << 62, 4096).unwrap(), far);
    assert_eq!(
        pread_raw(fd, (1 << 62) - 4096, 4096).unwrap(),
        vec![0u8; 4096]
    );
    // The very last bytes a file can have: [i64::MAX - 200, i64::MAX). One byte more is EINVAL.
    assert_eq!(
        pwrite_raw(fd, MAX - 200, &far[..100]).expect("pwrite near i64::MAX"),
        100
    );
    assert_eq!(
        pwrite_raw(fd, MAX - 100, &far[100..200]).expect("pwrite ending at i64::MAX"),
        100
    );
    assert_errno!(pwrite_raw(fd, MAX, b"x"), EINVAL);
    assert_errno!(pwrite_raw(fd, MAX - 1, b"xy"), EINVAL);
    assert_errno!(pwrite_raw(fd, -4096, b"x"), EINVAL);
    fsync(fd).expect("fsync after writing at the end of the range");
    assert_eq!(fa.metadata().unwrap().len(), MAX as u64);
    assert_eq!(pread_raw(fd, MAX - 200, 200).unwrap(), far[..200]);
    assert_eq!(pread_raw(fd, MAX - 4096, 4096).unwrap()[3896..], far[..200]);

    // truncate to huge sizes and back.
    ftruncate(fd, MAX).expect("ftruncate to i64::MAX");
    assert_errno!(ftruncate(fd, -1), EINVAL);
    assert_errno!(ftruncate(fd, i64::MIN), EINVAL);
    ftruncate(fd, (1 << 62) + 4096).expect("ftruncate back to 2^62+4096");
    assert_eq!(pread_raw(fd, 1 << 62, 8192).unwrap(), far);
    ftruncate(fd, 1 << 40).expect("ftruncate to 1 TiB");
    ftruncate(fd, 10 * KIB as i64).expect("ftruncate to 10 KiB");
    assert_eq!(pread_raw(fd, 0, 20 * KIB).unwrap(), small);

    // fallocate: unsupported modes are EOPNOTSUPP, bad ranges EINVAL/EFBIG.
    for mode in [
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
        libc::FALLOC_FL_UNSHARE_RANGE,
        libc::FALLOC_FL_PUNCH_HOLE, // without KEEP_SIZE
        0x100,                      // no such flag
    ] {
        let e = errno(fallocate(fd, mode, 0, CHUNK as i64));
        assert_eq!(e, Errno::EOPNOTSUPP, "fallocate mode {mode:#x}");
    }
    assert_errno!(fallocate(fd, 0, 0, 0), EINVAL);
    assert_errno!(fallocate(fd, 0, -1, 10), EINVAL);
    assert_errno!(fallocate(fd, 0, 1 << 62, 1 << 62), EFBIG);
    assert_errno!(fallocate(fd, 0, MAX, 1), EFBIG);
    fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 1 << 62, MIB as i64).expect("KEEP_SIZE far out");
    assert_eq!(fa.metadata().unwrap().len(), 10 * KIB as u64);
    fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        4096,
        MAX - 4096,
    )
    .expect("punch from 4 KiB to i64::MAX");
    let mut want = small.clone();
    want[4096..].fill(0);
    assert_eq!(pread_raw(fd, 0, 20 * KIB).unwrap(), want);
    fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, 0, 100).expect("ZERO_RANGE");
    fallocate(fd, 0, (1 << 62) - 1, 1).expect("fallocate up to 2^62");
    assert_eq!(fa.metadata().unwrap().len(), 1 << 62);
    ftruncate(fd, 10 * KIB as i64).unwrap();

    // lseek SEEK_DATA/SEEK_HOLE with negative and huge offsets: ENXIO (as ext4/xfs).
    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
        assert_errno!(lseek(fd, -1, whence), ENXIO);
        assert_errno!(lseek(fd, i64::MIN, whence), ENXIO);
        assert_errno!(lseek(fd, MAX, whence), ENXIO);
        assert_errno!(lseek(fd, 10 * KIB as i64, whence), ENXIO);
    }
    assert_errno!(lseek(fd, -1, libc::SEEK_SET), EINVAL);
    assert_errno!(lseek(fd, 0, 42), EINVAL);
    assert_eq!(lseek(fd, MAX, libc::SEEK_SET).unwrap(), MAX);
    assert_errno!(lseek(fd, 1, libc::SEEK_CUR), EOVERFLOW | EINVAL);
    assert_eq!(lseek(fd, 0, libc::SEEK_SET).unwrap(), 0);

    // xattrs: empty name ERANGE, > 255 bytes ERANGE, > 64 KiB value E2BIG, unknown
    // namespace EOPNOTSUPP, tiny buffers ERANGE.
    assert_errno!(fsetxattr(fd, b"", b"v", 0), ERANGE);
    assert_errno!(fsetxattr(fd, &[b'u'; 256], b"v", 0), ERANGE);
    assert_errno!(
        fsetxattr(fd, b"user.big", &vec![7u8; 64 * KIB + 1], 0),
        E2BIG
    );
    assert_errno!(fsetxattr(fd, b"user.big", &vec![7u8; 16 * MIB], 0), E2BIG);
    assert_errno!(fsetxattr(fd, b"nonsense.a", b"v", 0), EOPNOTSUPP);
    assert_errno!(fsetxattr(fd, b"user.a", b"v", 0x1234), EINVAL);
    fsetxattr(fd, b"user.ten", b"0123456789", 0).unwrap();
    fsetxattr(fd, b"user.max", &vec![9u8; 64 * KIB], 0).expect("64 KiB xattr");
    assert_errno!(fgetxattr(fd, "user.ten", 1), ERANGE);
    assert_errno!(fgetxattr(fd, "user.max", 64 * KIB - 1), ERANGE);
    assert_eq!(fgetxattr(fd, "user.ten", 0).unwrap().len(), 10);
    assert_eq!(fgetxattr(fd, "user.ten", 10).unwrap(), b"0123456789");
    assert_errno!(fgetxattr(fd, "user.missing", 0), ENODATA);
    assert_errno!(flistxattr(fd, 1), ERANGE);
    let need = flistxattr(fd, 0).unwrap();
    assert_eq!(need, "user.ten\0user.max\0".len());
    assert_errno!(flistxattr(fd, need - 1), ERANGE);
    assert_eq!(flistxattr(fd, need).unwrap(), need);

    // readlink on things that are not symlinks: EINVAL.
    assert_errno!(fs::read_link(a.join("odd")), EINVAL);
    assert_errno!(fs::read_link(&a), EINVAL);

    // ioctl: an unknown command and FS_IOC_GETFLAGS are ENOTTY; FIONREAD is answered by the
    // kernel for regular files.
    let mut arg = 0i64;
    // SAFETY: the argument points at 8 writable bytes, more than any of these commands uses.
    let r = unsafe { libc::ioctl(fd, 0x8004_5642, &mut arg) }; // _IOR('V', 0x42, u32)
    assert_errno!(sys(r), ENOTTY);
    // SAFETY: as above.
    let r = unsafe { libc::ioctl(fd, 0xC008_76FF, &mut arg) }; // _IOWR('v', 0xff, u64)
    assert_errno!(sys(r), ENOTTY);
    // SAFETY: as above (FS_IOC_GETFLAGS takes a long).
    let r = unsafe { libc::ioctl(fd, 0x8008_6601, &mut arg) };
    assert_errno!(sys(r), ENOTTY);
    // SAFETY: FIONREAD writes an int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut arg) };
    sys(r).expect("FIONREAD");

    // Directory fds: reads, writes, truncate, fallocate are refused; nothing breaks.
    let dfd = File::open(&a).unwrap();
    assert_errno!(pread_raw(dfd.as_raw_fd(), 0, 10), EISDIR);
    assert_errno!(ftruncate(dfd.as_raw_fd(), 0), EINVAL | EISDIR | EBADF);
    assert_errno!(
        fallocate(dfd.as_raw_fd(), 0, 0, 10),
        EBADF | EISDIR | ENODEV | EOPNOTSUPP
    );
    drop(dfd);

    // The daemon is alive and volume A still works.
    assert_daemon_serving(&d, "after odd requests on volume A");
    assert_eq!(fa.metadata().unwrap().len(), 10 * KIB as u64);
    drop(fa);
    let log = plain(&d.log());
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");

    // Both volumes through fresh mounts (bytes from the daemon, not the page cache).
    d.umount(&a);
    d.umount(&b);
    d.mount("vola", &a, false);
    d.mount("volb", &b, false);
    assert_eq!(fs::read(a.join("odd")).unwrap(), {
        let mut w = want.clone();
        w[..100].fill(0);
        w
    });
    for (p, data) in &b_files {
        let got = fs::read(p).unwrap_or_else(|e| panic!("volume B: {}: {e}", p.display()));
        assert!(
            got == *data,
            "volume B: {} differs at {:?}",
            p.display(),
            first_diff(&got, data)
        );
    }
    let mut names: Vec<String> = fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["b0", "b1", "b2", "b3", "dir"], "volume B listing");
    assert_eq!(fs::read(b.join("dir/x")).unwrap(), b"x");
    assert!(
        fs::read_dir(&a).unwrap().count() == 1,
        "volume A gained entries"
    );
}
