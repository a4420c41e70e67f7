//! Randomized data-integrity tests on a real mount.
//!
//! * [`random_ops_match_model_across_restarts`]: a long random sequence of writes (random
//!   offsets and lengths, many crossing 64 KiB chunk boundaries, some far past EOF making sparse
//!   files), truncates up and down, hole punches (`fallocate(PUNCH_HOLE|KEEP_SIZE)`), `mmap`
//!   (`MAP_SHARED`) writes with `msync`, mmap reads and `pread`s on a few files, every read
//!   checked against an in-memory model (exact bytes and exact file size). The run is split
//!   into phases; between phases the daemon is restarted in turn with a clean SIGTERM (files
//!   closed; the mount stays), with `kill -9` of the daemon alone right after fsyncing every
//!   file (the keeper keeps the mount: the files stay open and are used on through the new
//!   daemon) and with `kill -9` of the daemon and its keeper right after fsyncing (the mount
//!   dies; the next daemon mounts afresh), and every file is verified in full against the
//!   model after each restart, with the kernel's cached pages dropped first.
//! * [`fsx_exerciser`]: the classic fsx (the `fsx` crate, installed by `scripts/test`) against
//!   a file on the mount.
//!
//! Knobs: `VOLFS_TEST_SEED` (decimal or 0x-hex) replays a run; `VOLFS_INTEGRITY_OPS` (default
//! 100000) and `VOLFS_FSX_OPS` (default 20000) set the operation counts; `VOLFS_FSX` is the
//! path of the fsx binary (else `fsx` on PATH or in ~/.cargo/bin).
#![allow(unsafe_code)] // mmap / msync / munmap

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nix::fcntl::FallocateFlags;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::util::TestVolume;

/// The store's chunk size: offsets near its multiples are favoured.
const CHUNK: u64 = 64 * 1024;
/// Files never grow past this (keeps the model small and full verifications fast).
const MAX_SIZE: u64 = 6 << 20;
/// The files under test, relative to the mount point.
const FILES: [&str; 4] = ["f0", "f1", "dir/f2", "dir/sub/f3"];
const DEFAULT_OPS: u64 = 100_000;
const PHASES: u64 = 6;

/// The seed from `VOLFS_TEST_SEED`, or a fresh random one.
pub fn test_seed() -> u64 {
    match std::env::var("VOLFS_TEST_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("bad VOLFS_TEST_SEED {s:?}: {e}"))
        }
        Err(_) => rand::random(),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("bad {name} {s:?}: {e}")),
        Err(_) => default,
    }
}

/// Failure context: the seed and the last operations, printed with any failure.
struct Ctx {
    seed: u64,
    op_no: u64,
    history: VecDeque<String>,
}

impl Ctx {
    fn note(&mut self, s: String) {
        if self.history.len() == 40 {
            self.history.pop_front();
        }
        self.history.push_back(format!("#{} {s}", self.op_no));
    }

    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        let hist: Vec<&str> = self.history.iter().map(|s| s.as_str()).collect();
        panic!(
            "{msg}\n  at op #{} -- replay with VOLFS_TEST_SEED={}\n  last operations:\n    {}",
            self.op_no,
            self.seed,
            hist.join("\n    ")
        );
    }
}

/// One file under test and its model.
struct TFile {
    rel: &'static str,
    file: Option<File>,
    model: Vec<u8>,
}

impl TFile {
    fn f(&self) -> &File {
        self.file.as_ref().expect("file open")
    }
}

/// `pread` until `len` bytes or EOF.
fn pread_full(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Describe how `got` differs from `want` (`base` = file offset of index 0), or None if equal.
fn diff(got: &[u8], want: &[u8], base: u64) -> Option<String> {
    if got == want {
        return None;
    }
    let common = got.len().min(want.len());
    let first = (0..common).find(|&i| got[i] != want[i]);
    let nbad = (0..common).filter(|&i| got[i] != want[i]).count();
    Some(match first {
        Some(i) => {
            let end = (i + 16).min(common);
            format!(
                "{nbad} byte(s) differ, first at file offset {:#x} (chunk {}, +{:#x}): got {:02x?} want {:02x?}; got len {} want len {}",
                base + i as u64,
                (base + i as u64) / CHUNK,
                (base + i as u64) % CHUNK,
                &got[i..end],
                &want[i..end],
                got.len(),
                want.len()
            )
        }
        None => format!(
            "lengths differ: got {} bytes, want {} (data equal over the common part)",
            got.len(),
            want.len()
        ),
    })
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// A `MAP_SHARED` mapping, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(f: &File, off: u64, len: usize, write: bool) -> io::Result<Mapping> {
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    fn write(&mut self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len);
        // SAFETY: the range is inside the mapping, which is writable and not aliased by Rust.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), (self.ptr as *mut u8).add(at), data.len())
        };
    }

    fn read(&self, at: usize, len: usize) -> Vec<u8> {
        assert!(at + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: the range is inside the mapping, which is readable.
        unsafe {
            std::ptr::copy_nonoverlapping((self.ptr as *const u8).add(at), out.as_mut_ptr(), len)
        };
        out
    }

    fn msync(&self) -> io::Result<()> {
        // SAFETY: ptr/len describe exactly this live mapping.
        let r = unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly this live mapping, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A random offset for an operation on a file of size `size`: inside, at EOF, next to a chunk
/// boundary, or far past EOF (sparse).
fn pick_offset(rng: &mut StdRng, size: u64) -> u64 {
    match rng.gen_range(0..20) {
        0..=7 => rng.gen_range(0..=size),
        8..=13 => {
            let k = rng.gen_range(0..=(size / CHUNK + 1));
            let delta = rng.gen_range(0..600u64);
            if rng.gen_bool(0.5) {
                (k * CHUNK).saturating_sub(delta)
            } else {
                k * CHUNK + delta
            }
        }
        14..=15 => size,
        16..=17 => rng.gen_range(size..=size + 4 * CHUNK),
        _ => rng.gen_range(0..MAX_SIZE),
    }
    .min(MAX_SIZE - 1)
}

/// A random length: mostly small, some spanning one or more chunks.
fn pick_len(rng: &mut StdRng) -> u64 {
    match rng.gen_range(0..20) {
        0..=9 => rng.gen_range(1..=512),
        10..=16 => rng.gen_range(513..=16 * 1024),
        17..=18 => rng.gen_range(16 * 1024..=CHUNK + 4096),
        _ => rng.gen_range(CHUNK..=3 * CHUNK + 17),
    }
}

/// The state of one integrity run.
struct Run {
    ctx: Ctx,
    rng: StdRng,
    files: Vec<TFile>,
    page: u64,
    counts: [u64; 9],
}

const OP_NAMES: [&str; 9] = [
    "write",
    "read",
    "truncate",
    "punch",
    "mmap-write",
    "mmap-read",
    "fsync",
    "reopen",
    "stat",
];

impl Run {
    fn open(&mut self, mnt: &Path, create: bool) {
        for tf in &mut self.files {
            let p = mnt.join(tf.rel);
            if create {
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).expect("mkdir");
                }
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(&p);
            match f {
                Ok(f) => tf.file = Some(f),
                Err(e) => self.ctx.fail(&format!("open {}: {e}", p.display())),
            }
        }
    }

    fn close(&mut self) {
        for tf in &mut self.files {
            tf.file = None;
        }
    }

    /// Full comparison of file `i` (size and every byte).
    fn verify_file(&self, i: usize, when: &str) {
        let tf = &self.files[i];
        let size = match tf.f().metadata() {
            Ok(m) => m.len(),
            Err(e) => self.ctx.fail(&format!("{when}: fstat {}: {e}", tf.rel)),
        };
        if size != tf.model.len() as u64 {
            self.ctx.fail(&format!(
                "{when}: {} has size {size}, model says {}",
                tf.rel,
                tf.model.len()
            ));
        }
        let got = match pread_full(tf.f(), 0, tf.model.len() + 4096) {
            Ok(g) => g,
            Err(e) => self.ctx.fail(&format!("{when}: read {}: {e}", tf.rel)),
        };
        if let Some(d) = diff(&got, &tf.model, 0) {
            self.ctx
                .fail(&format!("{when}: {} differs from the model: {d}", tf.rel));
        }
    }

    /// `posix_fadvise(DONTNEED)` on every file: later reads go to the daemon, not the cache.
    fn drop_page_cache(&self) {
        for tf in &self.files {
            if let Err(e) = nix::fcntl::posix_fadvise(
                tf.f().as_raw_fd(),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            ) {
                self.ctx
                    .fail(&format!("posix_fadvise(DONTNEED) {}: {e}", tf.rel));
            }
        }
    }

    fn verify_all(&self, when: &str) {
        for i in 0..self.files.len() {
            self.verify_file(i, when);
        }
    }

    fn check_size(&self, i: usize) {
        let tf = &self.files[i];
        match tf.f().metadata() {
            Ok(m) if m.len() == tf.model.len() as u64 => {}
            Ok(m) => self.ctx.fail(&format!(
                "{}: size {} but model says {}",
                tf.rel,
                m.len(),
                tf.model.len()
            )),
            Err(e) => self.ctx.fail(&format!("fstat {}: {e}", tf.rel)),
        }
    }

    fn fsync_all(&self, mnt: &Path) {
        for tf in &self.files {
            if let Err(e) = tf.f().sync_all() {
                self.ctx.fail(&format!("fsync {}: {e}", tf.rel));
            }
        }
        for d in ["", "dir", "dir/sub"] {
            let p = mnt.join(d);
            if let Err(e) = File::open(&p).and_then(|f| f.sync_all()) {
                self.ctx.fail(&format!("fsync dir {}: {e}", p.display()));
            }
        }
    }

    fn one_op(&mut self, mnt: &Path) {
        let i = self.rng.gen_range(0..self.files.len());
        let size = self.files[i].model.len() as u64;
        let rel = self.files[i].rel;
        let kind = match self.rng.gen_range(0..100) {
            0..=31 => 0,  // write
            32..=63 => 1, // read
            64..=70 => 2, // truncate
            71..=77 => 3, // punch
            78..=84 => 4, // mmap write
            85..=90 => 5, // mmap read
            91 => 6,      // fsync / fdatasync
            92 => 7,      // close + reopen
            _ => 8,       // stat
        };
        self.counts[kind] += 1;
        match kind {
            0 => {
                let off = pick_offset(&mut self.rng, size);
                let len = pick_len(&mut self.rng).min(MAX_SIZE - off);
                let mut data = vec![0u8; len as usize];
                self.rng.fill_bytes(&mut data);
                self.ctx.note(format!(
                    "write {rel} off={off:#x} len={len:#x} (size {size:#x})"
                ));
                if let Err(e) = self.files[i].f().write_all_at(&data, off) {
                    self.ctx
                        .fail(&format!("pwrite {rel} off={off:#x} len={len:#x}: {e}"));
                }
                let m = &mut self.files[i].model;
                let end = (off + len) as usize;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[off as usize..end].copy_from_slice(&data);
            }
            1 => {
                let off = if self.rng.gen_bool(0.1) {
                    self.rng.gen_range(0..=size + CHUNK)
                } else {
                    pick_offset(&mut self.rng, size).min(size)
                };
                let len = pick_len(&mut self.rng) as usize;
                self.ctx.note(format!(
                    "read {rel} off={off:#x} len={len:#x} (size {size:#x})"
                ));
                let got = match pread_full(self.files[i].f(), off, len) {
                    Ok(g) => g,
                    Err(e) => self.ctx.fail(&format!("pread {rel} off={off:#x}: {e}")),
                };
                let m = &self.files[i].model;
                let s = (off as usize).min(m.len());
                let e = (off as usize + len).min(m.len());
                if let Some(d) = diff(&got, &m[s..e], off) {
                    self.ctx
                        .fail(&format!("pread {rel} off={off:#x} len={len:#x}: {d}"));
                }
                self.check_size(i);
            }
            2 => {
                let new = match self.rng.gen_range(0..6) {
                    0 => 0,
                    1 => self.rng.gen_range(0..=size),
                    2 => {
                        let k = self.rng.gen_range(0..=(size / CHUNK + 1));
                        (k * CHUNK + self.rng.gen_range(0..3u64)).saturating_sub(1)
                    }
                    3 => size + self.rng.gen_range(1..=2 * CHUNK),
                    4 => self.rng.gen_range(0..=MAX_SIZE),
                    _ => size.saturating_sub(self.rng.gen_range(1..=CHUNK)),
                }
                .min(MAX_SIZE);
                self.ctx
                    .note(format!("truncate {rel} {size:#x} -> {new:#x}"));
                if let Err(e) = self.files[i].f().set_len(new) {
                    self.ctx.fail(&format!("ftruncate {rel} to {new:#x}: {e}"));
                }
                self.files[i].model.resize(new as usize, 0);
                self.check_size(i);
            }
            3 => {
                let off = pick_offset(&mut self.rng, size);
                let len = if self.rng.gen_bool(0.2) {
                    self.rng.gen_range(1..=4 * CHUNK)
                } else {
                    pick_len(&mut self.rng)
                };
                self.ctx.note(format!(
                    "punch {rel} off={off:#x} len={len:#x} (size {size:#x})"
                ));
                let fd = self.files[i].f().as_raw_fd();
                if let Err(e) = nix::fcntl::fallocate(
                    fd,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                ) {
                    self.ctx.fail(&format!(
                        "fallocate(PUNCH_HOLE|KEEP_SIZE) {rel} off={off:#x} len={len:#x}: {e}"
                    ));
                }
                let m = &mut self.files[i].model;
                let s = (off as usize).min(m.len());
                let e = ((off + len) as usize).min(m.len());
                m[s..e].fill(0);
                self.check_size(i);
            }
            4 | 5 => {
                if size == 0 {
                    self.ctx.note(format!("mmap {rel}: skipped, empty file"));
                    return;
                }
                let off = self.rng.gen_range(0..size);
                let len = pick_len(&mut self.rng).min(size - off);
                let pa = off / self.page * self.page;
                let maplen = (off - pa + len) as usize;
                let write = kind == 4;
                self.ctx.note(format!(
                    "mmap-{} {rel} off={off:#x} len={len:#x} (size {size:#x})",
                    if write { "write+msync" } else { "read" }
                ));
                let mut map = match Mapping::new(self.files[i].f(), pa, maplen, write) {
                    Ok(m) => m,
                    Err(e) => self.ctx.fail(&format!(
                        "mmap(MAP_SHARED) {rel} off={pa:#x} len={maplen:#x}: {e}"
                    )),
                };
                let at = (off - pa) as usize;
                if write {
                    let mut data = vec![0u8; len as usize];
                    self.rng.fill_bytes(&mut data);
                    map.write(at, &data);
                    if let Err(e) = map.msync() {
                        self.ctx.fail(&format!("msync(MS_SYNC) {rel}: {e}"));
                    }
                    drop(map);
                    self.files[i].model[off as usize..(off + len) as usize].copy_from_slice(&data);
                } else {
                    let got = map.read(at, len as usize);
                    drop(map);
                    let want = &self.files[i].model[off as usize..(off + len) as usize];
                    if let Some(d) = diff(&got, want, off) {
                        self.ctx.fail(&format!("mmap read {rel}: {d}"));
                    }
                }
                self.check_size(i);
            }
            6 => {
                let data_only = self.rng.gen_bool(0.5);
                self.ctx.note(format!(
                    "{} {rel}",
                    if data_only { "fdatasync" } else { "fsync" }
                ));
                let r = if data_only {
                    self.files[i].f().sync_data()
                } else {
                    self.files[i].f().sync_all()
                };
                if let Err(e) = r {
                    self.ctx.fail(&format!("fsync {rel}: {e}"));
                }
            }
            7 => {
                self.ctx.note(format!("close+reopen {rel}"));
                self.files[i].file = None;
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(mnt.join(rel))
                {
                    Ok(f) => self.files[i].file = Some(f),
                    Err(e) => self.ctx.fail(&format!("reopen {rel}: {e}")),
                }
                self.verify_file(i, "after close+reopen");
            }
            _ => {
                self.ctx.note(format!("stat {rel}"));
                match fs::metadata(mnt.join(rel)) {
                    Ok(m) if m.len() == size && m.is_file() => {}
                    Ok(m) => self.ctx.fail(&format!(
                        "stat {rel}: size {} is_file {}, model size {size}",
                        m.len(),
                        m.is_file()
                    )),
                    Err(e) => self.ctx.fail(&format!("stat {rel}: {e}")),
                }
            }
        }
    }
}

#[test]
fn random_ops_match_model_across_restarts() {
    let seed = test_seed();
    let total = env_u64("VOLFS_INTEGRITY_OPS", DEFAULT_OPS);
    println!("integrity: seed {seed} (replay with VOLFS_TEST_SEED={seed}), {total} operations");
    let t0 = Instant::now();
    let mut tv = TestVolume::new();
    let mut run = Run {
        ctx: Ctx {
            seed,
            op_no: 0,
            history: VecDeque::new(),
        },
        rng: StdRng::seed_from_u64(seed),
        files: FILES
            .iter()
            .map(|rel| TFile {
                rel,
                file: None,
                model: Vec::new(),
            })
            .collect(),
        page: page_size(),
        counts: [0; 9],
    };
    let mnt: PathBuf = tv.mnt().to_path_buf();
    run.open(&mnt, true);
    for phase in 0..PHASES {
        let ops = total / PHASES + u64::from(phase < total % PHASES);
        let tp = Instant::now();
        for _ in 0..ops {
            run.ctx.op_no += 1;
            run.one_op(&mnt);
            if run.ctx.op_no % 2000 == 0 {
                // Drop the kernel's cached pages first so the reads reach the daemon.
                run.drop_page_cache();
                run.verify_all("periodic full check (page cache dropped)");
            }
        }
        run.verify_all(&format!("end of phase {phase}"));
        let tr = Instant::now();
        let how = match phase % 3 {
            0 => {
                run.ctx
                    .note("clean restart (close all, SIGTERM, start; the mount stays)".into());
                run.close();
                tv.restart();
                run.open(&mnt, false);
                "clean"
            }
            1 => {
                run.ctx.note(
                    "fsync all files and dirs, kill -9 of the daemon, start (files kept open)"
                        .into(),
                );
                run.fsync_all(&mnt);
                tv.kill_and_restart();
                "kill -9 of the daemon"
            }
            _ => {
                run.ctx.note(
                    "fsync all files and dirs, kill -9 of the daemon and keeper, start \
                     (fresh mount)"
                        .into(),
                );
                run.fsync_all(&mnt);
                tv.kill_all_and_restart();
                run.close();
                run.open(&mnt, false);
                "kill -9 of the daemon and keeper"
            }
        };
        run.drop_page_cache();
        run.verify_all(&format!(
            "after a {how} and restart (everything was fsynced or closed)"
        ));
        println!(
            "integrity: phase {phase}: {ops} ops in {:.1?}, {how} restart + verify in {:.1?}; \
             sizes {:?}",
            tp.elapsed() - tr.elapsed(),
            tr.elapsed(),
            run.files.iter().map(|f| f.model.len()).collect::<Vec<_>>()
        );
    }
    run.close();
    let counts: Vec<String> = OP_NAMES
        .iter()
        .zip(run.counts)
        .map(|(n, c)| format!("{n}={c}"))
        .collect();
    println!(
        "integrity: {} operations ({}) and {PHASES} restarts in {:.1?}, seed {seed}",
        run.ctx.op_no,
        counts.join(" "),
        t0.elapsed()
    );
}

/// Path of the fsx binary, if installed.
fn find_fsx() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("VOLFS_FSX") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("fsx")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/fsx"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/fsx"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

const FSX_CONFIG: &str = r#"
# Written by tests/integrity.rs
flen = 1048576
[opsize]
max = 200000
min = 0
align = 1
[weights]
close_open = 1
read = 10
write = 10
mapread = 5
mapwrite = 5
invalidate = 1
truncate = 2
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 2
sendfile = 1
copy_file_range = 1
"#;

#[test]
fn fsx_exerciser() {
    let Some(fsx) = find_fsx() else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "fsx not found (CI is set, so this fails instead of skipping): \
                 scripts/test installs it with `cargo install --locked --version 0.3.2 fsx`"
            );
        }
        eprintln!(
            "SKIPPED fsx_exerciser: fsx not installed (cargo install --locked --version 0.3.2 fsx)"
        );
        return;
    };
    let seed = test_seed() % (1 << 31);
    let ops = env_u64("VOLFS_FSX_OPS", 20_000);
    let tv = TestVolume::new();
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = work.path().join("fsx.toml");
    fs::write(&cfg, FSX_CONFIG).expect("write fsx.toml");
    let target = tv.path("fsx.dat");
    let t0 = Instant::now();
    let out = Command::new(&fsx)
        .arg("-N")
        .arg(ops.to_string())
        .arg("-S")
        .arg(seed.to_string())
        .arg("-f")
        .arg(&cfg)
        .arg("-P")
        .arg(work.path())
        .arg(&target)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", fsx.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tail: Vec<&str> = text.lines().rev().take(80).collect::<Vec<_>>();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    assert!(
        out.status.success(),
        "fsx -N {ops} -S {seed} on {} failed ({}); replay with VOLFS_TEST_SEED={seed}\n{}\ndaemon log tail:\n{}",
        target.display(),
        out.status,
        tail.join("\n"),
        tail_lines(&tv.daemon().log(), 40)
    );
    println!(
        "fsx: {ops} operations, seed {seed}, in {:.1?}",
        t0.elapsed()
    );
}

fn tail_lines(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}
