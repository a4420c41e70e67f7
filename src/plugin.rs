//! Docker's legacy (v1) volume-plugin protocol, served by `volfs-mountd` on a unix socket
//! (default [`DEFAULT_SOCKET`]; dockerd finds a plugin by the socket's file name, so this
//! one is the driver `volfs`: `docker volume create -d volfs`).
//!
//! Transport: HTTP/1.1 `POST /<Method>`, JSON bodies with a `Content-Length`, keep-alive
//! connections, one thread per connection (at most [`MAX_CONNECTIONS`]). The request
//! decoder ([`read_request`], [`decode_call`]) is written here, small and bounded: request
//! and header lines up to [`MAX_LINE`] bytes, at most [`MAX_HEADERS`] headers, bodies up to
//! [`MAX_BODY`] bytes, no chunked bodies. Every refusal is a JSON `{"Err":"..."}` answer
//! (400 malformed, 404 unknown endpoint, 405 not POST, 413 too large, 500 the operation
//! failed), after which a connection with a malformed request is closed.
//!
//! | endpoint | request | answer |
//! |---|---|---|
//! | `/Plugin.Activate` | (empty) | `{"Implements":["VolumeDriver"]}` |
//! | `/VolumeDriver.Capabilities` | `{}` | `{"Capabilities":{"Scope":"local"}}` |
//! | `/VolumeDriver.Create` | `{"Name":n,"Opts":{..}\|null}` | `{"Err":""}` |
//! | `/VolumeDriver.Remove` | `{"Name":n}` | `{"Err":""}` |
//! | `/VolumeDriver.Mount` | `{"Name":n,"ID":id}` | `{"Mountpoint":p,"Err":""}` |
//! | `/VolumeDriver.Unmount` | `{"Name":n,"ID":id}` | `{"Err":""}` |
//! | `/VolumeDriver.Path` | `{"Name":n}` | `{"Mountpoint":p or "","Err":""}` |
//! | `/VolumeDriver.Get` | `{"Name":n}` | `{"Volume":{"Name","Mountpoint","CreatedAt","Status"},"Err":""}` |
//! | `/VolumeDriver.List` | `{}` | `{"Volumes":[{"Name","Mountpoint","CreatedAt"}],"Err":""}` |
//!
//! Behaviour and invariants:
//! - Volumes are the daemon's own ([`Registry`]): `Create` takes the options of
//!   `volfs create --opt` (`readonly`, `size`, `uid`, `gid`, `mode`, `from`) with the same
//!   checks, and a volume made with `volfs create` is visible to Docker too. Docker keeps
//!   labels to itself; they never reach a plugin.
//! - `Get` never answers an error for a volume that exists: dockerd takes any error as
//!   "no such volume" and forgets the volume's labels and options. When the store cannot
//!   be read, the connection is closed unanswered instead, which dockerd treats as an
//!   unreachable driver and retries.
//! - Docker's mounts of volume `NAME` are one FUSE mount at `ROOT/docker/NAME`, made through
//!   [`Registry::mount`] (so it is in the mount table and survives daemon restarts) on the
//!   first `Mount` and unmounted when the last reference goes. A `Mount` answers only once
//!   that path is the live volfs mount ([`is_volfs_mount`]).
//! - References are counted per (volume, mount ID), durably (store tree `docker_mounts`),
//!   because dockerd reuses IDs: `docker cp` into a running container sends a second
//!   `Mount` and an `Unmount` with the container's ID. Repeated IDs add up; an `Unmount`
//!   of an unknown ID changes nothing and succeeds. Counts survive daemon restarts, so an
//!   `Unmount` dockerd sends afterwards still finds its `Mount`.
//! - `Remove` is called by dockerd only once no container references the volume: it drops
//!   the volume's Docker references, unmounts `ROOT/docker/NAME` and removes the volume
//!   (refused while it is mounted elsewhere with `volfs mount`). Removing a volume that
//!   does not exist succeeds.
//! - Mount, Unmount and Remove of one volume are serialised (dockerd sends them in
//!   parallel); Get, List and Path take no per-volume lock and answer at once.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{self, LsFilters, VolumeInfo};
use crate::units::{human_size, rfc3339};
use crate::volume::{Registry, is_volfs_mount, split_target, validate_target};

/// Where dockerd looks for the `volfs` driver.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/volfs.sock";
/// Longest request line or header line.
pub const MAX_LINE: usize = 8 * 1024;
/// Most header lines in one request.
pub const MAX_HEADERS: usize = 64;
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest mount ID (dockerd's are 64 hex digits).
pub const MAX_ID: usize = 256;
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The media type dockerd asks for.
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

// ---------------------------------------------------------------------------------------
// HTTP/1.1 requests
// ---------------------------------------------------------------------------------------

/// One HTTP request as read from the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    /// The request target without its query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer went away, timed out or stopped mid-request: nothing to answer.
    Io(std::io::Error),
    /// A malformed request: answer this status and message, then close.
    Bad(u16, String),
}

fn bad(status: u16, msg: impl Into<String>) -> ReadError {
    ReadError::Bad(status, msg.into())
}

/// Reads one line (up to [`MAX_LINE`] bytes) without its line ending; None at end of input
/// before any byte.
fn read_line<R: BufRead>(r: &mut R, what: &str) -> Result<Option<Vec<u8>>, ReadError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(ReadError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if line.len() > MAX_LINE {
            return Err(bad(400, format!("{what} longer than {MAX_LINE} bytes")));
        }
        // End of input inside a line: the request was cut off.
        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c))
}

/// Reads one request: `Ok(None)` when the peer closed the connection between requests.
pub fn read_request<R: BufRead>(r: &mut R) -> Result<Option<HttpRequest>, ReadError> {
    // A few empty lines before a request are allowed (RFC 9112 §2.2).
    let mut request_line = None;
    for _ in 0..4 {
        match read_line(r, "request line")? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => {
                request_line = Some(l);
                break;
            }
        }
    }
    let line = request_line.ok_or_else(|| bad(400, "no request line"))?;
    let text = std::str::from_utf8(&line).map_err(|_| bad(400, "request line is not UTF-8"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            400,
            "malformed request line (expected METHOD TARGET HTTP/1.1)",
        ));
    };
    if !is_token(method.as_bytes()) {
        return Err(bad(400, "malformed method in the request line"));
    }
    if !target.starts_with('/') || target.bytes().any(|c| c.is_ascii_control()) {
        return Err(bad(400, "malformed request target (expected /Method)"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => {
            return Err(bad(
                505,
                format!("unsupported protocol version {version:?}"),
            ));
        }
    };

    let mut content_length: Option<usize> = None;
    let mut close = false;
    let mut keep_alive = false;
    let mut headers = 0;
    loop {
        let line = read_line(r, "header line")?
            .ok_or_else(|| ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()))?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(bad(431, format!("more than {MAX_HEADERS} header lines")));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(bad(400, "folded header lines are not supported"));
        }
        let colon = line
            .iter()
            .position(|c| *c == b':')
            .ok_or_else(|| bad(400, "malformed header line (expected Name: value)"))?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if !is_token(name) {
            return Err(bad(400, "malformed header name"));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 19 && v.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| bad(400, "malformed Content-Length"))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(bad(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(bad(
                501,
                "Transfer-Encoding is not supported; send the body with a Content-Length",
            ));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|c| *c == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY {
        return Err(bad(
            413,
            format!("request body of {len} bytes is larger than the limit of {MAX_BODY}"),
        ));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(ReadError::Io)?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Some(HttpRequest {
        method: method.to_string(),
        path,
        body,
        keep_alive: !close && (http11 || keep_alive),
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes one answer with a JSON body.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    body: &Value,
    keep_alive: bool,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    w.write_all(&out)?;
    w.flush()
}

// ---------------------------------------------------------------------------------------
// The calls
// ---------------------------------------------------------------------------------------

/// One decoded plugin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Activate,
    Capabilities,
    Create {
        name: String,
        opts: BTreeMap<String, String>,
    },
    Remove {
        name: String,
    },
    Mount {
        name: String,
        id: String,
    },
    Unmount {
        name: String,
        id: String,
    },
    Path {
        name: String,
    },
    Get {
        name: String,
    },
    List,
}

#[derive(Deserialize)]
struct NameBody {
    #[serde(rename = "Name")]
    name: String,
}

#[derive(Deserialize)]
struct CreateBody {
    #[serde(rename = "Name")]
    name: String,
    /// dockerd sends `null` when no option was given.
    #[serde(rename = "Opts", default)]
    opts: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct MountBody {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "ID")]
    id: String,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8], shape: &str) -> Result<T, (u16, String)> {
    if body.trim_ascii().is_empty() {
        return Err((400, format!("the request body is empty; expected {shape}")));
    }
    serde_json::from_slice(body)
        .map_err(|e| (400, format!("malformed request: {e}; expected {shape}")))
}

fn check_id(id: &str) -> Result<(), (u16, String)> {
    if id.is_empty() || id.len() > MAX_ID || id.chars().any(char::is_control) {
        return Err((
            400,
            format!("invalid mount ID {id:?}: expected 1 to {MAX_ID} printable characters"),
        ));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), (u16, String)> {
    validate_target(name).map_err(|e| (400, e))
}

/// Decodes a request into a call: the endpoint, its JSON body and the checks every call
/// of that endpoint must pass (names, IDs, option count). `Err` is the HTTP status and
/// the message for Docker.
pub fn decode_call(method: &str, path: &str, body: &[u8]) -> Result<Call, (u16, String)> {
    const NAME: &str = r#"{"Name":"..."}"#;
    const MOUNT: &str = r#"{"Name":"...","ID":"..."}"#;
    const CREATE: &str = r#"{"Name":"...","Opts":{...}}"#;
    const KNOWN: [&str; 9] = [
        "/Plugin.Activate",
        "/VolumeDriver.Capabilities",
        "/VolumeDriver.List",
        "/VolumeDriver.Create",
        "/VolumeDriver.Mount",
        "/VolumeDriver.Unmount",
        "/VolumeDriver.Remove",
        "/VolumeDriver.Path",
        "/VolumeDriver.Get",
    ];
    if !KNOWN.contains(&path) {
        return Err((
            404,
            format!(
                "unknown endpoint {path:?}: volfs serves /Plugin.Activate and \
                 /VolumeDriver.{{Create,Remove,Mount,Unmount,Path,Get,List,Capabilities}}"
            ),
        ));
    }
    if method != "POST" {
        return Err((405, format!("{path} takes POST, not {method}")));
    }
    Ok(match path {
        "/Plugin.Activate" => Call::Activate,
        "/VolumeDriver.Capabilities" => Call::Capabilities,
        "/VolumeDriver.List" => Call::List,
        "/VolumeDriver.Create" => {
            let b: CreateBody = parse(body, CREATE)?;
            check_name(&b.name)?;
            let opts = b.opts.unwrap_or_default();
            if opts.len() > api::MAX_ENTRIES {
                return Err((400, format!("more than {} options", api::MAX_ENTRIES)));
            }
            Call::Create { name: b.name, opts }
        }
        "/VolumeDriver.Mount" | "/VolumeDriver.Unmount" => {
            let b: MountBody = parse(body, MOUNT)?;
            check_name(&b.name)?;
            check_id(&b.id)?;
            if path == "/VolumeDriver.Mount" {
                Call::Mount {
                    name: b.name,
                    id: b.id,
                }
            } else {
                Call::Unmount {
                    name: b.name,
                    id: b.id,
                }
            }
        }
        "/VolumeDriver.Remove" | "/VolumeDriver.Path" | "/VolumeDriver.Get" => {
            let b: NameBody = parse(body, NAME)?;
            check_name(&b.name)?;
            match path {
                "/VolumeDriver.Remove" => Call::Remove { name: b.name },
                "/VolumeDriver.Path" => Call::Path { name: b.name },
                _ => Call::Get { name: b.name },
            }
        }
        _ => unreachable!("KNOWN lists every endpoint matched here"),
    })
}

/// What to send back.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Json(u16, Value),
    /// Close the connection unanswered (dockerd retries: see the module docs).
    HangUp,
}

fn err_answer(status: u16, msg: impl Into<String>) -> Answer {
    Answer::Json(status, json!({ "Err": msg.into() }))
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn count_key(name: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1 + id.len());
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn count_prefix(name: &str) -> Vec<u8> {
    count_key(name, "")
}

fn decode_count(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// The Docker volume driver over a [`Registry`].
pub struct Plugin {
    registry: Arc<Registry>,
    /// `ROOT/docker`: Docker's mountpoints, one directory per volume.
    docker_root: PathBuf,
    /// Serialises Mount, Unmount and Remove per volume.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    connections: AtomicUsize,
    stopping: AtomicBool,
}

impl Plugin {
    /// Prepares `ROOT/docker` and settles what a crash may have left: references to
    /// volumes that no longer exist are dropped, and a Docker mountpoint with no
    /// reference left is unmounted.
    pub fn new(registry: Arc<Registry>) -> Result<Plugin, String> {
        let dir = registry.root().join("docker");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("creating Docker's mount directory {}: {e}", dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
        }
        let docker_root =
            std::fs::canonicalize(&dir).map_err(|e| format!("resolving {}: {e}", dir.display()))?;
        let plugin = Plugin {
            registry,
            docker_root,
            locks: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        };
        plugin.reconcile()?;
        Ok(plugin)
    }

    fn reconcile(&self) -> Result<(), String> {
        let tree = &self.registry.store().docker_mounts;
        for item in tree.iter() {
            let (k, _) = item.map_err(|e| format!("reading Docker's mount references: {e}"))?;
            let name = k.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(name);
            if self.registry.get(&name, false).ok().flatten().is_none() {
                tracing::info!(volume = %name, "dropping Docker mount references of a removed volume");
                let _ = tree.remove(&k);
            }
        }
        for (path, volume) in self.registry.mounts_under(&self.docker_root) {
            if self.references(&volume)? == 0 {
                tracing::info!(volume, path = %path.display(), "unmounting a Docker mount nothing references");
                if let Err(e) = self.registry.umount(&path) {
                    tracing::warn!("{e}");
                }
            }
        }
        self.registry
            .store()
            .sync()
            .map_err(|e| format!("making Docker's mount references durable: {e}"))
    }

    /// Docker's mountpoint for volume `name`.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.docker_root.join(name)
    }

    /// Stops answering: requests from now on are hung up on (dockerd retries them, and
    /// reaches the next daemon).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn volume_lock(&self, name: &str) -> Arc<Mutex<()>> {
        lock(&self.locks)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Docker's references to volume `name`, over all mount IDs.
    pub fn references(&self, name: &str) -> Result<u64, String> {
        let mut total = 0u64;
        for item in self
            .registry
            .store()
            .docker_mounts
            .scan_prefix(count_prefix(name))
        {
            let (_, v) = item.map_err(|e| format!("reading Docker's mount references: {e}"))?;
            total = total.saturating_add(decode_count(&v));
        }
        Ok(total)
    }

    /// Adds `delta` to the count of (name, id), durably; a count reaching 0 is deleted.
    fn add_reference(&self, name: &str, id: &str, delta: i64) -> Result<(), String> {
        let tree = &self.registry.store().docker_mounts;
        let key = count_key(name, id);
        let old = tree
            .get(&key)
            .map_err(|e| format!("reading Docker's mount references: {e}"))?
            .map(|v| decode_count(&v))
            .unwrap_or(0);
        let new = old.saturating_add_signed(delta);
        let r = if new == 0 {
            tree.remove(&key).map(|_| ())
        } else {
            tree.insert(&key, &new.to_be_bytes()).map(|_| ())
        };
        r.map_err(|e| format!("recording Docker's mount reference: {e}"))?;
        self.registry
            .store()
            .sync()
            .map_err(|e| format!("making Docker's mount reference durable: {e}"))
    }

    fn drop_references(&self, name: &str) -> Result<(), String> {
        let tree = &self.registry.store().docker_mounts;
        for item in tree.scan_prefix(count_prefix(name)) {
            let (k, _) = item.map_err(|e| format!("reading Docker's mount references: {e}"))?;
            tree.remove(&k)
                .map_err(|e| format!("dropping Docker's mount references: {e}"))?;
        }
        Ok(())
    }

    /// Docker's mountpoint of `name` if the volume is mounted there.
    fn live_mountpoint(&self, name: &str) -> Option<PathBuf> {
        let p = self.mountpoint(name);
        (self.registry.mounted_volume(&p).as_deref() == Some(name)).then_some(p)
    }

    /// Answers one decoded call.
    pub fn answer(&self, call: Call) -> Answer {
        let ok = |v: Value| Answer::Json(200, v);
        let failed = |e: String| err_answer(500, e);
        match call {
            Call::Activate => ok(json!({ "Implements": ["VolumeDriver"] })),
            Call::Capabilities => ok(json!({ "Capabilities": { "Scope": "local" } })),
            Call::Create { name, opts } => match self.create(&name, &opts) {
                Ok(()) => ok(json!({ "Err": "" })),
                Err(e) => failed(e),
            },
            Call::Remove { name } => match self.remove(&name) {
                Ok(()) => ok(json!({ "Err": "" })),
                Err(e) => failed(e),
            },
            Call::Mount { name, id } => match self.mount(&name, &id) {
                Ok(p) => ok(json!({ "Mountpoint": p, "Err": "" })),
                Err(e) => failed(e),
            },
            Call::Unmount { name, id } => match self.unmount(&name, &id) {
                Ok(()) => ok(json!({ "Err": "" })),
                Err(e) => failed(e),
            },
            Call::Path { name } => match self.registry.get(&name, false) {
                Ok(Some(_)) => {
                    let p = self.live_mountpoint(&name).unwrap_or_default();
                    ok(json!({ "Mountpoint": p, "Err": "" }))
                }
                Ok(None) => failed(format!("no such volume: {name}")),
                Err(e) => failed(e),
            },
            Call::Get { name } => match self.registry.get(&name, true) {
                Ok(Some(info)) => {
                    let mut v = self.describe(&info);
                    v["Status"] = self.status(&info);
                    ok(json!({ "Volume": v, "Err": "" }))
                }
                Ok(None) => failed(format!("no such volume: {name}")),
                Err(e) => {
                    // Any error would make dockerd forget the volume: hang up instead.
                    tracing::error!(volume = name, "Get: {e}; hanging up so dockerd retries");
                    Answer::HangUp
                }
            },
            Call::List => match self.registry.list(&LsFilters::default()) {
                Ok(list) => {
                    let vols: Vec<Value> = list.iter().map(|v| self.describe(v)).collect();
                    ok(json!({ "Volumes": vols, "Err": "" }))
                }
                Err(e) => failed(e),
            },
        }
    }

    /// Name, Mountpoint and CreatedAt, as Get and List give them.
    fn describe(&self, info: &VolumeInfo) -> Value {
        let mountpoint = self.live_mountpoint(&info.name).unwrap_or_default();
        json!({
            "Name": info.name,
            "Mountpoint": mountpoint,
            "CreatedAt": rfc3339(info.created),
        })
    }

    /// What `docker volume inspect` shows as `Status`.
    fn status(&self, info: &VolumeInfo) -> Value {
        let mut s = serde_json::Map::new();
        if let Some(u) = info.usage {
            s.insert("size".into(), json!(human_size(u.bytes)));
            s.insert("bytes".into(), json!(u.bytes));
            s.insert("inodes".into(), json!(u.inodes));
        }
        if !info.name.contains('@') {
            match self.registry.snapshot_list(&info.name) {
                Ok(l) => {
                    s.insert("snapshots".into(), json!(l.len()));
                }
                Err(e) => tracing::warn!(volume = info.name, "{e}"),
            }
        }
        if let Some(limit) = info.limit_bytes {
            s.insert("limit".into(), json!(human_size(limit)));
        }
        let read_only = info.options.get("readonly").is_some_and(|v| v == "true");
        s.insert("readonly".into(), json!(read_only));
        match self.references(&info.name) {
            Ok(n) => {
                s.insert("mounts".into(), json!(n));
            }
            Err(e) => tracing::warn!(volume = info.name, "{e}"),
        }
        let mountpoints: Vec<String> = info
            .mounts
            .iter()
            .map(|m| {
                let p = m.path.display().to_string();
                if m.read_only { format!("{p} (ro)") } else { p }
            })
            .collect();
        s.insert("mountpoints".into(), json!(mountpoints));
        Value::Object(s)
    }

    fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<(), String> {
        let l = self.volume_lock(name);
        let _g = lock(&l);
        if let (vol, Some(snap)) = split_target(name) {
            // `VOL@SNAP` names an existing snapshot: dockerd creates it on first use.
            if !opts.is_empty() {
                return Err(format!("{name} names a snapshot: it takes no options"));
            }
            return match self.registry.get(name, false)? {
                Some(_) => Ok(()),
                None => Err(format!(
                    "no such snapshot: {vol}@{snap} (take it with `volfs snapshot create {vol} {snap}`)"
                )),
            };
        }
        if self.registry.get(name, false)?.is_none() {
            // Left by a volume of this name removed behind Docker's back (`volfs rm`).
            self.drop_references(name)?;
        }
        self.registry.create(Some(name), &BTreeMap::new(), opts)?;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        let l = self.volume_lock(name);
        let _g = lock(&l);
        if self.registry.get(name, false)?.is_none() {
            self.drop_references(name)?;
            return Ok(());
        }
        // dockerd asks only once no container references the volume: what is left are
        // references whose Unmount never arrived.
        self.drop_references(name)?;
        if let Some(p) = self.live_mountpoint(name) {
            self.registry.umount(&p)?;
        }
        // Docker forgets a snapshot's name; the snapshot stays (`volfs snapshot rm`).
        if split_target(name).1.is_none() {
            self.registry.remove(name, false)?;
        }
        let _ = std::fs::remove_dir(self.mountpoint(name));
        // Forget the volume's lock unless another call waits on it (map and `l` hold two).
        let mut locks = lock(&self.locks);
        if locks.get(name).is_some_and(|x| Arc::strong_count(x) <= 2) {
            locks.remove(name);
        }
        Ok(())
    }

    fn mount(&self, name: &str, id: &str) -> Result<PathBuf, String> {
        let l = self.volume_lock(name);
        let _g = lock(&l);
        if self.registry.get(name, false)?.is_none() {
            return Err(format!("no such volume: {name}"));
        }
        let path = self.mountpoint(name);
        let mounted = self.registry.mounted_volume(&path);
        if mounted.as_deref() == Some(name) && !is_volfs_mount(&path) {
            // In the table but not in the kernel (unmounted behind the daemon's back).
            tracing::warn!(volume = name, path = %path.display(), "Docker's mount is gone; mounting it again");
            self.registry.umount(&path)?;
            return self.mount_locked(name, id, &path, None);
        }
        self.mount_locked(name, id, &path, mounted)
    }

    fn mount_locked(
        &self,
        name: &str,
        id: &str,
        path: &Path,
        mounted: Option<String>,
    ) -> Result<PathBuf, String> {
        match mounted {
            Some(v) if v == name => {}
            other => {
                if let Some(v) = other {
                    return Err(format!(
                        "{} has volume {v} mounted, not {name}",
                        path.display()
                    ));
                }
                match std::fs::create_dir(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("creating {}: {e}", path.display())),
                }
                self.registry.mount(name, path, false)?;
            }
        }
        if !is_volfs_mount(path) {
            return Err(format!(
                "{} is not a live volfs mount of {name} (see volfs-mountd's log)",
                path.display()
            ));
        }
        if let Err(e) = self.add_reference(name, id, 1) {
            if self.references(name).unwrap_or(1) == 0 {
                let _ = self.registry.umount(path);
            }
            return Err(e);
        }
        tracing::debug!(volume = name, id, "Docker mount");
        Ok(path.to_path_buf())
    }

    fn unmount(&self, name: &str, id: &str) -> Result<(), String> {
        let l = self.volume_lock(name);
        let _g = lock(&l);
        self.add_reference(name, id, -1)?;
        if self.references(name)? == 0 {
            if let Some(p) = self.live_mountpoint(name) {
                // Nothing in Docker uses it any more; a failure leaves it mounted, and the
                // next Mount uses it again.
                match self.registry.umount(&p) {
                    Ok(()) => {
                        let _ = std::fs::remove_dir(&p);
                    }
                    Err(e) => tracing::warn!(volume = name, "unmounting {}: {e}", p.display()),
                }
            }
        }
        tracing::debug!(volume = name, id, "Docker unmount");
        Ok(())
    }

    /// Accepts connections until the listener fails; one thread per connection.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let n = self.connections.fetch_add(1, Ordering::SeqCst);
                    if n >= MAX_CONNECTIONS {
                        self.connections.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(
                            "more than {MAX_CONNECTIONS} plugin connections; refusing one"
                        );
                        let _ = write_response(
                            &mut &stream,
                            503,
                            &json!({"Err": "volfs: too many connections"}),
                            false,
                        );
                        continue;
                    }
                    let me = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name("plugin-conn".into())
                        .spawn(move || {
                            me.connection(&stream);
                            me.connections.fetch_sub(1, Ordering::SeqCst);
                        });
                    if let Err(e) = spawned {
                        self.connections.fetch_sub(1, Ordering::SeqCst);
                        tracing::error!("starting a plugin connection thread: {e}");
                    }
                }
                Err(e) => tracing::warn!("accepting a plugin connection: {e}"),
            }
        }
    }

    fn connection(&self, stream: &UnixStream) {
        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
        let mut reader = BufReader::new(stream);
        let mut out = stream;
        loop {
            let req = match read_request(&mut reader) {
                Ok(Some(r)) => r,
                Ok(None) | Err(ReadError::Io(_)) => return,
                Err(ReadError::Bad(status, msg)) => {
                    tracing::info!("refusing a malformed plugin request: {msg}");
                    let _ = write_response(&mut out, status, &json!({ "Err": msg }), false);
                    return;
                }
            };
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let answer = match decode_call(&req.method, &req.path, &req.body) {
                Ok(call) => {
                    tracing::debug!(?call, "plugin call");
                    self.answer(call)
                }
                Err((status, msg)) => {
                    tracing::info!(path = req.path, "refusing a plugin call: {msg}");
                    err_answer(status, msg)
                }
            };
            let Answer::Json(status, body) = answer else {
                return;
            };
            if status != 200 {
                tracing::debug!(path = req.path, status, %body, "plugin call failed");
            }
            if write_response(&mut out, status, &body, req.keep_alive).is_err() || !req.keep_alive {
                return;
            }
        }
    }
}

/// Binds the plugin socket (mode 0600: dockerd runs as root), replacing a stale one.
pub fn bind(socket: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "creating the plugin socket directory {}: {e}",
                dir.display()
            )
        })?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(format!(
                "something already answers on the plugin socket {}; stop it first, or \
                 choose --plugin-socket or --no-plugin",
                socket.display()
            ));
        }
        std::fs::remove_file(socket)
            .map_err(|e| format!("removing the stale plugin socket {}: {e}", socket.display()))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener =
        listener.map_err(|e| format!("binding the plugin socket {}: {e}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("setting the mode of {}: {e}", socket.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Cursor;

    fn read(bytes: &[u8]) -> Result<Option<HttpRequest>, ReadError> {
        read_request(&mut Cursor::new(bytes))
    }

    fn bad_status(bytes: &[u8]) -> u16 {
        match read(bytes) {
            Err(ReadError::Bad(s, _)) => s,
            other => panic!(
                "{:?}: expected a refusal, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    #[test]
    fn reads_dockerds_requests_back_to_back() {
        // As dockerd sends them: no Content-Type, a JSON body ending in a newline.
        let body = b"{\"Name\":\"data\",\"ID\":\"abc\"}\n";
        let mut wire = format!(
            "POST /VolumeDriver.Mount HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\n\
             Content-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\
             Accept-Encoding: gzip\r\n\r\n",
            body.len()
        )
        .into_bytes();
        wire.extend_from_slice(body);
        wire.extend_from_slice(b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        wire.extend_from_slice(b"POST /VolumeDriver.List?x=1 HTTP/1.0\nConnection: close\n\n");
        let mut r = Cursor::new(wire);
        let a = read_request(&mut r).expect("read").expect("a request");
        assert_eq!(a.method, "POST");
        assert_eq!(a.path, "/VolumeDriver.Mount");
        assert_eq!(a.body, body);
        assert!(a.keep_alive);
        assert_eq!(
            decode_call(&a.method, &a.path, &a.body),
            Ok(Call::Mount {
                name: "data".into(),
                id: "abc".into()
            })
        );
        let b = read_request(&mut r).expect("read").expect("a request");
        assert_eq!(
            (b.path.as_str(), b.body.len(), b.keep_alive),
            ("/Plugin.Activate", 0, true)
        );
        assert_eq!(decode_call(&b.method, &b.path, &b.body), Ok(Call::Activate));
        let c = read_request(&mut r).expect("read").expect("a request");
        assert_eq!(
            (c.path.as_str(), c.keep_alive),
            ("/VolumeDriver.List", false)
        );
        assert!(matches!(read_request(&mut r), Ok(None)));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let ka = |wire: &str| {
            read(wire.as_bytes())
                .expect("read")
                .expect("req")
                .keep_alive
        };
        assert!(ka("POST / HTTP/1.1\r\n\r\n"));
        assert!(!ka("POST / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka(
            "POST / HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n"
        ));
        assert!(!ka("POST / HTTP/1.0\r\n\r\n"));
        assert!(ka("POST / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn malformed_requests_are_refused_with_a_status() {
        assert_eq!(bad_status(b"POST /x HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(bad_status(b"POST /x\r\n\r\n"), 400);
        assert_eq!(bad_status(b"POST  /x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(bad_status(b"PO(ST /x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(bad_status(b"POST x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(bad_status(b"POST /x HTTP/1.1\r\nNoColon\r\n\r\n"), 400);
        assert_eq!(bad_status(b"POST /x HTTP/1.1\r\n folded: x\r\n\r\n"), 400);
        assert_eq!(
            bad_status(b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            bad_status(b"POST /x HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n"),
            400
        );
        assert_eq!(
            bad_status(b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            400
        );
        assert_eq!(
            bad_status(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            400
        );
        assert_eq!(
            bad_status(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            501
        );
        let huge = format!(
            "POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(bad_status(huge.as_bytes()), 413);
        let long = format!("POST /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE));
        assert_eq!(bad_status(long.as_bytes()), 400);
        let many = format!(
            "POST /x HTTP/1.1\r\n{}\r\n",
            "X-A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(bad_status(many.as_bytes()), 431);
        assert_eq!(bad_status(b"\r\n\r\n\r\n\r\n\r\n"), 400);
        // Cut short: nothing to answer.
        for cut in [
            &b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"[..],
            b"POST /x HTTP/1.1\r\nHost: x",
            b"POST /x HTTP/1.1\r\n",
        ] {
            assert!(matches!(read(cut), Err(ReadError::Io(_))), "{cut:?}");
        }
        assert!(matches!(read(b""), Ok(None)));
    }

    #[test]
    fn calls_decode_and_bad_bodies_say_what_is_wrong() {
        let d = |path: &str, body: &str| decode_call("POST", path, body.as_bytes());
        assert_eq!(
            d("/VolumeDriver.Create", r#"{"Name":"v1","Opts":null}"#),
            Ok(Call::Create {
                name: "v1".into(),
                opts: BTreeMap::new()
            })
        );
        assert_eq!(
            d(
                "/VolumeDriver.Create",
                r#"{"Name":"v1","Opts":{"size":"1G"},"X":1}"#
            ),
            Ok(Call::Create {
                name: "v1".into(),
                opts: [("size".to_string(), "1G".to_string())].into()
            })
        );
        assert_eq!(
            d("/VolumeDriver.Get", "{\"Name\":\"v1\"}\n"),
            Ok(Call::Get { name: "v1".into() })
        );
        assert_eq!(
            d("/VolumeDriver.Path", r#"{"Name":"v1"}"#),
            Ok(Call::Path { name: "v1".into() })
        );
        assert_eq!(
            d("/VolumeDriver.Remove", r#"{"Name":"v1"}"#),
            Ok(Call::Remove { name: "v1".into() })
        );
        assert_eq!(d("/VolumeDriver.List", ""), Ok(Call::List));
        assert_eq!(
            d("/VolumeDriver.Capabilities", "{}"),
            Ok(Call::Capabilities)
        );
        for (path, body, status, says) in [
            ("/VolumeDriver.Get", "{", 400, "malformed request"),
            ("/VolumeDriver.Get", "", 400, "the request body is empty"),
            ("/VolumeDriver.Get", "[]", 400, "malformed request"),
            (
                "/VolumeDriver.Get",
                r#"{"name":"v1"}"#,
                400,
                "missing field `Name`",
            ),
            (
                "/VolumeDriver.Mount",
                r#"{"Name":"v1"}"#,
                400,
                "missing field `ID`",
            ),
            (
                "/VolumeDriver.Mount",
                r#"{"Name":"v1","ID":""}"#,
                400,
                "invalid mount ID",
            ),
            (
                "/VolumeDriver.Unmount",
                r#"{"Name":"v1","ID":"a\nb"}"#,
                400,
                "invalid mount ID",
            ),
            (
                "/VolumeDriver.Create",
                r#"{"Name":"../x"}"#,
                400,
                "invalid volume name \"../x\"",
            ),
            (
                "/VolumeDriver.Create",
                r#"{"Name":"a/b"}"#,
                400,
                "invalid volume name \"a/b\"",
            ),
            (
                "/VolumeDriver.Mount",
                r#"{"Name":"a","ID":"1"}"#,
                400,
                "invalid volume name",
            ),
            (
                "/VolumeDriver.Create",
                r#"{"Name":"v1","Opts":{"a":1}}"#,
                400,
                "malformed request",
            ),
            (
                "/VolumeDriver.Create",
                r#"{"Name":7}"#,
                400,
                "malformed request",
            ),
            (
                "/VolumeDriver.Nope",
                "{}",
                404,
                "unknown endpoint \"/VolumeDriver.Nope\"",
            ),
            ("/", "", 404, "unknown endpoint"),
        ] {
            match d(path, body) {
                Err((s, msg)) => {
                    assert_eq!(s, status, "{path} {body}: {msg}");
                    assert!(msg.contains(says), "{path} {body}: {msg}");
                }
                Ok(c) => panic!("{path} {body}: accepted as {c:?}"),
            }
        }
        let opts: BTreeMap<String, String> = (0..=api::MAX_ENTRIES)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let body = json!({"Name": "v1", "Opts": opts}).to_string();
        assert!(d("/VolumeDriver.Create", &body).is_err());
        assert_eq!(
            decode_call("GET", "/VolumeDriver.List", b"").map_err(|e| e.0),
            Err(405)
        );
    }

    #[test]
    fn responses_carry_length_and_close() {
        let mut out = Vec::new();
        write_response(&mut out, 500, &json!({"Err": "no"}), false).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: \
             application/vnd.docker.plugins.v1.2+json\r\nContent-Length: 12\r\n\
             Connection: close\r\n\r\n{\"Err\":\"no\"}"
        );
    }

    /// Random bytes, and valid requests with random damage, never panic the decoder; what
    /// it accepts is within the limits.
    #[test]
    fn fuzz_the_request_decoder() {
        let seed: u64 = std::env::var("VOLFS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("fuzz seed {seed} (VOLFS_TEST_SEED)");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let samples: Vec<Vec<u8>> = [
            "POST /VolumeDriver.Mount HTTP/1.1\r\nContent-Length: 27\r\n\r\n{\"Name\":\"data\",\"ID\":\"ab\"}\n",
            "POST /VolumeDriver.Create HTTP/1.1\r\nContent-Length: 44\r\n\r\n{\"Name\":\"v1\",\"Opts\":{\"size\":\"1G\",\"uid\":\"1\"}}",
            "POST /Plugin.Activate HTTP/1.1\r\nHost: \r\nContent-Length: 0\r\n\r\n",
            "POST /VolumeDriver.Get HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 13\r\n\r\n{\"Name\":\"v1\"}",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let alphabet = b"POST /:\r\n{}\"Name,ID0123456789-Content-Length: \x00\xff";
        for round in 0..20_000 {
            let mut bytes = if round % 4 == 0 {
                let n = rng.gen_range(0..512);
                (0..n).map(|_| rng.r#gen::<u8>()).collect()
            } else {
                let mut b = samples[rng.gen_range(0..samples.len())].clone();
                for _ in 0..rng.gen_range(1..6) {
                    let at = rng.gen_range(0..=b.len());
                    match rng.gen_range(0..4) {
                        0 if at < b.len() => b[at] = alphabet[rng.gen_range(0..alphabet.len())],
                        1 if at < b.len() => {
                            b.remove(at);
                        }
                        2 => b.insert(at, alphabet[rng.gen_range(0..alphabet.len())]),
                        _ => b.truncate(at),
                    }
                }
                b
            };
            if round % 7 == 0 {
                let copy = bytes.clone();
                bytes.extend_from_slice(&copy);
            }
            let mut r = Cursor::new(&bytes[..]);
            for _ in 0..4 {
                match read_request(&mut r) {
                    Ok(Some(req)) => {
                        assert!(req.body.len() <= MAX_BODY);
                        if let Ok(Call::Create { name, opts }) =
                            decode_call(&req.method, &req.path, &req.body)
                        {
                            assert!(validate_target(&name).is_ok());
                            assert!(opts.len() <= api::MAX_ENTRIES);
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = decode_call("POST", "/VolumeDriver.Mount", &bytes);
            let _ = decode_call("POST", "/VolumeDriver.Create", &bytes);
        }
    }
}
