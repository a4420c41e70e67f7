//! Volumes and their mounts, as the daemon keeps them: the lifecycle (create, list,
//! inspect, remove, prune, usage) and the mounts.
//!
//! Invariants: one [`SledFs`] per volume, shared by all of its mounts (so open-handle counts
//! and locks are per volume, not per mount); a mountpoint holds at most one volfs mount.
//! A volume's options are fixed at creation. `rm` holds the mount table's lock from its
//! "not mounted" check to the durable removal of the name, and `mount` holds it from
//! reading the volume's record to the mount's registration, so the two never interleave:
//! a mount racing a removal either comes first (and the removal is refused, or undoes it
//! with `force`) or finds no volume.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::api::{
    self, DaemonInfo, FsckReport, FsckVolume, Imported, LsFilters, MountInfo, Pruned, Removed,
    Reply, Request, Response, RolledBack, ScrubReport, ScrubVolume, SnapshotInfo, UsageInfo,
    VersionInfo, VolumeInfo,
};
use crate::fs::{self, Gate, MountSpec, Mounted};
use crate::import::ImportStats;
use crate::keeper::{HeldMount, Keeper};
use crate::store::{MountRecord, Store, Timestamp, VolumeRecord};
use crate::vfs::{FileSystem, SledFs};

struct MountEntry {
    volume: String,
    read_only: bool,
    mounted: Mounted,
}

/// A volume in use: its filesystem and its live mounts, shared by all of them.
type OpenVolume = (Arc<SledFs>, Arc<fs::Peers>);

/// What an export reads (see [`Registry::export_source`]).
pub struct ExportSource {
    /// The tree to write out, read as root.
    pub fs: Arc<dyn FileSystem>,
    /// Kept until the export ends, then dropped (a temporary snapshot can release itself
    /// on drop); `None` for a live volume.
    pub hold: Option<Box<dyn Send>>,
}

/// Everything the daemon serves.
///
/// Restart guarantee: the mount table (store tree `mounts`) lists what should be mounted;
/// the keeper process holds every connection's descriptor. At start, connections the
/// keeper still holds are served again in place (their users never notice more than a
/// pause), the rest are mounted afresh at the same paths after detaching any dead mount
/// left there.
pub struct Registry {
    store: Store,
    /// Open filesystems by (volume id, snapshot id): the live volume has no snapshot.
    open: Mutex<HashMap<(u64, Option<u64>), OpenVolume>>,
    mounts: Mutex<BTreeMap<PathBuf, MountEntry>>,
    gate: Arc<Gate>,
    keeper: Keeper,
    /// Serialises snapshot creation, removal and rollback.
    snap_admin: Mutex<()>,
    root: PathBuf,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `VOL@SNAP` as `(VOL, Some(SNAP))`, `VOL` as `(VOL, None)`.
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('@') {
        Some((v, s)) => (v, Some(s)),
        None => (target, None),
    }
}

/// A volume name, or `VOL@SNAP` naming one of its snapshots.
pub fn validate_target(target: &str) -> Result<(), String> {
    let (vol, snap) = split_target(target);
    validate_name(vol)?;
    snap.map_or(Ok(()), validate_snapshot_name)
}

/// Whether `name` is `[a-zA-Z0-9][a-zA-Z0-9_.-]*` with a length in `len`.
fn name_rule(name: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    let b = name.as_bytes();
    len.contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Snapshot names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 128 characters.
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    if name_rule(name, 1..=128) {
        return Ok(());
    }
    Err(format!(
        "invalid snapshot name {name:?}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]* \
         (at most 128 characters)"
    ))
}

/// Docker's rule for volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name_rule(name, 2..=255) {
        return Ok(());
    }
    Err(format!(
        "invalid volume name {name:?}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]+ \
         (at least 2 characters, at most 255)"
    ))
}

/// The create options volfs knows, for messages.
pub const OPTIONS: &str = "readonly=true|false, size=BYTES (e.g. 10G), uid=N, gid=N, \
     mode=OCTAL (e.g. 0755), from=/ABSOLUTE/PATH (a directory or tar file to copy in)";

/// Longest label key, and longest label or option value.
const MAX_KEY: usize = 255;
const MAX_VALUE: usize = 4096;

/// A volume's create options, parsed. The record keeps them as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Every mount is read-only.
    pub read_only: bool,
    /// Quota on the bytes stored.
    pub size: Option<u64>,
    /// Owner and mode of the volume's root directory.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
    /// A host directory or tar file the volume starts as a copy of.
    pub from: Option<PathBuf>,
}

impl VolumeOptions {
    /// Validates every option; an unknown one is refused by name.
    pub fn parse(options: &BTreeMap<String, String>) -> Result<VolumeOptions, String> {
        let mut o = VolumeOptions::default();
        for (k, v) in options {
            let norm = normalize_option(k, v)?;
            match k.as_str() {
                "readonly" => o.read_only = norm == "true",
                "size" => o.size = norm.parse().ok(),
                "uid" => o.uid = norm.parse().ok(),
                "gid" => o.gid = norm.parse().ok(),
                "mode" => o.mode = u32::from_str_radix(&norm, 8).ok(),
                "from" => o.from = Some(PathBuf::from(norm)),
                _ => unreachable!("normalize_option refuses unknown options"),
            }
        }
        Ok(o)
    }

    /// The options of a stored volume (validated when it was created).
    pub fn of(rec: &VolumeRecord) -> VolumeOptions {
        VolumeOptions::parse(&rec.options).unwrap_or_else(|e| {
            tracing::error!(id = rec.id, "ignoring the stored options of a volume: {e}");
            VolumeOptions::default()
        })
    }
}

/// Checks one option and returns its value in one canonical spelling, so that `size=1G`
/// and `size=1073741824` compare equal.
fn normalize_option(key: &str, value: &str) -> Result<String, String> {
    if value.len() > MAX_VALUE {
        return Err(format!("option {key}: value longer than {MAX_VALUE} bytes"));
    }
    let id = |v: &str| -> Result<String, String> {
        match v.parse::<u32>() {
            // (uid_t)-1 means "leave unchanged" to chown: not an owner.
            Ok(n) if n != u32::MAX && v.bytes().all(|b| b.is_ascii_digit()) => Ok(n.to_string()),
            _ => Err(format!(
                "option {key}={v:?}: expected a number from 0 to {}",
                u32::MAX - 1
            )),
        }
    };
    match key {
        "readonly" => match value {
            "true" | "false" => Ok(value.to_string()),
            _ => Err(format!("option readonly={value:?}: expected true or false")),
        },
        "size" => match crate::units::parse_size(value) {
            Ok(0) => Err("option size=0: a quota must be at least 1 byte".into()),
            Ok(n) => Ok(n.to_string()),
            Err(e) => Err(format!("option size: {e}")),
        },
        "uid" | "gid" => id(value),
        "mode" => {
            let ok = !value.is_empty()
                && value.len() <= 5
                && value.bytes().all(|b| (b'0'..=b'7').contains(&b));
            match u32::from_str_radix(value, 8) {
                Ok(m) if ok && m <= 0o7777 => Ok(format!("{m:o}")),
                _ => Err(format!(
                    "option mode={value:?}: expected octal permission bits from 0 to 7777, e.g. 0755"
                )),
            }
        }
        "from" => {
            let p = Path::new(value);
            if !p.is_absolute() {
                return Err(format!("option from={value:?}: must be an absolute path"));
            }
            if value.contains('\0') {
                return Err(format!("option from={value:?}: contains a NUL byte"));
            }
            // One spelling per path: `/a//b/` and `/a/b` are the same source.
            Ok(p.components().collect::<PathBuf>().display().to_string())
        }
        _ => Err(format!("unknown option {key:?} (known options: {OPTIONS})")),
    }
}

/// Checks labels: keys non-empty, no control characters, bounded sizes. Values may be
/// empty.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err("a label key is empty (labels are KEY=VALUE)".into());
        }
        if k.len() > MAX_KEY {
            return Err(format!("label key {k:?} is longer than {MAX_KEY} bytes"));
        }
        if k.contains('=') {
            return Err(format!("label key {k:?} contains '='"));
        }
        if v.len() > MAX_VALUE {
            return Err(format!("label {k}: value longer than {MAX_VALUE} bytes"));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(format!("label {k:?} contains a control character"));
        }
    }
    Ok(())
}

/// Splits a `KEY=VALUE` argument (`what` is "label" or "option", for messages).
pub fn parse_key_value(arg: &str, what: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some(("", _)) => Err(format!("{what} {arg:?} has an empty key (write KEY=VALUE)")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("{what} {arg:?} is not KEY=VALUE")),
    }
}

/// Collects `KEY=VALUE` arguments into a map; a key given twice is refused.
pub fn key_values<S: AsRef<str>>(
    args: &[S],
    what: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for a in args {
        let (k, v) = parse_key_value(a.as_ref(), what)?;
        if map.contains_key(&k) {
            return Err(format!("{what} {k:?} is given twice"));
        }
        map.insert(k, v);
    }
    Ok(map)
}

/// Crash tests: `VOLFS_FAILPOINTS=NAME[,NAME…]` makes the daemon SIGKILL itself at these
/// points, as a crash there would stop it. Points: `create-before-register`, `rm-before-purge`.
fn failpoint(name: &str) {
    static POINTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let points = POINTS.get_or_init(|| {
        std::env::var("VOLFS_FAILPOINTS")
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    });
    if points.iter().any(|p| p == name) {
        tracing::error!("failpoint {name}: killing the daemon");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// A random name for an anonymous volume: 64 hex digits, as Docker's.
fn random_name() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom for a volume name: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What differs between a volume and a create of the same name, one line per difference.
fn differences(
    rec: &VolumeRecord,
    labels: &BTreeMap<String, String>,
    options: &BTreeMap<String, String>,
) -> Vec<String> {
    fn compare(
        out: &mut Vec<String>,
        what: &str,
        have: &BTreeMap<String, String>,
        want: &BTreeMap<String, String>,
        same: impl Fn(&str, &str, &str) -> bool,
    ) {
        let keys: BTreeSet<&String> = have.keys().chain(want.keys()).collect();
        for k in keys {
            let line = match (have.get(k), want.get(k)) {
                (Some(a), Some(b)) if same(k, a, b) => continue,
                (Some(a), Some(b)) => format!("{what} {k}: the volume has {a:?}, not {b:?}"),
                (Some(a), None) => format!("{what} {k}: the volume has {a:?}, this create none"),
                (None, Some(b)) => format!("{what} {k}: the volume has none, this create {b:?}"),
                (None, None) => continue,
            };
            out.push(line);
        }
    }
    let mut out = Vec::new();
    compare(&mut out, "label", &rec.labels, labels, |_, a, b| a == b);
    compare(&mut out, "option", &rec.options, options, |k, a, b| {
        a == b
            || matches!((normalize_option(k, a), normalize_option(k, b)), (Ok(x), Ok(y)) if x == y)
    });
    out
}

fn log_import(name: &str, stats: &ImportStats, t0: Instant, created: bool) {
    tracing::info!(
        volume = name,
        created,
        files = stats.files,
        dirs = stats.dirs,
        symlinks = stats.symlinks,
        hardlinks = stats.hardlinks,
        others = stats.others,
        bytes = stats.bytes,
        secs = t0.elapsed().as_secs_f64(),
        "imported an archive"
    );
}

/// Bytes allocated on the host for the files under `dir` (recursively).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

impl Registry {
    /// Opens the store, connects to (or starts) the keeper and serves the mount table.
    pub fn open(root: &Path) -> Result<Registry, String> {
        let store = Store::open(root)?;
        store
            .spawn_maintenance()
            .map_err(|e| format!("starting the maintenance thread: {e}"))?;
        {
            // Snapshot removals a stop or crash interrupted.
            let s = store.clone();
            std::thread::Builder::new()
                .name("snapshot-rm".into())
                .spawn(move || s.resume_removals())
                .map_err(|e| format!("starting the snapshot removal thread: {e}"))?;
        }
        let doomed = store.doomed()?;
        if !doomed.is_empty() {
            // Removals (or creates) a crash interrupted: finish them in the background.
            let s = store.clone();
            std::thread::Builder::new()
                .name("purge".into())
                .spawn(move || {
                    for (vol, rec) in doomed {
                        match s.purge(vol) {
                            Ok(bytes) => tracing::info!(
                                volume = rec.name,
                                id = vol,
                                bytes,
                                reason = ?rec.reason,
                                "finished purging a volume a crash left half-removed"
                            ),
                            Err(e) => tracing::error!(volume = rec.name, id = vol, "{e}"),
                        }
                    }
                })
                .map_err(|e| format!("starting the purge thread: {e}"))?;
        }
        let keeper = Keeper::new(root);
        keeper.connect()?;
        let reg = Registry {
            store,
            open: Mutex::new(HashMap::new()),
            mounts: Mutex::new(BTreeMap::new()),
            root: root.to_path_buf(),
            gate: Arc::new(Gate::default()),
            keeper,
            snap_admin: Mutex::new(()),
            started: Instant::now(),
        };
        reg.restore();
        Ok(reg)
    }

    fn table(&self) -> Vec<(PathBuf, MountRecord)> {
        let mut out = Vec::new();
        for item in self.store.mounts.iter() {
            match item {
                Ok((k, v)) => match serde_json::from_slice::<MountRecord>(&v) {
                    Ok(r) => out.push((PathBuf::from(std::ffi::OsStr::from_bytes(&k)), r)),
                    Err(e) => tracing::error!("skipping a corrupt mount-table row: {e}"),
                },
                Err(e) => tracing::error!("reading the mount table: {e}"),
            }
        }
        out
    }

    fn set_table(&self, path: &Path, rec: Option<&MountRecord>) -> Result<(), String> {
        let key = path.as_os_str().as_bytes();
        let r = match rec {
            Some(r) => {
                let v = serde_json::to_vec(r).map_err(|e| e.to_string())?;
                self.store.mounts.insert(key, v).map(|_| ())
            }
            None => self.store.mounts.remove(key).map(|_| ()),
        };
        r.map_err(|e| format!("updating the mount table for {}: {e}", path.display()))?;
        self.store
            .sync()
            .map_err(|e| format!("making the mount table durable: {e}"))
    }

    /// Serves the mount table again after a (re)start.
    fn restore(&self) {
        let table = self.table();
        let mut held: HashMap<PathBuf, (HeldMount, OwnedFd)> = match self.keeper.list() {
            Ok(v) => v
                .into_iter()
                .map(|(m, fd)| (m.path.clone(), (m, fd)))
                .collect(),
            Err(e) => {
                tracing::warn!("asking the keeper for its connections: {e}");
                HashMap::new()
            }
        };
        let mut resumed = Vec::new();
        for (path, rec) in &table {
            let Some((m, fd)) = held.remove(path) else {
                continue;
            };
            if m.volume == rec.volume && !fs::connection_dead(fd.as_fd()) {
                match self.resume(path, rec, fd) {
                    Ok(()) => {
                        tracing::info!(volume = rec.volume, path = %path.display(), "serving the mount again");
                        resumed.push(path.clone());
                        continue;
                    }
                    Err(e) => tracing::warn!(path = %path.display(), "resuming the mount: {e}"),
                }
            }
            let _ = self.keeper.release(path);
        }
        for (path, _) in held {
            // Held but no longer wanted (the table lost it): let the connection end.
            tracing::warn!(path = %path.display(), "detaching a mount missing from the mount table");
            if is_volfs_mount(&path) {
                fs::detach(&path);
            }
            let _ = self.keeper.release(&path);
        }
        for (path, rec) in table {
            if resumed.contains(&path) {
                continue;
            }
            if is_volfs_mount(&path) {
                // Its connection is gone with the keeper: only a dead mount is left.
                tracing::warn!(path = %path.display(), "detaching a dead mount left by an earlier daemon");
                fs::detach(&path);
            }
            if !path.is_dir() {
                tracing::warn!(path = %path.display(), volume = rec.volume, "mountpoint is gone; dropping it from the mount table");
                let _ = self.set_table(&path, None);
                continue;
            }
            match self.mount_inner(&rec.volume, &path, rec.read_only, false) {
                Ok(()) => {
                    tracing::info!(volume = rec.volume, path = %path.display(), "mounted again")
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), "mounting again failed (kept in the mount table): {e}")
                }
            }
        }
    }

    fn resume(&self, path: &Path, rec: &MountRecord, fd: OwnedFd) -> Result<(), String> {
        let (vfs, peers) = self.volume_fs(&rec.volume, true)?;
        if peers.count() > 0 {
            let f = vfs.clone();
            peers.prepare_join(move || f.inodes().unwrap_or_default());
        }
        let spec = MountSpec {
            volume: &rec.volume,
            mountpoint: path,
            read_only: rec.read_only,
            peers,
            gate: self.gate.clone(),
        };
        let mounted = fs::resume(vfs, &spec, fd).map_err(|e| e.to_string())?;
        lock(&self.mounts).insert(
            path.to_path_buf(),
            MountEntry {
                volume: rec.volume.clone(),
                read_only: rec.read_only,
                mounted,
            },
        );
        Ok(())
    }

    /// Checks the keeper every few seconds; a new one is started and given every
    /// connection if it died, so the next restart still finds them.
    pub fn watch_keeper(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("keeper-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(2));
                    let Some(reg) = me.upgrade() else { return };
                    if reg.gate.frozen() || reg.keeper.ping() {
                        continue;
                    }
                    tracing::warn!("the keeper is gone; starting a new one");
                    if let Err(e) = reg.keeper.connect() {
                        tracing::error!("restarting the keeper: {e}");
                        continue;
                    }
                    for (path, m) in lock(&reg.mounts).iter() {
                        let held = HeldMount {
                            path: path.clone(),
                            volume: m.volume.clone(),
                            read_only: m.read_only,
                        };
                        if let Err(e) = reg.keeper.hold(&held, m.mounted.device()) {
                            tracing::error!(path = %path.display(), "handing the mount to the keeper: {e}");
                        }
                    }
                }
            });
    }

    /// Answers one control request.
    pub fn handle(&self, req: Request) -> Response {
        let r = match req {
            Request::Create {
                name,
                labels,
                options,
            } => self
                .create(name.as_deref(), &labels, &options)
                .map(|v| Some(Reply::Volume(v))),
            Request::Ls { filters } => self.list(&filters).map(|v| Some(Reply::Volumes(v))),
            Request::Inspect { name } => self.inspect(&name).map(|v| Some(Reply::Volume(v))),
            Request::Df => self.df().map(|v| Some(Reply::Volumes(v))),
            Request::Rm { name, force } => {
                self.remove(&name, force).map(|r| Some(Reply::Removed(r)))
            }
            Request::Prune { all } => self.prune(all).map(|p| Some(Reply::Pruned(p))),
            Request::Mount {
                name,
                path,
                read_only,
            } => self.mount(&name, &path, read_only).map(|()| None),
            Request::Umount { path } => self.umount(&path).map(|()| None),
            Request::SnapshotCreate { name, snapshot } => self
                .snapshot_create(&name, snapshot.as_deref())
                .map(|v| Some(Reply::Snapshot(v))),
            Request::SnapshotLs { name } => {
                self.snapshot_list(&name).map(|v| Some(Reply::Snapshots(v)))
            }
            Request::SnapshotRm { name, snapshot } => self
                .snapshot_remove(&name, &snapshot)
                .map(|v| Some(Reply::Snapshot(v))),
            Request::Rollback {
                name,
                snapshot,
                force,
            } => self
                .rollback(&name, &snapshot, force)
                .map(|v| Some(Reply::RolledBack(v))),
            Request::CloneVolume {
                name,
                snapshot,
                new,
            } => self
                .clone_volume(&name, &snapshot, &new)
                .map(|v| Some(Reply::Volume(v))),
            Request::Fsck { name, repair } => self
                .fsck(name.as_deref(), repair)
                .map(|r| Some(Reply::Fsck(r))),
            Request::Scrub { names } => self.scrub(&names).map(|r| Some(Reply::Scrub(r))),
            Request::Version => Ok(Some(Reply::Version(VersionInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                protocol: api::PROTOCOL,
            }))),
            Request::Info => self.daemon_info().map(|i| Some(Reply::Info(i))),
            // The daemon's control loop does these itself: it must exit afterwards, or stream.
            Request::Shutdown => Err("shutdown is handled by the daemon's control loop".into()),
            // The archive follows the request on its connection: see `handle_import`.
            Request::Import { .. } => Err("import is handled by the daemon's control loop".into()),
            Request::Export { .. } => Err("export is streamed by the daemon's control loop".into()),
        };
        match r {
            Ok(Some(reply)) => Response::reply(reply),
            Ok(None) => Response::ok(),
            Err(e) => Response::err(e),
        }
    }

    /// Answers an `import` request whose archive is read from `source`.
    pub fn handle_import(&self, name: &str, replace: bool, source: &mut dyn Read) -> Response {
        match self.import(name, replace, source) {
            Ok(i) => Response::reply(Reply::Imported(i)),
            Err(e) => Response::err(e),
        }
    }

    fn record(&self, name: &str) -> Result<Option<VolumeRecord>, String> {
        self.store.volume(name)
    }

    fn info(&self, name: &str, rec: &VolumeRecord) -> VolumeInfo {
        let mounts = lock(&self.mounts)
            .iter()
            .filter(|(_, m)| {
                m.volume == name || (!name.contains('@') && split_target(&m.volume).0 == name)
            })
            .map(|(p, m)| MountInfo {
                path: p.clone(),
                read_only: m.read_only,
                snapshot: split_target(&m.volume).1.map(str::to_string),
            })
            .collect();
        VolumeInfo {
            name: name.to_string(),
            created: rec.created,
            labels: rec.labels.clone(),
            options: rec.options.clone(),
            anonymous: rec.anonymous,
            mounts,
            limit_bytes: VolumeOptions::of(rec).size,
            usage: None,
        }
    }

    /// What volume `id` holds: from the counters of the open volume, or by a scan of its
    /// inode records.
    fn usage(&self, id: u64) -> Result<UsageInfo, String> {
        let open = lock(&self.open).get(&(id, None)).map(|(fs, _)| fs.clone());
        let u = match open {
            Some(fs) => fs.usage(),
            None => SledFs::scan_usage(&self.store, id)
                .map_err(|e| format!("measuring a volume: {e}"))?,
        };
        Ok(UsageInfo {
            bytes: u.bytes,
            inodes: u.inodes,
        })
    }

    /// Creates a volume (`name` None: an anonymous one with a random name). Creating an
    /// existing volume with the same labels and options answers that volume, as with
    /// Docker; other labels or options are an error saying what differs. A create that
    /// fails leaves nothing behind.
    pub fn create(
        &self,
        name: Option<&str>,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<VolumeInfo, String> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        validate_labels(labels)?;
        let opts = VolumeOptions::parse(options)?;
        let (name, anonymous) = match name {
            Some(n) => (n.to_string(), false),
            None => (random_name()?, true),
        };
        if let Some(rec) = self.record(&name)? {
            return self.existing(&name, &rec, labels, options);
        }
        let created = self.create_hidden(&name, labels, options, anonymous, |id| {
            self.build(id, &name, &opts)
        })?;
        match created {
            Ok((rec, ())) => {
                tracing::info!(
                    volume = name,
                    id = rec.id,
                    ?options,
                    ?labels,
                    "created volume"
                );
                Ok(self.info(&name, &rec))
            }
            // Another create of the same name came first: that one stands.
            Err(winner) => self.existing(&name, &winner, labels, options),
        }
    }

    /// Creates volume `name` with what `fill` writes into its new id, hidden until complete:
    /// the id is doomed (purged after a failure or a crash) until its content is durable and
    /// the name is registered in one step with lifting the mark. On a failure nothing is
    /// left. Returns the new record and what `fill` returned, or the record of a volume of
    /// that name another request created meanwhile (and nothing of this one is left).
    fn create_hidden<T>(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
        anonymous: bool,
        fill: impl FnOnce(u64) -> Result<T, String>,
    ) -> Result<Result<(VolumeRecord, T), VolumeRecord>, String> {
        let id = self.new_volume_id(name)?;
        // The content is durable before a name points at it (and a crash from here on
        // leaves a doomed mark that is sure to be found).
        let built = fill(id).and_then(|t| {
            self.store
                .sync()
                .map_err(|e| format!("making volume {name} durable: {e}"))
                .map(|()| t)
        });
        let filled = match built {
            Ok(t) => t,
            Err(e) => {
                self.discard(id, name);
                return Err(e);
            }
        };
        failpoint("create-before-register");
        let rec = VolumeRecord {
            version: 1,
            id,
            created: Timestamp::now().secs,
            labels: labels.clone(),
            options: options.clone(),
            anonymous,
        };
        let registered = self
            .store
            .register(name, &rec)
            .inspect_err(|_| self.discard(id, name))?;
        if let Some(winner) = registered {
            self.discard(id, name);
            return Ok(Err(winner));
        }
        self.store
            .sync()
            .map_err(|e| format!("making volume {name} durable: {e}"))?;
        Ok(Ok((rec, filled)))
    }

    /// Fills volume `name` from the tar archive `source` (plain, gzip or zstd), all or
    /// nothing. A volume that does not exist is created (no labels or options), hidden
    /// until the whole archive is in, as `create` with `from=` does: on any error nothing
    /// is left and the name stays free. An existing volume must be empty unless `replace`;
    /// then [`Registry::import_into_existing`] does the work. Hostile archives are refused
    /// naming the entry and the reason (see [`crate::import`]).
    pub fn import(
        &self,
        name: &str,
        replace: bool,
        source: &mut dyn Read,
    ) -> Result<Imported, String> {
        validate_name(name)?;
        let t0 = Instant::now();
        if self.record(name)?.is_some() {
            if !replace {
                let (fs, _) = self.volume_fs(name, false)?;
                let empty = crate::import::is_empty_dir(&fs, crate::store::ROOT_INO)
                    .map_err(|e| format!("volume {name}: {e}"))?;
                if !empty {
                    return Err(format!(
                        "volume {name} is not empty: use --replace to swap its content for the archive's"
                    ));
                }
            }
            let (stats, kept) = self
                .import_into_existing(name, source, replace)
                .map_err(|e| {
                    format!("import into volume {name}: {e} (the volume was not changed)")
                })?;
            log_import(name, &stats, t0, false);
            let volume = self.inspect(name)?;
            return Ok(Imported {
                volume,
                created: false,
                kept_snapshot: kept,
                stats,
            });
        }
        let none = BTreeMap::new();
        let created = self
            .create_hidden(name, &none, &none, false, |id| {
                SledFs::init_volume(&self.store, id, 0, 0, 0o755)
                    .map_err(|e| format!("creating volume {name}: {e}"))?;
                let fs = SledFs::open(self.store.clone(), id, name)
                    .map_err(|e| format!("opening new volume {name}: {e}"))?;
                crate::import::import_archive(&fs, crate::store::ROOT_INO, source)
            })
            .map_err(|e| {
                format!("import into volume {name}: {e} (nothing was imported: volume {name} was not created)")
            })?;
        match created {
            Ok((rec, stats)) => {
                log_import(name, &stats, t0, true);
                tracing::info!(volume = name, id = rec.id, "created volume by import");
                let volume = self.inspect(name)?;
                Ok(Imported {
                    volume,
                    created: true,
                    kept_snapshot: None,
                    stats,
                })
            }
            Err(_) => Err(format!(
                "import into volume {name}: another request created volume {name} while the \
                 archive was read; nothing was imported (import again: an empty volume can be \
                 filled)"
            )),
        }
    }

    /// Imports the archive `source` into the existing volume `name`, which is empty or,
    /// with `replace`, may hold anything: the seam for snapshots. The intended design:
    /// import into a hidden staging directory of the volume (with
    /// [`crate::import::import_archive`], which takes the directory to fill), then swap it
    /// with the volume's content atomically, keeping the old content as a snapshot; on any
    /// error the volume is exactly as before. Mounts of the volume, `readonly=true` and the
    /// quota are this method's to handle. [`Registry::import`] has checked the name, that
    /// the volume exists, and that it is empty unless `replace`.
    pub fn import_into_existing(
        &self,
        name: &str,
        source: &mut dyn Read,
        replace: bool,
    ) -> Result<(ImportStats, Option<String>), String> {
        self.import_into_existing_with(name, replace, |fs| {
            crate::import::import_archive(fs, crate::store::ROOT_INO, source)
        })
    }

    /// The answer to creating a volume that exists.
    fn existing(
        &self,
        name: &str,
        rec: &VolumeRecord,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<VolumeInfo, String> {
        let diff = differences(rec, labels, options);
        if diff.is_empty() {
            return Ok(self.info(name, rec));
        }
        Err(format!(
            "volume {name} already exists with other labels or options: {} \
             (create it with the same ones, or remove it first with `volfs rm {name}`)",
            diff.join("; ")
        ))
    }

    /// Writes what a new volume starts with: its root directory, and with `from=` a copy
    /// of that tree (whose root the volume root becomes, except for what `uid=`, `gid=`
    /// and `mode=` set).
    fn build(&self, id: u64, name: &str, opts: &VolumeOptions) -> Result<(), String> {
        SledFs::init_volume(
            &self.store,
            id,
            opts.uid.unwrap_or(0),
            opts.gid.unwrap_or(0),
            opts.mode.unwrap_or(0o755),
        )
        .map_err(|e| format!("creating volume {name}: {e}"))?;
        let Some(from) = &opts.from else {
            return Ok(());
        };
        let fs = SledFs::open(self.store.clone(), id, name)
            .map_err(|e| format!("opening new volume {name}: {e}"))?;
        fs.set_limit(opts.size);
        let t0 = Instant::now();
        let stats = crate::import::import(&fs, from).map_err(|e| match opts.size {
            Some(size) => format!(
                "creating volume {name} (quota size={}): {e}",
                crate::units::human_size(size)
            ),
            None => format!("creating volume {name}: {e}"),
        })?;
        if opts.uid.is_some() || opts.gid.is_some() || opts.mode.is_some() {
            let set = crate::vfs::SetAttr {
                uid: opts.uid,
                gid: opts.gid,
                mode: opts.mode,
                ..crate::vfs::SetAttr::default()
            };
            let root = crate::vfs::Ctx::ROOT;
            fs.setattr(&root, crate::store::ROOT_INO, &set)
                .map_err(|e| format!("setting the root of volume {name}: {e}"))?;
        }
        tracing::info!(volume = name, from = %from.display(), "copied in");
        log_import(name, &stats, t0, true);
        Ok(())
    }

    /// A new volume id for `name`, doomed until registered: a failure or a crash from
    /// here on leaves only a mark that gets the id's keys purged.
    fn new_volume_id(&self, name: &str) -> Result<u64, String> {
        let id = self
            .store
            .db
            .generate_id()
            .map_err(|e| format!("allocating a volume id: {e}"))?
            + 1;
        self.store.begin_create(id, name)?;
        Ok(id)
    }

    /// Purges a volume id whose create failed or lost a race.
    fn discard(&self, id: u64, name: &str) {
        if let Err(e) = self.store.purge(id) {
            // The doomed mark stays: the next start finishes the purge.
            tracing::error!(volume = name, id, "discarding a failed create: {e}");
        }
    }

    /// Volumes passing `filters`, without measuring them.
    pub fn list(&self, filters: &LsFilters) -> Result<Vec<VolumeInfo>, String> {
        let mut out = Vec::new();
        for item in self.store.volumes.iter() {
            let (k, v) = item.map_err(|e| format!("listing volumes: {e}"))?;
            let name = String::from_utf8_lossy(&k).into_owned();
            match VolumeRecord::decode(&v) {
                Ok(rec) => {
                    let info = self.info(&name, &rec);
                    if filters.matches(&info) {
                        out.push(info);
                    }
                }
                Err(e) => tracing::error!(volume = name, "skipping corrupt volume record: {e}"),
            }
        }
        Ok(out)
    }

    fn no_such_volume(name: &str) -> String {
        format!("no such volume: {name}")
    }

    /// One volume with its usage.
    pub fn inspect(&self, name: &str) -> Result<VolumeInfo, String> {
        validate_name(name)?;
        let rec = self
            .record(name)?
            .ok_or_else(|| Self::no_such_volume(name))?;
        let mut info = self.info(name, &rec);
        info.usage = Some(self.usage(rec.id)?);
        Ok(info)
    }

    /// Volume `name` if it exists, with its usage when `measure` (a usage that cannot be
    /// measured is left out and logged: the volume still exists).
    ///
    /// `VOL@SNAP` answers for snapshot SNAP of VOL: a read-only volume created when the
    /// snapshot was taken, holding what the volume held then.
    pub fn get(&self, name: &str, measure: bool) -> Result<Option<VolumeInfo>, String> {
        validate_target(name)?;
        let (vol, snap) = split_target(name);
        let Some(rec) = self.record(vol)? else {
            return Ok(None);
        };
        if let Some(snap) = snap {
            let Some((_, srec)) = self
                .store
                .snapshots(rec.id)?
                .into_iter()
                .find(|(_, r)| r.name == snap && !r.deleting && !r.temporary)
            else {
                return Ok(None);
            };
            let mut info = self.info(name, &rec);
            info.created = srec.created.secs;
            info.options = BTreeMap::from([("readonly".to_string(), "true".to_string())]);
            info.limit_bytes = None;
            info.anonymous = false;
            if measure {
                info.usage = Some(UsageInfo {
                    bytes: srec.bytes,
                    inodes: srec.inodes,
                });
            }
            return Ok(Some(info));
        }
        let mut info = self.info(name, &rec);
        if measure {
            match self.usage(rec.id) {
                Ok(u) => info.usage = Some(u),
                Err(e) => tracing::warn!(volume = name, "{e}"),
            }
        }
        Ok(Some(info))
    }

    /// The volume mounted at `path` (canonical), per the daemon's mount table.
    pub fn mounted_volume(&self, path: &Path) -> Option<String> {
        lock(&self.mounts).get(path).map(|m| m.volume.clone())
    }

    /// The mountpoints of the daemon's mounts under `dir`, with their volumes.
    pub fn mounts_under(&self, dir: &Path) -> Vec<(PathBuf, String)> {
        lock(&self.mounts)
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .map(|(p, m)| (p.clone(), m.volume.clone()))
            .collect()
    }

    /// The daemon's `--root` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store (for modules that keep their own trees in it, such as `crate::plugin`).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every volume with its usage.
    pub fn df(&self) -> Result<Vec<VolumeInfo>, String> {
        let mut out = self.list(&LsFilters::default())?;
        for v in &mut out {
            // A volume removed since the listing is left out.
            if let Some(rec) = self.record(&v.name)? {
                v.usage = Some(self.usage(rec.id)?);
            }
        }
        out.retain(|v| v.usage.is_some());
        Ok(out)
    }

    /// Removes a volume and deletes its data. A mounted volume is refused, unless `force`:
    /// then its mounts are unmounted first.
    pub fn remove(&self, name: &str, force: bool) -> Result<Removed, String> {
        validate_name(name)?;
        let mut unmounted = Vec::new();
        // Each round either removes the volume, fails, or unmounts what was mounted; a
        // volume mounted again and again between rounds is given up on.
        for _ in 0..8 {
            let rec = self
                .record(name)?
                .ok_or_else(|| Self::no_such_volume(name))?;
            let bytes = self.usage(rec.id).map(|u| u.bytes).unwrap_or(0);
            let mounts = lock(&self.mounts);
            let here: Vec<PathBuf> = mounts
                .iter()
                .filter(|(_, m)| split_target(&m.volume).0 == name)
                .map(|(p, _)| p.clone())
                .collect();
            if !here.is_empty() {
                let list: Vec<String> = here.iter().map(|p| p.display().to_string()).collect();
                if !force {
                    return Err(format!(
                        "volume {name} is in use: mounted at {}; unmount it first \
                         (`volfs umount PATH`) or use `volfs rm --force {name}`",
                        list.join(", ")
                    ));
                }
                drop(mounts);
                for p in here {
                    match self.umount(&p) {
                        Ok(()) => unmounted.push(p),
                        // Unmounted by someone else meanwhile.
                        Err(e) => tracing::debug!("rm --force {name}: {e}"),
                    }
                }
                continue;
            }
            // Still holding the mount table: no mount of this volume can begin until the
            // name is gone.
            if !self.store.unregister(name, rec.id)? {
                continue; // removed, or removed and created again, meanwhile
            }
            let opened = {
                let mut open = lock(&self.open);
                open.retain(|(v, s), _| *v != rec.id || s.is_none());
                open.remove(&(rec.id, None))
            };
            drop(mounts);
            self.store
                .sync()
                .map_err(|e| format!("making the removal of volume {name} durable: {e}"))?;
            tracing::info!(volume = name, id = rec.id, ?unmounted, "removed volume");
            failpoint("rm-before-purge");
            self.purge(rec.id, name, opened.map(|(fs, _)| Arc::downgrade(&fs)));
            return Ok(Removed {
                name: name.to_string(),
                unmounted,
                bytes,
            });
        }
        Err(format!(
            "volume {name} kept being mounted while `rm --force` unmounted it; try again"
        ))
    }

    /// Deletes the keys of a removed volume now, or once nothing uses its filesystem any
    /// more (a mount detached while busy serves its open files until they close).
    fn purge(&self, id: u64, name: &str, fs: Option<Weak<SledFs>>) {
        // A mount just unmounted lets go of the filesystem as soon as its session threads
        // see the connection end: give them a moment before deferring the purge.
        let t0 = Instant::now();
        while fs.as_ref().is_some_and(|w| w.strong_count() > 0)
            && t0.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let in_use = fs.as_ref().is_some_and(|w| w.strong_count() > 0);
        if !in_use {
            if let Err(e) = self.store.purge(id) {
                tracing::error!(volume = name, id, "purging a removed volume: {e}");
            }
            return;
        }
        tracing::info!(
            volume = name,
            id,
            "volume still in use by a detached mount: purging once it is released"
        );
        let store = self.store.clone();
        let name = name.to_string();
        let spawned = std::thread::Builder::new()
            .name("purge".into())
            .spawn(move || {
                while fs.as_ref().is_some_and(|w| w.strong_count() > 0) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                match store.purge(id) {
                    Ok(bytes) => tracing::info!(volume = name, id, bytes, "purged removed volume"),
                    Err(e) => tracing::error!(volume = name, id, "purging a removed volume: {e}"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(
                id,
                "starting a purge thread: {e}; the next start purges the volume"
            );
        }
    }

    /// Removes unmounted anonymous volumes (`all`: every unmounted volume).
    pub fn prune(&self, all: bool) -> Result<Pruned, String> {
        let mut pruned = Pruned::default();
        for v in self.list(&LsFilters {
            dangling: Some(true),
            ..LsFilters::default()
        })? {
            if !(all || v.anonymous) {
                continue;
            }
            // A volume mounted or removed since the listing is skipped.
            match self.remove(&v.name, false) {
                Ok(r) => {
                    pruned.deleted.push(r.name);
                    pruned.bytes += r.bytes;
                }
                Err(e) => tracing::info!(volume = v.name, "prune skips it: {e}"),
            }
        }
        Ok(pruned)
    }

    fn daemon_info(&self) -> Result<DaemonInfo, String> {
        Ok(DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            root: self.root.clone(),
            store_bytes: disk_usage(&self.root),
            volumes: self.store.volumes.len() as u64,
            mounts: lock(&self.mounts).len() as u64,
        })
    }

    /// Whether volume `name` was created `readonly=true` (then every mount is read-only).
    fn forced_read_only(&self, name: &str) -> Result<bool, String> {
        Ok(self
            .record(name)?
            .is_some_and(|r| VolumeOptions::of(&r).read_only))
    }

    fn volume_fs(&self, target: &str, resumed: bool) -> Result<OpenVolume, String> {
        let (name, snap) = split_target(target);
        let rec = self.record(name)?.ok_or_else(|| {
            format!("no such volume: {name} (create it with `volfs create {name}`)")
        })?;
        let snap_id = match snap {
            Some(s) => Some(self.snapshot_id(name, rec.id, s)?.0),
            None => None,
        };
        let mut open = lock(&self.open);
        if let Some(v) = open.get(&(rec.id, snap_id)) {
            return Ok(v.clone());
        }
        let opened = match snap_id {
            Some(sid) => SledFs::open_snapshot(self.store.clone(), rec.id, sid, target),
            None if resumed => SledFs::open_resumed(self.store.clone(), rec.id, name),
            None => SledFs::open(self.store.clone(), rec.id, name),
        };
        let fs = Arc::new(opened.map_err(|e| format!("opening volume {target}: {e}"))?);
        fs.set_limit(VolumeOptions::of(&rec).size);
        let v = (fs, Arc::new(fs::Peers::default()));
        open.insert((rec.id, snap_id), v.clone());
        Ok(v)
    }

    /// The tree `volfs export NAME[@SNAPSHOT]` writes out: that snapshot, or for no
    /// snapshot a temporary one taken now, so the archive is always the volume at one
    /// instant (the temporary snapshot goes when the export ends).
    pub fn export_source(
        &self,
        name: &str,
        snapshot: Option<&str>,
    ) -> Result<ExportSource, String> {
        validate_name(name)?;
        let view = self.consistent_view(name, snapshot)?;
        let fs: Arc<SledFs> = view
            .fs
            .clone()
            .ok_or_else(|| format!("exporting {name}: no view"))?;
        // `fs` is dropped before `hold`, so the view's is the last reference to the
        // snapshot when it removes a temporary one.
        Ok(ExportSource {
            fs,
            hold: Some(Box::new(view)),
        })
    }

    /// Mounts a volume at an existing directory and records it in the mount table.
    pub fn mount(&self, name: &str, path: &Path, read_only: bool) -> Result<(), String> {
        self.mount_inner(name, path, read_only, true)
    }

    fn mount_inner(
        &self,
        name: &str,
        path: &Path,
        read_only: bool,
        record: bool,
    ) -> Result<(), String> {
        validate_target(name)?;
        // A snapshot never changes: its mounts are read-only.
        let read_only = read_only
            || split_target(name).1.is_some()
            || self.forced_read_only(split_target(name).0)?;
        if !path.is_absolute() {
            return Err(format!(
                "mountpoint {} is not an absolute path",
                path.display()
            ));
        }
        if let Err(e) = std::fs::metadata(path) {
            if e.raw_os_error() == Some(libc::ENOTCONN) {
                // A mount left by a daemon that died: nothing serves it any more.
                tracing::warn!("detaching dead FUSE mount at {}", path.display());
                fs::detach(path);
            }
        }
        // One spelling per directory: symlinks, `..` and trailing slashes resolve here.
        let path = &std::fs::canonicalize(path).map_err(|e| {
            format!(
                "mountpoint {}: {e} (create the directory first)",
                path.display()
            )
        })?;
        let mut mounts = lock(&self.mounts);
        if let Some(m) = mounts.get(path) {
            return Err(format!(
                "{} already has volume {} mounted; unmount it first with `volfs umount {}`",
                path.display(),
                m.volume,
                path.display()
            ));
        }
        let meta = std::fs::metadata(path).map_err(|e| {
            format!(
                "mountpoint {}: {e} (create the directory first)",
                path.display()
            )
        })?;
        if !meta.is_dir() {
            return Err(format!("mountpoint {} is not a directory", path.display()));
        }
        let (vfs, peers) = self.volume_fs(name, false)?;
        let rec = MountRecord {
            volume: name.to_string(),
            read_only,
        };
        // Recorded first: a crash before the keeper holds the connection leaves a dead
        // mount that the next start finds in the table, detaches and mounts again.
        if record {
            self.set_table(path, Some(&rec))?;
        }
        if peers.count() > 0 {
            let f = vfs.clone();
            peers.prepare_join(move || f.inodes().unwrap_or_default());
        }
        let spec = MountSpec {
            volume: name,
            mountpoint: path,
            read_only,
            peers,
            gate: self.gate.clone(),
        };
        let mounted = match fs::mount(vfs, &spec) {
            Ok(m) => m,
            Err(e) => {
                if record {
                    let _ = self.set_table(path, None);
                }
                return Err(format!("mounting {name} at {}: {e}", path.display()));
            }
        };
        let held = HeldMount {
            path: path.to_path_buf(),
            volume: name.to_string(),
            read_only,
        };
        if let Err(e) = self.keeper.hold(&held, mounted.device()) {
            tracing::error!(path = %path.display(), "the keeper did not take the connection; this mount will not survive a daemon restart: {e}");
        }
        tracing::info!(volume = name, path = %path.display(), read_only, "mounted");
        mounts.insert(
            path.to_path_buf(),
            MountEntry {
                volume: name.to_string(),
                read_only,
                mounted,
            },
        );
        Ok(())
    }

    pub fn umount(&self, path: &Path) -> Result<(), String> {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut mounts = lock(&self.mounts);
        let key = if mounts.contains_key(path) {
            path
        } else {
            canonical.as_path()
        };
        if !mounts.contains_key(key) {
            return Err(format!(
                "{} is not a volfs mountpoint (see `volfs ls`)",
                path.display()
            ));
        }
        // The table first: if that fails, the mount stays as it was, managed.
        self.set_table(key, None)?;
        let key = key.to_path_buf();
        let Some(entry) = mounts.remove(&key) else {
            return Ok(());
        };
        let _ = self.keeper.release(&key);
        entry.mounted.unmount(&key);
        tracing::info!(volume = entry.volume, path = %path.display(), "unmounted");
        if split_target(&entry.volume).1.is_some()
            && !mounts.values().any(|m| m.volume == entry.volume)
        {
            // Its session lets go of the snapshot's filesystem (and pin) when it ends.
            lock(&self.open).retain(|_, (fs, _)| fs.name() != entry.volume);
        }
        Ok(())
    }

    /// Stops answering and makes everything acknowledged durable, leaving the mounts to
    /// the keeper: the next daemon serves them again. Requests arriving from now on wait.
    pub fn stop_for_restart(&self) {
        if !self.gate.freeze(Duration::from_secs(10)) {
            tracing::warn!("requests still running after 10 s; the next daemon redoes them");
        }
        self.flush_all();
    }

    /// Unmounts everything (the mount table stays, for the next start), lets the keeper
    /// go and makes the store durable.
    pub fn shutdown(&self) {
        let mounts = std::mem::take(&mut *lock(&self.mounts));
        for (path, m) in mounts {
            let _ = self.keeper.release(&path);
            m.mounted.unmount(&path);
            tracing::info!(volume = m.volume, path = %path.display(), "unmounted at shutdown");
        }
        if let Err(e) = self.keeper.exit() {
            tracing::warn!("stopping the keeper: {e}");
        }
        self.flush_all();
    }

    fn flush_all(&self) {
        let open: Vec<OpenVolume> = lock(&self.open).values().cloned().collect();
        for (fs, _) in &open {
            if let Err(e) = fs.sync() {
                tracing::error!("flushing at shutdown: {e}");
            }
        }
        if let Err(e) = self.store.sync() {
            tracing::error!("flushing the store at shutdown: {e}");
        }
    }
}

/// True if a `fuse.volfs` mount sits exactly at `path` (per /proc/self/mountinfo; no
/// access to the mount itself, which could block if its server is away).
pub fn is_volfs_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.split(|b| *b == b'\n').any(|line| {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            return false;
        };
        fields.len() > sep + 1
            && fields.get(4).is_some_and(|mp| unescape(mp) == want)
            && fields[sep + 1] == b"fuse.volfs"
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && i + 3 < f.len()
            && f[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((f[i + 1] - b'0') * 64 + (f[i + 2] - b'0') * 8 + (f[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

/// What [`Registry::consistent_view`] gives.
pub struct ConsistentView {
    fs: Option<Arc<SledFs>>,
    /// The temporary snapshot to remove afterwards: (store, volume id, snapshot id).
    temp: Option<(Store, u64, u64)>,
}

impl ConsistentView {
    pub fn fs(&self) -> &SledFs {
        // Set at construction, taken only by `drop`.
        self.fs
            .as_deref()
            .expect("view filesystem present until drop")
    }
}

impl Drop for ConsistentView {
    fn drop(&mut self) {
        let fs = self.fs.take();
        let Some((store, vol, id)) = self.temp.take() else {
            return;
        };
        // The pin goes with the last reference to the filesystem.
        drop(fs);
        if let Err(e) = store.remove_snapshot(vol, id) {
            tracing::warn!(
                vol,
                id,
                "removing a temporary snapshot (the next start does): {e}"
            );
        }
    }
}

/// The default snapshot name: the UTC time, `20261128-133918`.
fn default_snapshot_name() -> String {
    let secs = Timestamp::now().secs;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn snapshot_info(volume: &str, rec: &crate::snap::SnapshotRecord) -> SnapshotInfo {
    SnapshotInfo {
        volume: volume.to_string(),
        name: rec.name.clone(),
        created: rec.created.secs,
        created_nanos: rec.created.nsecs,
        bytes: rec.bytes,
        inodes: rec.inodes,
        stall_us: None,
        freed_bytes: None,
    }
}

impl Registry {
    /// The id and record of snapshot `snap` of volume `name` (id `vol`).
    fn snapshot_id(
        &self,
        name: &str,
        vol: u64,
        snap: &str,
    ) -> Result<(u64, crate::snap::SnapshotRecord), String> {
        validate_snapshot_name(snap)?;
        self.store
            .snapshots(vol)?
            .into_iter()
            .find(|(_, r)| r.name == snap && !r.deleting && !r.temporary)
            .ok_or_else(|| {
                format!("no such snapshot: {name}@{snap} (see `volfs snapshot ls {name}`)")
            })
    }

    fn existing_record(&self, name: &str) -> Result<VolumeRecord, String> {
        validate_name(name)?;
        self.record(name)?.ok_or_else(|| Self::no_such_volume(name))
    }

    /// Takes a snapshot of a volume: the whole volume at one instant, with what the
    /// kernels of its mounts still held dirty written back first.
    pub fn snapshot_create(&self, name: &str, snap: Option<&str>) -> Result<SnapshotInfo, String> {
        let _admin = lock(&self.snap_admin);
        let rec = self.existing_record(name)?;
        let snap = match snap {
            Some(s) => {
                validate_snapshot_name(s)?;
                s.to_string()
            }
            None => {
                let base = default_snapshot_name();
                let taken: Vec<String> = self
                    .store
                    .snapshots(rec.id)?
                    .into_iter()
                    .map(|(_, r)| r.name)
                    .collect();
                let mut n = base.clone();
                let mut i = 1;
                while taken.contains(&n) {
                    i += 1;
                    n = format!("{base}.{i}");
                }
                n
            }
        };
        if self
            .store
            .snapshots(rec.id)?
            .iter()
            .any(|(_, r)| r.name == snap)
        {
            return Err(format!(
                "snapshot {name}@{snap} exists already (remove it with `volfs snapshot rm {name}@{snap}`, or choose another name)"
            ));
        }
        let (_, srec, stall) = self.take_snapshot(name, &rec, &snap, false)?;
        tracing::info!(
            volume = name,
            snapshot = snap,
            stall_us = stall.as_micros() as u64,
            "took a snapshot"
        );
        let mut info = snapshot_info(name, &srec);
        info.stall_us = Some(stall.as_micros() as u64);
        Ok(info)
    }

    /// Has the kernels of the volume's mounts write back what they hold dirty (pages of
    /// shared writable mmaps), then takes the snapshot.
    fn take_snapshot(
        &self,
        name: &str,
        rec: &VolumeRecord,
        snap: &str,
        temporary: bool,
    ) -> Result<(u64, crate::snap::SnapshotRecord, Duration), String> {
        // Pages dirtied through shared writable mmaps are in the kernels until written
        // back: have them written now, so the snapshot holds them.
        let live = lock(&self.open).get(&(rec.id, None)).cloned();
        if let Some((fs, peers)) = &live {
            let f = fs.clone();
            peers.write_back(&fs.open_inodes(), move || f.inodes().unwrap_or_default());
        }
        let open = lock(&self.open)
            .get(&(rec.id, None))
            .map(|(fs, _)| fs.clone());
        let counted = match &open {
            Some(_) => None,
            None => Some(SledFs::scan_usage(&self.store, rec.id).map_err(|e| e.to_string())?),
        };
        self.store
            .create_snapshot_with(rec.id, snap, temporary, || {
                let u = open
                    .as_ref()
                    .map_or_else(|| counted.unwrap_or_default(), |fs| fs.usage());
                (u.bytes, u.inodes)
            })
            .map_err(|e| format!("snapshot of {name}: {e}"))
    }

    /// A consistent read-only view of a volume (for an export): snapshot `snap`, or a
    /// temporary snapshot of the volume taken now, removed when the view is dropped.
    pub fn consistent_view(
        &self,
        name: &str,
        snap: Option<&str>,
    ) -> Result<ConsistentView, String> {
        let rec = self.existing_record(name)?;
        if let Some(snap) = snap {
            let (id, _) = self.snapshot_id(name, rec.id, snap)?;
            let fs =
                SledFs::open_snapshot(self.store.clone(), rec.id, id, &format!("{name}@{snap}"))
                    .map_err(|e| format!("opening {name}@{snap}: {e}"))?;
            return Ok(ConsistentView {
                fs: Some(Arc::new(fs)),
                temp: None,
            });
        }
        let tmp = format!("tmp-{}-{}", std::process::id(), Timestamp::now().nsecs);
        let (id, _, _) = {
            let _admin = lock(&self.snap_admin);
            self.take_snapshot(name, &rec, &tmp, true)?
        };
        // Removes the snapshot again if opening it fails.
        let mut view = ConsistentView {
            fs: None,
            temp: Some((self.store.clone(), rec.id, id)),
        };
        let fs = SledFs::open_snapshot(self.store.clone(), rec.id, id, &format!("{name}@{tmp}"))
            .map_err(|e| format!("opening a snapshot of {name}: {e}"))?;
        view.fs = Some(Arc::new(fs));
        Ok(view)
    }

    /// The snapshots of a volume, oldest first.
    pub fn snapshot_list(&self, name: &str) -> Result<Vec<SnapshotInfo>, String> {
        let rec = self.existing_record(name)?;
        Ok(self
            .store
            .snapshots(rec.id)?
            .iter()
            .filter(|(_, r)| !r.deleting && !r.temporary)
            .map(|(_, r)| snapshot_info(name, r))
            .collect())
    }

    /// Removes a snapshot; refused while it is mounted.
    pub fn snapshot_remove(&self, name: &str, snap: &str) -> Result<SnapshotInfo, String> {
        let _admin = lock(&self.snap_admin);
        let rec = self.existing_record(name)?;
        let (id, srec) = self.snapshot_id(name, rec.id, snap)?;
        let target = format!("{name}@{snap}");
        let here: Vec<String> = lock(&self.mounts)
            .iter()
            .filter(|(_, m)| m.volume == target)
            .map(|(p, _)| p.display().to_string())
            .collect();
        if !here.is_empty() {
            return Err(format!(
                "snapshot {target} is mounted at {}; unmount it first (`volfs umount PATH`)",
                here.join(", ")
            ));
        }
        // A mount just unmounted lets go of the snapshot when its session ends.
        let t0 = Instant::now();
        while self.store.snaps.pinned(rec.id, id) && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let freed = self
            .store
            .remove_snapshot(rec.id, id)
            .map_err(|e| format!("removing snapshot {target}: {e}"))?;
        tracing::info!(volume = name, snapshot = snap, freed, "removed a snapshot");
        let mut info = snapshot_info(name, &srec);
        info.freed_bytes = Some(freed);
        Ok(info)
    }

    /// Makes a volume what one of its snapshots holds (the snapshots all stay). Refused
    /// while the volume has writable mounts, unless `force`: their kernels then drop
    /// what they cached, and files they hold open may vanish.
    pub fn rollback(&self, name: &str, snap: &str, force: bool) -> Result<RolledBack, String> {
        let _admin = lock(&self.snap_admin);
        let rec = self.existing_record(name)?;
        let (id, _) = self.snapshot_id(name, rec.id, snap)?;
        let writable: Vec<String> = lock(&self.mounts)
            .iter()
            .filter(|(_, m)| m.volume == name && !m.read_only)
            .map(|(p, _)| p.display().to_string())
            .collect();
        if !writable.is_empty() && !force {
            return Err(format!(
                "volume {name} is mounted writable at {}: unmount it first, or use \
                 `volfs rollback --force {name}@{snap}` (programs using it then see its \
                 content change under them)",
                writable.join(", ")
            ));
        }
        let _pin = self.store.snaps.pin(rec.id, id);
        let r = self
            .store
            .replace_content(rec.id, rec.id, Some(id))
            .map_err(|e| format!("rolling {name} back to {snap}: {e}"))?;
        self.content_replaced(rec.id);
        tracing::info!(
            volume = name,
            snapshot = snap,
            keys = r.keys,
            bytes = r.bytes,
            "rolled back"
        );
        Ok(RolledBack {
            volume: name.to_string(),
            snapshot: snap.to_string(),
            changed_keys: r.keys,
            copied_bytes: r.bytes,
        })
    }

    /// Fills existing volume `name` with what `fill` writes into a fresh staging volume,
    /// all or nothing: on any error the volume is as before. Without `replace` the
    /// volume must be empty; with it, its content is swapped for the new one in one
    /// commit and kept as snapshot `before-import-TIME`, whose name is returned.
    fn import_into_existing_with(
        &self,
        name: &str,
        replace: bool,
        fill: impl FnOnce(&SledFs) -> Result<ImportStats, String>,
    ) -> Result<(ImportStats, Option<String>), String> {
        let rec = self.existing_record(name)?;
        let empty = self
            .store
            .fs
            .scan_prefix(crate::store::dentry_prefix(rec.id, crate::store::ROOT_INO))
            .next()
            .is_none();
        if !empty && !replace {
            return Err(format!(
                "volume {name} is not empty: use --replace to swap its content for the \
                 archive's (the current content is kept as a snapshot)"
            ));
        }
        let staging = self.new_volume_id(name)?;
        let filled = SledFs::init_volume(&self.store, staging, 0, 0, 0o755)
            .map_err(|e| format!("staging the import into {name}: {e}"))
            .and_then(|()| {
                let fs = SledFs::open(self.store.clone(), staging, name)
                    .map_err(|e| format!("staging the import into {name}: {e}"))?;
                fs.set_limit(VolumeOptions::of(&rec).size);
                fill(&fs)
            });
        let stats = match filled {
            Ok(s) => s,
            Err(e) => {
                self.discard(staging, name);
                return Err(e);
            }
        };
        let swapped = {
            let _admin = lock(&self.snap_admin);
            let kept = if empty {
                Ok(None)
            } else {
                let snap = format!("before-import-{}", default_snapshot_name());
                self.take_snapshot(name, &rec, &snap, false)
                    .map(|_| Some(snap))
            };
            kept.and_then(|kept| {
                self.store
                    .replace_content(rec.id, staging, None)
                    .map(|_| kept)
                    .map_err(|e| format!("importing into {name}: {e}"))
            })
        };
        self.discard(staging, name);
        let kept = swapped?;
        self.content_replaced(rec.id);
        tracing::info!(
            volume = name,
            files = stats.files,
            bytes = stats.bytes,
            ?kept,
            "imported into an existing volume"
        );
        Ok((stats, kept))
    }

    /// `(name, record)` of volume `name`, or of every volume.
    fn named_or_all(&self, names: &[String]) -> Result<Vec<(String, VolumeRecord)>, String> {
        if names.is_empty() {
            let mut out = Vec::new();
            for item in self.store.volumes.iter() {
                let (k, v) = item.map_err(|e| format!("listing volumes: {e}"))?;
                let name = String::from_utf8_lossy(&k).into_owned();
                let rec = VolumeRecord::decode(&v)
                    .map_err(|e| format!("the record of volume {name} is corrupt: {e}"))?;
                out.push((name, rec));
            }
            return Ok(out);
        }
        names
            .iter()
            .map(|n| Ok((n.clone(), self.existing_record(n)?)))
            .collect()
    }

    /// Checks volume `name` (or every volume, with the store as a whole), and with
    /// `repair` fixes what is safe (see `crate::fsck`). A volume in use is checked through
    /// a temporary snapshot; a repair is refused while the volume is mounted, and holds
    /// the mount table so that no mount starts meanwhile.
    pub fn fsck(&self, name: Option<&str>, repair: bool) -> Result<FsckReport, String> {
        let names: Vec<String> = name.map(str::to_string).into_iter().collect();
        let vols = self.named_or_all(&names)?;
        let mut report = FsckReport::default();
        for (name, rec) in vols {
            let mut v = FsckVolume {
                name: name.clone(),
                ..FsckVolume::default()
            };
            let checked = if repair {
                let _admin = lock(&self.snap_admin);
                let mounts = lock(&self.mounts);
                let at: Vec<String> = mounts
                    .iter()
                    .filter(|(_, m)| split_target(&m.volume).0 == name)
                    .map(|(p, _)| p.display().to_string())
                    .collect();
                if !at.is_empty() {
                    let e = format!(
                        "{name}: not repaired: the volume is mounted at {}; unmount it (and \
                         stop what uses it), then run `volfs fsck --repair {name}` again",
                        at.join(", ")
                    );
                    if !names.is_empty() {
                        return Err(e);
                    }
                    v.problems.push(e);
                    None
                } else {
                    let r = crate::fsck::repair(&self.store, rec.id, &name)?;
                    drop(mounts);
                    self.content_replaced(rec.id);
                    for f in &r.fixed {
                        tracing::warn!(volume = name, "fsck repaired: {f}");
                    }
                    v.repaired = r.fixed;
                    Some(r.remaining)
                }
            } else {
                None
            };
            let checked = match checked {
                Some(c) => c,
                None => {
                    let tmp = format!("fsck-{}-{}", std::process::id(), Timestamp::now().nsecs);
                    let (id, _, _) = {
                        let _admin = lock(&self.snap_admin);
                        self.take_snapshot(&name, &rec, &tmp, true)?
                    };
                    let c = crate::fsck::check_volume(&self.store, rec.id, &name, Some(id));
                    if let Err(e) = self.store.remove_snapshot(rec.id, id) {
                        tracing::warn!(volume = name, "removing fsck's snapshot: {e}");
                    }
                    c
                }
            };
            v.problems.extend(checked.lines());
            v.inodes = checked.inodes;
            v.entries = checked.entries;
            v.chunks = checked.chunks;
            v.bytes = checked.bytes;
            if v.problems.is_empty() {
                tracing::info!(volume = name, inodes = v.inodes, "fsck: clean");
            } else {
                tracing::warn!(volume = name, problems = v.problems.len(), "fsck: problems");
            }
            report.volumes.push(v);
        }
        if names.is_empty() {
            let st = crate::fsck::check_store(&self.store);
            report.store = st.problems;
            report.notes = st.notes;
        }
        Ok(report)
    }

    /// Reads and verifies every chunk of volumes `names` (none: every volume), live and
    /// in snapshots, while they stay in use.
    pub fn scrub(&self, names: &[String]) -> Result<ScrubReport, String> {
        let t = Instant::now();
        let vols = self.named_or_all(names)?;
        let mut report = ScrubReport::default();
        for (name, rec) in vols {
            let s = crate::scrub::scrub_volume(&self.store, rec.id, &name, &|_| {});
            for p in &s.problems {
                tracing::error!("scrub: {p}");
            }
            report.chunks += s.chunks;
            report.bytes += s.bytes;
            report.volumes.push(ScrubVolume {
                name,
                chunks: s.chunks,
                bytes: s.bytes,
                problems: s.problems,
            });
        }
        report.millis = t.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// After a volume's content was replaced underneath its filesystem and mounts.
    fn content_replaced(&self, vol: u64) {
        let open = lock(&self.open).get(&(vol, None)).cloned();
        if let Some((fs, peers)) = open {
            if let Err(e) = fs.recount() {
                tracing::warn!(volume = fs.name(), "recounting usage: {e}");
            }
            let f = fs.clone();
            peers.invalidate_all(move || f.inodes().unwrap_or_default());
        }
    }

    /// A new volume holding what a snapshot holds; it gets the source's labels and
    /// options (but not `from`).
    pub fn clone_volume(&self, name: &str, snap: &str, new: &str) -> Result<VolumeInfo, String> {
        validate_name(new)?;
        let rec = self.existing_record(name)?;
        let (sid, _) = self.snapshot_id(name, rec.id, snap)?;
        if self.record(new)?.is_some() {
            return Err(format!(
                "volume {new} exists already: choose another name, or remove it first with `volfs rm {new}`"
            ));
        }
        let _pin = self.store.snaps.pin(rec.id, sid);
        let id = self.new_volume_id(new)?;
        let t0 = Instant::now();
        let copied = match self.store.copy_content(rec.id, Some(sid), id) {
            Ok(c) => c,
            Err(e) => {
                self.discard(id, new);
                return Err(format!("cloning {name}@{snap} into {new}: {e}"));
            }
        };
        let mut options = rec.options.clone();
        options.remove("from");
        let nrec = VolumeRecord {
            version: 1,
            id,
            created: Timestamp::now().secs,
            labels: rec.labels.clone(),
            options,
            anonymous: false,
        };
        if let Some(_winner) = self
            .store
            .register(new, &nrec)
            .inspect_err(|_| self.discard(id, new))?
        {
            self.discard(id, new);
            return Err(format!(
                "volume {new} was created meanwhile; choose another name"
            ));
        }
        self.store
            .sync()
            .map_err(|e| format!("making volume {new} durable: {e}"))?;
        tracing::info!(
            volume = new,
            from = format!("{name}@{snap}"),
            bytes = copied.bytes,
            secs = t0.elapsed().as_secs_f64(),
            "cloned"
        );
        Ok(self.info(new, &nrec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_parse_and_each_refusal_names_the_problem() {
        let o = VolumeOptions::parse(&map(&[
            ("readonly", "true"),
            ("size", "10G"),
            ("uid", "1000"),
            ("gid", "0"),
            ("mode", "01777"),
        ]))
        .expect("valid options");
        assert_eq!(
            o,
            VolumeOptions {
                read_only: true,
                size: Some(10 << 30),
                uid: Some(1000),
                gid: Some(0),
                mode: Some(0o1777),
                from: None,
            }
        );
        assert_eq!(
            VolumeOptions::parse(&map(&[("from", "/srv//seed/")])).map(|o| o.from),
            Ok(Some(PathBuf::from("/srv/seed")))
        );
        assert_eq!(
            VolumeOptions::parse(&map(&[])),
            Ok(VolumeOptions::default())
        );
        for ((k, v), says) in [
            (
                ("readonly", "yes"),
                "option readonly=\"yes\": expected true or false",
            ),
            (("readonly", ""), "expected true or false"),
            (("size", "0"), "at least 1 byte"),
            (("size", "10X"), "unknown unit"),
            (("size", ""), "no number"),
            (("uid", "-1"), "option uid=\"-1\": expected a number"),
            (
                ("uid", "4294967295"),
                "expected a number from 0 to 4294967294",
            ),
            (("gid", "+5"), "option gid"),
            (("mode", "0888"), "option mode=\"0888\": expected octal"),
            (("mode", "17777"), "expected octal"),
            (("mode", ""), "expected octal"),
            (
                ("type", "tmpfs"),
                "unknown option \"type\" (known options: readonly",
            ),
            (("Size", "1G"), "unknown option \"Size\""),
            (
                ("from", "rel/dir"),
                "option from=\"rel/dir\": must be an absolute path",
            ),
            (("from", ""), "must be an absolute path"),
        ] {
            let e = VolumeOptions::parse(&map(&[(k, v)])).expect_err(k);
            assert!(e.contains(says), "{k}={v}: {e}");
        }
    }

    #[test]
    fn labels_and_key_values_are_checked() {
        assert!(validate_labels(&map(&[("team", "a"), ("empty", "")])).is_ok());
        for (labels, says) in [
            (map(&[("", "v")]), "a label key is empty"),
            (map(&[("a\nb", "v")]), "control character"),
            (map(&[("k", "x\ty")]), "control character"),
            (map(&[(&"k".repeat(256), "v")]), "longer than 255"),
        ] {
            let e = validate_labels(&labels).expect_err(says);
            assert!(e.contains(says), "{e}");
        }
        assert_eq!(
            key_values(&["a=1", "b=", "c=x=y"], "label"),
            Ok(map(&[("a", "1"), ("b", ""), ("c", "x=y")]))
        );
        for (args, says) in [
            (vec!["novalue"], "label \"novalue\" is not KEY=VALUE"),
            (vec!["=v"], "has an empty key"),
            (vec!["a=1", "a=2"], "label \"a\" is given twice"),
        ] {
            let e = key_values(&args, "label").expect_err(says);
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn differences_compare_options_by_meaning_and_name_each_change() {
        let rec = VolumeRecord {
            version: 1,
            id: 3,
            created: 0,
            labels: map(&[("team", "a")]),
            options: map(&[("size", "1G"), ("mode", "0755")]),
            anonymous: false,
        };
        let same = map(&[("size", "1024M"), ("mode", "755")]);
        assert!(differences(&rec, &rec.labels, &same).is_empty());
        let with_from = VolumeRecord {
            options: map(&[("size", "1G"), ("mode", "0755"), ("from", "/srv/seed")]),
            ..rec.clone()
        };
        let same_from = map(&[("size", "1024M"), ("mode", "755"), ("from", "/srv//seed/")]);
        assert!(differences(&with_from, &rec.labels, &same_from).is_empty());
        assert!(differences(&rec, &rec.labels, &same).is_empty());
        let d = differences(
            &rec,
            &map(&[("team", "b"), ("x", "")]),
            &map(&[("size", "2G")]),
        );
        assert_eq!(
            d,
            vec![
                "label team: the volume has \"a\", not \"b\"".to_string(),
                "label x: the volume has none, this create \"\"".to_string(),
                "option mode: the volume has \"0755\", this create none".to_string(),
                "option size: the volume has \"1G\", not \"2G\"".to_string(),
            ]
        );
    }

    #[test]
    fn anonymous_names_are_64_hex_digits_and_valid() {
        let a = random_name().expect("name");
        let b = random_name().expect("name");
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        assert!(validate_name(&a).is_ok());
    }

    #[test]
    fn names_follow_dockers_rule() {
        for ok in ["data", "a1", "my_vol.2-x", "0abc"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "../x", "a/b", "-a", ".a", "a b", "a\nb", "é1"] {
            let e = validate_name(bad).expect_err(bad);
            assert!(e.contains("[a-zA-Z0-9][a-zA-Z0-9_.-]+"));
        }
    }
}
