//! The volume lifecycle through the real CLI, daemon and kernel: create (names, labels,
//! options, anonymous volumes, idempotence, races), ls filters and formats, inspect, the
//! quota, owner and mode of the root, read-only volumes, rm (refusal, --force, races with
//! mounts, crashes half-way), prune, df, version, info and the socket's group.
//! Every refused input must exit 1 with a message naming the problem and change nothing;
//! every removal must leave no key of the volume in the store.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use serde_json::Value;
use tempfile::TempDir;
use volfs::store::{self, Store, VolumeRecord};

use crate::util::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A fresh mount point directory (kept alive by the returned TempDir) and its canonical path.
pub(crate) fn mountpoint() -> (TempDir, PathBuf) {
    let dir = open_tempdir();
    let p = fs::canonicalize(dir.path()).expect("canonicalize");
    (dir, p)
}

/// `volfs ARGS` must exit 1 with `says` in its message, and change no volume.
#[track_caller]
fn assert_refused(d: &Daemon, args: &[&str], says: &str) {
    let before = d.cli_ok(&["ls"]);
    let o = d.cli(args);
    let err = stderr_of(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "volfs {args:?}: exit status {}, expected 1; stderr: {err}",
        o.status
    );
    assert!(
        err.contains(says),
        "volfs {args:?}: the message lacks {says:?}: {err:?}"
    );
    assert!(!err.contains("panicked"), "volfs {args:?} panicked: {err}");
    assert_eq!(
        d.cli_ok(&["ls"]),
        before,
        "volfs {args:?} was refused but changed the volume list"
    );
}

/// Names listed by `volfs ls -q` with these filters.
#[track_caller]
pub(crate) fn names(d: &Daemon, filters: &[&str]) -> Vec<String> {
    let mut args = vec!["ls", "-q"];
    for f in filters {
        args.extend(["--filter", f]);
    }
    d.cli_ok(&args).lines().map(str::to_string).collect()
}

/// The one object of `volfs inspect NAME`.
#[track_caller]
fn inspect(d: &Daemon, name: &str) -> Value {
    let out = d.cli_ok(&["inspect", name]);
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect {name}: {e}: {out}"));
    let arr = v.as_array().expect("inspect prints an array");
    assert_eq!(arr.len(), 1, "{out}");
    arr[0].clone()
}

/// `Usage.Bytes` of a volume, once it equals `want` (the kernel releases files
/// asynchronously after close, so an unlinked file may be freed a moment later).
#[track_caller]
fn wait_usage_bytes(d: &Daemon, name: &str, want: u64) {
    let t0 = Instant::now();
    loop {
        let got = inspect(d, name)["Usage"]["Bytes"].as_u64();
        if got == Some(want) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{name}: Usage.Bytes is {got:?}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds since the epoch of an RFC 3339 time, as GNU date reads it.
fn epoch_of(rfc3339: &str) -> i64 {
    let o = Command::new("date")
        .args(["-u", "-d", rfc3339, "+%s"])
        .output()
        .expect("run date");
    assert!(o.status.success(), "date cannot read {rfc3339:?}");
    stdout_of(&o).trim().parse().expect("epoch seconds")
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Bytes allocated on disk under `p`.
fn du(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += du(&e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// Writes `data` at the end of `p` (created if missing), fsyncs and closes it, reporting
/// which step failed: with the writeback cache, an error may surface at any of them.
fn append_fsync_close(p: &Path, data: &[u8]) -> Result<(), (&'static str, Errno)> {
    let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(0));
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(p)
        .map_err(|e| ("open", errno(e)))?;
    f.write_all(data).map_err(|e| ("write", errno(e)))?;
    f.sync_all().map_err(|e| ("fsync", errno(e)))?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    nix::unistd::close(fd).map_err(|e| ("close", e))
}

/// Opens the store of a stopped daemon and checks that the lifecycle left it whole: every
/// key of the `fs` tree belongs to a volume a name reaches, every such volume has its root,
/// and no removal is pending.
#[track_caller]
pub(crate) fn assert_store_consistent(root: &Path) {
    let store = Store::open(root).expect("open the stopped daemon's store");
    let mut ids = HashSet::new();
    for item in store.volumes.iter() {
        let (k, v) = item.expect("read a volume record");
        let rec = VolumeRecord::decode(&v).expect("volume record");
        assert!(ids.insert(rec.id), "two names share volume id {}", rec.id);
        assert!(
            store
                .fs
                .get(store::inode_key(rec.id, store::ROOT_INO))
                .expect("read root")
                .is_some(),
            "volume {} has no root directory",
            String::from_utf8_lossy(&k)
        );
    }
    let mut stray: BTreeMap<u64, usize> = BTreeMap::new();
    for k in store.fs.iter().keys() {
        let k = k.expect("read a key");
        let vol = u64::from_be_bytes(k[..8].try_into().expect("8-byte volume prefix"));
        if !ids.contains(&vol) {
            *stray.entry(vol).or_default() += 1;
        }
    }
    assert!(
        stray.is_empty(),
        "keys of volumes no name reaches (id: count): {stray:?}"
    );
    assert_eq!(
        store.doomed().expect("doomed"),
        vec![],
        "a removal is still pending"
    );
}

/// One request on the control socket, answered as JSON.
fn raw_request(socket: &Path, line: &str) -> Value {
    let s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    (&s).write_all(line.as_bytes()).expect("send");
    (&s).write_all(b"\n").expect("send");
    let mut answer = String::new();
    (&s).read_to_string(&mut answer).expect("answer");
    serde_json::from_str(answer.trim()).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// A `volfs-mountd` started with extra arguments and environment (the `Daemon` helper has
/// neither); killed on drop.
struct CustomDaemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl CustomDaemon {
    /// Starts it and waits until it answers, or returns its log if it exited first.
    fn start(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<CustomDaemon, String> {
        let dir = open_tempdir();
        let socket = dir.path().join("volfs.sock");
        let log = dir.path().join("daemon.log");
        let logf = File::create(&log).expect("log");
        let child = Command::new(MOUNTD)
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(&socket)
            .arg("--no-plugin")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("spawn volfs-mountd");
        let mut d = CustomDaemon {
            child,
            socket,
            log,
            _dir: dir,
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = d.child.try_wait().expect("wait") {
                return Err(format!("exited with {st}: {}", d.log()));
            }
            if d.cli(&["ls"]).status.success() {
                return Ok(d);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "volfs-mountd not ready: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(VOLFS)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("VOLFS_SOCKET")
            .stdin(Stdio::null())
            .output()
            .expect("run volfs")
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the daemon to die (it kills itself at a failpoint).
    #[track_caller]
    fn wait_dead(&mut self) {
        let t0 = Instant::now();
        while self.child.try_wait().expect("wait").is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the daemon did not die at its failpoint: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CustomDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// create: validation, anonymous volumes, idempotence
// ---------------------------------------------------------------------------------------------

#[test]
fn refused_input_exits_1_names_the_problem_and_changes_nothing() {
    let d = Daemon::start();
    d.cli_ok(&["create", "keep", "--label", "team=a", "-o", "size=1G"]);
    let long_key = format!("{}=v", "k".repeat(256));
    let cases: &[(&[&str], &str)] = &[
        (&["create", "--", "-x"], "[a-zA-Z0-9][a-zA-Z0-9_.-]+"),
        (&["create", "a"], "invalid volume name \"a\""),
        (&["create", "../up"], "invalid volume name \"../up\""),
        (
            &["create", "v1", "--opt", "colour=red"],
            "unknown option \"colour\" (known options: readonly=true|false, size=BYTES",
        ),
        (
            &["create", "v1", "-o", "Size=1G"],
            "unknown option \"Size\"",
        ),
        (
            &["create", "v1", "-o", "readonly=yes"],
            "option readonly=\"yes\": expected true or false",
        ),
        (
            &["create", "v1", "-o", "size=0"],
            "option size=0: a quota must be at least 1 byte",
        ),
        (
            &["create", "v1", "-o", "size=10X"],
            "invalid size \"10X\": unknown unit \"X\"",
        ),
        (
            &["create", "v1", "-o", "size="],
            "invalid size \"\": no number",
        ),
        (&["create", "v1", "-o", "size=99999999T"], "too large"),
        (
            &["create", "v1", "-o", "uid=-1"],
            "option uid=\"-1\": expected a number",
        ),
        (
            &["create", "v1", "-o", "gid=abc"],
            "option gid=\"abc\": expected a number",
        ),
        (
            &["create", "v1", "-o", "uid=4294967295"],
            "from 0 to 4294967294",
        ),
        (
            &["create", "v1", "-o", "mode=0888"],
            "option mode=\"0888\": expected octal",
        ),
        (
            &["create", "v1", "-o", "mode=17777"],
            "option mode=\"17777\": expected octal",
        ),
        (
            &["create", "v1", "-o", "size=1G", "-o", "size=2G"],
            "option \"size\" is given twice",
        ),
        (
            &["create", "v1", "-o", "size"],
            "option \"size\" is not KEY=VALUE",
        ),
        (
            &["create", "v1", "--label", "team"],
            "label \"team\" is not KEY=VALUE",
        ),
        (
            &["create", "v1", "--label", "=x"],
            "label \"=x\" has an empty key",
        ),
        (
            &["create", "v1", "--label", "a\u{7}=x"],
            "contains a control character",
        ),
        (
            &["create", "v1", "--label", &long_key],
            "is longer than 255 bytes",
        ),
        (
            &["create", "keep", "--label", "team=b", "-o", "size=1G"],
            "volume keep already exists with other labels or options: \
             label team: the volume has \"a\", not \"b\"",
        ),
        (
            &["create", "keep", "--label", "team=a"],
            "option size: the volume has \"1G\", this create none",
        ),
        (
            &["ls", "--filter", "colour=red"],
            "unknown filter \"colour\" (known: label=KEY",
        ),
        (
            &["ls", "--filter", "dangling=maybe"],
            "dangling is true or false, not \"maybe\"",
        ),
        (&["ls", "--filter", "label="], "the label key is empty"),
        (
            &["ls", "--filter", "nofilter"],
            "filter \"nofilter\" is not KEY=VALUE",
        ),
        (&["ls", "--format", "yaml"], "invalid value 'yaml'"),
        (&["df", "--format", "xml"], "invalid value 'xml'"),
        (&["rm", "nosuch"], "no such volume: nosuch"),
        (&["rm", "--force", "nosuch"], "no such volume: nosuch"),
        (&["inspect", "nosuch"], "no such volume: nosuch"),
        (&["inspect"], "required"),
        (&["rm"], "required"),
        (
            &["prune", "--everything"],
            "unexpected argument '--everything'",
        ),
    ];
    for (args, says) in cases {
        assert_refused(&d, args, says);
    }
    // The daemon checks requests itself, whatever the client.
    for (line, says) in [
        (
            r#"{"op":"create","name":"v1","options":{"colour":"red"}}"#,
            "unknown option \"colour\"",
        ),
        (
            r#"{"op":"create","name":"v1","labels":{"":"x"}}"#,
            "a label key is empty",
        ),
        (r#"{"op":"create","name":"a/b"}"#, "invalid volume name"),
        (r#"{"op":"rm","name":"../x"}"#, "invalid volume name"),
        (
            r#"{"op":"inspect","name":"x"}"#,
            "invalid volume name \"x\"",
        ),
        (
            r#"{"op":"ls","filters":{"labels":["a"]}}"#,
            "unknown field `labels`",
        ),
        (r#"{"op":"prune","al":true}"#, "unknown field `al`"),
    ] {
        let before = d.cli_ok(&["ls"]);
        let v = raw_request(d.socket(), line);
        assert_eq!(v["ok"], Value::Bool(false), "{line}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{line}: {msg:?} lacks {says:?}");
        assert_eq!(d.cli_ok(&["ls"]), before, "{line} changed the volume list");
    }
    assert_eq!(names(&d, &[]), vec!["keep"]);
}

#[test]
fn anonymous_volumes_get_64_hex_digit_names_each_new() {
    let d = Daemon::start();
    let a = d.cli_ok(&["create"]).trim().to_string();
    let b = d.cli_ok(&["create", "--label", "k=v"]).trim().to_string();
    for n in [&a, &b] {
        assert_eq!(n.len(), 64, "{n:?}");
        assert!(
            n.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            "{n:?}"
        );
    }
    assert_ne!(a, b);
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(names(&d, &[]), want);
    assert_eq!(inspect(&d, &b)["Labels"], serde_json::json!({"k": "v"}));
    // An anonymous volume works like any other.
    let (_m, mnt) = mountpoint();
    d.mount(&a, &mnt, false);
    fs::write(mnt.join("f"), b"anon").unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"anon");
}

#[test]
fn recreating_with_the_same_labels_and_options_is_a_no_op_and_other_ones_say_what_differs() {
    let d = Daemon::start();
    let args = [
        "create",
        "data",
        "--label",
        "team=a",
        "--label",
        "tier=",
        "-o",
        "size=1G",
        "-o",
        "mode=0750",
    ];
    assert_eq!(d.cli_ok(&args), "data\n");
    let first = inspect(&d, "data");
    let (_m, mnt) = mountpoint();
    d.mount("data", &mnt, false);
    fs::write(mnt.join("kept"), b"precious").unwrap();
    // The same, in another order and spelling of the same size.
    assert_eq!(
        d.cli_ok(&[
            "create",
            "-o",
            "mode=750",
            "--label",
            "tier=",
            "-o",
            "size=1024M",
            "data",
            "--label",
            "team=a"
        ]),
        "data\n"
    );
    assert_refused(
        &d,
        &[
            "create",
            "data",
            "--label",
            "team=b",
            "--label",
            "tier=",
            "-o",
            "size=2G",
            "-o",
            "mode=0750",
        ],
        "volume data already exists with other labels or options: \
         label team: the volume has \"a\", not \"b\"; \
         option size: the volume has \"1G\", not \"2G\" \
         (create it with the same ones, or remove it first with `volfs rm data`)",
    );
    assert_refused(
        &d,
        &["create", "data"],
        "label team: the volume has \"a\", this create none; \
         label tier: the volume has \"\", this create none; \
         option mode: the volume has \"0750\", this create none; \
         option size: the volume has \"1G\", this create none",
    );
    assert_refused(
        &d,
        &[
            "create",
            "data",
            "--label",
            "team=a",
            "--label",
            "tier=",
            "--label",
            "new=1",
            "-o",
            "size=1G",
            "-o",
            "mode=0750",
            "-o",
            "readonly=true",
        ],
        "label new: the volume has none, this create \"1\"; \
         option readonly: the volume has none, this create \"true\"",
    );
    let now = inspect(&d, "data");
    assert_eq!(now["Labels"], first["Labels"]);
    assert_eq!(now["Options"], first["Options"]);
    assert_eq!(now["CreatedAt"], first["CreatedAt"]);
    assert_eq!(fs::read(mnt.join("kept")).unwrap(), b"precious");
    assert_eq!(names(&d, &[]), vec!["data"]);
}

#[test]
fn concurrent_creates_of_one_name_make_one_volume() {
    let mut d = Daemon::start();
    let run = |d: &Daemon, name: &str, sizes: [&str; 8]| -> Vec<Output> {
        let barrier = Arc::new(Barrier::new(8));
        std::thread::scope(|s| {
            let handles: Vec<_> = sizes
                .iter()
                .map(|size| {
                    let barrier = barrier.clone();
                    let opt = format!("size={size}");
                    s.spawn(move || {
                        barrier.wait();
                        d.cli(&["create", name, "--label", "k=v", "-o", &opt])
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        })
    };
    // The same options: every create succeeds and names the one volume.
    for o in run(&d, "shared", ["1G"; 8]) {
        assert!(o.status.success(), "create failed: {}", stderr_of(&o));
        assert_eq!(stdout_of(&o), "shared\n");
    }
    assert_eq!(names(&d, &[]), vec!["shared"]);
    // Different options: the first create wins, the others with its options succeed, and
    // the rest are told what differs.
    let sizes = ["1G", "2G", "1G", "2G", "1G", "2G", "1G", "2G"];
    let outs = run(&d, "mixed", sizes);
    let winner = inspect(&d, "mixed")["Options"]["size"]
        .as_str()
        .expect("size option")
        .to_string();
    for (size, o) in sizes.iter().zip(&outs) {
        if *size == winner {
            assert!(o.status.success(), "size={size}: {}", stderr_of(o));
            assert_eq!(stdout_of(o), "mixed\n");
        } else {
            assert_eq!(o.status.code(), Some(1));
            assert!(
                stderr_of(o).contains(&format!(
                    "option size: the volume has \"{winner}\", not \"{size}\""
                )),
                "{}",
                stderr_of(o)
            );
        }
    }
    assert_eq!(names(&d, &[]), vec!["mixed", "shared"]);
    let (_m, mnt) = mountpoint();
    d.mount("mixed", &mnt, false);
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
    d.umount(&mnt);
    d.stop();
    // The losers' volumes were purged: nothing of them is left in the store.
    assert_store_consistent(d.root());
}

// ---------------------------------------------------------------------------------------------
// ls, inspect
// ---------------------------------------------------------------------------------------------

#[test]
fn ls_filters_by_label_dangling_and_name_and_several_filters_and() {
    let d = Daemon::start();
    d.cli_ok(&[
        "create", "web-data", "--label", "team=a", "--label", "env=prod",
    ]);
    d.cli_ok(&["create", "web-cache", "--label", "team=a"]);
    d.cli_ok(&["create", "db", "--label", "team=b"]);
    d.cli_ok(&["create", "plain"]);
    let (_m, mnt) = mountpoint();
    d.mount("web-data", &mnt, false);
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &["db", "plain", "web-cache", "web-data"]),
        (&["label=team"], &["db", "web-cache", "web-data"]),
        (&["label=team=a"], &["web-cache", "web-data"]),
        (&["label=env=prod"], &["web-data"]),
        (&["label=env=dev"], &[]),
        (&["label=nolabel"], &[]),
        (&["dangling=true"], &["db", "plain", "web-cache"]),
        (&["dangling=false"], &["web-data"]),
        (&["name=web"], &["web-cache", "web-data"]),
        (&["name=cache"], &["web-cache"]),
        (&["name=zzz"], &[]),
        (&["label=team=a", "dangling=true"], &["web-cache"]),
        (&["name=web", "label=env"], &["web-data"]),
        (&["label=team", "label=env"], &["web-data"]),
        (&["name=db", "label=team=a"], &[]),
        (&["name=web", "name=data"], &["web-data"]),
    ];
    for (filters, want) in cases {
        assert_eq!(names(&d, filters), *want, "filters {filters:?}");
    }
    let table = d.cli_ok(&["ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(
        lines[0].starts_with("VOLUME NAME") && lines[0].ends_with("MOUNTPOINTS"),
        "{table}"
    );
    assert_eq!(
        lines[4].split_whitespace().collect::<Vec<_>>(),
        vec!["web-data", mnt.to_str().unwrap()],
        "{table}"
    );
    let filtered = d.cli_ok(&["ls", "--filter", "label=team=b"]);
    assert_eq!(filtered.lines().count(), 2, "{filtered}");
    assert!(
        filtered.lines().nth(1).unwrap().starts_with("db "),
        "{filtered}"
    );
}

/// The keys of every Docker-style volume object.
const VOLUME_FIELDS: [&str; 8] = [
    "CreatedAt",
    "Driver",
    "Labels",
    "Mountpoints",
    "Name",
    "Options",
    "Scope",
    "Usage",
];

#[track_caller]
fn assert_docker_fields(v: &Value, name: &str, mnt: &Path) {
    let keys: Vec<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, VOLUME_FIELDS, "{v}");
    assert_eq!(v["Name"], name);
    assert_eq!(v["Driver"], "volfs");
    assert_eq!(v["Scope"], "local");
    assert_eq!(v["Labels"], serde_json::json!({"team": "a", "empty": ""}));
    assert_eq!(
        v["Options"],
        serde_json::json!({"size": "1M", "readonly": "false", "mode": "0777"})
    );
    assert_eq!(
        v["Mountpoints"],
        serde_json::json!([{"Path": mnt.to_str().unwrap(), "ReadOnly": false}])
    );
    let created = v["CreatedAt"].as_str().expect("CreatedAt is a string");
    assert_eq!(created.len(), 20, "{created}");
    assert!(
        created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );
    let age = now_secs() - epoch_of(created);
    assert!((0..60).contains(&age), "CreatedAt {created} is {age} s old");
}

#[test]
fn ls_json_and_inspect_show_dockers_fields() {
    let d = Daemon::start();
    d.cli_ok(&[
        "create",
        "jv",
        "--label",
        "team=a",
        "--label",
        "empty=",
        "-o",
        "size=1M",
        "-o",
        "readonly=false",
        "-o",
        "mode=0777",
    ]);
    d.create("other");
    let (_m, mnt) = mountpoint();
    d.mount("jv", &mnt, false);
    let data = pat(5000, 1);
    let mut f = File::create(mnt.join("f")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::create_dir(mnt.join("dir")).unwrap();
    std::os::unix::fs::symlink("f", mnt.join("link")).unwrap();

    let json = d.cli_ok(&["ls", "--format", "json"]);
    let objs: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(objs.len(), 2, "{json}");
    assert_docker_fields(&objs[0], "jv", &mnt);
    assert_eq!(objs[0]["Usage"], Value::Null, "ls does not measure");
    assert_eq!(objs[1]["Name"], "other");
    assert_eq!(objs[1]["Labels"], serde_json::json!({}));
    assert_eq!(objs[1]["Mountpoints"], serde_json::json!([]));

    let v = inspect(&d, "jv");
    assert_docker_fields(&v, "jv", &mnt);
    assert_eq!(
        v["Usage"],
        serde_json::json!({"Bytes": 5001, "Inodes": 4, "LimitBytes": 1048576}),
        "5000 bytes of data and a 1-byte symlink target; root, file, dir, link"
    );
    assert_eq!(
        inspect(&d, "other")["Usage"],
        serde_json::json!({"Bytes": 0, "Inodes": 1, "LimitBytes": null})
    );
    // Measured without the volume being open, the numbers are the same.
    d.umount(&mnt);
    assert_eq!(inspect(&d, "jv")["Usage"], v["Usage"]);
    assert_eq!(inspect(&d, "jv")["Mountpoints"], serde_json::json!([]));

    // Several names: the found ones are printed, each missing one reported, exit 1.
    let o = d.cli(&["inspect", "jv", "nosuch", "other"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr_of(&o), "volfs: no such volume: nosuch\n");
    let arr: Value = serde_json::from_str(&stdout_of(&o)).expect("an array");
    let found: Vec<&str> = arr
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap())
        .collect();
    assert_eq!(found, vec!["jv", "other"]);
    let o = d.cli(&["inspect", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout_of(&o).trim(), "[]");
}

// ---------------------------------------------------------------------------------------------
// options at work: quota, owner and mode, read-only
// ---------------------------------------------------------------------------------------------

#[test]
fn quota_write_past_size_is_enospc_statvfs_shows_the_limit_and_deleting_frees_it() {
    let d = Daemon::start();
    d.cli_ok(&["create", "qv", "-o", "size=1M"]);
    let (_m, mnt) = mountpoint();
    d.mount("qv", &mnt, false);
    let limit = MIB as u64;
    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert_eq!(st.blocks() * st.fragment_size(), limit);
    assert_eq!(st.blocks_available() * st.fragment_size(), limit);
    assert_eq!(st.blocks_free() * st.fragment_size(), limit);
    // `df` inside the mount shows the limit as the size.
    let df = Command::new("df")
        .args(["-B1", "--output=size,avail"])
        .arg(&mnt)
        .output()
        .expect("df");
    let df_out = stdout_of(&df);
    assert_eq!(
        df_out
            .lines()
            .nth(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["1048576", "1048576"]),
        "{df_out}"
    );

    // Exactly the limit fits.
    let a = mnt.join("a");
    let data = pat(MIB, 2);
    append_fsync_close(&a, &data[..300 * KIB]).expect("first part");
    append_fsync_close(&a, &data[300 * KIB..]).expect("up to the limit");
    wait_usage_bytes(&d, "qv", limit);
    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert_eq!(st.blocks() * st.fragment_size(), limit);
    assert_eq!((st.blocks_available(), st.blocks_free()), (0, 0));

    // One byte more is ENOSPC; so are new names on the full volume.
    let (step, e) = append_fsync_close(&a, b"x").expect_err("a byte past the quota was stored");
    assert_eq!(e, Errno::ENOSPC, "{step} failed with {e}, expected ENOSPC");
    assert_errno!(File::create(mnt.join("b")), ENOSPC);
    assert_errno!(fs::create_dir(mnt.join("dir")), ENOSPC);
    assert_errno!(std::os::unix::fs::symlink("t", mnt.join("l")), ENOSPC);
    assert_eq!(inspect(&d, "qv")["Usage"]["Bytes"], limit);
    // What was stored is exactly the first MiB, read through a fresh mount.
    d.umount(&mnt);
    d.mount("qv", &mnt, false);
    assert_eq!(fs::read(&a).unwrap(), data, "the file after ENOSPC");

    // Deleting frees the quota.
    fs::remove_file(&a).unwrap();
    wait_usage_bytes(&d, "qv", 0);
    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert_eq!(st.blocks_available() * st.fragment_size(), limit);
    append_fsync_close(&mnt.join("again"), &data).expect("a full MiB after deleting");
    assert_eq!(fs::read(mnt.join("again")).unwrap(), data);
    // df of the CLI shows the limit.
    let df = d.cli_ok(&["df"]);
    let row: Vec<&str> = df
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    assert_eq!(row, vec!["qv", "1", "1MiB", "2", "1MiB"], "{df}");
}

#[test]
fn uid_gid_and_mode_options_set_the_root_so_that_user_can_write_it() {
    let d = Daemon::start();
    d.cli_ok(&[
        "create",
        "own",
        "-o",
        "uid=4321",
        "-o",
        "gid=4322",
        "-o",
        "mode=0750",
    ]);
    d.cli_ok(&["create", "dflt"]);
    let (_m, mnt) = mountpoint();
    d.mount("own", &mnt, false);
    let m = fs::metadata(&mnt).unwrap();
    assert!(m.is_dir());
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4321, 4322, 0o750));
    let wrote: (u32, u32) = run_as(4321, 4322, || {
        let p = mnt.join("mine");
        fs::write(&p, b"by the owner").expect("the owner writes the root");
        assert_eq!(fs::read(&p).expect("read back"), b"by the owner");
        let m = fs::metadata(&p).expect("stat");
        (m.uid(), m.gid())
    });
    assert_eq!(wrote, (4321, 4322));
    // The group may look but not write; others may not even look.
    let group: (usize, i32) = run_as(5000, 4322, || {
        let n = fs::read_dir(&mnt).expect("group lists").count();
        let e = fs::write(mnt.join("g"), b"x").expect_err("group wrote");
        (n, e.raw_os_error().unwrap_or(0))
    });
    assert_eq!(group, (1, libc::EACCES));
    let other: i32 = run_as(5000, 5000, || {
        fs::read_dir(&mnt)
            .expect_err("others listed")
            .raw_os_error()
            .unwrap_or(0)
    });
    assert_eq!(other, libc::EACCES);
    // Without options the root is root's, 0755.
    let (_m2, mnt2) = mountpoint();
    d.mount("dflt", &mnt2, false);
    let m = fs::metadata(&mnt2).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755));
}

#[test]
fn readonly_volume_is_read_only_at_every_mount() {
    let d = Daemon::start();
    d.cli_ok(&["create", "rov", "-o", "readonly=true"]);
    let (_m1, m1) = mountpoint();
    let (_m2, m2) = mountpoint();
    d.mount("rov", &m1, false);
    d.mount("rov", &m2, true);
    for m in [&m1, &m2] {
        assert_errno!(File::create(m.join("f")), EROFS);
        assert_errno!(fs::create_dir(m.join("d")), EROFS);
        assert_errno!(
            nix::sys::stat::fchmodat(
                None,
                m.as_path(),
                nix::sys::stat::Mode::from_bits_truncate(0o700),
                nix::sys::stat::FchmodatFlags::FollowSymlink
            ),
            EROFS
        );
        let st = nix::sys::statvfs::statvfs(m.as_path()).unwrap();
        assert!(
            st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
            "{} is not mounted ro",
            m.display()
        );
    }
    let mut sorted = [m1.to_str().unwrap(), m2.to_str().unwrap()];
    sorted.sort();
    assert_eq!(
        inspect(&d, "rov")["Mountpoints"],
        serde_json::json!([
            {"Path": sorted[0], "ReadOnly": true},
            {"Path": sorted[1], "ReadOnly": true},
        ])
    );
    assert!(d.cli_ok(&["ls"]).contains(" (ro)"));
}

// ---------------------------------------------------------------------------------------------
// rm, prune
// ---------------------------------------------------------------------------------------------

#[test]
fn rm_of_a_mounted_volume_is_refused_listing_its_mountpoints_and_force_unmounts_first() {
    let d = Daemon::start();
    d.create("busy");
    let (_m1, m1) = mountpoint();
    let (_m2, m2) = mountpoint();
    d.mount("busy", &m1, false);
    d.mount("busy", &m2, true);
    fs::write(m1.join("f"), b"data").unwrap();
    let mut sorted = [m1.clone(), m2.clone()];
    sorted.sort();
    assert_refused(
        &d,
        &["rm", "busy"],
        &format!(
            "volume busy is in use: mounted at {}, {}; unmount it first (`volfs umount PATH`) \
             or use `volfs rm --force busy`",
            sorted[0].display(),
            sorted[1].display()
        ),
    );
    assert!(is_mounted(&m1) && is_mounted(&m2));
    assert_eq!(fs::read(m1.join("f")).unwrap(), b"data");
    assert_eq!(d.cli_ok(&["rm", "--force", "busy"]), "busy\n");
    assert!(!is_mounted(&m1) && !is_mounted(&m2));
    assert_eq!(names(&d, &[]), Vec::<String>::new());
    assert_refused(&d, &["rm", "-f", "busy"], "no such volume: busy");
    assert_refused(
        &d,
        &["mount", "busy", m1.to_str().unwrap()],
        "no such volume: busy",
    );
}

#[test]
fn rm_deletes_every_key_reclaims_disk_space_and_the_name_can_be_reused_empty() {
    let mut d = Daemon::start();
    d.create("gone");
    d.create("stays");
    let (_m, mnt) = mountpoint();
    d.mount("stays", &mnt, false);
    let kept = pat(100 * KIB, 7);
    append_fsync_close(&mnt.join("kept"), &kept).unwrap();
    d.umount(&mnt);
    d.mount("gone", &mnt, false);
    append_fsync_close(&mnt.join("big"), &pat(16 * MIB, 8)).unwrap();
    fs::create_dir(mnt.join("dir")).unwrap();
    fs::write(mnt.join("dir/small"), b"x").unwrap();
    d.umount(&mnt);
    let data = d.root().join("data");
    let before = du(&data);
    // Several names at once; a missing one is reported, the others removed.
    let o = d.cli(&["rm", "gone", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout_of(&o), "gone\n");
    assert_eq!(stderr_of(&o), "volfs: no such volume: nosuch\n");
    // The space comes back once the released chunks' holes are punched (after the sync
    // that follows their release; the maintenance thread may be the one to do it). A
    // punch frees only the 4 KiB blocks a chunk's bytes cover whole: the block a chunk
    // shares with its neighbour's record header stays until compaction rewrites the
    // segment, so at once about 3/4 of the 16 MiB comes back.
    let t0 = Instant::now();
    loop {
        let after = du(&data);
        if before.saturating_sub(after) >= 11 * MIB as u64 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "segment space on disk went from {before} to {after} bytes after removing 16 MiB"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(names(&d, &[]), vec!["stays"]);
    // The same name again is a new, empty volume.
    d.create("gone");
    assert_eq!(
        inspect(&d, "gone")["Usage"],
        serde_json::json!({"Bytes": 0, "Inodes": 1, "LimitBytes": null})
    );
    d.mount("gone", &mnt, false);
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
    assert_errno!(fs::metadata(mnt.join("big")), ENOENT);
    d.umount(&mnt);
    d.stop();
    assert_store_consistent(d.root());
    d.restart();
    d.mount("stays", &mnt, false);
    assert_eq!(fs::read(mnt.join("kept")).unwrap(), kept);
}

#[test]
fn rm_force_of_a_busy_mount_detaches_it_and_purges_once_the_last_file_closes() {
    use std::os::unix::fs::FileExt;
    let mut d = Daemon::start();
    d.create("held");
    let (_m, mnt) = mountpoint();
    d.mount("held", &mnt, false);
    fs::write(mnt.join("f"), b"before").unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("f"))
        .unwrap();
    assert_eq!(d.cli_ok(&["rm", "--force", "held"]), "held\n");
    assert_eq!(names(&d, &[]), Vec::<String>::new());
    assert!(!is_mounted(&mnt), "the busy mount was not detached");
    // The open file is still served by the detached mount until it is closed.
    f.write_all_at(b"after!", 0).unwrap();
    f.sync_all().unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"after!");
    assert!(
        !d.log().contains("purged removed volume"),
        "the volume was purged while a file was still open"
    );
    drop(f);
    wait_log(&d, "purged removed volume");
    d.stop();
    assert_store_consistent(d.root());
}

#[test]
fn rm_racing_a_mount_ends_in_one_consistent_state() {
    let mut d = Daemon::start();
    let (_m, mnt) = mountpoint();
    let mp = mnt.to_str().unwrap().to_string();
    let mut seen = BTreeSet::new();
    for i in 0..16 {
        let force = i % 2 == 1;
        let name = format!("race{i}");
        d.create(&name);
        let barrier = Barrier::new(2);
        let (mount, rm) = std::thread::scope(|s| {
            let m = s.spawn(|| {
                barrier.wait();
                d.cli(&["mount", &name, &mp])
            });
            let r = s.spawn(|| {
                barrier.wait();
                if force {
                    d.cli(&["rm", "--force", &name])
                } else {
                    d.cli(&["rm", &name])
                }
            });
            (m.join().expect("mount"), r.join().expect("rm"))
        });
        let exists = names(&d, &[]).contains(&name);
        let mounted = is_mounted(&mnt);
        let outcome = (mount.status.success(), rm.status.success(), exists, mounted);
        let (merr, rerr) = (stderr_of(&mount), stderr_of(&rm));
        match (force, outcome) {
            // The mount came first: rm refused (it names the mountpoint)…
            (false, (true, false, true, true)) => {
                assert!(rerr.contains(&format!("mounted at {mp}")), "{rerr}")
            }
            // …or rm came first and the mount found no volume.
            (_, (false, true, false, false)) => {
                assert!(merr.contains(&format!("no such volume: {name}")), "{merr}")
            }
            // With --force, a mount that came first is undone.
            (true, (true, true, false, false)) => {}
            _ => panic!(
                "round {i} (force {force}): mount ok {}, rm ok {}, volume exists {exists}, \
                 mounted {mounted}; mount: {merr:?}; rm: {rerr:?}",
                outcome.0, outcome.1
            ),
        }
        seen.insert((force, outcome));
        if mounted {
            d.umount(&mnt);
            d.cli_ok(&["rm", &name]);
        }
        assert!(!is_mounted(&mnt));
    }
    d.stop();
    assert_store_consistent(d.root());
    eprintln!("rm/mount race outcomes (force, (mount ok, rm ok, exists, mounted)): {seen:?}");
}

#[test]
fn prune_removes_unmounted_anonymous_volumes_and_with_all_every_unmounted_one() {
    let mut d = Daemon::start();
    d.create("keep1");
    d.create("keep2");
    let a: Vec<String> = (0..3)
        .map(|_| d.cli_ok(&["create"]).trim().to_string())
        .collect();
    let (_m, mnt) = mountpoint();
    d.mount(&a[0], &mnt, false);
    append_fsync_close(&mnt.join("f"), &pat(3000, 3)).unwrap();
    std::os::unix::fs::symlink("0123456789", mnt.join("l")).unwrap();
    d.umount(&mnt);
    let (_m2, busy_anon) = mountpoint();
    let (_m3, busy_named) = mountpoint();
    d.mount(&a[2], &busy_anon, false);
    d.mount("keep2", &busy_named, false);

    let mut gone = [a[0].clone(), a[1].clone()];
    gone.sort();
    assert_eq!(
        d.cli_ok(&["prune"]),
        format!(
            "Deleted Volumes:\n{}\n{}\n\nTotal reclaimed space: 2.94KiB\n",
            gone[0], gone[1]
        ),
        "3000 bytes of data and a 10-byte symlink target"
    );
    let mut left = vec!["keep1".to_string(), "keep2".to_string(), a[2].clone()];
    left.sort();
    assert_eq!(names(&d, &[]), left);
    assert_eq!(d.cli_ok(&["prune"]), "Total reclaimed space: 0B\n");
    assert_eq!(
        d.cli_ok(&["prune", "--all"]),
        "Deleted Volumes:\nkeep1\n\nTotal reclaimed space: 0B\n"
    );
    let mut left = vec!["keep2".to_string(), a[2].clone()];
    left.sort();
    assert_eq!(names(&d, &[]), left);
    d.umount(&busy_anon);
    d.umount(&busy_named);
    let mut all = ["keep2".to_string(), a[2].clone()];
    all.sort();
    assert_eq!(
        d.cli_ok(&["prune", "-a"]),
        format!(
            "Deleted Volumes:\n{}\n{}\n\nTotal reclaimed space: 0B\n",
            all[0], all[1]
        )
    );
    assert_eq!(names(&d, &[]), Vec::<String>::new());
    d.stop();
    assert_store_consistent(d.root());
}

// ---------------------------------------------------------------------------------------------
// crashes half-way through rm and create
// ---------------------------------------------------------------------------------------------

/// Waits until the daemon's log says `what`.
#[track_caller]
fn wait_log(d: &Daemon, what: &str) {
    let t0 = Instant::now();
    while !d.log().contains(what) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the log never said {what:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_crash_between_rm_and_its_purge_is_finished_at_the_next_start() {
    let root_dir = open_tempdir();
    let root = root_dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let (_m, mnt) = mountpoint();
    let kept = pat(200 * KIB, 9);
    {
        let mut c = CustomDaemon::start(&root, &[], &[("VOLFS_FAILPOINTS", "rm-before-purge")])
            .expect("daemon with a failpoint");
        for args in [["create", "doomed"], ["create", "other"]] {
            let o = c.cli(&args);
            assert!(o.status.success(), "{}", stderr_of(&o));
        }
        let mp = mnt.to_str().unwrap();
        for (vol, file, data) in [
            ("doomed", "big", pat(4 * MIB, 10)),
            ("other", "kept", kept.clone()),
        ] {
            assert!(c.cli(&["mount", vol, mp]).status.success());
            append_fsync_close(&mnt.join(file), &data).unwrap();
            assert!(c.cli(&["umount", mp]).status.success());
        }
        let o = c.cli(&["rm", "doomed"]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "rm answered despite the failpoint"
        );
        assert!(
            stderr_of(&o).contains("closed the connection without answering"),
            "{}",
            stderr_of(&o)
        );
        c.wait_dead();
    }
    let mut d = Daemon::start_at(&root);
    // The removal was durable before the crash; the purge finishes in the background.
    assert_eq!(names(&d, &[]), vec!["other"]);
    wait_log(&d, "finished purging a volume a crash left half-removed");
    d.mount("other", &mnt, false);
    assert_eq!(fs::read(mnt.join("kept")).unwrap(), kept);
    d.umount(&mnt);
    d.stop();
    assert_store_consistent(&root);
}

#[test]
fn a_crash_during_create_leaves_no_volume_and_no_keys_behind() {
    let root_dir = open_tempdir();
    let root = root_dir.path().join("root");
    fs::create_dir(&root).unwrap();
    {
        let mut c = CustomDaemon::start(
            &root,
            &[],
            &[("VOLFS_FAILPOINTS", "create-before-register")],
        )
        .expect("daemon with a failpoint");
        let o = c.cli(&["create", "ghost", "-o", "mode=0700"]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "create answered despite the failpoint"
        );
        c.wait_dead();
    }
    let mut d = Daemon::start_at(&root);
    assert_eq!(names(&d, &[]), Vec::<String>::new());
    wait_log(&d, "finished purging a volume a crash left half-removed");
    // The name is free and the new volume has nothing of the half-made one.
    d.create("ghost");
    assert_eq!(
        inspect(&d, "ghost")["Options"],
        serde_json::json!({}),
        "the crashed create's options"
    );
    d.stop();
    assert_store_consistent(&root);
}

// ---------------------------------------------------------------------------------------------
// df, version, info, the socket's group
// ---------------------------------------------------------------------------------------------

#[test]
fn df_reports_bytes_inodes_mounts_and_limit_per_volume() {
    let d = Daemon::start();
    d.cli_ok(&["create", "dfa", "-o", "size=2M"]);
    d.create("dfb");
    let (_m, mnt) = mountpoint();
    d.mount("dfa", &mnt, false);
    append_fsync_close(&mnt.join("one"), &pat(6000, 4)).unwrap();
    append_fsync_close(&mnt.join("two"), &pat(4000, 5)).unwrap();
    let rows = |d: &Daemon| -> Vec<Value> {
        d.cli_ok(&["df", "--format", "json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let want = serde_json::json!([
        {"Name": "dfa", "Mounts": 1, "Bytes": 10000, "Size": "9.77KiB", "Inodes": 3, "LimitBytes": 2097152},
        {"Name": "dfb", "Mounts": 0, "Bytes": 0, "Size": "0B", "Inodes": 1, "LimitBytes": null},
    ]);
    assert_eq!(Value::Array(rows(&d)), want);
    let table = d.cli_ok(&["df"]);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        vec![
            vec!["VOLUME", "NAME", "MOUNTS", "SIZE", "INODES", "LIMIT"],
            vec!["dfa", "1", "9.77KiB", "3", "2MiB"],
            vec!["dfb", "0", "0B", "1", "-"],
        ],
        "{table}"
    );
    // Unmounted, the numbers come from a scan of the store: the same.
    d.umount(&mnt);
    let mut want = want;
    want[0]["Mounts"] = 0.into();
    assert_eq!(Value::Array(rows(&d)), want);
}

#[test]
fn version_and_info_report_the_client_and_the_daemon() {
    let d = Daemon::start();
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        d.cli_ok(&["version"]),
        format!("Client version:  {v}\nDaemon version:  {v} (protocol 1)\n")
    );
    d.create("i1");
    d.create("i2");
    let (_m, mnt) = mountpoint();
    d.mount("i1", &mnt, false);
    append_fsync_close(&mnt.join("f"), &pat(MIB, 6)).unwrap();
    let info = |d: &Daemon| -> Value {
        serde_json::from_str(&d.cli_ok(&["info", "--format", "json"])).expect("info JSON")
    };
    let i = info(&d);
    assert_eq!(i["version"], v);
    assert_eq!(i["pid"], d.pid().expect("running"));
    assert_eq!(i["root"], d.root().to_str().unwrap());
    assert_eq!(
        (i["volumes"].as_u64(), i["mounts"].as_u64()),
        (Some(2), Some(1))
    );
    let store = i["store_bytes"].as_u64().expect("store_bytes");
    let on_disk = du(d.root());
    assert!(
        store >= MIB as u64 && store.abs_diff(on_disk) < 4 * MIB as u64,
        "info says the store takes {store} bytes, du says {on_disk}"
    );
    let up = i["uptime_secs"].as_u64().expect("uptime");
    std::thread::sleep(Duration::from_millis(1100));
    assert!(info(&d)["uptime_secs"].as_u64().expect("uptime") > up);
    let table = d.cli_ok(&["info"]);
    for want in [
        format!("Version:       {v}"),
        format!("Daemon pid:    {}", d.pid().unwrap()),
        format!("Store:         {}", d.root().display()),
        "Volumes:       2".to_string(),
        "Mounts:        1".to_string(),
    ] {
        assert!(
            table.lines().any(|l| l == want),
            "{want:?} not in:\n{table}"
        );
    }
    // Without a daemon, the client still says its own version, then fails.
    let o = Command::new(VOLFS)
        .args(["--socket", "/nonexistent/volfs.sock", "version"])
        .env_remove("VOLFS_SOCKET")
        .output()
        .expect("run volfs");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout_of(&o), format!("Client version:  {v}\n"));
    assert!(stderr_of(&o).contains("volfs-mountd is not running"));
}

#[test]
fn socket_group_gives_that_group_the_socket_and_an_unknown_group_is_refused() {
    let group = nix::unistd::Group::from_name("daemon")
        .expect("group lookup")
        .expect("group `daemon` exists");
    let gid = group.gid.as_raw();
    let root_dir = open_tempdir();
    let root = root_dir.path().join("root");
    fs::create_dir(&root).unwrap();

    let e = CustomDaemon::start(&root, &["--socket-group", "nosuchgroup-volfs"], &[])
        .err()
        .expect("a daemon started with an unknown group");
    assert!(
        e.contains("--socket-group nosuchgroup-volfs: no such group"),
        "{e}"
    );

    let c = CustomDaemon::start(&root, &["--socket-group", "daemon"], &[]).expect("daemon");
    let m = fs::metadata(&c.socket).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o660, 0, gid));
    let socket = c.socket.clone();
    let member: String = run_as(4500, gid, || {
        let s = UnixStream::connect(&socket).expect("a group member connects");
        (&s).write_all(b"{\"op\":\"ls\"}\n").expect("send");
        let mut answer = String::new();
        (&s).read_to_string(&mut answer).expect("answer");
        answer
    });
    assert!(member.starts_with("{\"ok\":true"), "{member}");
    let outsider: i32 = run_as(4500, 4500, || {
        UnixStream::connect(&socket)
            .expect_err("an outsider connected")
            .raw_os_error()
            .unwrap_or(0)
    });
    assert_eq!(outsider, libc::EACCES);
    // The permission message of the CLI says what to do.
    let o = run_as(4500, 4500, || {
        let o = Command::new(VOLFS)
            .arg("--socket")
            .arg(&socket)
            .arg("ls")
            .output()
            .expect("run volfs");
        (o.status.code(), stderr_of(&o))
    });
    assert_eq!(o.0, Some(1));
    assert!(o.1.contains("--socket-group"), "{}", o.1);
}

// ---------------------------------------------------------------------------------------------
// from=: a volume that starts as a copy of a host tree or a tar file
// ---------------------------------------------------------------------------------------------

/// A tree with every kind of entry and metadata import keeps: modes with setuid, setgid
/// and sticky, owners, nanosecond times, xattrs (binary too), symlinks (one dangling), a
/// hard link, a FIFO, a sparse file, an empty file.
pub(crate) fn build_tree() -> (TempDir, PathBuf) {
    let dir = open_tempdir();
    let t = dir.path().join("tree");
    fs::create_dir(&t).unwrap();
    fs::create_dir_all(t.join("d/sg")).unwrap();
    fs::write(t.join("a"), b"hello\n").unwrap();
    fs::hard_link(t.join("a"), t.join("a2")).unwrap();
    fs::write(t.join("exec"), pat(300 * KIB, 11)).unwrap();
    let sparse = File::create(t.join("sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"tail!", MIB as u64).unwrap();
    drop(sparse);
    File::create(t.join("empty")).unwrap();
    fs::write(t.join("d/sg/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("../a", t.join("d/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", t.join("dangle")).unwrap();
    nix::unistd::mkfifo(
        &t.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    xattr::set(t.join("a"), "user.test", b"value").unwrap();
    xattr::set(t.join("a"), "user.bin", &[0u8, 1, 2, 255]).unwrap();
    xattr::set(t.join("exec"), "trusted.x", b"t").unwrap();
    xattr::set(t.join("d"), "user.dir", b"dirval").unwrap();
    // Owners first: chown clears setuid and setgid.
    for (rel, uid, gid, mode) in [
        ("", 1005, 1006, 0o751),
        ("a", 1001, 1002, 0o644),
        ("exec", 0, 1002, 0o4755),
        ("sparse", 1001, 1001, 0o600),
        ("empty", 1003, 1003, 0o640),
        ("d", 1001, 1002, 0o1750),
        ("d/sg", 0, 1002, 0o2775),
        ("d/sg/inner", 1001, 1002, 0o444),
        ("pipe", 1004, 1004, 0o640),
    ] {
        lchown(&t.join(rel), uid, gid);
        chmod(&t.join(rel), mode);
    }
    lchown(&t.join("d/link"), 1003, 1004);
    // Times last, children before parents. Each atime lies ahead of its mtime and of its
    // ctime (which setting the times makes "now"), so that reading the tree — listing a
    // directory, following a symlink — does not change it under relatime.
    let now = now_secs();
    for (k, rel) in [
        "a",
        "exec",
        "sparse",
        "empty",
        "d/sg/inner",
        "d/sg",
        "d/link",
        "d",
        "dangle",
        "pipe",
        "",
    ]
    .iter()
    .enumerate()
    {
        let k = k as i64;
        set_times(
            &t.join(rel),
            (now + 3600 + k, 111_111_111 * k % 1_000_000_000),
            (1_600_000_000 + 1000 * k, 123_456_789 + k),
        );
    }
    (dir, t)
}

/// Every entry below `root`, relative, parents first.
fn entries(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    let mut i = 0;
    while i < out.len() {
        let p = root.join(&out[i]);
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut names: Vec<PathBuf> = fs::read_dir(&p)
                .unwrap()
                .map(|e| out[i].join(e.unwrap().file_name()))
                .collect();
            names.sort();
            out.extend(names);
        }
        i += 1;
    }
    out
}

/// Compares every entry of the volume mounted at `vol` with the tree at `src`: type, mode,
/// owner, link count, size, device, atime and mtime to the nanosecond, symlink targets,
/// xattrs, which names share an inode, and every byte.
#[track_caller]
pub(crate) fn assert_same_tree(src: &Path, vol: &Path) {
    let names = entries(src);
    assert_eq!(
        entries(vol),
        names,
        "the volume has other names than the source"
    );
    let mut inodes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut problems = Vec::new();
    for rel in &names {
        let (s, v) = (
            fs::symlink_metadata(src.join(rel)).unwrap(),
            fs::symlink_metadata(vol.join(rel)).unwrap(),
        );
        let is_dir = s.is_dir();
        let fields = |m: &fs::Metadata| {
            (
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                if is_dir { 0 } else { m.size() },
                m.rdev(),
                (m.atime(), m.atime_nsec()),
                (m.mtime(), m.mtime_nsec()),
            )
        };
        if fields(&s) != fields(&v) {
            problems.push(format!(
                "{}: (mode, uid, gid, nlink, size, rdev, atime, mtime) source {:?}, volume {:?}",
                rel.display(),
                fields(&s),
                fields(&v)
            ));
        }
        if let Some(prev) = inodes.insert(s.ino(), v.ino()) {
            if prev != v.ino() {
                problems.push(format!("{}: hard link not kept", rel.display()));
            }
        }
        if s.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(vol.join(rel)).unwrap(),
                fs::read_link(src.join(rel)).unwrap()
            );
        } else if !s.file_type().is_fifo() {
            let xattrs = |p: &Path| -> BTreeMap<String, Vec<u8>> {
                xattr::list(p)
                    .unwrap()
                    .map(|n| {
                        let v = xattr::get(p, &n).unwrap().unwrap_or_default();
                        (n.to_string_lossy().into_owned(), v)
                    })
                    .collect()
            };
            let (sx, vx) = (xattrs(&src.join(rel)), xattrs(&vol.join(rel)));
            if sx != vx {
                problems.push(format!("{}: xattrs {sx:?} vs {vx:?}", rel.display()));
            }
        }
    }
    let distinct: HashSet<u64> = inodes.values().copied().collect();
    assert_eq!(distinct.len(), inodes.len(), "two source inodes became one");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Bytes last: reading changes no metadata compared above.
    for rel in &names {
        let s = fs::symlink_metadata(src.join(rel)).unwrap();
        if s.is_file() {
            assert!(
                fs::read(vol.join(rel)).unwrap() == fs::read(src.join(rel)).unwrap(),
                "{}: bytes differ",
                rel.display()
            );
        }
    }
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn from_a_directory_copies_every_byte_and_metadata_field() {
    let (_t, tree) = build_tree();
    let d = Daemon::start();
    let from = format!("from={}", tree.display());
    assert_eq!(d.cli_ok(&["create", "seeded", "-o", &from]), "seeded\n");
    let (_m, mnt) = mountpoint();
    d.mount("seeded", &mnt, false);
    assert_same_tree(&tree, &mnt);
    assert_eq!(
        fs::metadata(mnt.join("sparse")).unwrap().blocks(),
        1,
        "only the 5 bytes after the 1 MiB hole are stored (one 512-byte block)"
    );
    // Creating it again with the same options is a no-op: nothing is imported again.
    fs::write(mnt.join("a"), b"changed").unwrap();
    assert_eq!(d.cli_ok(&["create", "seeded", "-o", &from]), "seeded\n");
    assert_eq!(fs::read(mnt.join("a")).unwrap(), b"changed");
    assert_eq!(
        inspect(&d, "seeded")["Options"],
        serde_json::json!({"from": tree.to_str().unwrap()})
    );
}

#[test]
fn from_a_tar_file_copies_every_byte_and_metadata_field() {
    let (t, tree) = build_tree();
    let tar = t.path().join("tree.tar.gz");
    let o = Command::new("tar")
        .args([
            "--create",
            "--gzip",
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .arg("--atime-preserve=system")
        .arg("--file")
        .arg(&tar)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .output()
        .expect("run tar");
    assert!(o.status.success(), "tar: {}", stderr_of(&o));
    let d = Daemon::start();
    d.cli_ok(&[
        "create",
        "fromtar",
        "-o",
        &format!("from={}", tar.display()),
    ]);
    let (_m, mnt) = mountpoint();
    d.mount("fromtar", &mnt, false);
    assert_same_tree(&tree, &mnt);
}

#[test]
fn from_with_owner_and_mode_options_sets_the_root_over_the_sources() {
    let (_t, tree) = build_tree();
    let d = Daemon::start();
    d.cli_ok(&[
        "create",
        "over",
        "-o",
        &format!("from={}", tree.display()),
        "-o",
        "uid=7",
        "-o",
        "mode=0700",
    ]);
    let (_m, mnt) = mountpoint();
    d.mount("over", &mnt, false);
    let m = fs::metadata(&mnt).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (7, 1006, 0o700));
    assert_eq!(fs::read(mnt.join("d/sg/inner")).unwrap(), b"inner");
}

#[test]
fn a_failed_from_leaves_no_volume_and_no_keys_behind() {
    let (t, tree) = build_tree();
    let evil_src = t.path().join("evil");
    fs::create_dir(&evil_src).unwrap();
    fs::write(evil_src.join("f"), b"x").unwrap();
    let evil = t.path().join("evil.tar");
    let o = Command::new("tar")
        .args(["-cPf"])
        .arg(&evil)
        .args(["--transform", "s,^,../,", "-C"])
        .arg(&evil_src)
        .arg("f")
        .output()
        .expect("run tar");
    assert!(o.status.success(), "tar: {}", stderr_of(&o));
    let not_tar = t.path().join("not.tar");
    fs::write(&not_tar, pat(10_000, 12)).unwrap();
    let mut d = Daemon::start();
    d.create("bystander");
    let from = |p: &Path| format!("from={}", p.display());
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["-o".into(), "from=/nonexistent/seed".into()],
            "from=/nonexistent/seed: cannot read it".into(),
        ),
        (
            vec!["-o".into(), "from=relative/seed".into()],
            "option from=\"relative/seed\": must be an absolute path".into(),
        ),
        (vec!["-o".into(), from(&evil)], "../f".into()),
        (
            vec!["-o".into(), from(&not_tar)],
            "not a directory or tar file".into(),
        ),
        (
            vec!["-o".into(), from(&tree), "-o".into(), "size=64K".into()],
            "creating volume v1 (quota size=64KiB)".into(),
        ),
        (
            vec!["-o".into(), from(&tree), "-o".into(), "size=64K".into()],
            "No space left on device".into(),
        ),
    ];
    for (opts, says) in &cases {
        let mut args = vec!["create", "v1"];
        args.extend(opts.iter().map(String::as_str));
        assert_refused(&d, &args, says);
    }
    // The anonymous kind too: no name is left behind either.
    assert_refused(&d, &["create", "-o", &from(&evil)], "../f");
    assert_eq!(names(&d, &[]), vec!["bystander"]);
    d.stop();
    assert_store_consistent(d.root());
}
