//! The on-disk layout: one sled database per daemon, every key built and parsed here.
//!
//! All filesystem state of every volume lives in the single tree `fs`; a multi-key change
//! (a rename, a write and its size update) is made atomic and crash-consistent by an intent
//! record ([`Store::commit`]). Volume metadata lives in the tree `volumes`.
//! A volume being removed is first made unreachable and marked in `doomed` in one
//! transaction, then its keys are purged ([`Store::purge`]); a purge a crash interrupted is
//! finished at the next start. A create marks its new id doomed until the name is registered,
//! so a create that failed or crashed half-way leaves nothing behind either.
//! Integers in keys are big-endian so that sled's byte order is numeric order.
//!
//! | tree      | key                                          | value                              |
//! |-----------|----------------------------------------------|------------------------------------|
//! | `volumes` | volume name (UTF-8)                          | [`VolumeRecord`]                   |
//! | `fs`      | `vol:u64 'i' ino:u64`                        | [`InodeRecord`]                    |
//! | `fs`      | `vol:u64 'd' parent:u64 name`                | [`DentryRecord`] (ino, kind, cookie) |
//! | `fs`      | `vol:u64 'r' parent:u64 cookie:u64`          | readdir index: ino, kind, name     |
//! | `fs`      | `vol:u64 'c' ino:u64 index:u64`              | [`ChunkPtr`]: segment, offset, length, crc32 |
//! | `fs`      | `vol:u64 'x' ino:u64 name`                   | xattr value                        |
//! | `fs`      | `vol:u64 'o' ino:u64`                        | empty: inode unlinked while open   |
//! | `fs`      | `vol:u64 'S' snap:u64 key[8..]`              | pre-image in snapshot `snap`'s layer of the `fs` key `key` of `vol`: `0` absent, `1 value` present (`crate::snap`) |
//! | `fs`      | `vol:u64 'T' snap:u64`                       | [`crate::snap::SnapshotRecord`]: name, time, state |
//! | `intents` | sequence:u64                                 | a multi-key change being applied ([`Store::commit`]) |
//! | `mounts`  | mountpoint path (bytes)                      | [`MountRecord`]: the daemon's mount table |
//! | `doomed`  | vol:u64                                      | [`DoomedRecord`]: every `fs` key of `vol` is to be purged |
//! | `docker_mounts` | volume name, 0x00, Docker mount ID (bytes) | count:u64: Docker's Mounts of that ID not yet Unmounted (`crate::plugin`) |
//!
//! Chunk bytes live in append-only segment files (`crate::chunks`), each version written
//! once; the `c` key points at the current version.
//!
//! Invariants: inode numbers come from `Db::generate_id` and are never reused; the root of
//! every volume is inode 1; no chunk holds bytes at or past its file's size; a directory's
//! readdir cookies only grow (`InodeRecord::next_cookie`), so a listing in cookie order
//! neither skips nor repeats entries while the directory changes. The chunk checksum covers
//! the chunk's key as well as its bytes, so a chunk stored under the wrong key is caught too.
//! Records start with a format version byte. Changes to one inode's records hold its stripe
//! lock ([`Store::stripe_locks`]), shared by every user of the store (volumes and the
//! segment compactor).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::{Arc, Mutex, MutexGuard};

use crate::chunks::{ChunkPtr, ChunkStore};
use crate::error::{FsError, FsResult};

/// Bytes per data chunk: a small write costs the same in any file size.
pub const CHUNK_SIZE: u64 = 16 * 1024;
const STRIPES: usize = 256;
/// The root directory of every volume.
pub const ROOT_INO: u64 = 1;

const RECORD_VERSION: u8 = 1;

pub const TAG_INODE: u8 = b'i';
pub const TAG_DENTRY: u8 = b'd';
pub const TAG_READDIR: u8 = b'r';
pub const TAG_CHUNK: u8 = b'c';
pub const TAG_XATTR: u8 = b'x';
pub const TAG_ORPHAN: u8 = b'o';
pub const TAG_LAYER: u8 = b'S';
pub const TAG_SNAPSHOT: u8 = b'T';

/// The opened database of one daemon.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    pub fs: sled::Tree,
    pub volumes: sled::Tree,
    /// The mount table: what the daemon serves again after a restart.
    pub mounts: sled::Tree,
    /// Docker's mount references per (volume, mount ID) (see `crate::plugin`).
    pub docker_mounts: sled::Tree,
    /// Volumes whose keys are to be purged (see [`Store::purge`]).
    doomed: sled::Tree,
    /// Multi-key changes being applied (see [`Store::commit`]).
    intents: sled::Tree,
    intent_seq: Arc<std::sync::atomic::AtomicU64>,
    wal: Arc<Wal>,
    pub chunks: Arc<ChunkStore>,
    stripes: Arc<Vec<Mutex<()>>>,
    pub(crate) snaps: Arc<crate::snap::Snaps>,
    /// Set by every change, cleared by `sync`: lets the background flusher idle.
    unsynced: Arc<std::sync::atomic::AtomicBool>,
    db_file: std::path::PathBuf,
}

impl Store {
    /// Opens (or creates) the store under `root`. sled's page cache is bounded so the
    /// daemon's memory does not grow with the volumes' size.
    pub fn open(root: &Path) -> Result<Store, String> {
        Self::open_with(root, crate::chunks::SEGMENT_MAX)
    }

    /// As [`Store::open`], with segments rolling at `segment_max` bytes.
    pub fn open_with(root: &Path, segment_max: u64) -> Result<Store, String> {
        let dir = root.join("store");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create store directory {}: {e}", dir.display()))?;
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(32 * 1024 * 1024)
            // Flushing is ours (`sync`), so segment data always becomes durable first.
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                format!(
                    "cannot open the volfs store in {}: {e} (is another volfs-mountd using it?)",
                    dir.display()
                )
            })?;
        let fs = db
            .open_tree("fs")
            .map_err(|e| format!("cannot open tree fs: {e}"))?;
        let volumes = db
            .open_tree("volumes")
            .map_err(|e| format!("cannot open tree volumes: {e}"))?;
        let mounts = db
            .open_tree("mounts")
            .map_err(|e| format!("cannot open tree mounts: {e}"))?;
        let docker_mounts = db
            .open_tree("docker_mounts")
            .map_err(|e| format!("cannot open tree docker_mounts: {e}"))?;
        let intents = db
            .open_tree("intents")
            .map_err(|e| format!("cannot open tree intents: {e}"))?;
        let doomed = db
            .open_tree("doomed")
            .map_err(|e| format!("cannot open tree doomed: {e}"))?;
        replay_intents(&fs, &intents)?;
        let wal = Wal::open(&root.join("wal"), &fs, &db, &dir.join("db"))?;
        let data = root.join("data");
        let chunks = ChunkStore::open_with(&data, segment_max)
            .map_err(|e| format!("cannot open the chunk segments in {}: {e}", data.display()))?;
        let mut snapshots = Vec::new();
        for item in fs.iter() {
            let (k, v) = item.map_err(|e| format!("scanning the store: {e}"))?;
            if let Some(p) = chunk_value(&k, &v) {
                chunks.account(&p);
            } else if k.len() == 17 && k[8] == TAG_SNAPSHOT {
                snapshots.push((be_u64(&k[..8]), be_u64(&k[9..17]), v));
            }
        }
        let snaps = crate::snap::Snaps::load(snapshots);
        Ok(Store {
            db,
            fs,
            volumes,
            mounts,
            docker_mounts,
            doomed,
            intents,
            intent_seq: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            wal: Arc::new(wal),
            chunks: Arc::new(chunks),
            stripes: Arc::new((0..STRIPES).map(|_| Mutex::new(())).collect()),
            snaps: Arc::new(snaps),
            unsynced: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            db_file: dir.join("db"),
        })
    }

    /// Applies `ops` to the `fs` tree as one atomic change.
    ///
    /// sled 0.34 forces a log write and `sync_file_range` around every `apply_batch` and
    /// transaction (measured: ~12 synchronous disk writes per extracted file). Instead, a
    /// change of several keys is first recorded whole under one key of the `intents` tree
    /// (a single-key insert, atomic and unforced), then applied key by key, then its intent
    /// is removed. sled recovers a prefix of its log, so after a crash an intent is either
    /// absent (nothing of the change survived, or all of it did) or present, and
    /// [`Store::open`] applies it again (every op is idempotent).
    /// Callers hold the locks of what they change; readers take none, so callers order
    /// `ops` so that every intermediate state is one a reader may see (new records before
    /// the names pointing at them, names removed before their records).
    ///
    /// This is the raw step: it records no snapshot pre-images. Changes to what a volume
    /// holds go through [`Store::commit_change`].
    pub(crate) fn commit(&self, ops: &[Op]) -> FsResult<()> {
        self.note_change();
        // Held until the change is in sled, so a sync's rotation never splits one.
        let wal = self.wal.append(ops)?;
        let r = self.apply(ops);
        drop(wal);
        r
    }

    fn apply(&self, ops: &[Op]) -> FsResult<()> {
        if let [op @ (Op::Put(..) | Op::Del(_))] = ops {
            return apply_op(&self.fs, op).map_err(|e| FsError::storage("applying a change", e));
        }
        let id = self
            .intent_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_be_bytes();
        self.intents
            .insert(id, encode_ops(ops))
            .map_err(|e| FsError::storage("recording a change", e))?;
        for op in ops {
            // A failure here leaves the intent in place: the next start finishes the change.
            apply_op(&self.fs, op).map_err(|e| FsError::storage("applying a change", e))?;
        }
        self.intents
            .remove(id)
            .map_err(|e| FsError::storage("completing a change", e))?;
        Ok(())
    }

    /// Records that something changed since the last `sync`.
    pub fn note_change(&self) {
        self.unsynced
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Starts the thread that bounds how much unsynced work a crash can lose (every
    /// 200 ms, segments then sled) and compacts segments now and then.
    pub fn spawn_maintenance(&self) -> std::io::Result<()> {
        let store = self.clone();
        std::thread::Builder::new()
            .name("maintenance".into())
            .spawn(move || {
                let mut tick = 0u64;
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    tick += 1;
                    if store.unsynced.load(std::sync::atomic::Ordering::SeqCst) {
                        let _ = store.sync();
                    }
                    if tick % 50 == 0 {
                        match store.collect_garbage() {
                            Ok(0) => {}
                            Ok(n) => tracing::info!("compacted segments, freed {n} bytes"),
                            Err(e) => tracing::warn!("segment compaction stopped: {e}"),
                        }
                    }
                }
            })
            .map(|_| ())
    }

    /// Locks the records of inodes `inos` of volume `vol`, in a global order.
    pub fn stripe_locks(&self, vol: u64, inos: &[u64]) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = inos
            .iter()
            .map(|i| (vol.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i) as usize % STRIPES)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Moves the live chunks out of mostly-dead segments and deletes those segments.
    /// Returns the bytes of segment files freed.
    pub fn collect_garbage(&self) -> FsResult<u64> {
        let mut freed = 0;
        for seg in self.chunks.gc_candidates() {
            let records = self.chunks.records(seg).map_err(|e| {
                tracing::error!("reading segment {seg:x} for compaction: {e}");
                FsError::Io(e.to_string())
            })?;
            for (key, ptr) in records {
                if key.len() != 25 || key[8] != TAG_CHUNK {
                    continue;
                }
                let vol = be_u64(&key[..8]);
                let ino = be_u64(&key[9..17]);
                let _l = self.stripe_locks(vol, &[ino]);
                let current = self
                    .fs
                    .get(&key)
                    .map_err(|e| FsError::storage("compacting segments", e))?;
                if current.as_deref().and_then(ChunkPtr::decode) == Some(ptr) {
                    // Same bytes, new place: no snapshot needs the old pointer.
                    self.move_chunk(vol, ino, &key, &key, ptr, false)?;
                } else {
                    // A chunk version a snapshot's layer holds (see `crate::snap`).
                    let lock = self.snaps.lock_of(vol);
                    let _g = lock.write().unwrap_or_else(|p| p.into_inner());
                    for layer in self.snaps.layers(vol).iter() {
                        let lk = layer_key(vol, layer.id, &key);
                        let held = self
                            .fs
                            .get(&lk)
                            .map_err(|e| FsError::storage("compacting segments", e))?;
                        if held.as_deref().and_then(crate::snap::decode_pre_ptr) == Some(ptr) {
                            self.move_chunk(vol, ino, &key, &lk, ptr, true)?;
                            break;
                        }
                    }
                }
            }
            self.sync()?;
            let size = self.chunks.disk_bytes();
            if let Err(e) = self.chunks.remove_segment(seg) {
                tracing::error!("deleting compacted segment {seg:x}: {e}");
            }
            freed += size.saturating_sub(self.chunks.disk_bytes());
        }
        Ok(freed)
    }

    /// Copies chunk version `ptr` (stored for live key `key`) to the active segment and
    /// points `at` (the live key, or a layer key when `layer`) at the copy.
    fn move_chunk(
        &self,
        vol: u64,
        ino: u64,
        key: &[u8],
        at: &[u8],
        ptr: ChunkPtr,
        layer: bool,
    ) -> FsResult<()> {
        let data = match self.chunks.read(key, &ptr) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::error!(vol, ino, "unreadable chunk while compacting: {e:?}");
                return Err(FsError::Io(format!("segment {:x} unreadable", ptr.seg)));
            }
        };
        let pending = self.chunks.append(&[(key, &data)]).map_err(|e| {
            tracing::error!("appending while compacting: {e}");
            FsError::Io(e.to_string())
        })?;
        let new = pending.ptrs()[0];
        let value = if layer {
            crate::snap::encode_pre(Some(&new.encode()))
        } else {
            new.encode()
        };
        match self.commit(&[Op::Put(at.to_vec(), value)]) {
            Ok(()) => {
                self.chunks.release(&ptr);
                Ok(())
            }
            Err(e) => {
                pending.abandon();
                Err(e)
            }
        }
    }

    /// Makes every write applied so far durable. sled's own flush uses `sync_file_range`,
    /// which does not flush the device cache or file metadata, so the file is fsynced too.
    pub fn sync(&self) -> FsResult<()> {
        self.unsynced
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let released = self.chunks.take_released();
        let r = self.sync_inner();
        if r.is_ok() {
            self.chunks.punch(&released);
        } else {
            for p in &released {
                self.chunks.requeue(p);
            }
        }
        r
    }

    /// Refuses to take `bytes` more when that would eat into the room kept for sled, which
    /// must never meet a full disk (sled 0.34 fails every later call once a log write has
    /// failed).
    pub fn check_space(&self, bytes: u64) -> FsResult<()> {
        let dir = self.dir();
        let Ok(st) = nix::sys::statvfs::statvfs(dir.as_path()) else {
            return Ok(());
        };
        let frag = st.fragment_size();
        let total = st.blocks() * frag;
        let avail = st.blocks_available() * frag;
        let reserve = (total / 20).clamp(1 << 20, 64 << 20);
        if avail < reserve.saturating_add(bytes) {
            tracing::warn!(
                "host disk of {} nearly full ({avail} bytes free, {reserve} kept for the store): ENOSPC",
                dir.display()
            );
            return Err(FsError::NoSpace);
        }
        Ok(())
    }

    fn sync_inner(&self) -> FsResult<()> {
        // Every change logged in the old file is in sled by now; the flush below makes
        // them durable, after which the old log is not needed.
        // One sync at a time: a later one finishing first must not delete a log whose
        // changes an earlier, still running (or failing) one has not made durable.
        let _one = self.wal.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let old_log = self.wal.rotate()?;
        self.chunks.sync().map_err(|e| {
            tracing::error!("fsync of chunk segments: {e}");
            if e.raw_os_error() == Some(libc::ENOSPC) {
                FsError::NoSpace
            } else {
                FsError::Io(e.to_string())
            }
        })?;
        self.db
            .flush()
            .map_err(|e| FsError::storage("flushing the store", e))?;
        let f = std::fs::File::open(&self.db_file).map_err(|e| {
            tracing::error!("opening {} to fsync it: {e}", self.db_file.display());
            FsError::Io(e.to_string())
        })?;
        f.sync_all().map_err(|e| {
            tracing::error!("fsync of {}: {e}", self.db_file.display());
            if e.raw_os_error() == Some(libc::ENOSPC) {
                FsError::NoSpace
            } else {
                FsError::Io(e.to_string())
            }
        })?;
        if let Some(g) = old_log {
            self.wal.remove_up_to(g);
        }
        Ok(())
    }

    /// The directory holding sled's files.
    pub fn dir(&self) -> std::path::PathBuf {
        self.db_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// A new inode number, never handed out before.
    pub fn new_ino(&self) -> FsResult<u64> {
        let id = self
            .db
            .generate_id()
            .map_err(|e| FsError::storage("allocating an inode number", e))?;
        Ok(id + 2)
    }

    /// A volume's record, `None` if no volume has that name.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, String> {
        let Some(v) = self
            .volumes
            .get(name.as_bytes())
            .map_err(|e| format!("reading volume {name}: {e}"))?
        else {
            return Ok(None);
        };
        VolumeRecord::decode(&v)
            .map(Some)
            .map_err(|e| format!("the record of volume {name} is corrupt: {e}"))
    }

    /// Marks the new volume id `vol` doomed before anything of it is written, so that a
    /// create that fails or is cut short by a crash is purged ([`Store::register`] lifts
    /// the mark).
    pub fn begin_create(&self, vol: u64, name: &str) -> Result<(), String> {
        let mark = DoomedRecord {
            name: name.to_string(),
            reason: DoomReason::Creating,
        };
        self.doomed
            .insert(vol.to_be_bytes(), mark.encode())
            .map_err(|e| format!("recording the creation of volume {name}: {e}"))?;
        Ok(())
    }

    /// Gives the volume `rec.id` its name, in one step with lifting its doomed mark. When
    /// the name is taken already, changes nothing and returns the record holding it.
    pub fn register(&self, name: &str, rec: &VolumeRecord) -> Result<Option<VolumeRecord>, String> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let bytes = rec.encode();
        let r = (&self.volumes, &self.doomed).transaction(|(volumes, doomed)| {
            if let Some(existing) = volumes.get(name.as_bytes())? {
                return Err(ConflictableTransactionError::Abort(existing));
            }
            volumes.insert(name.as_bytes(), bytes.as_slice())?;
            doomed.remove(&rec.id.to_be_bytes())?;
            Ok(())
        });
        self.note_change();
        match r {
            Ok(()) => Ok(None),
            Err(TransactionError::Abort(existing)) => VolumeRecord::decode(&existing)
                .map(Some)
                .map_err(|e| format!("the record of volume {name} is corrupt: {e}")),
            Err(TransactionError::Storage(e)) => Err(format!("registering volume {name}: {e}")),
        }
    }

    /// Removes the name of volume `vol` and marks the volume doomed, in one step. Returns
    /// false (and changes nothing) when `name` no longer names `vol`.
    pub fn unregister(&self, name: &str, vol: u64) -> Result<bool, String> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let mark = DoomedRecord {
            name: name.to_string(),
            reason: DoomReason::Removed,
        }
        .encode();
        let r = (&self.volumes, &self.doomed).transaction(|(volumes, doomed)| {
            let current = volumes.get(name.as_bytes())?;
            if current
                .as_deref()
                .and_then(|v| VolumeRecord::decode(v).ok())
                .is_none_or(|r| r.id != vol)
            {
                return Err(ConflictableTransactionError::Abort(()));
            }
            volumes.remove(name.as_bytes())?;
            doomed.insert(&vol.to_be_bytes(), mark.as_slice())?;
            Ok(())
        });
        self.note_change();
        match r {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(format!("removing volume {name}: {e}")),
        }
    }

    /// How many multi-key changes are recorded as in progress (finished at the next start
    /// if a crash interrupted them).
    pub fn pending_intents(&self) -> Result<u64, String> {
        let mut n = 0;
        for item in self.intents.iter() {
            item.map_err(|e| format!("listing changes in progress: {e}"))?;
            n += 1;
        }
        Ok(n)
    }

    /// The doomed volumes: `(vol, record)`.
    pub fn doomed(&self) -> Result<Vec<(u64, DoomedRecord)>, String> {
        let mut out = Vec::new();
        for item in self.doomed.iter() {
            let (k, v) = item.map_err(|e| format!("listing removed volumes: {e}"))?;
            if k.len() != 8 {
                tracing::error!("ignoring a malformed doomed key {:?}", k.as_ref());
                continue;
            }
            let rec = DoomedRecord::decode(&v).unwrap_or(DoomedRecord {
                name: String::new(),
                reason: DoomReason::Removed,
            });
            out.push((be_u64(&k), rec));
        }
        Ok(out)
    }

    /// Deletes every `fs` key of the doomed volume `vol` and releases its chunk versions
    /// (their segment space comes back through hole punching and compaction), then lifts
    /// the mark and syncs. Nothing may use the volume any more. Returns the chunk bytes
    /// released.
    ///
    /// Chunk keys are removed under their inode's stripe lock, as the compactor moves
    /// chunks under it: a chunk it moves is either moved before the removal (and the moved
    /// version released) or skipped.
    pub fn purge(&self, vol: u64) -> Result<u64, String> {
        let prefix = vol.to_be_bytes();
        let mut released = 0u64;
        // Logged first, so that a replay of older logged changes of this volume cannot
        // bring its keys back after the doomed mark is gone.
        drop(
            self.wal
                .append(&[Op::DelRange(prefix.to_vec(), prefix_end(&prefix))])
                .map_err(|e| format!("logging the purge of volume {vol}: {e}"))?,
        );
        loop {
            let keys: Vec<sled::IVec> = self
                .fs
                .scan_prefix(prefix)
                .keys()
                .take(1024)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("listing the keys of volume {vol}: {e}"))?;
            if keys.is_empty() {
                break;
            }
            let inos: Vec<u64> = keys.iter().filter_map(|k| chunk_key_ino(k)).collect();
            let _l = self.stripe_locks(vol, &inos);
            let lock = self.snaps.lock_of(vol);
            let _g = lock.write().unwrap_or_else(|p| p.into_inner());
            self.note_change();
            for k in &keys {
                let old = self
                    .fs
                    .remove(k)
                    .map_err(|e| format!("purging volume {vol}: {e}"))?;
                if let Some(p) = old.as_deref().and_then(|v| chunk_value(k, v)) {
                    self.chunks.release(&p);
                    released += u64::from(p.len);
                }
            }
        }
        self.snaps.forget_volume(vol);
        self.doomed
            .remove(prefix)
            .map_err(|e| format!("finishing the purge of volume {vol}: {e}"))?;
        self.sync()
            .map_err(|e| format!("making the purge of volume {vol} durable: {e}"))?;
        Ok(released)
    }
}

/// The change log: every change to the `fs` tree is appended here (one `write`, no
/// fsync) before it is applied to sled. sled keeps recent changes in its own memory until
/// it flushes, so a daemon killed between flushes would lose changes it had acknowledged
/// while the kernel, which outlives the daemon, still shows them; the log is in the page
/// cache and survives the process. At open every logged change is applied again (each op
/// is idempotent), in order. A `sync` starts a new file and deletes the old one once sled
/// is flushed. Record: `len:u32 crc32:u32 ops`; a torn last record is ignored.
struct Wal {
    dir: std::path::PathBuf,
    cur: std::sync::RwLock<(u64, std::fs::File)>,
    /// Something was logged in the current file.
    dirty: std::sync::atomic::AtomicBool,
    syncing: Mutex<()>,
}

/// This boot's id: a log written before a reboot or power loss is not replayed, since the
/// segment data it points at may not have reached the disk (neither is fsynced).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().replace('-', ""))
        .unwrap_or_default()
}

/// Keeps the log from rotating while a logged change is being applied.
struct WalGuard<'a>(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, (u64, std::fs::File)>);

impl Wal {
    fn file_name(dir: &Path, generation: u64) -> std::path::PathBuf {
        dir.join(format!("{generation:016x}-{}.log", boot_id()))
    }

    /// `(generation, boot id)` of the log files in `dir`.
    fn files(dir: &Path) -> Vec<(u64, String, std::path::PathBuf)> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut v: Vec<(u64, String, std::path::PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name();
                let n = n.to_str()?;
                let (g, boot) = n.strip_suffix(".log")?.split_once('-')?;
                Some((u64::from_str_radix(g, 16).ok()?, boot.to_string(), e.path()))
            })
            .collect();
        v.sort();
        v
    }

    /// Deletes every log file up to generation `g`, once their changes are durable.
    fn remove_up_to(&self, g: u64) {
        for (gen_, _, p) in Self::files(&self.dir) {
            if gen_ <= g {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn create(dir: &Path, generation: u64) -> Result<std::fs::File, std::io::Error> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Self::file_name(dir, generation))
    }

    /// Replays what earlier runs of this boot logged, makes it durable, and starts a new log.
    fn open(dir: &Path, fs: &sled::Tree, db: &sled::Db, db_file: &Path) -> Result<Wal, String> {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create the change log directory {}: {e}",
                dir.display()
            )
        })?;
        let files = Self::files(dir);
        let boot = boot_id();
        let mut replayed = 0usize;
        for (_, b, p) in &files {
            if *b != boot {
                tracing::warn!(file = %p.display(), "ignoring a change log from before a reboot: the store is as of its last flush");
                continue;
            }
            let bytes = std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
            let mut rest = bytes.as_slice();
            while rest.len() >= 8 {
                let len = be_u32(&rest[..4]) as usize;
                let crc = be_u32(&rest[4..8]);
                let Some(body) = rest.get(8..8 + len) else {
                    break;
                };
                if crc32fast::hash(body) != crc {
                    break;
                }
                let Some(ops) = decode_ops(body) else { break };
                for op in &ops {
                    apply_op(fs, op).map_err(|e| format!("replaying the change log: {e}"))?;
                }
                replayed += 1;
                rest = &rest[8 + len..];
            }
        }
        if replayed > 0 {
            db.flush()
                .map_err(|e| format!("flushing replayed changes: {e}"))?;
            // sled's flush does not reach the device cache: fsync before the logs go.
            std::fs::File::open(db_file)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("fsync of {}: {e}", db_file.display()))?;
            tracing::info!(
                changes = replayed,
                "replayed changes logged before the daemon stopped"
            );
        }
        for (_, _, p) in &files {
            let _ = std::fs::remove_file(p);
        }
        let generation = files.last().map_or(1, |f| f.0 + 1);
        let f = Self::create(dir, generation)
            .map_err(|e| format!("creating the change log in {}: {e}", dir.display()))?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            cur: std::sync::RwLock::new((generation, f)),
            dirty: std::sync::atomic::AtomicBool::new(false),
            syncing: Mutex::new(()),
        })
    }

    fn append(&self, ops: &[Op]) -> FsResult<WalGuard<'_>> {
        use std::io::Write;
        let body = encode_ops(ops);
        let mut rec = Vec::with_capacity(8 + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_be_bytes());
        rec.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        rec.extend_from_slice(&body);
        let g = self.cur.read().unwrap_or_else(|p| p.into_inner());
        // O_APPEND: one write is one record, whole, after every earlier one.
        let n = (&g.1).write(&rec).map_err(|e| {
            tracing::error!("writing the change log: {e}");
            if e.raw_os_error() == Some(libc::ENOSPC) {
                FsError::NoSpace
            } else {
                FsError::Io(e.to_string())
            }
        })?;
        if n != rec.len() {
            return Err(FsError::Io("short write to the change log".into()));
        }
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(WalGuard(g))
    }

    /// Starts a new log file if the current one holds anything; returns the old one's
    /// generation.
    fn rotate(&self) -> FsResult<Option<u64>> {
        let mut w = self.cur.write().unwrap_or_else(|p| p.into_inner());
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let generation = w.0 + 1;
        let f = Self::create(&self.dir, generation).map_err(|e| {
            tracing::error!("starting a new change log: {e}");
            FsError::Io(e.to_string())
        })?;
        let old = w.0;
        *w = (generation, f);
        Ok(Some(old))
    }
}

/// One step of a change to the `fs` tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
    /// Removes every key in `[start, end)`.
    DelRange(Vec<u8>, Vec<u8>),
}

fn apply_op(t: &sled::Tree, op: &Op) -> sled::Result<()> {
    match op {
        Op::Put(k, v) => t.insert(k.as_slice(), v.as_slice()).map(|_| ()),
        Op::Del(k) => t.remove(k.as_slice()).map(|_| ()),
        Op::DelRange(a, b) => {
            for k in t.range(a.as_slice()..b.as_slice()).keys() {
                t.remove(k?)?;
            }
            Ok(())
        }
    }
}

fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut v = vec![RECORD_VERSION];
    let field = |v: &mut Vec<u8>, b: &[u8]| {
        v.extend_from_slice(&(b.len() as u32).to_be_bytes());
        v.extend_from_slice(b);
    };
    for op in ops {
        match op {
            Op::Put(k, val) => {
                v.push(b'P');
                field(&mut v, k);
                field(&mut v, val);
            }
            Op::Del(k) => {
                v.push(b'D');
                field(&mut v, k);
            }
            Op::DelRange(a, b) => {
                v.push(b'R');
                field(&mut v, a);
                field(&mut v, b);
            }
        }
    }
    v
}

fn decode_ops(b: &[u8]) -> Option<Vec<Op>> {
    let (&version, mut rest) = b.split_first()?;
    if version != RECORD_VERSION {
        return None;
    }
    let field = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        let len = be_u32(rest.get(..4)?) as usize;
        let f = rest.get(4..4 + len)?.to_vec();
        *rest = &rest[4 + len..];
        Some(f)
    };
    let mut ops = Vec::new();
    while let Some((&tag, r)) = rest.split_first() {
        rest = r;
        ops.push(match tag {
            b'P' => Op::Put(field(&mut rest)?, field(&mut rest)?),
            b'D' => Op::Del(field(&mut rest)?),
            b'R' => Op::DelRange(field(&mut rest)?, field(&mut rest)?),
            _ => return None,
        });
    }
    Some(ops)
}

/// Finishes the changes a crash interrupted, in the order they began.
fn replay_intents(fs: &sled::Tree, intents: &sled::Tree) -> Result<(), String> {
    for item in intents.iter() {
        let (k, v) = item.map_err(|e| format!("reading interrupted changes: {e}"))?;
        let ops = decode_ops(&v).ok_or_else(|| {
            format!(
                "the record of an interrupted change ({:?}) is unreadable; the store needs repair",
                k.as_ref()
            )
        })?;
        for op in &ops {
            apply_op(fs, op).map_err(|e| format!("finishing an interrupted change: {e}"))?;
        }
        intents
            .remove(k)
            .map_err(|e| format!("finishing an interrupted change: {e}"))?;
        tracing::info!(
            "finished a change interrupted by a crash ({} steps)",
            ops.len()
        );
    }
    Ok(())
}

/// The chunk version a live chunk key or a snapshot layer's chunk entry points at.
pub fn chunk_value(key: &[u8], value: &[u8]) -> Option<ChunkPtr> {
    if key.len() == 25 && key[8] == TAG_CHUNK {
        ChunkPtr::decode(value)
    } else if key.len() == 34 && key[8] == TAG_LAYER && key[17] == TAG_CHUNK {
        crate::snap::decode_pre_ptr(value)
    } else {
        None
    }
}

/// The inode of a live chunk key or a layer's chunk entry.
fn chunk_key_ino(key: &[u8]) -> Option<u64> {
    if key.len() == 25 && key[8] == TAG_CHUNK {
        Some(be_u64(&key[9..17]))
    } else if key.len() == 34 && key[8] == TAG_LAYER && key[17] == TAG_CHUNK {
        Some(be_u64(&key[18..26]))
    } else {
        None
    }
}

/// `key` (a key of some volume) as a key of volume `vol`.
pub fn rekey(vol: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len());
    k.extend_from_slice(&vol.to_be_bytes());
    k.extend_from_slice(key.get(8..).unwrap_or_default());
    k
}

/// The key in snapshot `snap`'s layer that holds the pre-image of `key` (a key of `vol`).
pub fn layer_key(vol: u64, snap: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 9);
    k.extend_from_slice(&vol.to_be_bytes());
    k.push(TAG_LAYER);
    k.extend_from_slice(&snap.to_be_bytes());
    k.extend_from_slice(key.get(8..).unwrap_or_default());
    k
}

/// Every key of snapshot `snap`'s layer starts with this.
pub fn layer_prefix(vol: u64, snap: u64) -> Vec<u8> {
    prefix(vol, TAG_LAYER, snap, 0)
}

/// The `fs` key whose pre-image the layer key `lk` holds.
pub fn layer_key_origin(vol: u64, lk: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(lk.len().saturating_sub(9));
    k.extend_from_slice(&vol.to_be_bytes());
    k.extend_from_slice(lk.get(17..).unwrap_or_default());
    k
}

pub fn snapshot_key(vol: u64, snap: u64) -> Vec<u8> {
    prefix(vol, TAG_SNAPSHOT, snap, 0)
}

/// Whether `key` belongs to the snapshot machinery rather than to the volume's content.
pub fn is_snapshot_key(key: &[u8]) -> bool {
    matches!(key.get(8), Some(&TAG_LAYER) | Some(&TAG_SNAPSHOT))
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xFF; prefix.len() + 1]
}

fn prefix(vol: u64, tag: u8, id: u64, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + extra);
    k.extend_from_slice(&vol.to_be_bytes());
    k.push(tag);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn tag_prefix(vol: u64, tag: u8) -> Vec<u8> {
    let mut k = vol.to_be_bytes().to_vec();
    k.push(tag);
    k
}

pub fn inode_key(vol: u64, ino: u64) -> Vec<u8> {
    prefix(vol, TAG_INODE, ino, 0)
}

pub fn dentry_key(vol: u64, parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = prefix(vol, TAG_DENTRY, parent, name.len());
    k.extend_from_slice(name);
    k
}

/// All entries of one directory, by name.
pub fn dentry_prefix(vol: u64, parent: u64) -> Vec<u8> {
    prefix(vol, TAG_DENTRY, parent, 0)
}

pub fn readdir_key(vol: u64, parent: u64, cookie: u64) -> Vec<u8> {
    let mut k = prefix(vol, TAG_READDIR, parent, 8);
    k.extend_from_slice(&cookie.to_be_bytes());
    k
}

pub fn readdir_prefix(vol: u64, parent: u64) -> Vec<u8> {
    prefix(vol, TAG_READDIR, parent, 0)
}

pub fn parse_readdir_key(key: &[u8]) -> Option<u64> {
    (key.len() == 25 && key[8] == TAG_READDIR).then(|| be_u64(&key[17..25]))
}

pub fn chunk_key(vol: u64, ino: u64, index: u64) -> Vec<u8> {
    let mut k = prefix(vol, TAG_CHUNK, ino, 8);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn chunk_prefix(vol: u64, ino: u64) -> Vec<u8> {
    prefix(vol, TAG_CHUNK, ino, 0)
}

pub fn parse_chunk_key(key: &[u8]) -> Option<u64> {
    (key.len() == 25 && key[8] == TAG_CHUNK).then(|| be_u64(&key[17..25]))
}

pub fn xattr_key(vol: u64, ino: u64, name: &[u8]) -> Vec<u8> {
    let mut k = prefix(vol, TAG_XATTR, ino, name.len());
    k.extend_from_slice(name);
    k
}

pub fn xattr_prefix(vol: u64, ino: u64) -> Vec<u8> {
    prefix(vol, TAG_XATTR, ino, 0)
}

pub fn orphan_key(vol: u64, ino: u64) -> Vec<u8> {
    prefix(vol, TAG_ORPHAN, ino, 0)
}

pub fn parse_inode_key(key: &[u8]) -> Option<u64> {
    (key.len() == 17 && key[8] == TAG_INODE).then(|| be_u64(&key[9..17]))
}

pub fn parse_orphan_key(key: &[u8]) -> Option<u64> {
    (key.len() == 17 && key[8] == TAG_ORPHAN).then(|| be_u64(&key[9..17]))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Kind of an inode; the numbers are stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular = 1,
    Directory = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDevice = 6,
    BlockDevice = 7,
}

impl FileKind {
    pub fn from_u8(v: u8) -> Option<FileKind> {
        Some(match v {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDevice,
            7 => FileKind::BlockDevice,
            _ => return None,
        })
    }

    /// From the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => return None,
        })
    }

    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::Regular => libc::S_IFREG,
            FileKind::Directory => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }
}

/// A point in time with nanoseconds, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nsecs: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsecs = d.subsec_nanos();
                if nsecs > 0 {
                    secs -= 1;
                    nsecs = 1_000_000_000 - nsecs;
                }
                Timestamp { secs, nsecs }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nsecs)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(u64::from(self.nsecs))
        }
    }
}

/// Everything `stat` shows of an inode, plus directory bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeRecord {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (no type bits).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    /// Bytes stored in chunks (for `st_blocks` and usage accounting).
    pub stored: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub btime: Timestamp,
    /// Directories: the parent's inode (for `..`).
    pub parent: u64,
    /// Directories: the next readdir cookie to hand out.
    pub next_cookie: u64,
    /// Symlinks: the target.
    pub target: Vec<u8>,
}

/// First readdir cookie of a directory; 1 and 2 are `.` and `..`.
pub const FIRST_COOKIE: u64 = 3;

impl InodeRecord {
    pub fn new(kind: FileKind, perm: u32, uid: u32, gid: u32, now: Timestamp) -> InodeRecord {
        InodeRecord {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            rdev: 0,
            size: 0,
            stored: 0,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            parent: 0,
            next_cookie: FIRST_COOKIE,
            target: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(112 + self.target.len());
        v.push(RECORD_VERSION);
        v.push(self.kind as u8);
        for x in [self.perm, self.uid, self.gid, self.nlink, self.rdev] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend_from_slice(&self.size.to_be_bytes());
        v.extend_from_slice(&self.stored.to_be_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.btime] {
            v.extend_from_slice(&t.secs.to_be_bytes());
            v.extend_from_slice(&t.nsecs.to_be_bytes());
        }
        v.extend_from_slice(&self.parent.to_be_bytes());
        v.extend_from_slice(&self.next_cookie.to_be_bytes());
        v.extend_from_slice(&(self.target.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.target);
        v
    }

    pub fn decode(b: &[u8]) -> Option<InodeRecord> {
        const FIXED: usize = 1 + 1 + 20 + 16 + 48 + 16 + 4;
        if b.len() < FIXED || b[0] != RECORD_VERSION {
            return None;
        }
        let kind = FileKind::from_u8(b[1])?;
        let u = |i: usize| be_u32(&b[2 + 4 * i..]);
        let ts = |off: usize| Timestamp {
            secs: be_u64(&b[off..]) as i64,
            nsecs: be_u32(&b[off + 8..]),
        };
        let tlen = be_u32(&b[FIXED - 4..]) as usize;
        if b.len() != FIXED + tlen {
            return None;
        }
        let rec = InodeRecord {
            kind,
            perm: u(0),
            uid: u(1),
            gid: u(2),
            nlink: u(3),
            rdev: u(4),
            size: be_u64(&b[22..]),
            stored: be_u64(&b[30..]),
            atime: ts(38),
            mtime: ts(50),
            ctime: ts(62),
            btime: ts(74),
            parent: be_u64(&b[86..]),
            next_cookie: be_u64(&b[94..]),
            target: b[FIXED..].to_vec(),
        };
        (rec.atime.nsecs < 1_000_000_000 && rec.mtime.nsecs < 1_000_000_000).then_some(rec)
    }
}

/// A name in a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DentryRecord {
    pub ino: u64,
    pub kind: FileKind,
    pub cookie: u64,
}

impl DentryRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(18);
        v.push(RECORD_VERSION);
        v.extend_from_slice(&self.ino.to_be_bytes());
        v.push(self.kind as u8);
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<DentryRecord> {
        if b.len() != 18 || b[0] != RECORD_VERSION {
            return None;
        }
        Some(DentryRecord {
            ino: be_u64(&b[1..]),
            kind: FileKind::from_u8(b[9])?,
            cookie: be_u64(&b[10..]),
        })
    }
}

/// Value of a readdir index key: the entry, so a listing needs no second lookup.
pub fn encode_readdir(ino: u64, kind: FileKind, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + name.len());
    v.extend_from_slice(&ino.to_be_bytes());
    v.push(kind as u8);
    v.extend_from_slice(name);
    v
}

pub fn decode_readdir(b: &[u8]) -> Option<(u64, FileKind, &[u8])> {
    if b.len() < 10 {
        return None;
    }
    Some((be_u64(b), FileKind::from_u8(b[8])?, &b[9..]))
}

/// One row of the mount table (tree `mounts`), JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountRecord {
    pub volume: String,
    pub read_only: bool,
}

/// A volume's record in the `volumes` tree (JSON; fields added later default when absent,
/// so records written by older versions still read).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    pub version: u8,
    pub id: u64,
    /// Seconds since the epoch.
    pub created: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The create options as given (validated when given: see `crate::volume::VolumeOptions`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Created without a name (a random one was chosen): `prune` removes it.
    #[serde(default)]
    pub anonymous: bool,
}

impl VolumeRecord {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising maps of strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<VolumeRecord, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

/// Why a volume is doomed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DoomReason {
    /// Being created: doomed until registered under its name.
    Creating,
    /// Removed by `rm` or `prune`.
    Removed,
}

/// A value in the `doomed` tree (JSON), for logs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DoomedRecord {
    pub name: String,
    pub reason: DoomReason,
}

impl DoomedRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<DoomedRecord> {
        serde_json::from_slice(b).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_record_round_trips() {
        let mut r = InodeRecord::new(FileKind::Symlink, 0o4755, 1000, 100, Timestamp::now());
        r.target = b"/some/where".to_vec();
        r.size = 1 << 40;
        r.atime = Timestamp { secs: -5, nsecs: 7 };
        assert_eq!(InodeRecord::decode(&r.encode()), Some(r));
    }

    #[test]
    fn decoders_reject_garbage_without_panicking() {
        for len in 0..200 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 1) as u8).collect();
            let _ = InodeRecord::decode(&junk);
            let _ = DentryRecord::decode(&junk);
            let _ = decode_readdir(&junk);
            let _ = ChunkPtr::decode(&junk);
        }
        assert_eq!(InodeRecord::decode(&[9; 200]), None);
    }

    #[test]
    fn intents_round_trip_and_replay_finishes_a_change() {
        let ops = vec![
            Op::Put(b"a".to_vec(), b"1".to_vec()),
            Op::Del(b"b".to_vec()),
            Op::DelRange(b"c1".to_vec(), b"c3".to_vec()),
        ];
        assert_eq!(decode_ops(&encode_ops(&ops)), Some(ops.clone()));
        assert_eq!(decode_ops(&[RECORD_VERSION, b'P', 0, 0, 0, 9]), None);
        let db = sled::Config::new().temporary(true).open().expect("db");
        let fs = db.open_tree("fs").expect("tree");
        let intents = db.open_tree("intents").expect("tree");
        for k in ["b", "c1", "c2", "c3"] {
            fs.insert(k, "x").expect("insert");
        }
        intents
            .insert(7u64.to_be_bytes(), encode_ops(&ops))
            .expect("intent");
        replay_intents(&fs, &intents).expect("replay");
        let keys: Vec<Vec<u8>> = fs.iter().keys().map(|k| k.expect("key").to_vec()).collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"c3".to_vec()]);
        assert!(intents.is_empty());
        assert_eq!(prefix_end(&[1, 0xFF]), vec![2]);
    }

    #[test]
    fn unregister_dooms_in_one_step_and_a_purge_after_restart_removes_every_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vol_a, vol_b) = (5u64, 6u64);
        let put_volume = |store: &Store, vol: u64, name: &str| {
            store.begin_create(vol, name).expect("begin");
            store
                .fs
                .insert(inode_key(vol, ROOT_INO), b"root".to_vec())
                .expect("inode");
            store
                .fs
                .insert(xattr_key(vol, 9, b"user.a"), b"x".to_vec())
                .expect("xattr");
            let key = chunk_key(vol, 9, 0);
            let ptr = store
                .chunks
                .append(&[(&key, &[7u8; 1000])])
                .expect("append")
                .ptrs()[0];
            store.fs.insert(key, ptr.encode()).expect("chunk");
            let rec = VolumeRecord {
                version: 1,
                id: vol,
                created: 0,
                labels: BTreeMap::new(),
                options: BTreeMap::new(),
                anonymous: false,
            };
            assert_eq!(store.register(name, &rec), Ok(None));
            // A second registration of the name changes nothing and reports the holder.
            let other = VolumeRecord {
                id: 99,
                ..rec.clone()
            };
            assert_eq!(store.register(name, &other), Ok(Some(rec)));
        };
        {
            let store = Store::open(dir.path()).expect("store");
            put_volume(&store, vol_a, "aa");
            put_volume(&store, vol_b, "bb");
            assert_eq!(store.doomed(), Ok(vec![]));
            assert_eq!(store.unregister("aa", vol_b), Ok(false));
            assert_eq!(store.unregister("aa", vol_a), Ok(true));
            assert_eq!(store.unregister("aa", vol_a), Ok(false));
            store.sync().expect("sync");
            // "Crash" before the purge.
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.volume("aa"), Ok(None));
        let doomed = store.doomed().expect("doomed");
        assert_eq!(doomed.len(), 1);
        assert_eq!(doomed[0].0, vol_a);
        assert_eq!(doomed[0].1.reason, DoomReason::Removed);
        assert_eq!(store.purge(vol_a), Ok(1000));
        assert_eq!(store.fs.scan_prefix(vol_a.to_be_bytes()).count(), 0);
        assert_eq!(store.fs.scan_prefix(vol_b.to_be_bytes()).count(), 3);
        assert_eq!(store.doomed(), Ok(vec![]));
        assert_eq!(store.volume("bb").expect("bb").map(|r| r.id), Some(vol_b));
    }

    #[test]
    fn volume_records_of_older_versions_still_read() {
        let old = br#"{"version":1,"id":7,"created":1700000000}"#;
        let r = VolumeRecord::decode(old).expect("old record");
        assert_eq!((r.id, r.created, r.anonymous), (7, 1_700_000_000, false));
        assert!(r.labels.is_empty() && r.options.is_empty());
        assert_eq!(VolumeRecord::decode(&r.encode()).expect("round trip"), r);
    }

    #[test]
    fn keys_sort_numerically_and_parse_back() {
        assert!(chunk_key(1, 2, 255) < chunk_key(1, 2, 256));
        assert!(readdir_key(1, 2, 9) < readdir_key(1, 2, 10));
        assert_eq!(parse_chunk_key(&chunk_key(1, 2, 77)), Some(77));
        assert_eq!(parse_readdir_key(&readdir_key(4, 5, 6)), Some(6));
        assert_eq!(parse_orphan_key(&orphan_key(4, 8)), Some(8));
        assert!(dentry_key(1, 2, b"a").starts_with(&dentry_prefix(1, 2)));
    }

    #[test]
    fn timestamps_round_trip_before_and_after_epoch() {
        for t in [
            Timestamp { secs: 0, nsecs: 1 },
            Timestamp {
                secs: 1_700_000_000,
                nsecs: 123_456_789,
            },
            Timestamp {
                secs: -2,
                nsecs: 500,
            },
        ] {
            assert_eq!(Timestamp::from_system(t.to_system()), t);
        }
    }
}
