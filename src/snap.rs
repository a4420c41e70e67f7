//! Snapshots: a volume's whole state at one instant, kept by copy-on-write pre-images.
//!
//! A snapshot is a *layer* of the `fs` tree (keys in the table in `crate::store`): for every
//! key of the volume changed after the snapshot was taken and before the next one was, the
//! layer holds the value the key had at that instant (`0`: absent, `1 value`: present). The
//! newest snapshot not being removed is the *head*: the first change of a key after it
//! records the key's old value in the head's layer, in the same atomic commit as the change
//! ([`Store::commit_change`]). Taking a snapshot writes one record: nothing is copied, so
//! its cost does not depend on the volume's size.
//!
//! Reading snapshot S: the value in the oldest layer at or after S that holds the key, else
//! the live value. Removing a snapshot merges its layer into the next older one (entries
//! that one lacks move down; the rest, and everything when there is no older one, are
//! dropped and their chunk versions released), in batches; its record says `deleting` so
//! that the next start finishes a merge a crash interrupted ([`Store::resume_removals`]).
//!
//! Invariants:
//! - A commit holds its volume's lock ([`Snaps::lock_of`]) shared when the volume has no
//!   layers and exclusive otherwise; taking a snapshot and each merge batch hold it
//!   exclusive. A snapshot's instant therefore falls between two commits.
//! - Every chunk version has one owner: a live chunk key or one layer entry. A pre-image
//!   takes the chunk over from the live key (the writer's release of it is cancelled); a
//!   merge hands it down or releases it.
//! - Pre-images are written before the live change, and a merge writes an entry's new place
//!   before deleting the old one. Readers take no lock: a point read reads the live key
//!   first, then the layers newest first, keeping the oldest hit; a range read goes in pages
//!   of live keys, each followed by the layers' entries up to the page's last key.
//! - Layer ids come from `Db::generate_id`, so they grow with time.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sled::IVec;

use crate::chunks::ChunkPtr;
use crate::error::{FsError, FsResult};
use crate::store::{self, Op, Store, Timestamp};

const LOCK_STRIPES: usize = 64;
/// Live keys per page of a snapshot range read.
const PAGE: usize = 256;
/// Layer entries moved or dropped per commit when a snapshot is removed.
const MERGE_BATCH: usize = 1024;

/// A snapshot's record (JSON, key `vol 'T' id`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// When it was taken.
    pub created: Timestamp,
    /// Bytes stored and inodes of the volume at that instant.
    pub bytes: u64,
    pub inodes: u64,
    /// Being removed: hidden, merged away in the background.
    #[serde(default)]
    pub deleting: bool,
    /// Taken for one export or import: hidden, and removed at the next start if a crash
    /// left it.
    #[serde(default)]
    pub temporary: bool,
}

impl SnapshotRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<SnapshotRecord> {
        serde_json::from_slice(b).ok()
    }
}

/// One layer of a volume, oldest first in [`Snaps::layers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    pub id: u64,
    pub deleting: bool,
}

/// The snapshot layers of every volume, and the locks that order commits against them.
pub struct Snaps {
    layers: RwLock<HashMap<u64, Arc<Vec<Layer>>>>,
    locks: Vec<RwLock<()>>,
    /// Readers of snapshots (mounts, exports): `(vol, snap)` → count. A pinned snapshot
    /// cannot be removed.
    pins: Mutex<HashMap<(u64, u64), usize>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Encodes a pre-image: `0` absent, `1 value` present.
pub fn encode_pre(v: Option<&[u8]>) -> Vec<u8> {
    match v {
        None => vec![0],
        Some(v) => {
            let mut out = Vec::with_capacity(v.len() + 1);
            out.push(1);
            out.extend_from_slice(v);
            out
        }
    }
}

/// Decodes a pre-image; `None` for an absent key.
pub fn decode_pre(v: &[u8]) -> Option<IVec> {
    match v.split_first() {
        Some((1, rest)) => Some(IVec::from(rest)),
        _ => None,
    }
}

/// The chunk pointer in a layer's chunk entry.
pub fn decode_pre_ptr(v: &[u8]) -> Option<ChunkPtr> {
    match v.split_first() {
        Some((1, rest)) => ChunkPtr::decode(rest),
        _ => None,
    }
}

fn vol_of(op: &Op) -> Option<u64> {
    let k = match op {
        Op::Put(k, _) | Op::Del(k) | Op::DelRange(k, _) => k,
    };
    Some(u64::from_be_bytes(k.get(..8)?.try_into().ok()?))
}

impl Snaps {
    /// From every snapshot record: `(vol, id, record)`, in key order.
    pub fn load(records: Vec<(u64, u64, IVec)>) -> Snaps {
        let mut layers: HashMap<u64, Vec<Layer>> = HashMap::new();
        for (vol, id, v) in records {
            // A temporary snapshot's user died with the previous daemon.
            let deleting = SnapshotRecord::decode(&v).is_none_or(|r| r.deleting || r.temporary);
            layers.entry(vol).or_default().push(Layer { id, deleting });
        }
        Snaps {
            layers: RwLock::new(layers.into_iter().map(|(v, l)| (v, Arc::new(l))).collect()),
            locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            pins: Mutex::new(HashMap::new()),
        }
    }

    pub fn lock_of(&self, vol: u64) -> &RwLock<()> {
        &self.locks[(vol.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize % LOCK_STRIPES]
    }

    /// The layers of `vol`, oldest first.
    pub fn layers(&self, vol: u64) -> Arc<Vec<Layer>> {
        self.layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vol)
            .cloned()
            .unwrap_or_default()
    }

    fn set_layers(&self, vol: u64, list: Vec<Layer>) {
        let mut m = self.layers.write().unwrap_or_else(|p| p.into_inner());
        if list.is_empty() {
            m.remove(&vol);
        } else {
            m.insert(vol, Arc::new(list));
        }
    }

    pub fn forget_volume(&self, vol: u64) {
        self.layers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vol);
    }

    /// Keeps snapshot `snap` of `vol` from being removed until the pin is dropped.
    pub fn pin(self: &Arc<Self>, vol: u64, snap: u64) -> Pin {
        *lock(&self.pins).entry((vol, snap)).or_default() += 1;
        Pin {
            snaps: self.clone(),
            vol,
            snap,
        }
    }

    pub fn pinned(&self, vol: u64, snap: u64) -> bool {
        lock(&self.pins).get(&(vol, snap)).copied().unwrap_or(0) > 0
    }
}

/// A reader's hold on a snapshot ([`Snaps::pin`]).
pub struct Pin {
    snaps: Arc<Snaps>,
    vol: u64,
    snap: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut m = lock(&self.snaps.pins);
        if let Some(n) = m.get_mut(&(self.vol, self.snap)) {
            *n -= 1;
            if *n == 0 {
                m.remove(&(self.vol, self.snap));
            }
        }
    }
}

impl Store {
    /// Applies `ops` (keys of one volume) as one atomic change, with the pre-images the
    /// volume's head snapshot needs, then releases the chunk versions in `released` that
    /// no snapshot took over.
    pub fn commit_change(&self, ops: &[Op], released: &[ChunkPtr]) -> FsResult<()> {
        let Some(vol) = ops.first().and_then(vol_of) else {
            return Ok(());
        };
        let lock = self.snaps.lock_of(vol);
        let kept = {
            let g = lock.read().unwrap_or_else(|p| p.into_inner());
            if self.snaps.layers(vol).is_empty() {
                self.commit(ops)?;
                drop(g);
                HashSet::new()
            } else {
                drop(g);
                let _g = lock.write().unwrap_or_else(|p| p.into_inner());
                self.commit_preserving(vol, ops)?
            }
        };
        for p in released {
            if !kept.contains(p) {
                self.chunks.release(p);
            }
        }
        Ok(())
    }

    /// Commits `ops` after the pre-images of every key they change that the head's layer
    /// lacks. Returns the chunk versions the head took over. Holds `vol`'s lock exclusive.
    fn commit_preserving(&self, vol: u64, ops: &[Op]) -> FsResult<HashSet<ChunkPtr>> {
        let err = |e| FsError::storage("recording a snapshot's pre-image", e);
        let layers = self.snaps.layers(vol);
        let mut kept = HashSet::new();
        let Some(head) = layers.iter().rev().find(|l| !l.deleting).map(|l| l.id) else {
            self.commit(ops)?;
            return Ok(kept);
        };
        // Layers newer than the head are being removed; an entry of theirs is the value the
        // key had at the head's instant too, and moves down into the head.
        let newer: Vec<u64> = layers
            .iter()
            .filter(|l| l.id > head)
            .map(|l| l.id)
            .collect();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                Op::Put(k, _) | Op::Del(k) => keys.push(k.clone()),
                Op::DelRange(a, b) => {
                    for k in self.fs.range(a.as_slice()..b.as_slice()).keys() {
                        keys.push(k.map_err(err)?.to_vec());
                    }
                }
            }
        }
        let mut seen = HashSet::new();
        let mut all = Vec::with_capacity(ops.len() * 2);
        for k in keys {
            if k.len() < 9 || store::is_snapshot_key(&k) || !seen.insert(k.clone()) {
                continue;
            }
            let hk = store::layer_key(vol, head, &k);
            if self.fs.contains_key(&hk).map_err(err)? {
                continue;
            }
            let mut moved = None;
            for id in &newer {
                let lk = store::layer_key(vol, *id, &k);
                if let Some(v) = self.fs.get(&lk).map_err(err)? {
                    moved = Some((lk, v));
                    break;
                }
            }
            match moved {
                Some((lk, v)) => {
                    all.push(Op::Put(hk, v.to_vec()));
                    all.push(Op::Del(lk));
                }
                None => {
                    let live = self.fs.get(&k).map_err(err)?;
                    if let Some(p) = live.as_deref().and_then(|v| store::chunk_value(&k, v)) {
                        kept.insert(p);
                    }
                    all.push(Op::Put(hk, encode_pre(live.as_deref())));
                }
            }
        }
        all.extend_from_slice(ops);
        self.commit(&all)?;
        Ok(kept)
    }

    /// The value of `key` (a key of `vol`) live (`at` None) or in snapshot `at`.
    pub fn get_at(&self, vol: u64, at: Option<u64>, key: &[u8]) -> sled::Result<Option<IVec>> {
        let live = self.fs.get(key)?;
        let Some(snap) = at else {
            return Ok(live);
        };
        let mut hit = None;
        for l in self.snaps.layers(vol).iter().rev().filter(|l| l.id >= snap) {
            if let Some(v) = self.fs.get(store::layer_key(vol, l.id, key))? {
                hit = Some(v);
            }
        }
        Ok(match hit {
            Some(v) => decode_pre(&v),
            None => live,
        })
    }

    /// The keys of `vol` in `[start, end)`, live or in snapshot `at`, in order.
    pub fn range_at(
        &self,
        vol: u64,
        at: Option<u64>,
        start: Vec<u8>,
        end: Vec<u8>,
    ) -> Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>> + Send + '_> {
        match at {
            None => Box::new(self.fs.range(start..end)),
            Some(snap) => Box::new(LayeredRange {
                store: self,
                vol,
                snap,
                next: Some(start),
                end,
                buf: VecDeque::new(),
            }),
        }
    }

    /// The snapshots of `vol`, oldest first, those being removed included.
    pub fn snapshots(&self, vol: u64) -> Result<Vec<(u64, SnapshotRecord)>, String> {
        let mut out = Vec::new();
        for item in self
            .fs
            .scan_prefix(store::tag_prefix(vol, store::TAG_SNAPSHOT))
        {
            let (k, v) = item.map_err(|e| format!("listing snapshots: {e}"))?;
            let Some(id) = k.get(9..17).and_then(|b| b.try_into().ok()) else {
                continue;
            };
            let rec = SnapshotRecord::decode(&v).ok_or_else(|| {
                format!("the record of a snapshot of volume id {vol} is corrupt; run fsck")
            })?;
            out.push((u64::from_be_bytes(id), rec));
        }
        Ok(out)
    }

    /// Takes a snapshot of `vol` named `name` (the caller checked the name is free):
    /// writers are held only while its record is written. `usage` gives the volume's
    /// bytes and inodes at that instant. Returns its id, record and how long writers were
    /// held.
    pub fn create_snapshot(
        &self,
        vol: u64,
        name: &str,
        usage: impl FnOnce() -> (u64, u64),
    ) -> Result<(u64, SnapshotRecord, Duration), String> {
        self.create_snapshot_with(vol, name, false, usage)
    }

    /// As [`Store::create_snapshot`]; a `temporary` one is hidden and does not outlive
    /// the daemon.
    pub fn create_snapshot_with(
        &self,
        vol: u64,
        name: &str,
        temporary: bool,
        usage: impl FnOnce() -> (u64, u64),
    ) -> Result<(u64, SnapshotRecord, Duration), String> {
        let lock = self.snaps.lock_of(vol);
        let t = Instant::now();
        let g = lock.write().unwrap_or_else(|p| p.into_inner());
        let held = Instant::now();
        let id = self
            .db
            .generate_id()
            .map_err(|e| format!("allocating a snapshot id: {e}"))?;
        let (bytes, inodes) = usage();
        let rec = SnapshotRecord {
            name: name.to_string(),
            created: Timestamp::now(),
            bytes,
            inodes,
            deleting: false,
            temporary,
        };
        self.commit(&[Op::Put(store::snapshot_key(vol, id), rec.encode())])
            .map_err(|e| format!("recording snapshot {name}: {e}"))?;
        let mut list = self.snaps.layers(vol).to_vec();
        list.push(Layer {
            id,
            deleting: false,
        });
        self.snaps.set_layers(vol, list);
        drop(g);
        let stall = held.elapsed() + (held - t);
        self.sync()
            .map_err(|e| format!("making snapshot {name} durable: {e}"))?;
        Ok((id, rec, stall))
    }

    /// Removes snapshot `snap` of `vol`: hides it at once, then merges its layer away.
    /// Returns the chunk bytes released.
    pub fn remove_snapshot(&self, vol: u64, snap: u64) -> Result<u64, String> {
        if self.snaps.pinned(vol, snap) {
            return Err(
                "the snapshot is in use (mounted, or being exported or cloned); \
                 unmount it or wait, then retry"
                    .into(),
            );
        }
        {
            let lock = self.snaps.lock_of(vol);
            let _g = lock.write().unwrap_or_else(|p| p.into_inner());
            let key = store::snapshot_key(vol, snap);
            let Some(v) = self
                .fs
                .get(&key)
                .map_err(|e| format!("reading a snapshot record: {e}"))?
            else {
                return Ok(0);
            };
            let mut rec = SnapshotRecord::decode(&v)
                .ok_or("a snapshot record is corrupt; run fsck".to_string())?;
            if !rec.deleting {
                rec.deleting = true;
                self.commit(&[Op::Put(key, rec.encode())])
                    .map_err(|e| format!("marking the snapshot removed: {e}"))?;
            }
            let list = self
                .snaps
                .layers(vol)
                .iter()
                .map(|l| Layer {
                    id: l.id,
                    deleting: l.deleting || l.id == snap,
                })
                .collect();
            self.snaps.set_layers(vol, list);
        }
        let released = self.merge_layer(vol, snap)?;
        self.sync()
            .map_err(|e| format!("making the removal durable: {e}"))?;
        Ok(released)
    }

    fn merge_layer(&self, vol: u64, snap: u64) -> Result<u64, String> {
        let err = |e: sled::Error| format!("removing a snapshot: {e}");
        let prefix = store::layer_prefix(vol, snap);
        let mut released = 0u64;
        loop {
            let lock = self.snaps.lock_of(vol);
            let _g = lock.write().unwrap_or_else(|p| p.into_inner());
            let layers = self.snaps.layers(vol);
            let older = layers.iter().rev().find(|l| l.id < snap).map(|l| l.id);
            let batch: Vec<(IVec, IVec)> = self
                .fs
                .scan_prefix(&prefix)
                .take(MERGE_BATCH)
                .collect::<Result<_, _>>()
                .map_err(err)?;
            if batch.is_empty() {
                self.commit(&[Op::Del(store::snapshot_key(vol, snap))])
                    .map_err(|e| format!("removing a snapshot record: {e}"))?;
                let list = layers.iter().copied().filter(|l| l.id != snap).collect();
                self.snaps.set_layers(vol, list);
                return Ok(released);
            }
            let mut ops = Vec::with_capacity(batch.len() * 2);
            let mut dropped = Vec::new();
            for (lk, v) in batch {
                let origin = store::layer_key_origin(vol, &lk);
                if let Some(o) = older {
                    let ok = store::layer_key(vol, o, &origin);
                    if !self.fs.contains_key(&ok).map_err(err)? {
                        ops.push(Op::Put(ok, v.to_vec()));
                        ops.push(Op::Del(lk.to_vec()));
                        continue;
                    }
                }
                if let Some(p) = store::chunk_value(&lk, &v) {
                    dropped.push(p);
                }
                ops.push(Op::Del(lk.to_vec()));
            }
            self.commit(&ops)
                .map_err(|e| format!("removing a snapshot: {e}"))?;
            for p in dropped {
                released += u64::from(p.len);
                self.chunks.release(&p);
            }
        }
    }

    /// Finishes the snapshot removals a stop or crash interrupted.
    pub fn resume_removals(&self) {
        let all: Vec<(u64, Arc<Vec<Layer>>)> = self
            .snaps
            .layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(v, l)| (*v, l.clone()))
            .collect();
        let mut merged = false;
        for (vol, layers) in all {
            for l in layers.iter().filter(|l| l.deleting) {
                merged = true;
                match self.merge_layer(vol, l.id) {
                    Ok(bytes) => {
                        tracing::info!(vol, snapshot = l.id, bytes, "finished removing a snapshot")
                    }
                    Err(e) => tracing::error!(vol, snapshot = l.id, "{e}"),
                }
            }
        }
        if merged {
            let _ = self.sync();
        }
    }
}

/// What [`Store::replace_content`] or [`Store::copy_content`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Keys written or deleted.
    pub keys: u64,
    /// Chunk bytes copied.
    pub bytes: u64,
}

type KvIter<'a> =
    std::iter::Peekable<Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>> + Send + 'a>>;

/// The next item of a range, its key mapped by `f`, without consuming it.
fn peek_kv(
    it: &mut KvIter<'_>,
    f: impl Fn(&[u8]) -> Vec<u8>,
) -> Result<Option<(Vec<u8>, IVec)>, String> {
    match it.peek() {
        None => Ok(None),
        Some(Ok((k, v))) => Ok(Some((f(k), v.clone()))),
        Some(Err(_)) => match it.next() {
            Some(Err(e)) => Err(format!("comparing volume contents: {e}")),
            _ => Ok(None),
        },
    }
}

/// The content keys of `vol` (every tag but the snapshot machinery's): `[start, end)`.
fn content_range(vol: u64) -> (Vec<u8>, Vec<u8>) {
    let mut start = vol.to_be_bytes().to_vec();
    start.push(b'a');
    (start, store::prefix_end(&vol.to_be_bytes()))
}

impl Store {
    /// Makes the live content of `vol` equal to that of `src` (a volume, live or in
    /// snapshot `src_at`), in one atomic commit that keeps `vol`'s own snapshots intact.
    /// Changed chunks are copied (a chunk version has one owner). Writers of `vol` wait
    /// until it is done; the caller refreshes what caches the old content.
    pub fn replace_content(
        &self,
        vol: u64,
        src: u64,
        src_at: Option<u64>,
    ) -> Result<Replaced, String> {
        let lock = self.snaps.lock_of(vol);
        let _g = lock.write().unwrap_or_else(|p| p.into_inner());
        let (s0, s1) = content_range(src);
        let (d0, d1) = content_range(vol);
        let mut want: KvIter<'_> = self.range_at(src, src_at, s0, s1).peekable();
        let mut have: KvIter<'_> = self.range_at(vol, None, d0, d1).peekable();
        let mut ops = Vec::new();
        let mut released = Vec::new();
        let mut copies: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut copy_keys = Vec::new();
        let mut stats = Replaced::default();
        loop {
            let w = peek_kv(&mut want, |k| store::rekey(vol, k))?;
            let h = peek_kv(&mut have, <[u8]>::to_vec)?;
            let (wk, hk) = (w.as_ref().map(|x| &x.0), h.as_ref().map(|x| &x.0));
            let order = match (wk, hk) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(a), Some(b)) => a.cmp(b),
            };
            match order {
                std::cmp::Ordering::Greater => {
                    let (k, v) = h.unwrap_or_default();
                    have.next();
                    if let Some(p) = store::chunk_value(&k, &v) {
                        released.push(p);
                    }
                    ops.push(Op::Del(k));
                }
                o => {
                    let (k, v) = w.unwrap_or_default();
                    want.next();
                    if o == std::cmp::Ordering::Equal {
                        let (_, hv) = h.unwrap_or_default();
                        have.next();
                        if hv == v && (src == vol || store::chunk_value(&k, &v).is_none()) {
                            continue;
                        }
                        if let Some(p) = store::chunk_value(&k, &hv) {
                            released.push(p);
                        }
                    }
                    if let Some(p) = store::chunk_value(&k, &v) {
                        let sk = store::rekey(src, &k);
                        let data = self.read_chunk_at(&sk, &p)?;
                        stats.bytes += data.len() as u64;
                        copies.push((k.clone(), data));
                        copy_keys.push(ops.len());
                        ops.push(Op::Put(k, Vec::new()));
                    } else {
                        ops.push(Op::Put(k, v.to_vec()));
                    }
                }
            }
        }
        stats.keys = ops.len() as u64;
        let pairs: Vec<(&[u8], &[u8])> = copies
            .iter()
            .map(|(k, d)| (k.as_slice(), d.as_slice()))
            .collect();
        let pending = self
            .chunks
            .append(&pairs)
            .map_err(|e| format!("copying file data: {e}"))?;
        for (i, p) in copy_keys.iter().zip(pending.ptrs()) {
            if let Op::Put(_, v) = &mut ops[*i] {
                *v = p.encode();
            }
        }
        match self.commit_preserving(vol, &ops) {
            Ok(kept) => {
                for p in released.iter().filter(|p| !kept.contains(p)) {
                    self.chunks.release(p);
                }
            }
            Err(e) => {
                pending.abandon();
                return Err(format!("replacing the volume's content: {e}"));
            }
        }
        drop(pending);
        self.sync()
            .map_err(|e| format!("making the new content durable: {e}"))?;
        Ok(stats)
    }

    /// Reads and verifies a chunk version for a copy.
    fn read_chunk_at(&self, key: &[u8], p: &ChunkPtr) -> Result<Vec<u8>, String> {
        match self.chunks.read(key, p) {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err("a chunk moved while being copied; retry".into()),
            Err(e) => Err(format!(
                "a chunk of inode {} is unreadable ({e:?}): run `volfs scrub`",
                key.get(9..17)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_be_bytes)
            )),
        }
    }

    /// Copies the content of `src` (live or snapshot `src_at`) into the empty new volume
    /// `dst`, in batches (`dst` is doomed until registered, so a crash leaves nothing).
    /// Chunk data is copied.
    pub fn copy_content(
        &self,
        src: u64,
        src_at: Option<u64>,
        dst: u64,
    ) -> Result<Replaced, String> {
        let (s0, s1) = content_range(src);
        let mut stats = Replaced::default();
        let mut ops = Vec::new();
        let mut copies: Vec<(Vec<u8>, Vec<u8>, usize)> = Vec::new();
        let flush = |ops: &mut Vec<Op>,
                     copies: &mut Vec<(Vec<u8>, Vec<u8>, usize)>|
         -> Result<(), String> {
            let pairs: Vec<(&[u8], &[u8])> = copies
                .iter()
                .map(|(k, d, _)| (k.as_slice(), d.as_slice()))
                .collect();
            let pending = self
                .chunks
                .append(&pairs)
                .map_err(|e| format!("copying file data: {e}"))?;
            for ((_, _, i), p) in copies.iter().zip(pending.ptrs()) {
                if let Op::Put(_, v) = &mut ops[*i] {
                    *v = p.encode();
                }
            }
            if let Err(e) = self.commit(ops) {
                pending.abandon();
                return Err(format!("copying a volume: {e}"));
            }
            ops.clear();
            copies.clear();
            Ok(())
        };
        let mut pending_bytes = 0usize;
        for item in self.range_at(src, src_at, s0, s1) {
            let (k, v) = item.map_err(|e| format!("reading the source volume: {e}"))?;
            let nk = store::rekey(dst, &k);
            if let Some(p) = store::chunk_value(&k, &v) {
                let data = self.read_chunk_at(&k, &p)?;
                stats.bytes += data.len() as u64;
                pending_bytes += data.len();
                copies.push((nk.clone(), data, ops.len()));
                ops.push(Op::Put(nk, Vec::new()));
            } else {
                ops.push(Op::Put(nk, v.to_vec()));
            }
            stats.keys += 1;
            if ops.len() >= MERGE_BATCH || pending_bytes >= 8 << 20 {
                flush(&mut ops, &mut copies)?;
                pending_bytes = 0;
            }
        }
        if !ops.is_empty() {
            flush(&mut ops, &mut copies)?;
        }
        self.sync()
            .map_err(|e| format!("making the copy durable: {e}"))?;
        Ok(stats)
    }
}

/// A range read of a snapshot, a page at a time (see the module doc).
struct LayeredRange<'a> {
    store: &'a Store,
    vol: u64,
    snap: u64,
    next: Option<Vec<u8>>,
    end: Vec<u8>,
    buf: VecDeque<sled::Result<(IVec, IVec)>>,
}

impl LayeredRange<'_> {
    fn fill(&mut self) {
        let Some(start) = self.next.take() else {
            return;
        };
        if start >= self.end {
            return;
        }
        let mut live = Vec::new();
        for item in self
            .store
            .fs
            .range(start.clone()..self.end.clone())
            .take(PAGE)
        {
            match item {
                Ok(kv) => live.push(kv),
                Err(e) => {
                    self.buf.push_back(Err(e));
                    return;
                }
            }
        }
        let page_end = if live.len() == PAGE {
            let mut e = live.last().map(|(k, _)| k.to_vec()).unwrap_or_default();
            e.push(0);
            self.next = Some(e.clone());
            e
        } else {
            self.end.clone()
        };
        // Read after the live page: a change the live page missed has its pre-image here.
        let mut overlay: BTreeMap<Vec<u8>, Option<IVec>> = BTreeMap::new();
        let vol = self.vol;
        for l in self
            .store
            .snaps
            .layers(vol)
            .iter()
            .rev()
            .filter(|l| l.id >= self.snap)
        {
            let a = store::layer_key(vol, l.id, &start);
            let b = if page_end.len() >= 9 && page_end[..8] == vol.to_be_bytes() {
                store::layer_key(vol, l.id, &page_end)
            } else {
                store::prefix_end(&store::layer_prefix(vol, l.id))
            };
            for item in self.store.fs.range(a..b) {
                match item {
                    // Older layers come later and win.
                    Ok((k, v)) => {
                        overlay.insert(store::layer_key_origin(vol, &k), decode_pre(&v));
                    }
                    Err(e) => {
                        self.buf.push_back(Err(e));
                        return;
                    }
                }
            }
        }
        for (k, v) in live {
            overlay.entry(k.to_vec()).or_insert(Some(v));
        }
        for (k, v) in overlay {
            if let Some(v) = v {
                self.buf.push_back(Ok((IVec::from(k), v)));
            }
        }
    }
}

impl Iterator for LayeredRange<'_> {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.buf.is_empty() && self.next.is_some() {
            self.fill();
        }
        self.buf.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};

    use crate::store::{self, ROOT_INO, Store};
    use crate::vfs::{Ctx, FileKind, FileSystem, Ino, RenameFlags, SetAttr, SledFs};

    const CTX: Ctx = Ctx::ROOT;
    const VOL: u64 = 7;

    /// Everything a snapshot must keep of one path.
    type Dump = BTreeMap<Vec<u8>, String>;

    fn dump(fs: &SledFs) -> Dump {
        let mut out = BTreeMap::new();
        walk(fs, ROOT_INO, b"".to_vec(), &mut out);
        out
    }

    fn walk(fs: &SledFs, ino: Ino, path: Vec<u8>, out: &mut Dump) {
        let a = fs.getattr(ino).expect("getattr");
        let mut x: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for name in fs.listxattr(ino).expect("listxattr").split(|b| *b == 0) {
            if !name.is_empty() {
                x.push((name.to_vec(), fs.getxattr(ino, name).expect("getxattr")));
            }
        }
        let body = match a.kind {
            FileKind::Regular => fs.read(ino, 0, a.size as u32).expect("read"),
            FileKind::Symlink => fs.readlink(ino).expect("readlink"),
            _ => Vec::new(),
        };
        out.insert(
            path.clone(),
            format!(
                "{:?} {:o} {} {} size {} nlink {} mtime {:?} xattrs {x:?} body {:x}",
                a.kind,
                a.perm,
                a.uid,
                a.gid,
                a.size,
                a.nlink,
                a.mtime,
                crc32fast::hash(&body)
            ),
        );
        if a.kind == FileKind::Directory {
            let mut cookie = 0;
            loop {
                let entries = fs.readdir(ino, cookie, 7).expect("readdir");
                if entries.is_empty() {
                    break;
                }
                for e in entries {
                    cookie = e.cookie;
                    if e.name != b"." && e.name != b".." {
                        let mut p = path.clone();
                        p.push(b'/');
                        p.extend_from_slice(&e.name);
                        walk(fs, e.ino, p, out);
                    }
                }
            }
        }
    }

    fn open(root: &std::path::Path) -> (Store, SledFs) {
        crate::vfs::test_volume(root, VOL)
    }

    /// One random change: files written, truncated, renamed, linked and removed across
    /// a few directories, with xattrs and modes.
    fn step(fs: &SledFs, rng: &mut rand::rngs::StdRng) {
        let dirs = [ROOT_INO];
        let names: Vec<Vec<u8>> = (0..12).map(|i| format!("f{i}").into_bytes()).collect();
        let sub = match fs.lookup(ROOT_INO, b"d") {
            Ok(a) => a.ino,
            Err(_) => fs.mkdir(&CTX, ROOT_INO, b"d", 0o755, 0).expect("mkdir").ino,
        };
        let parent = if rng.gen_bool(0.5) { sub } else { dirs[0] };
        let name = &names[rng.gen_range(0..names.len())];
        let file = match fs.lookup(parent, name) {
            Ok(a) => a,
            Err(_) => fs
                .mknod(&CTX, parent, name, libc::S_IFREG | 0o644, 0, 0)
                .expect("create"),
        };
        match rng.gen_range(0..9) {
            0..=2 => {
                let off = rng.gen_range(0..100_000u64);
                let len = rng.gen_range(1..40_000usize);
                let byte: u8 = rng.r#gen();
                fs.write(file.ino, off, &vec![byte; len], false)
                    .expect("write");
            }
            3 => {
                let set = SetAttr {
                    size: Some(rng.gen_range(0..60_000)),
                    ..SetAttr::default()
                };
                fs.setattr(&CTX, file.ino, &set).expect("truncate");
            }
            4 => {
                let other = if parent == sub { ROOT_INO } else { sub };
                let to = &names[rng.gen_range(0..names.len())];
                let _ = fs.rename(parent, name, other, to, RenameFlags::default());
            }
            5 => {
                let to = &names[rng.gen_range(0..names.len())];
                let _ = fs.link(file.ino, sub, &[to.as_slice(), b"L"].concat());
            }
            6 => fs.unlink(parent, name).expect("unlink"),
            7 => {
                let v: u32 = rng.r#gen();
                fs.setxattr(&CTX, file.ino, b"user.v", &v.to_be_bytes(), 0)
                    .expect("setxattr");
            }
            _ => {
                let set = SetAttr {
                    mode: Some(rng.gen_range(0..0o777)),
                    ..SetAttr::default()
                };
                fs.setattr(&CTX, file.ino, &set).expect("chmod");
            }
        }
    }

    #[test]
    fn snapshots_keep_their_instant_through_changes_removals_compaction_and_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut kept: Vec<(u64, Dump)> = Vec::new();
        let check = |store: &Store, kept: &[(u64, Dump)]| {
            for (id, want) in kept {
                let view = SledFs::open_snapshot(store.clone(), VOL, *id, "t@s").expect("view");
                assert_eq!(&dump(&view), want, "snapshot {id}");
            }
        };
        for round in 0..4 {
            let (store, fs) = open(dir.path());
            check(&store, &kept);
            for i in 0..300 {
                step(&fs, &mut rng);
                if i % 60 == 59 {
                    let want = dump(&fs);
                    let usage = fs.usage();
                    let (id, _, _) = store
                        .create_snapshot(VOL, &format!("s{round}-{i}"), || {
                            (usage.bytes, usage.inodes)
                        })
                        .expect("snapshot");
                    kept.push((id, want));
                }
                if i % 100 == 99 && kept.len() > 2 {
                    let (id, _) = kept.remove(rng.gen_range(0..kept.len()));
                    store.remove_snapshot(VOL, id).expect("remove");
                    check(&store, &kept);
                }
            }
            check(&store, &kept);
            store.collect_garbage().expect("gc");
            check(&store, &kept);
            fs.sync().expect("sync");
        }
        // Removing every snapshot gives back every chunk version they held.
        let (store, fs) = open(dir.path());
        for (id, _) in kept.drain(..) {
            store.remove_snapshot(VOL, id).expect("remove");
        }
        let layer_keys = store
            .fs
            .scan_prefix(store::tag_prefix(VOL, store::TAG_LAYER))
            .count();
        assert_eq!(layer_keys, 0);
        assert_eq!(store.snapshots(VOL).expect("list"), vec![]);
        let live = dump(&fs);
        drop((fs, store));
        let (_, fs) = open(dir.path());
        assert_eq!(dump(&fs), live);
    }

    #[test]
    fn a_snapshot_view_refuses_changes_and_removal_while_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, fs) = open(dir.path());
        let f = fs
            .mknod(&CTX, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, 0)
            .expect("create");
        fs.write(f.ino, 0, b"before", false).expect("write");
        let (id, _, _) = store.create_snapshot(VOL, "s", || (0, 0)).expect("snap");
        fs.write(f.ino, 0, b"AFTER!", false).expect("write");
        fs.unlink(ROOT_INO, b"f").expect("unlink");
        let view = SledFs::open_snapshot(store.clone(), VOL, id, "t@s").expect("view");
        let a = view.lookup(ROOT_INO, b"f").expect("lookup in snapshot");
        assert_eq!(view.read(a.ino, 0, 100).expect("read"), b"before");
        assert_eq!(
            view.write(a.ino, 0, b"x", false),
            Err(crate::error::FsError::ReadOnly)
        );
        assert!(store.remove_snapshot(VOL, id).is_err());
        drop(view);
        store.remove_snapshot(VOL, id).expect("remove");
        assert_eq!(
            fs.lookup(ROOT_INO, b"f").map(|_| ()),
            Err(crate::error::FsError::NotFound)
        );
    }

    #[test]
    fn rollback_and_clone_reproduce_a_snapshot_and_keep_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let (store, fs) = open(dir.path());
        for _ in 0..200 {
            step(&fs, &mut rng);
        }
        let at_a = dump(&fs);
        let (a, _, _) = store.create_snapshot(VOL, "a", || (0, 0)).expect("snap");
        for _ in 0..200 {
            step(&fs, &mut rng);
        }
        let at_b = dump(&fs);
        let (b, _, _) = store.create_snapshot(VOL, "b", || (0, 0)).expect("snap");
        for _ in 0..100 {
            step(&fs, &mut rng);
        }
        let before_rollback = dump(&fs);
        let r = store.replace_content(VOL, VOL, Some(a)).expect("rollback");
        assert!(r.keys > 0);
        drop(fs);
        let fs = SledFs::open(store.clone(), VOL, "t").expect("reopen");
        assert_eq!(dump(&fs), at_a, "live after rollback to a");
        for (id, want) in [(a, &at_a), (b, &at_b)] {
            let view = SledFs::open_snapshot(store.clone(), VOL, id, "t@s").expect("view");
            assert_eq!(&dump(&view), want, "snapshot {id} after the rollback");
        }
        // Writing after the rollback leaves the snapshots alone too.
        for _ in 0..100 {
            step(&fs, &mut rng);
        }
        let view = SledFs::open_snapshot(store.clone(), VOL, b, "t@s").expect("view");
        assert_eq!(dump(&view), at_b);
        drop(view);
        // A clone of b is b, and independent of the volume.
        let clone = 99;
        let c = store.copy_content(VOL, Some(b), clone).expect("clone");
        assert!(c.bytes > 0);
        let cfs = SledFs::open(store.clone(), clone, "c").expect("open clone");
        assert_eq!(dump(&cfs), at_b);
        for _ in 0..50 {
            step(&cfs, &mut rng);
        }
        let view = SledFs::open_snapshot(store.clone(), VOL, b, "t@s").expect("view");
        assert_eq!(dump(&view), at_b);
        assert_ne!(dump(&fs), before_rollback);
        store.collect_garbage().expect("gc");
        store.sync().expect("sync");
        assert_eq!(dump(&view), at_b);
    }
}
