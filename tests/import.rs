//! `volfs import`: archives made by GNU tar come in exactly (checked through the kernel),
//! from a file or a pipe, plain, gzip or zstd; existing volumes are left alone; and every
//! kind of hostile archive is refused naming the entry and the reason, leaving no volume,
//! no key in the store, and nothing written outside.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::lifecycle::{assert_same_tree, assert_store_consistent, build_tree, mountpoint, names};
use crate::util::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Runs a command through the clean spawner and returns its output.
#[track_caller]
fn run(cmd: CleanCommand, what: &str) -> Output {
    run_within(cmd, LIMIT).unwrap_or_else(|| panic!("{what} did not finish within {LIMIT:?}"))
}

/// `volfs import NAME -` with `bytes` written into a pipe as its standard input.
#[track_caller]
fn import_from_pipe(d: &Daemon, name: &str, bytes: Vec<u8>) -> Output {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let writer = std::thread::spawn(move || {
        // The command may stop reading early (a refused archive): EPIPE then.
        let _ = fs::File::from(w).write_all(&bytes);
    });
    let mut cmd = CleanCommand::new(VOLFS);
    cmd.arg("--socket")
        .arg(d.socket())
        .args(["import", name, "-"])
        .env_remove("VOLFS_SOCKET")
        .stdin(r);
    let out = run(cmd, "volfs import -");
    writer.join().expect("pipe writer");
    out
}

// ---------------------------------------------------------------------------------------------
// Archives made by GNU tar
// ---------------------------------------------------------------------------------------------

/// The lifecycle tests' tree plus an access ACL, archived by GNU tar with xattrs, ACLs and
/// numeric owners (POSIX format: nanosecond times), as `plain.tar`, `a.tar.gz` and
/// `a.tar.zst`.
fn gnu_tar_archives() -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
    let (t, tree) = build_tree();
    let o = run(
        {
            let mut c = CleanCommand::new("setfacl");
            c.args(["-m", "u:1234:rw-,g:77:r--"]).arg(tree.join("a"));
            c
        },
        "setfacl",
    );
    assert!(o.status.success(), "setfacl: {}", stderr_of(&o));
    let plain = t.path().join("plain.tar");
    let mut c = CleanCommand::new("tar");
    c.args([
        "--create",
        "--format=posix",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
        "--numeric-owner",
        "--atime-preserve=system",
        "--file",
    ])
    .arg(&plain)
    .arg("-C")
    .arg(&tree)
    .arg(".");
    let o = run(c, "tar");
    assert!(o.status.success(), "tar: {}", stderr_of(&o));
    let gz = t.path().join("a.tar.gz");
    let zst = t.path().join("a.tar.zst");
    for (prog, out) in [("gzip", &gz), ("zstd", &zst)] {
        let mut c = CleanCommand::new(prog);
        c.args(["-c"])
            .arg(&plain)
            .stdout(fs::File::create(out).expect("create"));
        let mut child = c.spawn().expect("spawn compressor");
        assert!(child.wait().expect("wait").success(), "{prog} failed");
    }
    (t, tree, vec![plain, gz, zst])
}

#[test]
fn import_of_gnu_tar_archives_from_a_file_or_a_pipe_is_exact_through_the_kernel() {
    let (_t, tree, archives) = gnu_tar_archives();
    let d = Daemon::start();
    let mut volumes = Vec::new();
    for (i, archive) in archives.iter().enumerate() {
        let from_file = format!("file{i}");
        let out = d.cli_ok(&["import", &from_file, archive.to_str().expect("utf-8")]);
        volumes.push((from_file, out));
        let from_pipe = format!("pipe{i}");
        let o = import_from_pipe(&d, &from_pipe, fs::read(archive).expect("read archive"));
        assert!(
            o.status.success(),
            "import {} from a pipe: {}",
            archive.display(),
            stderr_of(&o)
        );
        volumes.push((from_pipe, stdout_of(&o)));
    }
    for (name, summary) in &volumes {
        // 5 files (a, exec, sparse, empty, d/sg/inner), d and d/sg, d/link and dangle,
        // a2 linked to a, the FIFO.
        assert!(
            summary.starts_with("imported 5 files, 2 dirs, 2 symlinks, 1 hard link, 1 other (")
                && summary.ends_with(&format!(") into {name} (created)\n")),
            "{name}: {summary:?}"
        );
        let (_m, mnt) = mountpoint();
        d.mount(name, &mnt, false);
        assert_same_tree(&tree, &mnt);
        let acl = xattr::get(mnt.join("a"), "system.posix_acl_access").expect("getxattr");
        assert!(acl.is_some(), "{name}: the access ACL is lost");
        d.umount(&mnt);
    }
}

#[test]
fn import_into_an_existing_volume_is_all_or_nothing_and_keeps_the_old_content() {
    let (_t, tree, archives) = gnu_tar_archives();
    let plain = archives[0].to_str().expect("utf-8");
    let d = Daemon::start();
    // Empty and mounted: filled, and the mount shows it through the kernel at once.
    d.create("empty");
    let (_m, mnt) = mountpoint();
    d.mount("empty", &mnt, false);
    assert_eq!(fs::read_dir(&mnt).expect("readdir").count(), 0);
    let out = d.cli_ok(&["import", "empty", plain]);
    assert!(out.ends_with(") into empty\n"), "{out:?}");
    assert_same_tree(&tree, &mnt);
    d.umount(&mnt);
    assert_eq!(
        d.cli_ok(&["snapshot", "ls", "empty", "--format", "json"]),
        ""
    );

    // Not empty: refused without --replace, unchanged.
    d.create("full");
    let (_m2, mnt) = mountpoint();
    d.mount("full", &mnt, false);
    fs::write(mnt.join("old"), b"old content\n").expect("write");
    fs::create_dir(mnt.join("olddir")).expect("mkdir");
    let o = d.cli(&["import", "full", plain]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains(
            "volume full is not empty: use --replace to swap its content for the archive's"
        ),
        "{}",
        stderr_of(&o)
    );
    // A failing replace changes nothing and keeps no snapshot.
    let o = d.cli(&[
        "import",
        "full",
        tree.join("a").to_str().expect("utf-8"),
        "--replace",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains("not a tar archive"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(fs::read(mnt.join("old")).expect("read"), b"old content\n");
    assert_eq!(
        d.cli_ok(&["snapshot", "ls", "full", "--format", "json"]),
        ""
    );

    // --replace swaps the content under the live mount and keeps the old as a snapshot.
    let out = d.cli_ok(&["import", "full", plain, "--replace"]);
    let kept = out
        .lines()
        .find_map(|l| l.strip_prefix("the previous content is snapshot full@"))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no kept snapshot in {out:?}"))
        .to_string();
    assert!(kept.starts_with("before-import-"), "{kept}");
    assert_same_tree(&tree, &mnt);
    assert_errno!(fs::metadata(mnt.join("old")), ENOENT);
    let (_m3, old) = mountpoint();
    d.mount(&format!("full@{kept}"), &old, false);
    assert_eq!(fs::read(old.join("old")).expect("read"), b"old content\n");
    assert!(old.join("olddir").is_dir());
    d.umount(&old);
    // The restore can be undone.
    d.umount(&mnt);
    d.cli_ok(&["rollback", &format!("full@{kept}")]);
    d.mount("full", &mnt, false);
    assert_eq!(fs::read(mnt.join("old")).expect("read"), b"old content\n");
    assert_errno!(fs::metadata(mnt.join("a")), ENOENT);
    d.umount(&mnt);
    assert_eq!(names(&d, &[]), vec!["empty", "full"]);

    // Not an archive, a missing file: refused before anything is created.
    let o = d.cli(&["import", "other", "/nonexistent/a.tar"]);
    assert!(
        stderr_of(&o).contains("cannot open the archive /nonexistent/a.tar"),
        "{}",
        stderr_of(&o)
    );
    let o = d.cli(&["import", "other", tree.join("a").to_str().expect("utf-8")]);
    assert!(
        stderr_of(&o).contains("not a tar archive"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(names(&d, &[]), vec!["empty", "full"]);
}

// ---------------------------------------------------------------------------------------------
// Hostile archives, made byte by byte
// ---------------------------------------------------------------------------------------------

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0w$o}\0", w = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

fn set_checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A ustar header (name and link up to 100 bytes), checksum set.
fn header(name: &[u8], kind: u8, size: u64, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], if kind == b'5' { 0o755 } else { 0o644 });
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    set_checksum(&mut h);
    h
}

/// One PAX record, its length counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len += 1;
    }
    [format!("{len} {key}=").as_bytes(), value, b"\n".as_slice()].concat()
}

/// A tar archive written block by block.
#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn raw(&mut self, h: [u8; 512], data: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&h);
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(header(name.as_bytes(), b'0', data.len() as u64, b""), data)
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(header(name.as_bytes(), b'5', 0, b""), b"")
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(header(name.as_bytes(), b'2', 0, target.as_bytes()), b"")
    }

    fn hard_link(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(header(name.as_bytes(), b'1', 0, target.as_bytes()), b"")
    }

    /// A PAX header with `body` as its records, as given.
    fn pax_raw(&mut self, body: &[u8]) -> &mut Self {
        self.raw(header(b"PaxHeaders/x", b'x', body.len() as u64, b""), body)
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let body: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        self.pax_raw(&body)
    }

    /// With the end-of-archive blocks.
    fn done(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.0);
        v.extend_from_slice(&[0u8; 1024]);
        v
    }
}

/// A directory outside every volume that a hostile archive aims at: it must stay empty.
fn marker() -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("volfs-hostile-")
        .tempdir_in("/tmp")
        .expect("marker dir");
    let path = dir.path().to_str().expect("utf-8").to_string();
    (dir, path)
}

/// Imports `archive` into a new volume, from a file and from a pipe: each must exit 1 with
/// every one of `says` in its message, create no volume, leave no key in the store, and
/// write nothing into `marker` (nor `marker/../escape`).
#[track_caller]
fn assert_hostile(archive: Vec<u8>, marker: Option<&Path>, says: &[&str]) {
    let mut d = Daemon::start();
    let dir = open_tempdir();
    let file = dir.path().join("hostile.tar");
    fs::write(&file, &archive).expect("write archive");
    let outputs = [
        (
            "file",
            d.cli(&["import", "hostile", file.to_str().expect("utf-8")]),
        ),
        ("pipe", import_from_pipe(&d, "hostile", archive)),
    ];
    for (how, o) in outputs {
        let err = stderr_of(&o);
        assert_eq!(
            o.status.code(),
            Some(1),
            "from a {how}: exit status {}, stderr {err}",
            o.status
        );
        for s in says {
            assert!(err.contains(s), "from a {how}: {s:?} missing from {err:?}");
        }
        assert!(
            err.contains("nothing was imported: volume hostile was not created"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            names(&d, &[]).is_empty(),
            "from a {how}: a volume is left: {:?}",
            names(&d, &[])
        );
    }
    if let Some(m) = marker {
        let left: Vec<_> = fs::read_dir(m).expect("marker").collect();
        assert!(left.is_empty(), "written outside the volume: {left:?}");
        assert!(
            !m.parent().expect("parent").join("escape").exists(),
            "written next to the marker"
        );
    }
    d.stop();
    assert_store_consistent(d.root());
}

#[test]
fn hostile_absolute_path_is_refused() {
    let (_m, m) = marker();
    let name = format!("{m}/escape");
    let a = Tar::default()
        .file("ok", b"fine")
        .file(&name, b"evil")
        .done();
    assert_hostile(
        a,
        Some(Path::new(&m)),
        &[
            &format!("archive entry \"{name}\""),
            "absolute path (archive entries must be relative to the volume)",
        ],
    );
}

#[test]
fn hostile_dotdot_component_is_refused() {
    let (_m, m) = marker();
    let name = format!("{}{}/escape", "../".repeat(8), &m[1..]);
    let a = Tar::default()
        .file("ok", b"fine")
        .file(&name, b"evil")
        .done();
    assert_hostile(
        a,
        Some(Path::new(&m)),
        &[&format!(
            "archive entry \"{name}\": path leaves the volume (\"..\")"
        )],
    );
}

#[test]
fn hostile_entry_through_a_symlink_is_refused() {
    let (_m, m) = marker();
    let a = Tar::default()
        .symlink("a", &m)
        .file("a/escape", b"evil")
        .done();
    assert_hostile(
        a,
        Some(Path::new(&m)),
        &["archive entry \"a/escape\": its path goes through the symlink \"a\""],
    );
    // A directory entry through a symlink, deeper.
    let a = Tar::default()
        .dir("d")
        .symlink("d/up", "../..")
        .dir("d/up/x")
        .done();
    assert_hostile(
        a,
        None,
        &["archive entry \"d/up/x\": its path goes through the symlink \"d/up\""],
    );
}

#[test]
fn hostile_hard_link_to_a_target_outside_the_archive_is_refused() {
    let a = Tar::default()
        .file("a", b"x")
        .hard_link("h", "etc/passwd")
        .done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"h\": hard link to \"etc/passwd\", which is not an earlier entry of the archive",
        ],
    );
    let a = Tar::default().hard_link("h", "/etc/passwd").done();
    assert_hostile(
        a,
        None,
        &["archive entry \"h\": hard link target \"/etc/passwd\": absolute path"],
    );
}

#[test]
fn hostile_hard_link_to_dotdot_is_refused() {
    let a = Tar::default().file("x", b"x").hard_link("h", "../x").done();
    assert_hostile(
        a,
        None,
        &["archive entry \"h\": hard link target \"../x\": path leaves the volume (\"..\")"],
    );
}

#[test]
fn hostile_duplicate_file_entry_is_refused() {
    let a = Tar::default()
        .file("a", b"first")
        .file("./a", b"second")
        .done();
    assert_hostile(
        a,
        None,
        &["archive entry \"./a\": duplicate entry: an earlier entry has the same path"],
    );
}

#[test]
fn hostile_file_then_directory_of_the_same_name_is_refused() {
    let a = Tar::default().file("a", b"file").dir("a/").done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"a/\": conflicting entry: a directory where an earlier entry made a file",
        ],
    );
}

#[test]
fn hostile_archive_cut_in_a_files_data_is_refused() {
    let mut a = Tar::default()
        .file("small", b"x")
        .file("big", &pat(100_000, 7))
        .done();
    a.truncate(1024 + 512 + 50_000);
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"big\": the archive ends after 50000 of its 100000 bytes of data (truncated?)",
        ],
    );
}

#[test]
fn hostile_archive_cut_in_a_header_is_refused() {
    let mut a = Tar::default().file("a", b"x").file("second", b"y").done();
    a.truncate(1024 + 300);
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"second\" (header at byte 1024): the archive ends inside a header, after 300 of its 512 bytes (truncated?)",
        ],
    );
    // Cut at a block boundary, after a whole entry: no end-of-archive block.
    let mut a = Tar::default().file("a", b"x").file("b", b"y").done();
    a.truncate(2048);
    assert_hostile(
        a,
        None,
        &["the archive ends without its end-of-archive block (truncated?)"],
    );
}

#[test]
fn hostile_bad_header_checksum_is_refused() {
    let mut h = header(b"b", b'0', 1, b"");
    h[148..156].copy_from_slice(b"0000001\0");
    let a = Tar::default().file("a", b"x").raw(h, b"y").done();
    assert_hostile(
        a,
        None,
        &["archive entry \"b\" (header at byte 1024): bad header checksum"],
    );
}

#[test]
fn hostile_absurd_size_field_is_refused() {
    // 2^62 in base-256: high bit set, then the value big-endian.
    let mut h = header(b"huge", b'0', 0, b"");
    h[124..136].fill(0);
    h[124] = 0x80;
    h[128] = 0x40;
    set_checksum(&mut h);
    let a = Tar::default().raw(h, b"not that much").done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"huge\" (header at byte 0): its size 4611686018427387904 is more than the volume can hold",
        ],
    );
}

#[test]
fn hostile_absurd_pax_size_is_refused() {
    let a = Tar::default()
        .pax(&[("size", b"9223372036854775808")])
        .file("huge", b"x")
        .done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"huge\" (header at byte 0): its size 9223372036854775808 is absurd (beyond 2^63 - 1 bytes)",
        ],
    );
    let a = Tar::default()
        .pax(&[("size", b"99999999999999999999999")])
        .file("huger", b"x")
        .done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"huger\" (header at byte 0): its PAX size record '99999999999999999999999' is not a size, or is absurd",
        ],
    );
    // A sparse file whose real size is absurd.
    let a = Tar::default()
        .pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"sparse"),
            ("GNU.sparse.realsize", b"9223372036854775808"),
        ])
        .file("GNUSparseFile.0/sparse", b"0\n")
        .done();
    assert_hostile(
        a,
        None,
        &["archive entry \"sparse\": its sparse real size 9223372036854775808 is absurd"],
    );
}

#[test]
fn hostile_name_component_of_256_bytes_is_refused() {
    let long = "n".repeat(256);
    let path = format!("d/{long}");
    let a = Tar::default()
        .pax(&[("path", path.as_bytes())])
        .file("placeholder", b"x")
        .done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"d/nnnn",
            &format!("name \"{long}\" of 256 bytes is too long (NAME_MAX is 255 bytes)"),
        ],
    );
}

#[test]
fn hostile_path_of_5000_bytes_is_refused() {
    let path = format!("{}/", "p".repeat(99)).repeat(50);
    assert_eq!(path.len(), 5000);
    let a = Tar::default()
        .pax(&[("path", path.as_bytes())])
        .file("placeholder", b"x")
        .done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"pppp",
            "[5000 bytes in all]",
            "path of 5000 bytes is too long (PATH_MAX is 4096 bytes, NUL included)",
        ],
    );
}

#[test]
fn hostile_pax_record_whose_length_lies_is_refused() {
    let a = Tar::default()
        .pax_raw(b"999 path=evil\n")
        .file("innocent", b"x")
        .done();
    assert_hostile(
        a,
        None,
        &[
            "(header at byte 0): its PAX header: a PAX record's length 999 runs past the end of its header (14 bytes left)",
        ],
    );
}

#[test]
fn hostile_pax_header_over_one_mib_is_refused_before_it_is_read() {
    let mut h = header(b"PaxHeaders/x", b'x', 0, b"");
    octal(&mut h[124..136], 1 << 30);
    set_checksum(&mut h);
    let a = Tar::default().raw(h, b"").file("innocent", b"x").done();
    assert_hostile(
        a,
        None,
        &[
            "archive entry \"PaxHeaders/x\" (header at byte 0): its PAX header claims 1073741824 bytes (at most 1048576 are accepted)",
        ],
    );
}

#[test]
fn a_refusal_is_answered_before_the_rest_of_a_large_archive_is_sent() {
    // The first entry is refused; 64 MiB of data follow that the daemon never reads.
    let mut a = Tar::default();
    a.file("../first", b"evil");
    a.file("big", &vec![7u8; 64 << 20]);
    let archive = a.done();
    let d = Daemon::start();
    let t0 = std::time::Instant::now();
    let o = import_from_pipe(&d, "early", archive);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("archive entry \"../first\": path leaves the volume"),
        "{}",
        stderr_of(&o)
    );
    assert!(names(&d, &[]).is_empty());
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}
