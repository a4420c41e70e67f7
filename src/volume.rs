//! Volumes and their mounts, as the daemon keeps them.
//!
//! Invariants: one [`SledFs`] per volume, shared by all of its mounts (so open-handle counts
//! and locks are per volume, not per mount); a mountpoint holds at most one volfs mount.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::api::{MountInfo, Request, Response, VolumeInfo};
use crate::fs::{self, Gate, MountSpec, Mounted};
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

/// Everything the daemon serves.
///
/// Restart guarantee: the mount table (store tree `mounts`) lists what should be mounted;
/// the keeper process holds every connection's descriptor. At start, connections the
/// keeper still holds are served again in place (their users never notice more than a
/// pause), the rest are mounted afresh at the same paths after detaching any dead mount
/// left there.
pub struct Registry {
    store: Store,
    open: Mutex<HashMap<u64, OpenVolume>>,
    mounts: Mutex<BTreeMap<PathBuf, MountEntry>>,
    gate: Arc<Gate>,
    keeper: Keeper,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Docker's rule for volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = b.len() >= 2
        && b.len() <= 255
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid volume name {name:?}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]+ \
             (at least 2 characters, at most 255)"
        ))
    }
}

impl Registry {
    /// Opens the store, connects to (or starts) the keeper and serves the mount table.
    pub fn open(root: &Path) -> Result<Registry, String> {
        let store = Store::open(root)?;
        store
            .spawn_maintenance()
            .map_err(|e| format!("starting the maintenance thread: {e}"))?;
        let keeper = Keeper::new(root);
        keeper.connect()?;
        let reg = Registry {
            store,
            open: Mutex::new(HashMap::new()),
            mounts: Mutex::new(BTreeMap::new()),
            gate: Arc::new(Gate::default()),
            keeper,
            started: Instant::now(),
        };
        reg.restore();
        Ok(reg)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
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
        {
            let mounts = lock(&self.mounts);
            for p in &resumed {
                if let Some(m) = mounts.get(p) {
                    if let Err(e) = m.mounted.resend() {
                        tracing::warn!(path = %p.display(), "asking the kernel to resend requests: {e}");
                    }
                }
            }
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
            Request::Create { name } => self.create(&name).map(|v| Response {
                volume: Some(v),
                ..Response::ok()
            }),
            Request::Ls => self.list().map(|v| Response {
                volumes: Some(v),
                ..Response::ok()
            }),
            Request::Mount {
                name,
                path,
                read_only,
            } => self.mount(&name, &path, read_only).map(|()| Response::ok()),
            Request::Umount { path } => self.umount(&path).map(|()| Response::ok()),
            // The daemon's control loop does this itself: it must exit afterwards.
            Request::Shutdown => Err("shutdown is handled by the daemon's control loop".into()),
        };
        r.unwrap_or_else(Response::err)
    }

    fn record(&self, name: &str) -> Result<Option<VolumeRecord>, String> {
        let Some(v) = self
            .store
            .volumes
            .get(name.as_bytes())
            .map_err(|e| format!("reading volume {name}: {e}"))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| format!("the record of volume {name} is corrupt: {e}"))
    }

    fn info(&self, name: &str, rec: &VolumeRecord) -> VolumeInfo {
        let mounts = lock(&self.mounts)
            .iter()
            .filter(|(_, m)| m.volume == name)
            .map(|(p, m)| MountInfo {
                path: p.clone(),
                read_only: m.read_only,
            })
            .collect();
        VolumeInfo {
            name: name.to_string(),
            created: rec.created,
            mounts,
        }
    }

    /// Creates a volume; creating an existing one is a no-op, as with Docker.
    pub fn create(&self, name: &str) -> Result<VolumeInfo, String> {
        validate_name(name)?;
        if let Some(rec) = self.record(name)? {
            return Ok(self.info(name, &rec));
        }
        let id = self
            .store
            .db
            .generate_id()
            .map_err(|e| format!("allocating a volume id: {e}"))?
            + 1;
        // The root inode goes first: a crash before the registry entry leaves only an
        // unreachable root under an id that is never reused.
        SledFs::init_volume(&self.store, id, 0, 0, 0o755)
            .map_err(|e| format!("creating volume {name}: {e}"))?;
        let rec = VolumeRecord {
            version: 1,
            id,
            created: Timestamp::now().secs,
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
        let prev = self
            .store
            .volumes
            .compare_and_swap(name.as_bytes(), None as Option<&[u8]>, Some(bytes))
            .map_err(|e| format!("registering volume {name}: {e}"))?;
        if prev.is_err() {
            // Lost a race with another create of the same name: that one stands.
            return self
                .record(name)?
                .map(|r| self.info(name, &r))
                .ok_or_else(|| format!("volume {name} vanished while being created"));
        }
        self.store
            .sync()
            .map_err(|e| format!("making volume {name} durable: {e}"))?;
        tracing::info!(volume = name, id, "created volume");
        Ok(self.info(name, &rec))
    }

    pub fn list(&self) -> Result<Vec<VolumeInfo>, String> {
        let mut out = Vec::new();
        for item in self.store.volumes.iter() {
            let (k, v) = item.map_err(|e| format!("listing volumes: {e}"))?;
            let name = String::from_utf8_lossy(&k).into_owned();
            match serde_json::from_slice::<VolumeRecord>(&v) {
                Ok(rec) => out.push(self.info(&name, &rec)),
                Err(e) => tracing::error!(volume = name, "skipping corrupt volume record: {e}"),
            }
        }
        Ok(out)
    }

    fn volume_fs(&self, name: &str, resumed: bool) -> Result<OpenVolume, String> {
        let rec = self.record(name)?.ok_or_else(|| {
            format!("no such volume: {name} (create it with `volfs create {name}`)")
        })?;
        let mut open = lock(&self.open);
        if let Some(v) = open.get(&rec.id) {
            return Ok(v.clone());
        }
        let opened = if resumed {
            SledFs::open_resumed(self.store.clone(), rec.id, name)
        } else {
            SledFs::open(self.store.clone(), rec.id, name)
        };
        let fs = Arc::new(opened.map_err(|e| format!("opening volume {name}: {e}"))?);
        let v = (fs, Arc::new(fs::Peers::default()));
        open.insert(rec.id, v.clone());
        Ok(v)
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
        validate_name(name)?;
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
        let entry = mounts.remove(key).ok_or_else(|| {
            format!(
                "{} is not a volfs mountpoint (see `volfs ls`)",
                path.display()
            )
        })?;
        let _ = self.keeper.release(key);
        self.set_table(key, None)?;
        entry.mounted.unmount(key);
        tracing::info!(volume = entry.volume, path = %path.display(), "unmounted");
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

#[cfg(test)]
mod tests {
    use super::*;

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
