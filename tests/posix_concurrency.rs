//! Namespace operations racing each other, through two read-write mounts of the same volume
//! (the kernel serializes cross-directory renames only per mount, so two mounts make volfs see
//! truly concurrent renames): no deadlock, no lost or duplicated file, consistent link counts.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::RenameFlags;
use rand::{Rng, SeedableRng};

use crate::posix::*;
use crate::util::*;

const FILES: usize = 200;
const DIRS: usize = 4;
const SUBDIRS: usize = 4;

/// Where every `f<id>` file and `s<k>` subdirectory is, walking from `root`.
fn census(root: &Path) -> (BTreeMap<String, Vec<PathBuf>>, Vec<PathBuf>) {
    let mut found: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        dirs.push(d.clone());
        for n in names(&d) {
            let p = d.join(&n);
            let n = n.to_string_lossy().into_owned();
            if ftype(&p) == libc::S_IFDIR {
                stack.push(p.clone());
            }
            found.entry(n).or_default().push(p);
        }
    }
    (found, dirs)
}

#[test]
fn racing_renames_creates_and_unlinks_on_two_mounts_lose_nothing() {
    let mut tv = TestVolume::new();
    let m2 = tv.mount_again(false);
    let m1 = tv.mnt().to_path_buf();
    for d in 0..DIRS {
        fs::create_dir(m1.join(format!("d{d}"))).unwrap();
    }
    for s in 0..SUBDIRS {
        fs::create_dir(m1.join(format!("d{}/s{s}", s % DIRS))).unwrap();
    }
    for i in 0..FILES {
        let mut f = File::create(m1.join(format!("d{}/f{i}", i % DIRS))).unwrap();
        f.write_all(format!("file {i}").as_bytes()).unwrap();
    }
    let seed: u64 = std::env::var("VOLFS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let roots = [m1.clone(), m2.clone()];
            let (stop, ops) = (stop.clone(), ops.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (t * 0x9E37));
                let mut tmp = 0u64;
                // A random directory path: dK or dK/sJ (the latter may not exist there).
                let rand_dir = |rng: &mut rand::rngs::StdRng| {
                    let r = &roots[rng.gen_range(0..2)];
                    let d = r.join(format!("d{}", rng.gen_range(0..DIRS)));
                    if rng.gen_bool(0.4) {
                        d.join(format!("s{}", rng.gen_range(0..SUBDIRS)))
                    } else {
                        d
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match rng.gen_range(0..10) {
                        0..=5 => {
                            let id = rng.gen_range(0..FILES);
                            let (a, b) = (rand_dir(&mut rng), rand_dir(&mut rng));
                            let _ = nix::fcntl::renameat2(
                                None,
                                &a.join(format!("f{id}")),
                                None,
                                &b.join(format!("f{id}")),
                                RenameFlags::RENAME_NOREPLACE,
                            );
                        }
                        6 | 7 => {
                            let s = rng.gen_range(0..SUBDIRS);
                            let r = &roots[rng.gen_range(0..2)];
                            let a = r.join(format!("d{}/s{s}", rng.gen_range(0..DIRS)));
                            let b = r.join(format!("d{}/s{s}", rng.gen_range(0..DIRS)));
                            let _ = nix::fcntl::renameat2(
                                None,
                                &a,
                                None,
                                &b,
                                RenameFlags::RENAME_NOREPLACE,
                            );
                        }
                        _ => {
                            // Create and remove a private temp file (same mount both times).
                            let r = &roots[rng.gen_range(0..2)];
                            let d = r.join(format!("d{}", rng.gen_range(0..DIRS)));
                            let p = d.join(format!("t{t}-{tmp}"));
                            tmp += 1;
                            if File::create(&p).is_ok() {
                                fs::remove_file(&p).unwrap_or_else(|e| {
                                    panic!("unlink of just-created {}: {e}", p.display())
                                });
                            }
                        }
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    for t in threads {
        while !t.is_finished() {
            assert!(
                Instant::now() < deadline,
                "worker threads stuck for 60 s: deadlock in volfs suspected (seed {seed}); log:\n{}",
                tv.daemon().log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t.join().unwrap();
    }
    let n_ops = ops.load(Ordering::Relaxed);
    assert!(n_ops > 100, "only {n_ops} operations in 3 s");
    tv.restart();
    let (found, dirs) = census(tv.mnt());
    for i in 0..FILES {
        let n = format!("f{i}");
        let at = found.get(&n).cloned().unwrap_or_default();
        assert_eq!(
            at.len(),
            1,
            "file {n} found at {at:?} after {n_ops} racing ops (seed {seed})"
        );
        assert_eq!(
            fs::read(&at[0]).unwrap(),
            format!("file {i}").as_bytes(),
            "content of {n}"
        );
        assert_eq!(st(&at[0]).st_nlink, 1, "nlink of {n}");
    }
    for s in 0..SUBDIRS {
        let n = format!("s{s}");
        let at = found.get(&n).cloned().unwrap_or_default();
        assert_eq!(at.len(), 1, "subdir {n} found at {at:?} (seed {seed})");
    }
    let stray: Vec<_> = found.keys().filter(|k| k.starts_with('t')).collect();
    assert!(stray.is_empty(), "temp files left behind: {stray:?}");
    assert_eq!(
        found.len(),
        FILES + SUBDIRS + DIRS,
        "unexpected names: {:?}",
        found.keys()
    );
    for d in dirs {
        let subdirs = names(&d)
            .iter()
            .filter(|n| ftype(&d.join(n)) == libc::S_IFDIR)
            .count();
        assert_eq!(
            st(&d).st_nlink,
            2 + subdirs as u64,
            "nlink of {}",
            d.display()
        );
    }
}

#[test]
fn parallel_creates_in_one_directory_all_land() {
    let tv = TestVolume::new();
    let d = tv.path("d");
    fs::create_dir(&d).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..250 {
                    let p = d.join(format!("t{t}-{i}"));
                    File::create(&p)
                        .unwrap()
                        .write_all(p.to_str().unwrap().as_bytes())
                        .unwrap();
                    if i % 2 == 0 {
                        fs::create_dir(d.join(format!("dir-t{t}-{i}"))).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n = names(&d);
    assert_eq!(n.len(), 4 * 250 + 4 * 125);
    assert_eq!(st(&d).st_nlink, 2 + 4 * 125);
    let mut inos: Vec<u64> = n.iter().map(|x| st(&d.join(x)).st_ino).collect();
    inos.push(st(&d).st_ino);
    inos.push(st(tv.mnt()).st_ino);
    let total = inos.len();
    inos.sort();
    inos.dedup();
    assert_eq!(inos.len(), total, "inode numbers are not unique");
    for t in 0..4 {
        for i in 0..250 {
            let p = d.join(format!("t{t}-{i}"));
            assert_eq!(fs::read(&p).unwrap(), p.to_str().unwrap().as_bytes());
        }
    }
}
