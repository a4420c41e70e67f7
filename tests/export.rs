//! `volfs export`: a volume written out as a pax tar archive, checked with the real tools
//! (GNU tar and bsdtar) against the mounted volume, extracted, imported back and compressed.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::util::{
    CleanCommand, Daemon, TestVolume, VOLUME, chmod, lchown, open_tempdir, run_within, set_times,
};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Where the 1 GiB sparse file holds data, and what.
const SPARSE_DATA: [(u64, &[u8]); 3] = [
    (0, b"head of the sparse file"),
    (512 * MIB + 12_345, b"in the middle"),
    (GIB - 100, b"near its end"),
];

/// Bytes that are never all zero (a zero block would become a hole on import).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Runs a tool through the clean spawner (it reads the mount), at most two minutes.
#[track_caller]
fn run(args: &[&str]) -> Output {
    let mut cmd = CleanCommand::new(args[0]);
    cmd.args(&args[1..]);
    run_within(cmd, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("{args:?} did not finish within 2 minutes"))
}

#[track_caller]
fn run_ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{args:?}: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// GNU tar finds archive `tar` equal to the tree at `dir`, xattrs, ACLs and owners included.
#[track_caller]
fn assert_tar_compare(dir: &str, tar: &str, what: &str) {
    let cmp = run(&[
        "tar",
        "--compare",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
        "--numeric-owner",
        "-C",
        dir,
        "-f",
        tar,
    ]);
    assert!(
        cmp.status.success() && cmp.stdout.is_empty() && cmp.stderr.is_empty(),
        "{what}: {}\n{}{}",
        cmp.status,
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

/// Every entry below `root` as the archive names it (`./`, `./d/`, `./d/f`), with its path
/// relative to `root`: the root first, then depth-first, names sorted bytewise.
fn archive_order(root: &Path) -> Vec<(String, PathBuf)> {
    fn walk(root: &Path, rel: &Path, name: &str, out: &mut Vec<(String, PathBuf)>) {
        let md = fs::symlink_metadata(root.join(rel)).unwrap();
        if !md.is_dir() {
            out.push((name.to_string(), rel.to_path_buf()));
            return;
        }
        out.push((format!("{name}/"), rel.to_path_buf()));
        let mut names: Vec<Vec<u8>> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        names.sort();
        for n in names {
            let n = String::from_utf8(n).unwrap();
            walk(root, &rel.join(&n), &format!("{name}/{n}"), out);
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), ".", &mut out);
    out
}

/// The long names of the tree.
fn long_name() -> String {
    "n".repeat(255)
}
fn deep_dir() -> String {
    format!("deep/{}/{}", "x".repeat(60), "y".repeat(60))
}
fn long_target() -> String {
    format!("../{}", "t".repeat(250))
}

/// Builds, through the mount at `m`, a tree with every kind of entry and attribute the
/// archive keeps.
fn build_tree(m: &Path) {
    fs::create_dir_all(m.join("d/e/f")).unwrap();
    fs::create_dir_all(m.join(deep_dir())).unwrap();
    fs::create_dir(m.join("sticky")).unwrap();
    fs::create_dir(m.join("acl-dir")).unwrap();
    fs::write(m.join("a"), pattern(70_000, 1)).unwrap();
    fs::write(m.join("d/e/f/nested"), b"nested\n").unwrap();
    fs::write(m.join(deep_dir()).join("file-in-a-deep-dir"), b"deep").unwrap();
    fs::write(m.join(long_name()), b"long name").unwrap();
    File::create(m.join("empty")).unwrap();
    fs::write(m.join("suid"), pattern(5000, 2)).unwrap();
    fs::write(m.join("owned"), b"owned by 1234").unwrap();
    fs::write(m.join("acl-file"), b"with an ACL").unwrap();
    // Three names for one inode.
    fs::write(m.join("link1"), pattern(40_000, 3)).unwrap();
    fs::hard_link(m.join("link1"), m.join("d/link2")).unwrap();
    fs::hard_link(m.join("link1"), m.join("d/e/link3")).unwrap();
    std::os::unix::fs::symlink("d/e/f/nested", m.join("sym")).unwrap();
    std::os::unix::fs::symlink(long_target(), m.join("d/longsym")).unwrap();
    nix::unistd::mkfifo(
        &m.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &m.join("d/tty"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o620),
        nix::sys::stat::makedev(4, 64),
    )
    .unwrap();
    let sparse = File::create(m.join("sparse")).unwrap();
    sparse.set_len(GIB).unwrap();
    for (off, data) in SPARSE_DATA {
        sparse.write_all_at(data, off).unwrap();
    }
    drop(sparse);
    xattr::set(m.join("a"), "user.text", b"value").unwrap();
    xattr::set(m.join("a"), "user.binary", &[0u8, b'\n', b'=', 255]).unwrap();
    xattr::set(m.join("a"), "trusted.t", b"trusted value").unwrap();
    xattr::set(m.join("a"), "security.s", b"security value").unwrap();
    xattr::set(m.join("d"), "user.dir", b"on a directory").unwrap();
    // Owners before modes: chown clears setuid.
    for (rel, uid, gid, mode) in [
        ("owned", 1234, 1234, 0o640),
        ("suid", 1234, 1234, 0o4755),
        ("sticky", 1234, 1234, 0o1777),
        ("d", 1234, 1234, 0o2750),
        ("", 1234, 1234, 0o755),
    ] {
        lchown(&m.join(rel), uid, gid);
        chmod(&m.join(rel), mode);
    }
    lchown(&m.join("sym"), 1234, 1234);
    for args in [
        vec!["setfacl", "-m", "u:1234:rw,g:55:r"],
        vec!["setfacl", "-m", "u:4321:rx"],
        vec!["setfacl", "-d", "-m", "u:1234:rwx,g:77:rx"],
    ] {
        let target = if args.contains(&"-d") || args.contains(&"u:4321:rx") {
            "acl-dir"
        } else {
            "acl-file"
        };
        let p = m.join(target);
        let mut a = args.clone();
        a.push(p.to_str().unwrap());
        run_ok(&a);
    }
    // Created under the default ACL: it inherits an access ACL.
    fs::write(m.join("acl-dir/inherited"), b"inherits").unwrap();
    // Times last, children before parents.
    let entries = archive_order(m);
    for (k, (_, rel)) in entries.iter().rev().enumerate() {
        let k = k as i64;
        set_times(
            &m.join(rel),
            (1_700_000_000 + k, (111_111_111 * k) % 1_000_000_000),
            (1_600_000_000 + 1000 * k, 123_456_789 + k),
        );
    }
}

/// `volfs export ARGS… -o FILE` (FILE in `dir`); returns the archive's bytes.
#[track_caller]
fn export(d: &Daemon, vol: &str, dir: &Path, file: &str, extra: &[&str]) -> Vec<u8> {
    let out = dir.join(file);
    let mut args = vec!["export", vol, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = d.cli(&args);
    assert!(
        o.status.success(),
        "volfs {args:?}: {}\nstderr: {}\ndaemon log:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    assert!(
        o.stderr.is_empty() && o.stdout.is_empty(),
        "an export to a file is quiet when stderr is not a terminal: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    fs::read(&out).unwrap()
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    xattr::list(p)
        .unwrap()
        .map(|n| {
            let v = xattr::get(p, &n).unwrap().unwrap_or_default();
            (n.to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// Compares every entry of `got` (an extraction) with `want` (the mount): type, mode,
/// owner, size, device, mtime to the nanosecond, symlink target, xattrs and ACLs, bytes,
/// and which names share an inode.
#[track_caller]
fn assert_same_tree(want: &Path, got: &Path) {
    let names = archive_order(want);
    assert_eq!(
        archive_order(got),
        names,
        "the extraction has other names than the volume"
    );
    let mut inodes: HashMap<u64, u64> = HashMap::new();
    let mut problems = Vec::new();
    for (name, rel) in &names {
        let (w, g) = (
            fs::symlink_metadata(want.join(rel)).unwrap(),
            fs::symlink_metadata(got.join(rel)).unwrap(),
        );
        let fields = |m: &fs::Metadata| {
            (
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                if m.is_dir() { 0 } else { m.size() },
                m.rdev(),
                (m.mtime(), m.mtime_nsec()),
            )
        };
        if fields(&w) != fields(&g) {
            problems.push(format!(
                "{name}: (mode, uid, gid, nlink, size, rdev, mtime) volume {:?}, extracted {:?}",
                fields(&w),
                fields(&g)
            ));
        }
        if let Some(prev) = inodes.insert(w.ino(), g.ino()) {
            if prev != g.ino() {
                problems.push(format!("{name}: hard link not kept"));
            }
        }
        let t = w.file_type();
        if t.is_symlink() {
            if fs::read_link(want.join(rel)).unwrap() != fs::read_link(got.join(rel)).unwrap() {
                problems.push(format!("{name}: symlink target differs"));
            }
        } else if !t.is_fifo() && !t.is_char_device() {
            let (wx, gx) = (xattrs(&want.join(rel)), xattrs(&got.join(rel)));
            if wx != gx {
                problems.push(format!("{name}: xattrs {wx:?} vs {gx:?}"));
            }
        }
        if t.is_file()
            && rel != Path::new("sparse")
            && fs::read(want.join(rel)).unwrap() != fs::read(got.join(rel)).unwrap()
        {
            problems.push(format!("{name}: bytes differ"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let sparse = got.join("sparse");
    let f = File::open(&sparse).unwrap();
    for (off, data) in SPARSE_DATA {
        let mut buf = vec![0u8; data.len() + 200];
        let start = off.saturating_sub(100);
        let n = f.read_at(&mut buf, start).unwrap();
        let mut expect = vec![0u8; n];
        let at = (off - start) as usize;
        expect[at..at + data.len()].copy_from_slice(data);
        assert_eq!(&buf[..n], &expect[..], "sparse file around {off}");
    }
    let blocks = fs::metadata(&sparse).unwrap().blocks();
    assert!(
        blocks < 2048,
        "the extracted sparse file takes {blocks} blocks: holes were filled"
    );
}

#[test]
fn export_of_a_varied_tree_is_read_compared_and_extracted_exactly_by_gnu_tar_and_bsdtar() {
    let v = TestVolume::new();
    let d = v.daemon();
    build_tree(v.mnt());
    let dir = open_tempdir();
    let first = export(d, VOLUME, dir.path(), "a.tar", &[]);
    let second = export(d, VOLUME, dir.path(), "b.tar", &[]);
    assert!(first == second, "two exports of the same volume differ");
    assert!(
        first.len() < 4 * MIB as usize,
        "the archive takes {} bytes: the 1 GiB sparse file's holes were written",
        first.len()
    );
    assert!(first.len() % 512 == 0 && first.ends_with(&[0u8; 1024]));
    // To stdout: the same bytes.
    let o = d.cli(&["export", VOLUME]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == first, "export to stdout differs from -o");

    let tar = dir.path().join("a.tar");
    let tar = tar.to_str().unwrap();
    let mnt = v.mnt().to_str().unwrap();
    let order: Vec<String> = archive_order(v.mnt()).into_iter().map(|e| e.0).collect();
    for lister in ["tar", "bsdtar"] {
        let listed = run_ok(&[lister, "-tf", tar]);
        let listed: Vec<String> = String::from_utf8(listed.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(listed, order, "{lister} -tf: entries or their order");
        let verbose = run_ok(&[lister, "-tvf", tar]);
        assert_eq!(
            String::from_utf8_lossy(&verbose.stdout).lines().count(),
            order.len(),
            "{lister} -tvf"
        );
    }
    assert_tar_compare(mnt, tar, "tar --compare");
    let dest = dir.path().join("extracted");
    fs::create_dir(&dest).unwrap();
    run_ok(&[
        "tar",
        "-x",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
        "--numeric-owner",
        "--same-permissions",
        "-C",
        dest.to_str().unwrap(),
        "-f",
        tar,
    ]);
    assert_same_tree(v.mnt(), &dest);
    assert_eq!(
        fs::metadata(dest.join("d/e/link3")).unwrap().nlink(),
        3,
        "three names, one inode"
    );

    // A snapshot exports to the same bytes after the volume changed, and GNU tar finds
    // the archive equal to the mounted snapshot.
    d.cli_ok(&["snapshot", "create", VOLUME, "s1"]);
    fs::write(v.path("changed-later"), b"later").unwrap();
    fs::remove_dir_all(v.path("d")).unwrap();
    let snap = export(d, &format!("{VOLUME}@s1"), dir.path(), "s1.tar", &[]);
    assert!(
        snap == first,
        "the snapshot's export differs from the volume's at that time"
    );
    let live = export(d, VOLUME, dir.path(), "live.tar", &[]);
    assert!(live != first, "the live export did not change");
    let smnt = open_tempdir();
    d.mount(&format!("{VOLUME}@s1"), smnt.path(), false);
    let s1 = dir.path().join("s1.tar");
    assert_tar_compare(
        smnt.path().to_str().unwrap(),
        s1.to_str().unwrap(),
        "tar --compare against the mounted snapshot",
    );
    d.umount(smnt.path());
}

/// Exports taken while a writer keeps two files in step are each one instant of the
/// volume: the writer replaces `a` with generation g (written aside, renamed over), then
/// `b`, so at any instant `a` holds g or g+1 when `b` holds g. A copy that reads `b` later
/// than `a` breaks that.
#[test]
fn exports_of_a_volume_being_written_are_consistent() {
    let v = TestVolume::new();
    let d = v.daemon();
    let (a, b) = (v.path("a"), v.path("b"));
    let gen_of = |data: &[u8]| -> u64 {
        let s = String::from_utf8_lossy(data);
        s.split('\n').next().unwrap().parse().unwrap()
    };
    let body = |g: u64| format!("{g}\n{}", "x".repeat(20_000 + (g % 7) as usize * 3000));
    fs::write(&a, body(0)).unwrap();
    fs::write(&b, body(0)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut g = 0;
            let tmp = a.with_file_name("tmp");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                g += 1;
                for f in [&a, &b] {
                    fs::write(&tmp, body(g)).unwrap();
                    fs::rename(&tmp, f).unwrap();
                }
            }
            g
        })
    };
    let dir = open_tempdir();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..12 {
        let tar = export(d, VOLUME, dir.path(), &format!("{i}.tar"), &[]);
        let x = dir.path().join(format!("x{i}"));
        fs::create_dir(&x).unwrap();
        run_ok(&[
            "tar",
            "-x",
            "-C",
            x.to_str().unwrap(),
            "-f",
            dir.path().join(format!("{i}.tar")).to_str().unwrap(),
        ]);
        let (ga, gb) = (
            gen_of(&fs::read(x.join("a")).unwrap()),
            gen_of(&fs::read(x.join("b")).unwrap()),
        );
        assert!(ga == gb || ga == gb + 1, "export {i}: a at {ga}, b at {gb}");
        assert_eq!(
            fs::read(x.join("a")).unwrap(),
            body(ga).into_bytes(),
            "export {i}: a torn"
        );
        assert_eq!(
            fs::read(x.join("b")).unwrap(),
            body(gb).into_bytes(),
            "export {i}: b torn"
        );
        seen.insert(gb);
        assert!(!tar.is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert!(
        seen.len() > 3 && last > 10,
        "the writer barely ran: {seen:?}, {last}"
    );
    // The temporary snapshots are gone.
    assert_eq!(
        d.cli_ok(&["snapshot", "ls", VOLUME, "--format", "json"]),
        ""
    );
}

#[test]
fn an_exported_volume_imported_again_exports_to_the_same_bytes_and_compresses() {
    let v = TestVolume::new();
    let d = v.daemon();
    build_tree(v.mnt());
    let dir = open_tempdir();
    let first = export(d, VOLUME, dir.path(), "a.tar", &[]);
    let from = format!("from={}", dir.path().join("a.tar").display());
    d.cli_ok(&["create", "copy", "-o", &from]);
    // Not mounted: the daemon opens it for the export.
    let again = export(d, "copy", dir.path(), "copy.tar", &[]);
    assert!(
        again == first,
        "the export of the imported copy differs from the original's"
    );
    // The same through `volfs import`, which streams the archive to the daemon.
    d.cli_ok(&[
        "import",
        "streamed",
        dir.path().join("a.tar").to_str().unwrap(),
    ]);
    let streamed = export(d, "streamed", dir.path(), "streamed.tar", &[]);
    assert!(
        streamed == first,
        "the export of the volfs-imported copy differs from the original's"
    );

    for (flag, file, tool) in [("zstd", "a.tar.zst", "zstd"), ("gzip", "a.tar.gz", "gzip")] {
        let packed = export(d, VOLUME, dir.path(), file, &["--compress", flag]);
        assert!(packed.len() < first.len(), "{flag} did not compress");
        let path = dir.path().join(file);
        let o = run_ok(&[tool, "-dc", path.to_str().unwrap()]);
        assert!(
            o.stdout == first,
            "{tool} -dc gives other bytes than the plain export"
        );
    }
}

#[test]
fn export_errors_name_what_failed_and_leave_no_file() {
    let v = TestVolume::new();
    let d = v.daemon();
    fs::write(v.path("f"), b"x").unwrap();
    let dir = open_tempdir();
    let out = dir.path().join("x.tar");
    let out_s = out.to_str().unwrap();
    let missing = dir.path().join("no/such/dir/x.tar");
    for (args, says) in [
        (
            vec!["export", "nosuchvol", "-o", out_s],
            "no such volume: nosuchvol",
        ),
        (
            vec!["export", VOLUME, "-o", missing.to_str().unwrap()],
            "cannot write",
        ),
        (
            vec!["export", &format!("{VOLUME}@snap1"), "-o", out_s],
            &format!("no such snapshot: {VOLUME}@snap1"),
        ),
        (
            vec!["export", "bad/name", "-o", out_s],
            "invalid volume name",
        ),
    ] {
        let o = d.cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left {out_s} behind");
    }
    assert!(d.cli(&["export", VOLUME, "-o", out_s]).status.success());
    assert!(out.exists());
}

/// Runs `volfs --socket … ARGS` under `script`, so that its stdout and stderr are a terminal;
/// returns its exit code and what it printed.
fn volfs_on_a_terminal(d: &Daemon, args: &str) -> (Option<i32>, String) {
    let cmd = format!(
        "{} --socket {} {args}",
        crate::util::VOLFS,
        d.socket().display()
    );
    let o = run(&["script", "-qec", &cmd, "/dev/null"]);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn export_refuses_a_terminal_as_output_and_shows_progress_on_one() {
    let v = TestVolume::new();
    let d = v.daemon();
    fs::write(v.path("f"), pattern(3 * MIB as usize, 4)).unwrap();
    let (code, said) = volfs_on_a_terminal(d, &format!("export {VOLUME}"));
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("refusing to write a tar archive to a terminal") && said.contains("-o FILE"),
        "{said}"
    );
    let dir = open_tempdir();
    let out = dir.path().join("a.tar");
    let (code, said) = volfs_on_a_terminal(d, &format!("export {VOLUME} -o {}", out.display()));
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains(&format!("exported {VOLUME}: 3")), "{said}");
    assert!(fs::metadata(&out).unwrap().len() > 3 * MIB);
}

#[test]
fn export_of_a_mounted_volume_leaves_its_open_unlinked_files_alone() {
    let v = TestVolume::new();
    let d = v.daemon();
    fs::write(v.path("kept"), b"kept").unwrap();
    fs::write(v.path("orphan"), pattern(100_000, 9)).unwrap();
    let f = File::open(v.path("orphan")).unwrap();
    fs::remove_file(v.path("orphan")).unwrap();
    let dir = open_tempdir();
    let tar = export(d, VOLUME, dir.path(), "a.tar", &[]);
    let listed = run_ok(&["tar", "-tf", dir.path().join("a.tar").to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout), "./\n./kept\n");
    assert!(!tar.is_empty());
    // The export used the mount's own filesystem: a second one opened on the volume would
    // have reclaimed the inode that is unlinked but still open.
    let mut back = vec![0u8; 100_000];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == pattern(100_000, 9));
}

/// Exported archives name entries exactly as the kernel lists them, so this helper's order
/// must be bytewise: checked on names that sort differently as text and as bytes.
#[test]
fn archive_order_is_bytewise() {
    let dir = open_tempdir();
    let root = dir.path();
    for n in ["b", "B", "a-", "a.", "a"] {
        fs::write(root.join(n), b"").unwrap();
    }
    let names: Vec<String> = archive_order(root).into_iter().map(|e| e.0).collect();
    assert_eq!(names, ["./", "./B", "./a", "./a-", "./a.", "./b"]);
}
