//! The control protocol between `volfs` and `volfs-mountd` ("the documented JSON
//! protocol"): one JSON request and one JSON response per connection, each a single line,
//! over a unix socket (mode 0600, or 0660 for the group given by `--socket-group`).
//! Two requests stream: after an `import` line the client sends the raw archive bytes and
//! shuts down its write side, and the answer comes once the archive is read (or refused);
//! an `export` answer is followed by the archive and a status line (see below).
//!
//! Every request is an object whose `op` names it; fields not listed are refused, as is a
//! line over [`MAX_REQUEST`] bytes. Every response has `ok`; a failure carries `error` (what
//! failed, on what, and what to do), a success the one reply field listed for its request.
//! Volume names follow Docker's rule `[a-zA-Z0-9][a-zA-Z0-9_.-]+` (2 to 255 characters);
//! paths must be absolute.
//!
//! | request | reply field |
//! |---|---|
//! | `{"op":"create","name":"data","labels":{"team":"x"},"options":{"size":"10G"}}` | `volume` |
//! | `{"op":"ls","filters":{"label":["team","env=prod"],"dangling":true,"name":["da"]}}` | `volumes` |
//! | `{"op":"inspect","name":"data"}` | `volume`, with `usage` |
//! | `{"op":"df"}` | `volumes`, each with `usage` |
//! | `{"op":"rm","name":"data","force":false}` | `removed` |
//! | `{"op":"prune","all":false}` | `pruned` |
//! | `{"op":"mount","name":"data","path":"/mnt/d","read_only":false}` | none |
//! | `{"op":"umount","path":"/mnt/d"}` | none |
//! | `{"op":"import","name":"data","replace":false}` + archive bytes | `imported` |
//! | `{"op":"fsck","name":"data","repair":false}` (`"name":null`: every volume) | `fsck` |
//! | `{"op":"scrub","names":["data"]}` (`[]`: every volume) | `scrub` |
//! | `{"op":"version"}` | `version` |
//! | `{"op":"info"}` | `info` |
//! | `{"op":"shutdown"}` | none, once every mount is unmounted; the daemon then exits |
//! | `{"op":"export","name":"data","snapshot":null}` | none, then the archive as a stream (below) |
//!
//! Requests in detail:
//! - `create`: `name` may be left out for an anonymous volume (a random 64-hex-digit name).
//!   `labels` and `options` default to `{}`. Options: `readonly` (`true`/`false`), `size`
//!   (quota in bytes, or with a binary unit: `10G`), `uid`, `gid`, `mode` (octal) of the
//!   volume root, `from` (an absolute path of a directory or tar file to copy in). Creating
//!   an existing name with the same labels and options answers that volume; with others it
//!   is an error naming what differs.
//! - `ls`: `filters` defaults to none. `label` entries are `KEY` (has the label) or
//!   `KEY=VALUE`; `dangling` true keeps unmounted volumes, false mounted ones; `name`
//!   entries are substrings of the name. Every filter given must match.
//! - `rm`: a mounted volume is refused (the error lists its mountpoints) unless `force`,
//!   which unmounts it first. The volume's data is deleted.
//! - `prune`: removes unmounted anonymous volumes, or with `all` every unmounted volume.
//! - `mount`: the directory must exist; a volume created `readonly=true` is mounted
//!   read-only whatever `read_only` says. `mount` and `umount` answer `{"ok":true}`.
//! - `import`: the request line is followed by a tar archive (plain, gzip or zstd: the
//!   daemon detects which), then the client shuts down its write side (`shutdown(SHUT_WR)`)
//!   and reads the answer. All or nothing: a volume that does not exist is created, hidden
//!   until the whole archive is in (on any error nothing is left and the name stays free);
//!   an existing volume must be empty unless `replace` (default false), and is then handed
//!   to `Registry::import_into_existing`. Hostile entries (absolute paths, `..`, paths
//!   through symlinks, hard links to anything but an earlier entry, duplicates, truncation,
//!   bad checksums, absurd sizes…) are refused with an error naming the entry and the
//!   reason; see `crate::import`. The daemon may answer (an error) before it has read
//!   everything: a client keeps reading the answer when its writes fail.
//! - `export`: the volume as a pax tar archive (`crate::export`); `snapshot` (default null)
//!   names a snapshot of it instead. Without one, a temporary snapshot is taken first, so
//!   the archive is the volume at one instant.
//!   The only streaming request: a failure before the first byte is an ordinary answer
//!   line; `{"ok":true}` is followed by the archive in frames, each a 4-byte big-endian
//!   length (1 to [`EXPORT_FRAME_MAX`]) and that many bytes, then a frame of length 0, then
//!   one more answer line: `{"ok":true}` if the archive is complete, or `{"ok":false,
//!   "error":…}` saying what failed (the bytes sent are then a truncated archive). A
//!   connection that ends before that last line is an export that failed in the daemon
//!   (see its log). The compression `volfs export --compress` offers is the CLI's.
//! - `fsck`: checks every invariant of the volume's store keys (see `crate::fsck`); a
//!   volume in use is checked through a temporary snapshot, so the check sees one instant.
//!   `repair` fixes what is safely fixable and is refused for a mounted volume (the error
//!   lists its mountpoints; with `"name":null` the refusal is one of that volume's
//!   problems). Problems are lines naming volume, inode (and path when known), key and
//!   what is wrong; `repaired` says what the repair did, `problems` what is left.
//! - `scrub`: reads and verifies every chunk of the volumes (live and in snapshots) while
//!   they stay in use; a corrupt chunk is a line naming volume, inode and offset.
//!
//! Limits: at most [`MAX_ENTRIES`] labels, options or filters; label keys up to 255 bytes,
//! label and option values up to 4096; no control characters in labels; paths up to
//! [`MAX_PATH`] bytes.
//!
//! A volume (`volume`, each of `volumes`):
//!
//! ```json
//! {"name":"data","created":1795861862,"labels":{"team":"x"},"options":{"size":"10G"},
//!  "anonymous":false,"mounts":[{"path":"/mnt/d","read_only":false}],
//!  "limit_bytes":10737418240,"usage":{"bytes":4096,"inodes":2}}
//! ```
//!
//! `created` is in seconds since the epoch; `limit_bytes` is null without `size`; `usage`
//! (bytes stored, inodes) is present in `inspect` and `df` answers only: `ls` does not
//! measure volumes.
//!
//! Other replies:
//!
//! ```text
//! ← {"ok":true,"removed":{"name":"data","unmounted":["/mnt/d"],"bytes":4096}}
//! ← {"ok":true,"pruned":{"deleted":["0f3a…"],"bytes":1048576}}
//! ← {"ok":true,"imported":{"volume":{"name":"data",…},"created":true,"files":12,"dirs":3,
//!    "symlinks":1,"hardlinks":2,"others":0,"bytes":1048576}}
//! ← {"ok":true,"fsck":{"volumes":[{"name":"data","problems":["data: inode 12 (/a): link
//!    count 5, but 2 entries name it [key 3/i/12]"],"repaired":[],"inodes":40,"entries":39,
//!    "chunks":210,"bytes":3407872}],"store":[],"notes":[]}}
//! ← {"ok":true,"scrub":{"volumes":[{"name":"data","chunks":210,"bytes":3407872,
//!    "problems":[]}],"chunks":210,"bytes":3407872,"millis":41}}
//! ← {"ok":true,"version":{"version":"0.1.0","protocol":1}}
//! ← {"ok":true,"info":{"version":"0.1.0","pid":812,"uptime_secs":3600,"root":"/var/lib/volfs",
//!    "store_bytes":1048576,"volumes":3,"mounts":1}}
//! ← {"ok":false,"error":"no such volume: data"}
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::import::ImportStats;

/// Where the CLI and daemon meet unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/volfs/volfs.sock";
/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Version of this protocol, reported by `version`.
pub const PROTOCOL: u32 = 1;
/// Longest path accepted in a request (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most labels, options or filters in one request.
pub const MAX_ENTRIES: usize = 64;
/// Largest frame of an export stream.
pub const EXPORT_FRAME_MAX: usize = 1 << 20;

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Create {
        /// None: an anonymous volume with a random name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        options: BTreeMap<String, String>,
    },
    Ls {
        #[serde(default)]
        filters: LsFilters,
    },
    Inspect {
        name: String,
    },
    Df,
    Rm {
        name: String,
        #[serde(default)]
        force: bool,
    },
    Prune {
        #[serde(default)]
        all: bool,
    },
    Mount {
        name: String,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
    Umount {
        path: PathBuf,
    },
    /// Takes a snapshot of volume `name` (default name: the UTC time).
    #[serde(rename = "snapshot_create")]
    SnapshotCreate {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<String>,
    },
    #[serde(rename = "snapshot_ls")]
    SnapshotLs {
        name: String,
    },
    #[serde(rename = "snapshot_rm")]
    SnapshotRm {
        name: String,
        snapshot: String,
    },
    /// Makes volume `name` what snapshot `snapshot` holds.
    Rollback {
        name: String,
        snapshot: String,
        #[serde(default)]
        force: bool,
    },
    /// A new volume `new` holding what snapshot `snapshot` of `name` holds.
    #[serde(rename = "clone")]
    CloneVolume {
        name: String,
        snapshot: String,
        new: String,
    },
    /// Followed by the archive's bytes on the same connection (see the module docs).
    Import {
        name: String,
        #[serde(default)]
        replace: bool,
    },
    /// Checks one volume (`name`) or every one (`None`); with `repair`, fixes what is safe.
    Fsck {
        name: Option<String>,
        #[serde(default)]
        repair: bool,
    },
    /// Verifies every chunk of the volumes `names` (none: every volume), online.
    Scrub {
        #[serde(default)]
        names: Vec<String>,
    },
    Version,
    Info,
    /// Unmount everything, stop the keeper and exit (the mount table is kept).
    Shutdown,
    /// The volume (or one of its snapshots) as a tar archive, streamed after the answer.
    Export {
        name: String,
        #[serde(default)]
        snapshot: Option<String>,
    },
}

impl Request {
    /// How long the CLI waits for the answer: copying a tree in (`from=`) and deleting a
    /// volume's data take time in proportion to the data.
    pub fn timeout(&self) -> Duration {
        match self {
            Request::Create { options, .. } if options.contains_key("from") => {
                Duration::from_secs(24 * 3600)
            }
            Request::Rm { .. }
            | Request::Prune { .. }
            | Request::SnapshotRm { .. }
            | Request::Rollback { .. }
            | Request::CloneVolume { .. } => Duration::from_secs(3600),
            // Per frame: the daemon sends one as soon as it has read a frame's worth.
            Request::Export { .. } => Duration::from_secs(600),
            Request::Import { .. } | Request::Fsck { .. } | Request::Scrub { .. } => {
                Duration::from_secs(24 * 3600)
            }
            _ => Duration::from_secs(120),
        }
    }
}

/// `ls` filters; every one given must match (as with Docker, filters AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LsFilters {
    /// `KEY` (the volume has label KEY) or `KEY=VALUE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label: Vec<String>,
    /// true: only volumes mounted nowhere; false: only mounted ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dangling: Option<bool>,
    /// Substrings of the name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name: Vec<String>,
}

/// The filters `volfs ls --filter` knows.
pub const FILTERS: &str = "label=KEY, label=KEY=VALUE, dangling=true|false, name=SUBSTRING";

impl LsFilters {
    /// Parses `--filter` arguments (`label=team`, `dangling=true`, `name=web`…).
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<LsFilters, String> {
        let mut f = LsFilters::default();
        for arg in args {
            let arg = arg.as_ref();
            let (key, value) = arg
                .split_once('=')
                .ok_or_else(|| format!("filter {arg:?} is not KEY=VALUE (known: {FILTERS})"))?;
            match key {
                "label" => {
                    if value.is_empty() || value.starts_with('=') {
                        return Err(format!(
                            "filter {arg:?}: the label key is empty (label=KEY or label=KEY=VALUE)"
                        ));
                    }
                    f.label.push(value.to_string());
                }
                "dangling" => {
                    let v = match value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(format!(
                                "filter {arg:?}: dangling is true or false, not {value:?}"
                            ));
                        }
                    };
                    if f.dangling.is_some_and(|d| d != v) {
                        return Err(
                            "filters dangling=true and dangling=false exclude each other".into(),
                        );
                    }
                    f.dangling = Some(v);
                }
                "name" => f.name.push(value.to_string()),
                _ => return Err(format!("unknown filter {key:?} (known: {FILTERS})")),
            }
        }
        Ok(f)
    }

    /// Whether `v` passes every filter.
    pub fn matches(&self, v: &VolumeInfo) -> bool {
        let labels_ok = self.label.iter().all(|l| match l.split_once('=') {
            Some((k, want)) => v.labels.get(k).is_some_and(|have| have == want),
            None => v.labels.contains_key(l),
        });
        let dangling_ok = self.dangling.is_none_or(|d| d == v.mounts.is_empty());
        let name_ok = self.name.iter().all(|n| v.name.contains(n.as_str()));
        labels_ok && dangling_ok && name_ok
    }
}

/// One mount of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub path: PathBuf,
    pub read_only: bool,
    /// The snapshot this mount shows, when it is one (`volfs mount VOL@SNAP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// What a volume holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageInfo {
    /// Bytes stored: file data and symlink targets (the quota counts these).
    pub bytes: u64,
    pub inodes: u64,
}

/// A volume as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    /// Seconds since the epoch.
    pub created: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The create options as given.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub anonymous: bool,
    pub mounts: Vec<MountInfo>,
    /// The quota (`size=`), if any.
    #[serde(default)]
    pub limit_bytes: Option<u64>,
    /// Measured by `inspect` and `df` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
}

/// What `rm` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub name: String,
    /// Mountpoints `force` unmounted.
    pub unmounted: Vec<PathBuf>,
    /// Bytes the volume stored.
    pub bytes: u64,
}

/// What `prune` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub deleted: Vec<String>,
    /// Bytes the deleted volumes stored.
    pub bytes: u64,
}

/// What `import` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// The volume, as `inspect` shows it (with its usage).
    pub volume: VolumeInfo,
    /// Whether the import created the volume.
    pub created: bool,
    /// With `replace`: the snapshot keeping what the volume held before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_snapshot: Option<String>,
    /// What the archive held.
    #[serde(flatten)]
    pub stats: ImportStats,
}

/// The daemon's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub protocol: u32,
}

/// The daemon and its store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// The `--root` directory.
    pub root: PathBuf,
    /// Bytes the store takes on the host disk (sled files and chunk segments, as allocated).
    pub store_bytes: u64,
    pub volumes: u64,
    pub mounts: u64,
}

/// A snapshot as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    /// When it was taken: seconds since the epoch, and nanoseconds.
    pub created: i64,
    pub created_nanos: u32,
    /// Bytes stored and inodes of the volume at that instant.
    pub bytes: u64,
    pub inodes: u64,
    /// `snapshot_create`: how long writers were held, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_us: Option<u64>,
    /// `snapshot_rm`: chunk bytes only this snapshot held, now freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed_bytes: Option<u64>,
}

/// What `rollback` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    pub volume: String,
    pub snapshot: String,
    /// Keys of the store written or deleted.
    pub changed_keys: u64,
    /// File bytes copied back from the snapshot.
    pub copied_bytes: u64,
}

/// What `fsck` found in one volume, and what its repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckVolume {
    pub name: String,
    /// What is (still) wrong, one line each.
    pub problems: Vec<String>,
    /// What the repair fixed.
    #[serde(default)]
    pub repaired: Vec<String>,
    pub inodes: u64,
    pub entries: u64,
    pub chunks: u64,
    /// Chunk bytes read and verified.
    pub bytes: u64,
}

/// What `fsck` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckReport {
    pub volumes: Vec<FsckVolume>,
    /// Problems of the store as a whole (every-volume checks only).
    #[serde(default)]
    pub store: Vec<String>,
    /// Work in progress in the store: removals being purged, changes being applied.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl FsckReport {
    /// Whether anything is (still) wrong.
    pub fn has_problems(&self) -> bool {
        !self.store.is_empty() || self.volumes.iter().any(|v| !v.problems.is_empty())
    }
}

/// What `scrub` read in one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubVolume {
    pub name: String,
    pub chunks: u64,
    pub bytes: u64,
    /// One line per corrupt chunk: volume (and snapshot), inode, offset, why.
    pub problems: Vec<String>,
}

/// What `scrub` read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    pub volumes: Vec<ScrubVolume>,
    pub chunks: u64,
    pub bytes: u64,
    pub millis: u64,
}

/// The payload of a successful answer, one field named after the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Removed(Removed),
    Pruned(Pruned),
    Imported(Imported),
    Version(VersionInfo),
    Info(DaemonInfo),
    Snapshot(SnapshotInfo),
    Snapshots(Vec<SnapshotInfo>),
    #[serde(rename = "rolled_back")]
    RolledBack(RolledBack),
    Fsck(FsckReport),
    Scrub(ScrubReport),
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub reply: Option<Reply>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    pub fn reply(reply: Reply) -> Response {
        Response {
            ok: true,
            error: None,
            reply: Some(reply),
        }
    }

    pub fn err(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Response::default()
        }
    }
}

/// Checks what every request must satisfy before the registry sees it: sizes, counts,
/// absolute paths. Names, labels and options get their own checks where they are used.
fn check_limits(req: &Request) -> Result<(), String> {
    let path_ok = |p: &Path, what: &str| -> Result<(), String> {
        let len = p.as_os_str().len();
        if !p.is_absolute() {
            return Err(format!("{what} {} is not an absolute path", p.display()));
        }
        if len > MAX_PATH {
            return Err(format!("{what} is longer than {MAX_PATH} bytes"));
        }
        if p.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(format!("{what} contains a NUL byte"));
        }
        Ok(())
    };
    let count = |n: usize, what: &str| {
        if n > MAX_ENTRIES {
            Err(format!("more than {MAX_ENTRIES} {what}"))
        } else {
            Ok(())
        }
    };
    match req {
        Request::Create {
            labels, options, ..
        } => {
            count(labels.len(), "labels")?;
            count(options.len(), "options")
        }
        Request::Ls { filters } => count(filters.label.len() + filters.name.len(), "filters"),
        Request::Scrub { names } => count(names.len(), "volume names"),
        Request::Mount { path, .. } => path_ok(path, "mountpoint"),
        Request::Umount { path } => path_ok(path, "mountpoint"),
        _ => Ok(()),
    }
}

/// Parses one request line, with a message that says what was wrong.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let req = serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    check_limits(&req)?;
    Ok(req)
}

/// Sends one request to the daemon and waits for its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Response, String> {
    let stream = connect(socket)?;
    send_line(&stream, req)?;
    read_answer(&stream)
}

/// Sends a streaming request (`import`): the request line, then everything `body` holds,
/// then the end of the stream (shutdown of the write side); then waits for the answer.
/// When the daemon stops reading early (it refused the archive), its answer is still read.
pub fn call_streaming(
    socket: &Path,
    req: &Request,
    body: &mut dyn Read,
) -> Result<Response, String> {
    let stream = connect(socket)?;
    send_line(&stream, req)?;
    let mut buf = vec![0u8; 256 * 1024];
    let sent = loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(format!("reading the archive to send: {e}")),
        };
        if let Err(e) = (&stream).write_all(&buf[..n]) {
            // The daemon answered early and closed: its answer says why.
            match read_answer(&stream) {
                Ok(r) => return Ok(r),
                Err(_) => return Err(format!("sending the archive to volfs-mountd: {e}")),
            }
        }
    };
    if let Err(e) = sent {
        // Nothing more will come: the daemon sees a truncated archive and discards it.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return Err(e);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    read_answer(&stream)
}

fn connect(socket: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(socket).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => format!(
            "volfs-mountd is not running (nothing answers on {}). Start it with \
             `volfs-mountd --root /var/lib/volfs &` (or `scripts/up`), or point \
             --socket / VOLFS_SOCKET at the daemon's socket",
            socket.display()
        ),
        Some(libc::EACCES) => format!(
            "permission denied on {}: the control socket is for root (and the group given \
             to volfs-mountd --socket-group); run volfs as root or as a member of that group",
            socket.display()
        ),
        _ => format!(
            "cannot connect to volfs-mountd at {}: {e}",
            socket.display()
        ),
    })
}

fn send_line(stream: &UnixStream, req: &Request) -> Result<(), String> {
    let _ = stream.set_read_timeout(Some(req.timeout()));
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&*stream)
        .write_all(&line)
        .map_err(|e| format!("sending the request to volfs-mountd: {e}"))
}

fn read_answer(stream: &UnixStream) -> Result<Response, String> {
    read_response(&mut BufReader::new(stream))
}

/// Reads one answer line; `reader` keeps what follows it (an export's archive).
fn read_response(reader: &mut impl BufRead) -> Result<Response, String> {
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .map_err(|e| format!("reading volfs-mountd's answer: {e}"))?;
    if answer.is_empty() {
        return Err("volfs-mountd closed the connection without answering (see its log)".into());
    }
    serde_json::from_str(&answer).map_err(|e| format!("unreadable answer from volfs-mountd: {e}"))
}

/// An export the daemon accepted: the archive follows.
pub struct ExportStream {
    reader: BufReader<UnixStream>,
}

/// Sends an `export` request; the daemon's refusal is the error.
pub fn start_export(socket: &Path, req: &Request) -> Result<ExportStream, String> {
    let stream = connect(socket)?;
    send_line(&stream, req)?;
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader)?;
    if !response.ok {
        return Err(response
            .error
            .unwrap_or_else(|| "volfs-mountd refused the export".into()));
    }
    Ok(ExportStream { reader })
}

/// Why copying an export stream stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The daemon failed, or the connection broke: the archive is incomplete.
    Daemon(String),
    /// Writing to `out` failed.
    Output(std::io::ErrorKind, String),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Daemon(e) | StreamError::Output(_, e) => f.write_str(e),
        }
    }
}

impl ExportStream {
    /// Copies the archive to `out` until the daemon says it is complete, calling `progress`
    /// with the bytes copied so far; returns their count.
    pub fn copy_to(
        mut self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, StreamError> {
        let early = |e: std::io::Error| {
            StreamError::Daemon(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "export failed on the daemon side: the archive stopped short (see volfs-mountd's log)"
                    .to_string()
            } else {
                format!("export failed: reading from volfs-mountd: {e}")
            })
        };
        let mut buf = vec![0u8; EXPORT_FRAME_MAX];
        let mut total = 0u64;
        loop {
            let mut len = [0u8; 4];
            self.reader.read_exact(&mut len).map_err(early)?;
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 {
                break;
            }
            if len > EXPORT_FRAME_MAX {
                return Err(StreamError::Daemon(format!(
                    "export failed: volfs-mountd sent a frame of {len} bytes (at most \
                     {EXPORT_FRAME_MAX}); is it another version?"
                )));
            }
            self.reader.read_exact(&mut buf[..len]).map_err(early)?;
            out.write_all(&buf[..len])
                .map_err(|e| StreamError::Output(e.kind(), format!("writing the archive: {e}")))?;
            total += len as u64;
            progress(total);
        }
        let end = read_response(&mut self.reader)
            .map_err(|e| StreamError::Daemon(format!("export failed on the daemon side: {e}")))?;
        if !end.ok {
            return Err(StreamError::Daemon(format!(
                "export failed on the daemon side: {}",
                end.error
                    .unwrap_or_else(|| "no reason given (see its log)".into())
            )));
        }
        Ok(total)
    }
}

/// The daemon's side of an export stream: bytes written are sent in frames of up to
/// [`EXPORT_FRAME_MAX`] bytes; [`FrameWriter::finish`] ends the stream with its status.
pub struct FrameWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(out: W) -> FrameWriter<W> {
        FrameWriter {
            out,
            buf: Vec::with_capacity(EXPORT_FRAME_MAX),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.out.write_all(&(self.buf.len() as u32).to_be_bytes())?;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Sends what is buffered, the end frame and `status` as the last answer line.
    pub fn finish(mut self, status: &Response) -> std::io::Result<()> {
        self.send()?;
        self.out.write_all(&0u32.to_be_bytes())?;
        let mut line = serde_json::to_vec(status).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.out.flush()
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(EXPORT_FRAME_MAX - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == EXPORT_FRAME_MAX {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_a_clear_error() {
        let reqs = [
            Request::Mount {
                name: "a".into(),
                path: "/m".into(),
                read_only: true,
            },
            Request::Create {
                name: Some("data".into()),
                labels: [("k".to_string(), String::new())].into(),
                options: [("size".to_string(), "1G".to_string())].into(),
            },
            Request::Create {
                name: None,
                labels: BTreeMap::new(),
                options: BTreeMap::new(),
            },
            Request::Ls {
                filters: LsFilters::parse(&["label=a=b", "dangling=true", "name=x"])
                    .expect("filters"),
            },
            Request::Rm {
                name: "x".into(),
                force: true,
            },
            Request::Prune { all: true },
            Request::Import {
                name: "data".into(),
                replace: true,
            },
            Request::Df,
            Request::Fsck {
                name: None,
                repair: false,
            },
            Request::Fsck {
                name: Some("data".into()),
                repair: true,
            },
            Request::Scrub {
                names: vec!["a".into()],
            },
            Request::Version,
            Request::Info,
            Request::Export {
                name: "data".into(),
                snapshot: Some("s1".into()),
            },
        ];
        for r in reqs {
            let line = serde_json::to_vec(&r).expect("serializable");
            assert_eq!(decode_request(&line), Ok(r));
        }
        assert_eq!(
            decode_request(br#"{"op":"export","name":"data"}"#),
            Ok(Request::Export {
                name: "data".into(),
                snapshot: None
            })
        );
        assert_eq!(
            decode_request(br#"{"op":"ls"}"#),
            Ok(Request::Ls {
                filters: LsFilters::default()
            })
        );
        for bad in [
            &b"{"[..],
            b"{\"op\":\"nope\"}",
            b"{\"op\":\"create\",\"nmae\":\"x\"}",
            b"{\"op\":\"ls\",\"filters\":{\"labels\":[]}}",
            b"{\"op\":\"rm\"}",
            b"{\"op\":\"mount\",\"name\":\"a\",\"path\":\"rel\"}",
            b"{\"op\":\"umount\",\"path\":\"/a\\u0000b\"}",
            b"\xff\xfe",
            b"",
        ] {
            assert!(
                decode_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(decode_request(&vec![b' '; MAX_REQUEST + 1]).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_ENTRIES)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let line = serde_json::to_vec(&Request::Create {
            name: None,
            labels: many,
            options: BTreeMap::new(),
        })
        .expect("serializable");
        assert!(decode_request(&line).is_err());
    }

    #[test]
    fn responses_carry_one_reply_field() {
        let v = VolumeInfo {
            name: "data".into(),
            created: 5,
            labels: BTreeMap::new(),
            options: BTreeMap::new(),
            anonymous: false,
            mounts: vec![],
            limit_bytes: None,
            usage: None,
        };
        let r = Response::reply(Reply::Volumes(vec![v]));
        let text = serde_json::to_string(&r).expect("json");
        assert!(
            text.starts_with(r#"{"ok":true,"volumes":[{"name":"data""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Response>(&text).expect("parse"), r);
        let ok = serde_json::to_string(&Response::ok()).expect("json");
        assert_eq!(ok, r#"{"ok":true}"#);
        assert_eq!(
            serde_json::from_str::<Response>(&ok).expect("parse"),
            Response::ok()
        );
        let e = Response::err("no such volume: x");
        let text = serde_json::to_string(&e).expect("json");
        assert_eq!(text, r#"{"ok":false,"error":"no such volume: x"}"#);
        assert_eq!(serde_json::from_str::<Response>(&text).expect("parse"), e);
    }

    #[test]
    fn filters_parse_match_and_refuse_unknown_keys() {
        let v = |name: &str, labels: &[(&str, &str)], mounted: bool| VolumeInfo {
            name: name.into(),
            created: 0,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            options: BTreeMap::new(),
            anonymous: false,
            mounts: if mounted {
                vec![MountInfo {
                    path: "/m".into(),
                    read_only: false,
                    snapshot: None,
                }]
            } else {
                vec![]
            },
            limit_bytes: None,
            usage: None,
        };
        let web = v("web-data", &[("team", "a"), ("env", "")], true);
        let db = v("db", &[("team", "b")], false);
        let f = |args: &[&str]| LsFilters::parse(args).expect("filters");
        assert!(f(&[]).matches(&web) && f(&[]).matches(&db));
        assert!(f(&["label=team"]).matches(&db));
        assert!(f(&["label=team=a"]).matches(&web) && !f(&["label=team=a"]).matches(&db));
        assert!(f(&["label=env="]).matches(&web) && !f(&["label=env=x"]).matches(&web));
        assert!(f(&["dangling=true"]).matches(&db) && !f(&["dangling=true"]).matches(&web));
        assert!(f(&["dangling=false"]).matches(&web) && !f(&["dangling=false"]).matches(&db));
        assert!(f(&["name=data"]).matches(&web) && !f(&["name=data"]).matches(&db));
        assert!(!f(&["label=team", "dangling=true", "name=web"]).matches(&web));
        assert!(f(&["label=team", "label=env", "name=web"]).matches(&web));
        for (bad, says) in [
            ("size=1", "unknown filter \"size\""),
            ("label", "not KEY=VALUE"),
            ("label=", "label key is empty"),
            ("label==v", "label key is empty"),
            ("dangling=maybe", "true or false"),
        ] {
            let e = LsFilters::parse(&[bad]).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(LsFilters::parse(&["dangling=true", "dangling=false"]).is_err());
    }

    #[test]
    fn export_frames_carry_the_bytes_then_the_status() {
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        let data: Vec<u8> = (0..EXPORT_FRAME_MAX * 2 + 10).map(|i| i as u8).collect();
        w.write_all(&data[..7]).expect("write");
        w.flush().expect("flush");
        w.write_all(&data[7..]).expect("write");
        w.finish(&Response::ok()).expect("finish");
        assert_eq!(&wire[..4], &7u32.to_be_bytes());
        assert!(wire.ends_with(b"\0\0\0\0{\"ok\":true}\n"));

        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let writer = std::thread::spawn(move || {
            (&b).write_all(&wire).expect("send");
        });
        let stream = ExportStream {
            reader: BufReader::new(a),
        };
        let mut out = Vec::new();
        let mut seen = 0;
        let n = stream.copy_to(&mut out, &mut |t| seen = t).expect("copy");
        writer.join().expect("writer");
        assert_eq!((n, seen), (data.len() as u64, data.len() as u64));
        assert!(out == data);

        // A failure after some bytes, and a connection cut short.
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        w.write_all(b"abc").expect("write");
        w.finish(&Response::err("exporting ./x: reading its data: I/O error"))
            .expect("finish");
        let cut = wire[..5].to_vec();
        for (bytes, says) in [
            (
                wire,
                "export failed on the daemon side: exporting ./x: reading its data",
            ),
            (cut, "the archive stopped short"),
        ] {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
            (&b).write_all(&bytes).expect("send");
            drop(b);
            let e = ExportStream {
                reader: BufReader::new(a),
            }
            .copy_to(&mut Vec::new(), &mut |_| {})
            .expect_err("must fail");
            assert!(matches!(e, StreamError::Daemon(_)), "{e:?}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
