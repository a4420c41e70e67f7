//! volfs as Docker's volume plugin, end to end: the plugin protocol spoken byte by byte over
//! the socket (bad input, reference counts, restarts), then a real dockerd (Debian's
//! `docker.io`) driving volfs through every scenario of `scripts/docker-e2e`.
//!
//! Each Docker test starts its own private dockerd (data root, exec root and API socket in a
//! temp dir, `--iptables=false --bridge=none`, containers with `--network none`) and its own
//! volfs-mountd, imports a busybox-static test image, and tears everything down on drop,
//! also after a failed assertion. dockerd finds plugins only in the machine-wide
//! `/run/docker/plugins`, so each test's plugin socket there has its own name (the Docker
//! driver name `volfs-e2e-PID-N`). Docker tests run one at a time (a global lock): they
//! share the machine's containerd shims, cgroups and mount tables, and timing assertions
//! (`docker stop` after a daemon crash) need the CPU.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::util::*;

/// The test image, built by `docker import` from a busybox-static root.
const IMAGE: &str = "volfs-e2e:1";
/// Longest any single docker command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

static SERIAL: Mutex<()> = Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` (through util's clean spawner: see [`CleanCommand`]) to completion, killing it
/// (and failing the test, naming `what`) after `limit`.
#[track_caller]
fn run_limited(what: &str, cmd: CleanCommand, limit: Duration) -> Output {
    run_within(cmd, limit).unwrap_or_else(|| panic!("{what} did not finish within {limit:?}"))
}

/// `s` without terminal colour sequences (the daemon's log has them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The docker CLI of the engine under test (Debian's `docker.io` puts it in /usr/bin; a
/// newer CLI elsewhere in PATH is not what we test against).
fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// Waits until `cond` holds, or fails naming `what`.
#[track_caller]
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// raw plugin protocol
// ---------------------------------------------------------------------------------------------

/// One keep-alive HTTP connection to the plugin socket.
struct Conn {
    reader: BufReader<UnixStream>,
    stream: UnixStream,
}

impl Conn {
    fn open(socket: &Path) -> Conn {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Conn {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            stream,
        }
    }

    /// `POST path` with `body` as dockerd sends it; returns the status and JSON answer.
    fn call(&mut self, path: &str, body: &str) -> (u16, Value) {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\n\
             Content-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n{body}",
            body.len()
        );
        self.send(req.as_bytes())
    }

    fn send(&mut self, bytes: &[u8]) -> (u16, Value) {
        self.stream.write_all(bytes).expect("send");
        self.answer()
            .unwrap_or_else(|| panic!("no answer to {:?}", text(bytes)))
    }

    /// The next answer; None if the plugin closed the connection.
    fn answer(&mut self) -> Option<(u16, Value)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        assert!(line.starts_with("HTTP/1.1 "), "{line:?}");
        let mut len = None;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("Content-Length: ") {
                len = Some(v.parse::<usize>().expect("length"));
            }
        }
        let mut body = vec![0; len.expect("every answer has a Content-Length")];
        self.reader.read_exact(&mut body).expect("body");
        Some((status, serde_json::from_slice(&body).expect("JSON answer")))
    }

    /// True once the plugin has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

#[track_caller]
fn ok(c: &mut Conn, path: &str, body: Value) -> Value {
    let (status, v) = c.call(path, &format!("{body}\n"));
    assert_eq!(status, 200, "{path} {body}: {v}");
    if let Some(e) = v.get("Err") {
        assert_eq!(e, "", "{path} {body}: {v}");
    }
    v
}

#[track_caller]
fn refused(c: &mut Conn, path: &str, body: &str, status: u16, says: &str) {
    let (st, v) = c.call(path, body);
    let err = v["Err"].as_str().unwrap_or_default();
    assert_eq!(st, status, "{path} {body}: {v}");
    assert!(err.contains(says), "{path} {body}: {err:?} lacks {says:?}");
}

fn plugin_daemon(dir: &Path) -> (Daemon, PathBuf) {
    let socket = dir.join("plugin.sock");
    let d = Daemon::start_with(&["--plugin-socket", socket.to_str().expect("utf-8")]);
    (d, socket)
}

fn docker_mountpoint(d: &Daemon, name: &str) -> PathBuf {
    fs::canonicalize(d.root())
        .expect("root")
        .join("docker")
        .join(name)
}

fn is_volfs(path: &Path) -> bool {
    mount_fstype(path).as_deref() == Some("fuse.volfs")
}

/// `Status.mounts` of a volume, per Get.
#[track_caller]
fn references(c: &mut Conn, name: &str) -> u64 {
    let v = ok(c, "/VolumeDriver.Get", json!({ "Name": name }));
    v["Volume"]["Status"]["mounts"]
        .as_u64()
        .unwrap_or_else(|| panic!("no Status.mounts in {v}"))
}

#[test]
fn plugin_protocol_answers_every_endpoint_and_refuses_bad_input() {
    let dir = open_tempdir();
    let (d, socket) = plugin_daemon(dir.path());
    let mut c = Conn::open(&socket);
    // One keep-alive connection for everything below.
    assert_eq!(
        ok(&mut c, "/Plugin.Activate", json!(null)),
        json!({"Implements": ["VolumeDriver"]})
    );
    let (st, v) = c.send(b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((st, v), (200, json!({"Implements": ["VolumeDriver"]})));
    assert_eq!(
        ok(&mut c, "/VolumeDriver.Capabilities", json!({})),
        json!({"Capabilities": {"Scope": "local"}})
    );
    refused(
        &mut c,
        "/VolumeDriver.Get",
        r#"{"Name":"p1"}"#,
        500,
        "no such volume: p1",
    );
    ok(
        &mut c,
        "/VolumeDriver.Create",
        json!({"Name": "p1", "Opts": null}),
    );
    // Idempotent, as dockerd may retry.
    ok(
        &mut c,
        "/VolumeDriver.Create",
        json!({"Name": "p1", "Opts": {}}),
    );
    ok(
        &mut c,
        "/VolumeDriver.Create",
        json!({"Name": "p2", "Opts": {"size": "1G", "uid": "1000", "gid": "1000", "mode": "0700", "readonly": "false"}}),
    );
    let created = d.cli_ok(&["inspect", "p2"]);
    let created: Value = serde_json::from_str(&created).expect("inspect");
    assert_eq!(created[0]["Options"]["size"], "1G");
    for (body, status, says) in [
        (
            r#"{"Name":"p3","Opts":{"bogus":"1"}}"#,
            500,
            r#"unknown option "bogus" (known options: readonly"#,
        ),
        (
            r#"{"Name":"p3","Opts":{"size":"0"}}"#,
            500,
            "a quota must be at least 1 byte",
        ),
        (
            r#"{"Name":"p3","Opts":{"uid":"-1"}}"#,
            500,
            "option uid=\"-1\": expected a number",
        ),
        (
            r#"{"Name":"p3","Opts":{"mode":"999"}}"#,
            500,
            "expected octal permission bits",
        ),
        (
            r#"{"Name":"p3","Opts":{"readonly":"yes"}}"#,
            500,
            "expected true or false",
        ),
        (
            r#"{"Name":"p3","Opts":{"from":"relative"}}"#,
            500,
            "must be an absolute path",
        ),
        (
            r#"{"Name":"p3","Opts":{"from":"/nonexistent/x"}}"#,
            500,
            "/nonexistent/x",
        ),
        (
            r#"{"Name":"p1","Opts":{"size":"1G"}}"#,
            500,
            "already exists with other labels or options",
        ),
        (r#"{"Name":"../x"}"#, 400, "invalid volume name \"../x\""),
        (r#"{"Name":"a/b"}"#, 400, "invalid volume name \"a/b\""),
        (r#"{"Name":"x"}"#, 400, "invalid volume name"),
        (
            r#"{"Name":"p3","Opts":{"size":1}}"#,
            400,
            "malformed request",
        ),
        (r#"{"Name":"p3""#, 400, "malformed request"),
        (r#"{"Opts":null}"#, 400, "missing field `Name`"),
        ("", 400, "the request body is empty"),
    ] {
        refused(&mut c, "/VolumeDriver.Create", body, status, says);
    }
    refused(
        &mut c,
        "/VolumeDriver.Mount",
        r#"{"Name":"p1"}"#,
        400,
        "missing field `ID`",
    );
    refused(
        &mut c,
        "/VolumeDriver.Mount",
        r#"{"Name":"p1","ID":""}"#,
        400,
        "invalid mount ID",
    );
    refused(
        &mut c,
        "/VolumeDriver.Mount",
        r#"{"Name":"nope","ID":"1"}"#,
        500,
        "no such volume: nope",
    );
    refused(
        &mut c,
        "/VolumeDriver.Frobnicate",
        "{}",
        404,
        "unknown endpoint",
    );
    refused(&mut c, "/", "", 404, "unknown endpoint");
    let (st, v) = c.send(b"GET /VolumeDriver.List HTTP/1.1\r\n\r\n");
    assert_eq!(st, 405, "{v}");
    assert_eq!(
        d.cli_ok(&["ls", "-q"]).lines().collect::<Vec<_>>(),
        ["p1", "p2"],
        "refused creates left volumes behind"
    );

    // Get and List: every volume, with its creation time and a useful Status.
    let info: Value = serde_json::from_str(&d.cli_ok(&["inspect", "p2"])).expect("inspect");
    let created = info[0]["CreatedAt"]
        .as_str()
        .expect("CreatedAt")
        .to_string();
    let v = ok(&mut c, "/VolumeDriver.Get", json!({"Name": "p2"}));
    assert_eq!(v["Volume"]["Name"], "p2");
    assert_eq!(v["Volume"]["Mountpoint"], "");
    assert_eq!(v["Volume"]["CreatedAt"], created.as_str());
    assert_eq!(
        v["Volume"]["Status"],
        json!({"size": "0B", "bytes": 0, "inodes": 1, "snapshots": 0, "limit": "1GiB",
               "readonly": false, "mounts": 0, "mountpoints": []})
    );
    d.create("cli-made");
    let list = ok(&mut c, "/VolumeDriver.List", json!({}));
    let names: Vec<&str> = list["Volumes"]
        .as_array()
        .expect("Volumes")
        .iter()
        .map(|v| v["Name"].as_str().expect("Name"))
        .collect();
    assert_eq!(names, ["cli-made", "p1", "p2"]);
    assert!(list["Volumes"][2]["CreatedAt"].as_str().is_some());

    // Huge bodies and garbage: a clear refusal, then the connection is closed.
    let mut big = Conn::open(&socket);
    let (st, v) = big.send(
        format!(
            "POST /VolumeDriver.Create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .as_bytes(),
    );
    assert_eq!(st, 413, "{v}");
    assert!(
        v["Err"]
            .as_str()
            .unwrap_or_default()
            .contains("larger than the limit")
    );
    assert!(big.closed());
    let mut junk = Conn::open(&socket);
    let (st, v) = junk.send(b"\x00\xff\xfe garbage\r\n\r\n");
    assert_eq!(st, 400, "{v}");
    assert!(junk.closed());
    let mut chunked = Conn::open(&socket);
    let (st, _) = chunked.send(
        b"POST /VolumeDriver.List HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(st, 501);
    // A request arriving in pieces is read whole.
    let mut slow = Conn::open(&socket);
    slow.stream
        .write_all(b"POST /VolumeDriver.Get HTTP/1.1\r\nContent-Le")
        .expect("send");
    std::thread::sleep(Duration::from_millis(100));
    slow.stream
        .write_all(b"ngth: 13\r\n\r\n{\"Name\"")
        .expect("send");
    std::thread::sleep(Duration::from_millis(100));
    let (st, v) = slow.send(b":\"p1\"}");
    assert_eq!((st, &v["Volume"]["Name"]), (200, &json!("p1")));
    // The original connection is still fine after all of that.
    ok(&mut c, "/VolumeDriver.Path", json!({"Name": "p1"}));

    // Concurrent connections.
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(&socket);
                for _ in 0..50 {
                    let (st, v) = c.call("/VolumeDriver.Get", r#"{"Name":"p1"}"#);
                    assert_eq!(st, 200, "{v}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("concurrent Gets");
    }
    assert!(d.log().contains("volfs-mountd ready"));
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn plugin_counts_mounts_per_id_across_daemon_restarts() {
    let dir = open_tempdir();
    let (mut d, socket) = plugin_daemon(dir.path());
    let mut c = Conn::open(&socket);
    ok(
        &mut c,
        "/VolumeDriver.Create",
        json!({"Name": "rc", "Opts": null}),
    );
    let mp = docker_mountpoint(&d, "rc");
    let mount = |c: &mut Conn, id: &str| {
        let v = ok(c, "/VolumeDriver.Mount", json!({"Name": "rc", "ID": id}));
        assert_eq!(v["Mountpoint"], mp.to_str().expect("utf-8"));
        assert!(
            is_volfs(&mp),
            "{} is not the live volfs mount",
            mp.display()
        );
    };
    let unmount = |c: &mut Conn, id: &str| {
        ok(c, "/VolumeDriver.Unmount", json!({"Name": "rc", "ID": id}));
    };
    mount(&mut c, "A");
    mount(&mut c, "A"); // `docker cp` into a running container repeats its ID
    mount(&mut c, "B");
    assert_eq!(references(&mut c, "rc"), 3);
    let v = ok(&mut c, "/VolumeDriver.Path", json!({"Name": "rc"}));
    assert_eq!(v["Mountpoint"], mp.to_str().expect("utf-8"));
    let v = ok(&mut c, "/VolumeDriver.Get", json!({"Name": "rc"}));
    assert_eq!(v["Volume"]["Mountpoint"], mp.to_str().expect("utf-8"));
    assert_eq!(v["Volume"]["Status"]["mountpoints"], json!([mp]));
    fs::write(mp.join("f"), b"before\n").expect("write through Docker's mountpoint");
    // Unknown IDs change nothing and never fail.
    unmount(&mut c, "never-mounted");
    assert_eq!(references(&mut c, "rc"), 3);
    unmount(&mut c, "A");
    assert_eq!(references(&mut c, "rc"), 2);
    assert!(is_volfs(&mp));

    // kill -9: the mount lives on in the keeper, and the counts in the store.
    d.kill9();
    d.restart();
    let mut c = Conn::open(&socket);
    assert_eq!(references(&mut c, "rc"), 2);
    assert!(is_volfs(&mp));
    assert_eq!(
        fs::read(mp.join("f")).expect("read after restart"),
        b"before\n"
    );
    // A clean stop removes both sockets; the next start serves the same counts.
    d.stop();
    assert!(!socket.exists(), "SIGTERM left the plugin socket");
    d.restart();
    let mut c = Conn::open(&socket);
    assert_eq!(references(&mut c, "rc"), 2);
    unmount(&mut c, "A");
    assert!(is_volfs(&mp), "unmounted while ID B still holds it");
    unmount(&mut c, "B");
    assert_eq!(references(&mut c, "rc"), 0);
    assert!(!is_volfs(&mp), "still mounted after the last Unmount");
    let v = ok(&mut c, "/VolumeDriver.Path", json!({"Name": "rc"}));
    assert_eq!(v["Mountpoint"], "");
    unmount(&mut c, "B");

    // Unmounted behind the daemon's back: the next Mount mounts it again.
    mount(&mut c, "D");
    lazy_umount(&mp);
    assert!(!is_volfs(&mp));
    mount(&mut c, "E");
    unmount(&mut c, "D");
    unmount(&mut c, "E");
    assert!(!is_volfs(&mp));

    // Remove: drops references whose Unmount never came, unmounts, deletes; idempotent.
    mount(&mut c, "C");
    ok(&mut c, "/VolumeDriver.Remove", json!({"Name": "rc"}));
    assert!(!is_volfs(&mp));
    assert_eq!(d.cli_ok(&["ls", "-q"]), "");
    refused(
        &mut c,
        "/VolumeDriver.Get",
        r#"{"Name":"rc"}"#,
        500,
        "no such volume",
    );
    ok(&mut c, "/VolumeDriver.Remove", json!({"Name": "rc"}));
    // Re-created under the same name, it starts with no references.
    ok(
        &mut c,
        "/VolumeDriver.Create",
        json!({"Name": "rc", "Opts": null}),
    );
    assert_eq!(references(&mut c, "rc"), 0);
    // A volume mounted by hand is not removed under its user.
    let (_keep, hand) = {
        let t = open_tempdir();
        let p = fs::canonicalize(t.path()).expect("canonicalize");
        (t, p)
    };
    d.mount("rc", &hand, false);
    refused(
        &mut c,
        "/VolumeDriver.Remove",
        r#"{"Name":"rc"}"#,
        500,
        "is in use",
    );
    d.umount(&hand);
    ok(&mut c, "/VolumeDriver.Remove", json!({"Name": "rc"}));

    // `volfs shutdown` removes the plugin socket too.
    d.cli_ok(&["shutdown"]);
    wait_for("the plugin socket to go", Duration::from_secs(10), || {
        !socket.exists()
    });
}

#[test]
fn plugin_socket_flags_and_a_second_daemon() {
    let dir = open_tempdir();
    let (_d, socket) = plugin_daemon(dir.path());
    assert_eq!(
        fs::metadata(&socket).expect("socket").permissions().mode() & 0o777,
        0o600
    );
    // A second daemon on the same plugin socket is refused, and leaves the first alone.
    let other = open_tempdir();
    let mut second = CleanCommand::new(MOUNTD);
    second
        .arg("--root")
        .arg(other.path().join("root"))
        .arg("--socket")
        .arg(other.path().join("ctl.sock"))
        .arg("--plugin-socket")
        .arg(&socket);
    let out = run_limited("a second volfs-mountd", second, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already answers on the plugin socket"),
        "{}",
        text(&out.stderr)
    );
    assert!(!other.path().join("ctl.sock").exists());
    let mut c = Conn::open(&socket);
    ok(&mut c, "/VolumeDriver.List", json!({}));
    // --no-plugin: no socket at all.
    let quiet = Daemon::start();
    let log = strip_ansi(&quiet.log());
    assert!(log.contains("volfs-mountd ready"), "{log}");
    assert!(log.contains("plugin_socket=none"), "{log}");
}

/// A container keeps its bind of a volume's mount after the host unmounts it; the daemon
/// must not wait for that (it holds the mount table meanwhile).
#[test]
fn umount_returns_while_a_bind_of_the_mount_lives_on() {
    let d = Daemon::start();
    d.create("bound");
    let (a, b) = (open_tempdir(), open_tempdir());
    let (a, b) = (
        fs::canonicalize(a.path()).expect("a"),
        fs::canonicalize(b.path()).expect("b"),
    );
    d.mount("bound", &a, false);
    fs::write(a.join("f"), b"bytes\n").expect("write");
    nix::mount::mount(
        Some(&a),
        &b,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind");
    let mut umount = CleanCommand::new(VOLFS);
    umount.arg("--socket").arg(d.socket()).arg("umount").arg(&a);
    let out = run_limited("volfs umount", umount, Duration::from_secs(10));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(d.cli_ok(&["ls", "-q"]), "bound\n");
    assert!(!is_volfs(&a));
    // The bind still reaches the volume, served by the same daemon.
    assert_eq!(
        fs::read(b.join("f")).expect("read through the bind"),
        b"bytes\n"
    );
    fs::write(b.join("g"), b"more\n").expect("write through the bind");
    lazy_umount(&b);
    d.mount("bound", &a, false);
    assert_eq!(fs::read(a.join("g")).expect("read"), b"more\n");
}

// ---------------------------------------------------------------------------------------------
// a private dockerd
// ---------------------------------------------------------------------------------------------

/// A private dockerd plus a volfs-mountd serving it as driver [`Docker::driver`].
/// `-v VOLUME IMAGE sh -c SCRIPT`: the end of a `docker run` of a shell script.
fn sh_in<'a>(volume: &'a str, script: &'a str) -> [&'a str; 6] {
    ["-v", volume, IMAGE, "sh", "-c", script]
}

struct Docker {
    volfs: Daemon,
    driver: String,
    plugin_socket: PathBuf,
    dockerd: Option<CleanChild>,
    host: String,
    dir: TempDir,
    /// Mount points made for the test (kept alive until teardown).
    scratch: Vec<TempDir>,
    _serial: MutexGuard<'static, ()>,
}

impl Docker {
    fn start() -> Docker {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        let driver = format!(
            "volfs-e2e-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let plugin_socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
        let volfs =
            Daemon::start_with(&["--plugin-socket", plugin_socket.to_str().expect("utf-8")]);
        let dir = open_tempdir();
        let p = dir.path();
        fs::write(p.join("daemon.json"), "{}\n").expect("daemon.json");
        fs::create_dir(p.join("cli")).expect("cli config dir");
        let log = fs::File::create(p.join("dockerd.log")).expect("dockerd log");
        let host = format!("unix://{}", p.join("docker.sock").display());
        let dockerd = CleanCommand::new("dockerd")
            .arg("--config-file")
            .arg(p.join("daemon.json"))
            .arg("--data-root")
            .arg(p.join("data"))
            .arg("--exec-root")
            .arg(p.join("exec"))
            .arg("--pidfile")
            .arg(p.join("docker.pid"))
            .args(["-H", &host])
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
                "--shutdown-timeout=5",
            ])
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn dockerd (apt-get install docker.io)");
        let mut env = Docker {
            volfs,
            driver,
            plugin_socket,
            dockerd: Some(dockerd),
            host,
            dir,
            scratch: Vec::new(),
            _serial: serial,
        };
        let ready = Instant::now();
        loop {
            if let Some(st) = env
                .dockerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                env.dockerd = None;
                panic!(
                    "dockerd exited during startup ({st}):\n{}",
                    env.dockerd_log()
                );
            }
            if env.docker(&["info"]).status.success() {
                break;
            }
            assert!(
                ready.elapsed() < Duration::from_secs(60),
                "dockerd not ready after 60 s:\n{}",
                env.dockerd_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        env.build_image();
        eprintln!("docker test environment up in {:.1?}", t0.elapsed());
        env
    }

    /// The test image: busybox-static with every applet, a user 1000, and a `/data` with
    /// content owned by 1000 for Docker's copy-up.
    fn build_image(&self) {
        let root = self.dir.path().join("rootfs");
        for d in ["bin", "etc", "tmp", "data/sub"] {
            fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("chmod");
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox (apt-get install busybox-static)");
        fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
        let mut list = CleanCommand::new(root.join("bin/busybox"));
        list.arg("--list");
        let list = run_limited("busybox --list", list, Duration::from_secs(10));
        for applet in text(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                    .expect("applet link");
            }
        }
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n",
        )
        .expect("passwd");
        fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").expect("group");
        let data = root.join("data");
        fs::write(data.join("seed"), "seed\n").expect("seed");
        fs::write(data.join("sub/inner"), "inner\n").expect("inner");
        for (p, uid, mode) in [
            ("seed", 1000, 0o750),
            ("sub", 1000, 0o700),
            ("sub/inner", 0, 0o644),
        ] {
            let p = data.join(p);
            nix::unistd::chown(&p, Some(uid.into()), Some(uid.into())).expect("chown");
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).expect("chmod");
        let tarball = self.dir.path().join("rootfs.tar");
        let mut tar = CleanCommand::new("tar");
        tar.arg("-C").arg(&root).arg("-cf").arg(&tarball).arg(".");
        let out = run_limited("tar of the image root", tar, COMMAND_TIMEOUT);
        assert!(out.status.success(), "tar: {}", text(&out.stderr));
        self.docker_ok(&["import", tarball.to_str().expect("utf-8"), IMAGE]);
    }

    fn dockerd_log(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `docker -H HOST args…`, whatever its exit status.
    fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = CleanCommand::new(docker_cli());
        cmd.env("DOCKER_CONFIG", self.dir.path().join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .args(["-H", &self.host])
            .args(args);
        run_limited(&format!("docker {args:?}"), cmd, COMMAND_TIMEOUT)
    }

    /// `docker args…`, which must succeed; returns its stdout.
    #[track_caller]
    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        if !out.status.success() {
            panic!(
                "docker {args:?} failed ({}):\nstdout: {}\nstderr: {}\n--- dockerd log (tail):\n{}\n--- volfs-mountd log:\n{}",
                out.status,
                text(&out.stdout),
                text(&out.stderr),
                self.dockerd_log(),
                self.volfs.log()
            );
        }
        text(&out.stdout)
    }

    /// `docker args…`, which must fail with exit status `code`; returns its stderr.
    #[track_caller]
    fn docker_fails(&self, args: &[&str], code: i32) -> String {
        let out = self.docker(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "docker {args:?}: stdout {:?} stderr {:?}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stderr)
    }

    /// `docker run --rm --network none args…` (stdout), which must succeed.
    #[track_caller]
    fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["run", "--rm", "--network", "none"];
        all.extend_from_slice(args);
        self.docker_ok(&all)
    }

    /// `docker run --rm --network none args…`, which must exit `code`; its stderr.
    #[track_caller]
    fn run_fails(&self, args: &[&str], code: i32) -> String {
        let mut all = vec!["run", "--rm", "--network", "none"];
        all.extend_from_slice(args);
        self.docker_fails(&all, code)
    }

    /// `docker run -d --name NAME --network none -v VOLUME IMAGE sh -c SCRIPT`.
    #[track_caller]
    fn run_detached(&self, name: &str, volume: &str, script: &str) -> String {
        let mut all = vec!["run", "-d", "--name", name, "--network", "none"];
        all.extend_from_slice(&sh_in(volume, script));
        self.docker_ok(&all)
    }

    /// `docker run --rm --network none -v VOLUME IMAGE sh -c SCRIPT` (stdout), which must succeed.
    #[track_caller]
    fn run_sh(&self, volume: &str, script: &str) -> String {
        self.run(&sh_in(volume, script))
    }

    /// `docker run --rm --network none -v VOLUME IMAGE sh -c SCRIPT`, whatever its exit.
    fn sh_output(&self, volume: &str, script: &str) -> Output {
        let mut all = vec!["run", "--rm", "--network", "none"];
        all.extend_from_slice(&sh_in(volume, script));
        self.docker(&all)
    }

    /// `docker volume create -d DRIVER args…`.
    #[track_caller]
    fn create(&self, args: &[&str]) -> String {
        let mut all = vec!["volume", "create", "-d", &self.driver];
        all.extend_from_slice(args);
        self.docker_ok(&all)
    }

    /// `docker volume inspect NAME`, the one object.
    #[track_caller]
    fn inspect(&self, name: &str) -> Value {
        let v: Value =
            serde_json::from_str(&self.docker_ok(&["volume", "inspect", name])).expect("JSON");
        v[0].clone()
    }

    /// Docker's mountpoint of volume `name` (live only while a container uses it).
    fn mountpoint(&self, name: &str) -> PathBuf {
        docker_mountpoint(&self.volfs, name)
    }

    /// A fresh directory (mode 0755) that lives as long as the test.
    fn scratch_dir(&mut self) -> PathBuf {
        let d = open_tempdir();
        let p = fs::canonicalize(d.path()).expect("canonicalize");
        self.scratch.push(d);
        p
    }

    fn volfs_names(&self) -> BTreeSet<String> {
        self.volfs
            .cli_ok(&["ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Volumes of this test's driver only: another volfs daemon on the machine (a user's
    /// own, on the default plugin socket) is found by dockerd too.
    fn docker_names(&self) -> BTreeSet<String> {
        let only = format!("driver={}", self.driver);
        self.docker_ok(&["volume", "ls", "-q", "--filter", &only])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if self.dockerd.is_some() {
            let ids = self.docker(&["ps", "-aq"]);
            let ids: Vec<String> = text(&ids.stdout).lines().map(str::to_string).collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.docker(&args);
            }
        }
        if let Some(mut c) = self.dockerd.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // dockerd stops its containerd; one it left (killed itself) goes now.
        let pidfile = self.dir.path().join("exec/containerd/containerd.pid");
        if let Some(pid) = fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains(&self.dir.path().display().to_string()))
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if self.volfs.pid().is_some() {
            let _ = self.volfs.cli(&["shutdown"]);
        }
        let mine = self.dir.path().to_path_buf();
        for (mp, _) in mounts().into_iter().rev() {
            if mp.starts_with(&mine) || mp.starts_with(self.volfs.root()) {
                lazy_umount(&mp);
            }
        }
        let _ = fs::remove_file(&self.plugin_socket);
    }
}

// ---------------------------------------------------------------------------------------------
// scenarios
// ---------------------------------------------------------------------------------------------

/// Prints how long a scenario took (for the report in scripts/docker-e2e and the issue).
struct Timed(&'static str, Instant);

impl Timed {
    fn new(name: &'static str) -> Timed {
        Timed(name, Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        eprintln!("scenario {}: {:.1?}", self.0, self.1.elapsed());
    }
}

const EROFS: &str = "Read-only file system";

#[test]
fn docker_host_mount_binds_into_containers_like_a_directory() {
    let _t = Timed::new("host mount bind-mounted into containers");
    let mut dk = Docker::start();
    dk.volfs.create("hostvol");
    let mnt = dk.scratch_dir();
    dk.volfs.mount("hostvol", &mnt, false);
    fs::create_dir(mnt.join("u")).expect("mkdir");
    nix::unistd::chown(&mnt.join("u"), Some(1000.into()), Some(1000.into())).expect("chown");
    fs::write(mnt.join("from-host"), b"host bytes\n").expect("write");
    let bind = format!("{}:/data", mnt.display());
    let bind_ro = format!("{}:/data:ro", mnt.display());

    let out = dk.run_sh(
        &bind,
        "cat /data/from-host && printf 'container bytes\\n' > /data/from-root && ls /data",
    );
    assert_eq!(out, "host bytes\nfrom-host\nfrom-root\nu\n");
    assert_eq!(
        fs::read(mnt.join("from-root")).expect("read"),
        b"container bytes\n"
    );
    assert_eq!(fs::metadata(mnt.join("from-root")).expect("stat").uid(), 0);

    // A container user other than root: its own directory yes, root's no.
    let out = dk.run(&[
        "-u",
        "1000:1000",
        "-v",
        &bind,
        IMAGE,
        "sh",
        "-c",
        "echo user-data > /data/u/f && id -u && stat -c '%u:%g %a' /data/u/f && cat /data/from-root",
    ]);
    assert_eq!(out, "1000\n1000:1000 644\ncontainer bytes\n");
    let m = fs::metadata(mnt.join("u/f")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    assert_eq!(fs::read(mnt.join("u/f")).expect("read"), b"user-data\n");
    let err = dk.run_fails(
        &["-u", "1000:1000", "-v", &bind, IMAGE, "touch", "/data/nope"],
        1,
    );
    assert!(
        err.contains("touch: /data/nope: Permission denied"),
        "{err}"
    );

    // :ro reads, refuses writes.
    let out = dk.sh_output(&bind_ro, "cat /data/from-host; echo x > /data/w");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "host bytes\n");
    assert!(
        text(&out.stderr).contains(&format!("can't create /data/w: {EROFS}")),
        "{}",
        text(&out.stderr)
    );
    assert!(!mnt.join("w").exists());
    // Still the same live mount afterwards.
    assert!(is_volfs(&mnt));
    dk.volfs.umount(&mnt);
}

#[test]
fn docker_volume_create_ls_inspect_rm_and_anonymous_volumes() {
    let _t = Timed::new("volume create/ls/inspect/rm, anonymous --rm");
    let dk = Docker::start();
    assert_eq!(
        dk.create(&[
            "-o",
            "size=1G",
            "-o",
            "mode=0770",
            "--label",
            "team=x",
            "dv1"
        ]),
        "dv1\n"
    );
    let only = format!("driver={}", dk.driver);
    let ls = dk.docker_ok(&[
        "volume",
        "ls",
        "--filter",
        &only,
        "--format",
        "{{.Driver}} {{.Name}}",
    ]);
    assert_eq!(ls, format!("{} dv1\n", dk.driver));
    let v = dk.inspect("dv1");
    let ours: Value = serde_json::from_str(&dk.volfs.cli_ok(&["inspect", "dv1"])).expect("JSON");
    assert_eq!(v["Driver"], dk.driver.as_str());
    assert_eq!(v["Name"], "dv1");
    assert_eq!(v["Labels"], json!({"team": "x"}));
    assert_eq!(v["Options"], json!({"size": "1G", "mode": "0770"}));
    assert_eq!(v["CreatedAt"], ours[0]["CreatedAt"]);
    assert_ne!(v["CreatedAt"], "0001-01-01T00:00:00Z");
    assert_eq!(v["Scope"], "local");
    assert_eq!(v["Mountpoint"], "");
    assert_eq!(v["Status"]["limit"], "1GiB");
    assert_eq!(v["Status"]["mounts"], 0);
    assert_eq!(ours[0]["Options"], json!({"size": "1G", "mode": "0770"}));
    // Options are checked as `volfs create --opt` checks them.
    for (opt, says) in [
        ("bogus=1", r#"unknown option "bogus""#),
        ("size=lots", "option size"),
        ("readonly=maybe", "expected true or false"),
        ("uid=x", "option uid=\"x\": expected a number"),
        ("from=relative", "must be an absolute path"),
    ] {
        let err = dk.docker_fails(
            &["volume", "create", "-d", &dk.driver, "-o", opt, "bad1"],
            1,
        );
        assert!(err.contains(says), "-o {opt}: {err}");
    }
    for name in ["../x", "a/b"] {
        let err = dk.docker_fails(&["volume", "create", "-d", &dk.driver, name], 1);
        assert!(
            err.contains(&format!("invalid volume name {name:?}")),
            "{name}: {err}"
        );
    }
    assert_eq!(dk.volfs_names(), BTreeSet::from(["dv1".to_string()]));
    // A volume made with the volfs CLI is Docker's too.
    dk.volfs.create("dv2");
    assert_eq!(
        dk.docker_names(),
        BTreeSet::from(["dv1".into(), "dv2".into()])
    );
    assert_eq!(dk.inspect("dv2")["Driver"], dk.driver.as_str());
    dk.docker_ok(&["volume", "rm", "dv1", "dv2"]);
    assert!(dk.volfs_names().is_empty());
    assert!(dk.docker_names().is_empty());

    // Anonymous: created for the run, a volfs mount inside, removed by --rm.
    let out = dk.run(&[
        "--volume-driver",
        &dk.driver,
        "-v",
        "/vol",
        IMAGE,
        "sh",
        "-c",
        "grep ' /vol ' /proc/mounts; echo anon > /vol/f; cat /vol/f",
    ]);
    let mut lines = out.lines();
    let mount = lines.next().expect("the /vol mount line");
    let name = mount
        .strip_prefix("volfs:")
        .and_then(|m| m.split(' ').next())
        .unwrap_or_else(|| panic!("/vol is not a volfs mount: {out}"));
    assert_eq!(name.len(), 64, "{mount}");
    assert!(mount.contains(" /vol fuse.volfs rw,"), "{mount}");
    assert_eq!(lines.next(), Some("anon"));
    assert!(
        dk.volfs_names().is_empty(),
        "--rm left the anonymous volume"
    );
    assert!(dk.docker_names().is_empty());
}

#[test]
fn docker_copies_image_content_into_a_new_volume() {
    let _t = Timed::new("copy-up of image content");
    let mut dk = Docker::start();
    dk.create(&["cu"]);
    let out = dk.run_sh(
        "cu:/data",
        "stat -c '%n %u:%g %a' /data /data/seed /data/sub /data/sub/inner && \
         stat -c '%s' /data/seed /data/sub/inner && cat /data/seed /data/sub/inner",
    );
    assert_eq!(
        out,
        "/data 0:0 755\n/data/seed 1000:1000 750\n/data/sub 1000:1000 700\n\
         /data/sub/inner 0:0 644\n5\n6\nseed\ninner\n"
    );
    // The bytes, owners and modes are in the volume itself, seen from the host.
    let mnt = dk.scratch_dir();
    dk.volfs.mount("cu", &mnt, false);
    let m = |p: &str| fs::symlink_metadata(mnt.join(p)).expect("stat");
    assert_eq!(fs::read(mnt.join("seed")).expect("read"), b"seed\n");
    assert_eq!(fs::read(mnt.join("sub/inner")).expect("read"), b"inner\n");
    for (p, uid, mode) in [
        ("", 0, 0o755),
        ("seed", 1000, 0o750),
        ("sub", 1000, 0o700),
        ("sub/inner", 0, 0o644),
    ] {
        let md = m(p);
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (uid, uid, mode),
            "/data/{p}"
        );
    }
    // Not copied again into a volume that has content.
    fs::remove_file(mnt.join("seed")).expect("rm");
    dk.volfs.umount(&mnt);
    assert_eq!(dk.run(&["-v", "cu:/data", IMAGE, "ls", "/data"]), "sub\n");
    // An anonymous volume gets the copy too.
    let out = dk.run(&[
        "--volume-driver",
        &dk.driver,
        "-v",
        "/data",
        IMAGE,
        "sh",
        "-c",
        "grep -c '^volfs:' /proc/mounts; stat -c '%u:%g %a %s' /data/seed; cat /data/seed",
    ]);
    assert_eq!(out, "1\n1000:1000 750 5\nseed\n");
}

#[test]
fn docker_ro_mounts_and_readonly_volumes_refuse_writes() {
    let _t = Timed::new(":ro and readonly=true");
    let dk = Docker::start();
    dk.create(&["rw1"]);
    dk.run_sh("rw1:/vol", "echo kept > /vol/f");
    let out = dk.sh_output(
        "rw1:/vol:ro",
        "cat /vol/f; echo x > /vol/f; echo $? >&2; mkdir /vol/d",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "kept\n");
    assert_eq!(
        text(&out.stderr),
        format!(
            "sh: can't create /vol/f: {EROFS}\n1\nmkdir: can't create directory '/vol/d': {EROFS}\n"
        )
    );
    assert_eq!(
        dk.run(&["-v", "rw1:/vol", IMAGE, "cat", "/vol/f"]),
        "kept\n"
    );

    // readonly=true: read-only for every container, and on the host.
    dk.create(&["-o", "readonly=true", "ro1"]);
    assert_eq!(dk.inspect("ro1")["Status"]["readonly"], true);
    let err = dk.run_fails(&["-v", "ro1:/vol", IMAGE, "touch", "/vol/x"], 1);
    assert!(err.contains(&format!("touch: /vol/x: {EROFS}")), "{err}");
    dk.run_detached(
        "holder",
        "ro1:/vol",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    );
    let mp = dk.mountpoint("ro1");
    wait_for(
        "the read-only volume's mount",
        Duration::from_secs(20),
        || is_volfs(&mp),
    );
    assert_errno!(fs::write(mp.join("x"), b"x"), EROFS);
    assert_errno!(fs::create_dir(mp.join("d")), EROFS);
    dk.docker_ok(&["rm", "-f", "holder"]);
}

#[test]
fn docker_mounts_a_snapshot_read_only_by_the_name_vol_at_snap() {
    let _t = Timed::new("VOL@SNAP");
    let dk = Docker::start();
    dk.create(&["snapvol"]);
    dk.run_sh(
        "snapvol:/vol",
        "mkdir /vol/cfg && echo v1 > /vol/cfg/app.conf",
    );
    assert_eq!(
        dk.volfs
            .cli_ok(&["snapshot", "create", "snapvol", "nightly"]),
        "snapvol@nightly\n"
    );
    dk.run_sh(
        "snapvol:/vol",
        "echo v2 > /vol/cfg/app.conf; rm -r /vol/cfg",
    );
    // Copy a file back from the snapshot, as a restore would.
    let out = dk.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        "snapvol@nightly:/restore:ro",
        "-v",
        "snapvol:/vol",
        IMAGE,
        "sh",
        "-c",
        "cp -a /restore/cfg /vol/ && cat /vol/cfg/app.conf; echo x > /restore/new; echo $? >&2",
    ]);
    assert_eq!(text(&out.stdout), "v1\n", "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!("sh: can't create /restore/new: {EROFS}\n1\n")
    );
    // Read-only even without :ro: a snapshot never changes.
    let err = dk.run_fails(
        &[
            "-v",
            "snapvol@nightly:/restore",
            IMAGE,
            "touch",
            "/restore/x",
        ],
        1,
    );
    assert!(
        err.contains(&format!("touch: /restore/x: {EROFS}")),
        "{err}"
    );
    assert_eq!(dk.inspect("snapvol@nightly")["Status"]["readonly"], true);
    assert_eq!(
        dk.run(&["-v", "snapvol:/vol", IMAGE, "cat", "/vol/cfg/app.conf"]),
        "v1\n"
    );
    // Docker forgetting the name leaves the snapshot; an unknown snapshot is refused.
    dk.docker_ok(&["volume", "rm", "snapvol@nightly"]);
    assert!(
        dk.volfs
            .cli_ok(&["snapshot", "ls", "snapvol"])
            .contains("nightly")
    );
    let err = dk.run_fails(
        &[
            "--volume-driver",
            &dk.driver,
            "-v",
            "snapvol@nope:/r",
            IMAGE,
            "true",
        ],
        125,
    );
    assert!(err.contains("no such snapshot: snapvol@nope"), "{err}");
}

#[test]
fn docker_two_containers_share_one_volume_at_the_same_time() {
    let _t = Timed::new("two containers on one volume");
    let dk = Docker::start();
    dk.create(&["shared"]);
    // Each announces itself, waits for the other, then both append at the same time; each
    // then waits for the other's result and for the host's stop sign.
    let script = |me: &str, other: &str| {
        format!(
            "touch /vol/ready-{me}; n=0; \
             while [ ! -f /vol/ready-{other} ] && [ $n -lt 600 ]; do n=$((n+1)); sleep 0.05; done; \
             for i in $(seq 1 200); do echo {me}$i >> /vol/log; done; \
             echo from-{me} > /vol/done-{me}; \
             while [ ! -f /vol/done-{other} ] && [ $n -lt 1200 ]; do n=$((n+1)); sleep 0.05; done; \
             cat /vol/done-{other}; \
             while [ ! -f /vol/stop ] && [ $n -lt 1800 ]; do n=$((n+1)); sleep 0.05; done"
        )
    };
    for (me, other) in [("a", "b"), ("b", "a")] {
        dk.run_detached(&format!("c{me}"), "shared:/vol", &script(me, other));
    }
    wait_for(
        "both containers to read each other's file",
        Duration::from_secs(60),
        || {
            dk.docker_ok(&["logs", "ca"]) == "from-b\n"
                && dk.docker_ok(&["logs", "cb"]) == "from-a\n"
        },
    );
    assert_eq!(dk.inspect("shared")["Status"]["mounts"], 2);
    let mp = dk.mountpoint("shared");
    assert!(is_volfs(&mp));
    let log = fs::read_to_string(mp.join("log")).expect("log");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 400, "{log}");
    for who in ["a", "b"] {
        let mine: Vec<String> = lines
            .iter()
            .filter(|l| l.starts_with(who))
            .map(|l| l.to_string())
            .collect();
        let want: Vec<String> = (1..=200).map(|i| format!("{who}{i}")).collect();
        assert_eq!(mine, want, "appends of {who} lost, torn or reordered");
    }
    fs::write(mp.join("stop"), b"").expect("stop sign");
    assert_eq!(dk.docker_ok(&["wait", "ca", "cb"]), "0\n0\n");
    dk.docker_ok(&["rm", "ca", "cb"]);
    assert_eq!(dk.inspect("shared")["Status"]["mounts"], 0);
    assert!(!is_volfs(&mp), "still mounted after both containers left");
}

#[test]
fn docker_volumes_from_a_volume_container_keeps_the_data() {
    let _t = Timed::new("--volumes-from");
    let dk = Docker::start();
    dk.docker_ok(&[
        "create",
        "--name",
        "vc",
        "--volume-driver",
        &dk.driver,
        "-v",
        "/vol",
        IMAGE,
        "true",
    ]);
    let anon = dk.docker_ok(&[
        "inspect",
        "vc",
        "--format",
        "{{range .Mounts}}{{.Name}}{{end}}",
    ]);
    let anon = anon.trim();
    assert_eq!(dk.volfs_names(), BTreeSet::from([anon.to_string()]));
    dk.run(&[
        "--volumes-from",
        "vc",
        IMAGE,
        "sh",
        "-c",
        "echo kept > /vol/f",
    ]);
    let out = dk.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--volumes-from",
        "vc:ro",
        IMAGE,
        "sh",
        "-c",
        "cat /vol/f; echo x > /vol/g",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "kept\n");
    assert!(text(&out.stderr).contains(EROFS), "{}", text(&out.stderr));
    dk.docker_ok(&["rm", "vc"]);
    assert_eq!(dk.volfs_names(), BTreeSet::from([anon.to_string()]));
    assert_eq!(dk.docker_names(), BTreeSet::from([anon.to_string()]));
    assert_eq!(
        dk.run(&["-v", &format!("{anon}:/vol"), IMAGE, "cat", "/vol/f"]),
        "kept\n"
    );
    dk.docker_ok(&["volume", "rm", anon]);
    assert!(dk.volfs_names().is_empty());
}

#[test]
fn docker_backup_recipe_and_restore_into_a_fresh_volume() {
    let _t = Timed::new("backup and restore recipe");
    let mut dk = Docker::start();
    let fill = "echo payload > /data/p && mkdir /data/d && echo deep > /data/d/e && \
                chown 1000:1000 /data/d/e && chmod 0640 /data/d/e && ln -s d/e /data/link && \
                dd if=/dev/urandom of=/data/big bs=64k count=16 2>/dev/null && md5sum /data/big";
    dk.docker_ok(&[
        "create",
        "--name",
        "dbstore",
        "-v",
        "bk1:/data",
        "--volume-driver",
        &dk.driver,
        IMAGE,
        "true",
    ]);
    let sum = dk.run(&["--volumes-from", "dbstore", IMAGE, "sh", "-c", fill]);
    let backup = dk.scratch_dir();
    let bind = format!("{}:/backup", backup.display());
    let listing = dk.run(&[
        "--volumes-from",
        "dbstore",
        "-v",
        &bind,
        IMAGE,
        "tar",
        "cvf",
        "/backup/backup.tar",
        "/data",
    ]);
    let listed: BTreeSet<&str> = listing.lines().collect();
    for want in [
        "data/",
        "data/p",
        "data/d/",
        "data/d/e",
        "data/link",
        "data/big",
        "data/seed",
        "data/sub/inner",
    ] {
        assert!(
            listed.contains(want),
            "{want} missing from tar's listing {listing:?}"
        );
    }
    // The archive on the host holds exactly the volume's content.
    let mut archive =
        tar::Archive::new(fs::File::open(backup.join("backup.tar")).expect("backup.tar"));
    let mut found = BTreeSet::new();
    for entry in archive.entries().expect("entries") {
        let mut e = entry.expect("entry");
        let path = e.path().expect("path").display().to_string();
        if path == "data/d/e" {
            assert_eq!(
                (
                    e.header().uid().expect("uid"),
                    e.header().mode().expect("mode")
                ),
                (1000, 0o640)
            );
            let mut s = String::new();
            e.read_to_string(&mut s).expect("read");
            assert_eq!(s, "deep\n");
        }
        found.insert(path.trim_end_matches('/').to_string());
    }
    assert_eq!(
        found,
        [
            "data",
            "data/big",
            "data/d",
            "data/d/e",
            "data/link",
            "data/p",
            "data/seed",
            "data/sub",
            "data/sub/inner"
        ]
        .into_iter()
        .map(String::from)
        .collect()
    );
    // Restore into a fresh volume.
    dk.create(&["bk2"]);
    dk.run(&[
        "-v",
        "bk2:/data",
        "-v",
        &bind,
        IMAGE,
        "sh",
        "-c",
        "cd / && tar xf /backup/backup.tar",
    ]);
    let check = "cat /data/p /data/d/e && stat -c '%u:%g %a' /data/d/e && readlink /data/link && md5sum /data/big";
    let want = format!("payload\ndeep\n1000:1000 640\nd/e\n{sum}");
    assert_eq!(dk.run_sh("bk2:/data", check), want);
    assert_eq!(
        dk.run(&["--volumes-from", "dbstore", IMAGE, "sh", "-c", check]),
        want
    );
    // An archive of the volume's root restores in one step: `-o from=`.
    dk.run(&[
        "--volumes-from",
        "dbstore",
        "-v",
        &bind,
        IMAGE,
        "tar",
        "cf",
        "/backup/flat.tar",
        "-C",
        "/data",
        ".",
    ]);
    let from = format!("from={}", backup.join("flat.tar").display());
    dk.create(&["-o", &from, "bk3"]);
    assert_eq!(dk.run_sh("bk3:/data", check), want);
}

#[test]
fn docker_volfs_export_of_a_volume_a_container_writes_is_consistent_and_restores() {
    let _t = Timed::new("volfs export under a writing container");
    let dk = Docker::start();
    dk.create(&["live"]);
    // The container keeps two files in step: `a` is replaced with generation g (written
    // aside, renamed over), then `b`, so at any instant a is g or g+1 when b is g.
    dk.run_detached(
        "pairs",
        "live:/data",
        "trap 'exit 0' TERM; g=0; while true; do g=$((g+1)); \
         for f in a b; do echo $g > /data/t; seq 1 $((200 + g % 50)) >> /data/t; mv /data/t /data/$f; done; done",
    );
    let dir = dk.volfs.root().join("exports");
    fs::create_dir_all(&dir).expect("exports dir");
    wait_for("the writer", Duration::from_secs(20), || {
        dk.volfs
            .cli(&[
                "export",
                "live",
                "-o",
                dir.join("probe.tar").to_str().expect("utf-8"),
            ])
            .status
            .success()
            && tar::Archive::new(fs::File::open(dir.join("probe.tar")).expect("probe"))
                .entries()
                .expect("entries")
                .filter_map(Result::ok)
                .any(|e| e.path().is_ok_and(|p| p.ends_with("b")))
    });
    let gen_of = |data: &[u8]| -> u64 {
        let text = String::from_utf8_lossy(data).into_owned();
        let mut lines = text.lines();
        let g: u64 = lines.next().expect("generation").parse().expect("number");
        let want: Vec<String> = (1..=200 + g % 50).map(|i| i.to_string()).collect();
        assert_eq!(
            lines.map(str::to_string).collect::<Vec<_>>(),
            want,
            "a torn file"
        );
        g
    };
    let mut gens = BTreeSet::new();
    for i in 0..8 {
        let path = dir.join(format!("{i}.tar"));
        dk.volfs
            .cli_ok(&["export", "live", "-o", path.to_str().expect("utf-8")]);
        let mut files = BTreeMap::new();
        for e in tar::Archive::new(fs::File::open(&path).expect("archive"))
            .entries()
            .expect("entries")
        {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).expect("read entry");
            files.insert(name, data);
        }
        let (a, b) = (gen_of(&files["./a"]), gen_of(&files["./b"]));
        assert!(a == b || a == b + 1, "export {i}: a at {a}, b at {b}");
        gens.insert(b);
    }
    assert!(gens.len() > 2, "the container barely wrote: {gens:?}");
    dk.docker_ok(&["rm", "-f", "pairs"]);
    // Restore the last archive into a new volume and read it from a container.
    let last = dir.join("7.tar");
    dk.volfs
        .cli_ok(&["import", "restored", last.to_str().expect("utf-8")]);
    let out = dk.run_sh("restored:/data", "head -1 /data/a; head -1 /data/b");
    let mut lines = out.lines().map(|l| l.parse::<u64>().expect("generation"));
    let (a, b) = (lines.next().expect("a"), lines.next().expect("b"));
    assert!(a == b || a == b + 1, "restored: a at {a}, b at {b}");
    assert_eq!(dk.inspect("restored")["Status"]["snapshots"], 0);
    dk.volfs.cli_ok(&["snapshot", "create", "restored", "r1"]);
    assert_eq!(dk.inspect("restored")["Status"]["snapshots"], 1);
}

#[test]
fn docker_uid_1000_writes_to_a_volume_created_with_uid_1000() {
    let _t = Timed::new("non-root container user");
    let dk = Docker::start();
    dk.create(&["-o", "uid=1000", "-o", "gid=1000", "u1"]);
    let out = dk.run(&[
        "-u", "1000:1000", "-v", "u1:/vol", IMAGE, "sh", "-c",
        "echo mine > /vol/f && mkdir /vol/d && stat -c '%u:%g' /vol /vol/f /vol/d && id -un && cat /vol/f",
    ]);
    assert_eq!(out, "1000:1000\n1000:1000\n1000:1000\nuser\nmine\n");
    dk.create(&["u2"]);
    let err = dk.run_fails(
        &[
            "-u",
            "1000:1000",
            "-v",
            "u2:/vol",
            IMAGE,
            "sh",
            "-c",
            "echo x > /vol/f",
        ],
        1,
    );
    assert!(
        err.contains("can't create /vol/f: Permission denied"),
        "{err}"
    );
}

#[test]
fn docker_refuses_rm_of_a_volume_in_use_and_cp_keeps_the_mount() {
    let _t = Timed::new("rm in use refused, docker cp");
    let mut dk = Docker::start();
    dk.create(&["busy"]);
    dk.run_detached(
        "user",
        "busy:/vol",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    );
    let mp = dk.mountpoint("busy");
    wait_for("the container's mount", Duration::from_secs(20), || {
        is_volfs(&mp)
    });
    let err = dk.docker_fails(&["volume", "rm", "busy"], 1);
    assert!(err.contains("volume is in use"), "{err}");
    let err = dk.docker_fails(&["volume", "rm", "-f", "busy"], 1);
    assert!(err.contains("volume is in use"), "{err}");
    assert!(dk.volfs_names().contains("busy"));

    // docker cp sends Mount and Unmount with the running container's own ID: the volume
    // must stay mounted under the container.
    let host = dk.scratch_dir();
    fs::write(host.join("in"), b"copied in\n").expect("write");
    dk.docker_ok(&[
        "cp",
        host.join("in").to_str().expect("utf-8"),
        "user:/vol/in",
    ]);
    assert!(
        is_volfs(&mp),
        "docker cp unmounted the volume under the running container"
    );
    assert_eq!(dk.inspect("busy")["Status"]["mounts"], 1);
    assert_eq!(
        dk.docker_ok(&[
            "exec",
            "user",
            "sh",
            "-c",
            "cat /vol/in; echo after > /vol/after; cat /vol/after"
        ]),
        "copied in\nafter\n"
    );
    dk.docker_ok(&[
        "cp",
        "user:/vol/after",
        host.join("out").to_str().expect("utf-8"),
    ]);
    assert_eq!(fs::read(host.join("out")).expect("read"), b"after\n");
    assert!(is_volfs(&mp));
    assert_eq!(
        dk.docker_ok(&["exec", "user", "cat", "/vol/in"]),
        "copied in\n"
    );

    dk.docker_ok(&["stop", "user"]);
    assert!(!is_volfs(&mp));
    dk.docker_ok(&["rm", "user"]);
    dk.docker_ok(&["volume", "rm", "busy"]);
    assert!(dk.volfs_names().is_empty());
}

#[test]
fn docker_container_keeps_writing_across_kill_9_of_the_daemon() {
    let _t = Timed::new("kill -9 of volfs-mountd under a writing container");
    let mut dk = Docker::start();
    dk.create(&["k9"]);
    dk.run_detached(
        "writer",
        "k9:/vol",
        "trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); \
         echo $i >> /vol/log || echo FAIL $i >&2; sleep 0.02; done",
    );
    let mp = dk.mountpoint("k9");
    let lines = |mp: &Path| {
        fs::read_to_string(mp.join("log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    wait_for("the writer to start", Duration::from_secs(30), || {
        lines(&mp) >= 20
    });
    dk.volfs.kill9();
    std::thread::sleep(Duration::from_millis(500));
    dk.volfs.restart();
    let after = lines(&mp);
    wait_for(
        "the writer to go on after the restart",
        Duration::from_secs(30),
        || lines(&mp) >= after + 50,
    );
    assert_eq!(dk.inspect("k9")["Status"]["mounts"], 1);
    let t0 = Instant::now();
    dk.docker_ok(&["stop", "writer"]);
    let stop = t0.elapsed();
    assert!(stop < Duration::from_secs(5), "docker stop took {stop:?}");
    assert_eq!(dk.docker_ok(&["wait", "writer"]), "0\n");
    let failures = dk.docker(&["logs", "writer"]);
    let failed: Vec<String> = text(&failures.stderr).lines().map(str::to_string).collect();
    assert!(
        failed.len() <= 1,
        "more than the in-flight call failed: {failed:?}"
    );
    // The log counts up by one, but for the one failed call, if any.
    assert!(
        !is_volfs(&mp),
        "the restarted daemon did not get dockerd's Unmount"
    );
    let mnt = dk.scratch_dir();
    dk.volfs.mount("k9", &mnt, false);
    let log = fs::read_to_string(mnt.join("log")).expect("log");
    let nums: Vec<u64> = log
        .lines()
        .map(|l| l.parse().expect("a number per line"))
        .collect();
    let mut expect = 1;
    for n in &nums {
        if *n != expect {
            assert_eq!(
                failed,
                [format!("FAIL {expect}")],
                "line {expect} missing: {log}"
            );
            assert_eq!(*n, expect + 1);
        }
        expect = n + 1;
    }
    eprintln!(
        "writer wrote {} lines; docker stop took {stop:?}",
        nums.len()
    );
    dk.volfs.umount(&mnt);
}
