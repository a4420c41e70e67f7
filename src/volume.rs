//! Volumes and their mounts, as the daemon keeps them.
//!
//! Invariants: one [`SledFs`] per volume, shared by all of its mounts (so open-handle counts
//! and locks are per volume, not per mount); a mountpoint holds at most one volfs mount.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::api::{MountInfo, Request, Response, VolumeInfo};
use crate::fs::{self, MountSpec, Mounted};
use crate::store::{Store, Timestamp, VolumeRecord};
use crate::vfs::{FileSystem, SledFs};

struct MountEntry {
    volume: String,
    read_only: bool,
    mounted: Mounted,
}

/// A volume in use: its filesystem and its live mounts, shared by all of them.
type OpenVolume = (Arc<SledFs>, Arc<fs::Peers>);

/// Everything the daemon serves.
pub struct Registry {
    store: Store,
    open: Mutex<HashMap<u64, OpenVolume>>,
    mounts: Mutex<BTreeMap<PathBuf, MountEntry>>,
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
    pub fn open(root: &Path) -> Result<Registry, String> {
        let store = Store::open(root)?;
        store
            .spawn_maintenance()
            .map_err(|e| format!("starting the maintenance thread: {e}"))?;
        Ok(Registry {
            store,
            open: Mutex::new(HashMap::new()),
            mounts: Mutex::new(BTreeMap::new()),
        })
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

    fn volume_fs(&self, name: &str) -> Result<OpenVolume, String> {
        let rec = self.record(name)?.ok_or_else(|| {
            format!("no such volume: {name} (create it with `volfs create {name}`)")
        })?;
        let mut open = lock(&self.open);
        if let Some(v) = open.get(&rec.id) {
            return Ok(v.clone());
        }
        let fs = Arc::new(
            SledFs::open(self.store.clone(), rec.id, name)
                .map_err(|e| format!("opening volume {name}: {e}"))?,
        );
        let v = (fs, Arc::new(fs::Peers::default()));
        open.insert(rec.id, v.clone());
        Ok(v)
    }

    /// Mounts a volume at an existing directory.
    pub fn mount(&self, name: &str, path: &Path, read_only: bool) -> Result<(), String> {
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
        let (vfs, peers) = self.volume_fs(name)?;
        let spec = MountSpec {
            volume: name,
            mountpoint: path,
            read_only,
            peers,
        };
        let mounted = fs::mount(vfs, &spec)
            .map_err(|e| format!("mounting {name} at {}: {e}", path.display()))?;
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
        entry.mounted.unmount(path);
        tracing::info!(volume = entry.volume, path = %path.display(), "unmounted");
        Ok(())
    }

    /// Unmounts everything and makes the store durable: the clean-exit path.
    pub fn shutdown(&self) {
        let mounts = std::mem::take(&mut *lock(&self.mounts));
        for (path, m) in mounts {
            m.mounted.unmount(&path);
            tracing::info!(volume = m.volume, path = %path.display(), "unmounted at shutdown");
        }
        let open = std::mem::take(&mut *lock(&self.open));
        for (fs, _) in open.values() {
            if let Err(e) = fs.sync() {
                tracing::error!("flushing at shutdown: {e}");
            }
        }
        if let Err(e) = self.store.sync() {
            tracing::error!("flushing the store at shutdown: {e}");
        }
    }
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
