//! [`FileSystem`] over the sled store: one instance per volume, shared by all its mounts.
//!
//! Concurrency: namespace changes (create, link, unlink, rename…) hold the volume's
//! `namespace` lock, because sled transactions cannot scan ("is this directory empty?").
//! Changes to an inode's records hold its stripe lock (`Store::stripe_locks`), taken after
//! `namespace`. Reads take no lock. Every change is one [`Change`]: chunk bytes appended to
//! segments first, then one `apply_batch` that points at them, so a change is atomic and
//! survives a crash whole or not at all.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::acl;
use super::{
    Attr, Ctx, DirEntry, FileSystem, Ino, NAME_MAX, RenameFlags, SetAttr, SetTime, StatFs, Usage,
    XATTR_SIZE_MAX, falloc,
};
use crate::chunks::{ChunkPtr, PendingAppend, ReadError};
use crate::error::{FsError, FsResult};
use crate::store::{
    self, CHUNK_SIZE, DentryRecord, FileKind, InodeRecord, Op, ROOT_INO, Store, Timestamp,
};

/// One volume's filesystem.
pub struct SledFs {
    store: Store,
    vol: u64,
    name: String,
    namespace: Mutex<()>,
    open_handles: Mutex<HashMap<Ino, u32>>,
    /// The kernel holds handles opened under a previous daemon (see `open_resumed`).
    handles_unknown: AtomicBool,
    /// Bytes stored in chunks and symlink targets, and live inodes, kept in memory for
    /// `statfs` and the quota.
    used_bytes: AtomicU64,
    inodes: AtomicU64,
    /// The quota on `used_bytes` ([`NO_LIMIT`]: none).
    limit: AtomicU64,
    /// The snapshot this serves (read-only), or `None` for the live volume.
    at: Option<u64>,
    _pin: Option<crate::snap::Pin>,
}

/// `now`, or one nanosecond past `old` if `now` is not later.
fn later(old: Timestamp, now: Timestamp) -> Timestamp {
    if (now.secs, now.nsecs) > (old.secs, old.nsecs) {
        now
    } else if old.nsecs >= 999_999_999 {
        Timestamp {
            secs: old.secs + 1,
            nsecs: 0,
        }
    } else {
        Timestamp {
            secs: old.secs,
            nsecs: old.nsecs + 1,
        }
    }
}
/// `SledFs::limit` when the volume has no quota.
const NO_LIMIT: u64 = u64::MAX;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these guards cannot leave sled inconsistent (batches are
    // atomic), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid);
    }
    Ok(())
}

fn attr_of(ino: Ino, r: &InodeRecord) -> Attr {
    Attr {
        ino,
        kind: r.kind,
        perm: r.perm,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
        size: r.size,
        blocks: r.stored.div_ceil(512),
        atime: r.atime,
        mtime: r.mtime,
        ctime: r.ctime,
        btime: r.btime,
    }
}

/// One atomic change: a sled batch, the segment appends it points at, and the chunk
/// versions it makes unreachable (released only once the batch is applied).
#[derive(Default)]
struct Change<'a> {
    ops: Vec<Op>,
    appends: Vec<PendingAppend<'a>>,
    released: Vec<ChunkPtr>,
}

impl Change<'_> {
    fn insert(&mut self, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) {
        self.ops
            .push(Op::Put(k.as_ref().to_vec(), v.as_ref().to_vec()));
    }

    fn remove(&mut self, k: impl AsRef<[u8]>) {
        self.ops.push(Op::Del(k.as_ref().to_vec()));
    }

    /// Removes every key starting with `prefix`.
    fn remove_prefix(&mut self, prefix: Vec<u8>) {
        let end = store::prefix_end(&prefix);
        self.ops.push(Op::DelRange(prefix, end));
    }
}

/// What to create in `create_node`.
struct NewNode<'a> {
    kind: FileKind,
    perm: u32,
    umask: u32,
    rdev: u32,
    target: &'a [u8],
}

/// Records loaded for one change, written back together.
struct Dirty(BTreeMap<Ino, InodeRecord>);

impl Dirty {
    fn get(&mut self, ino: Ino) -> &mut InodeRecord {
        // Every ino passed here was loaded first; a miss is a programming error.
        self.0.get_mut(&ino).expect("inode loaded before use")
    }
}

impl SledFs {
    /// Opens a volume: reclaims inodes left unlinked-but-open by a previous run and counts
    /// usage for `statfs`.
    pub fn open(store: Store, vol: u64, name: &str) -> FsResult<SledFs> {
        Self::open_inner(store, vol, name, false)
    }

    /// Opens a volume whose mounts outlived the previous daemon: the kernel may still hold
    /// files unlinked while open, with handles this process never counted, so orphans are
    /// kept until [`FileSystem::forget`] says the kernel let go of them.
    pub fn open_resumed(store: Store, vol: u64, name: &str) -> FsResult<SledFs> {
        Self::open_inner(store, vol, name, true)
    }

    /// The filesystem of `vol` (at snapshot `at`), its root checked, nothing counted yet.
    fn new(store: Store, vol: u64, name: &str, resumed: bool, at: Option<u64>) -> FsResult<SledFs> {
        let pin = at.map(|snap| store.snaps.pin(vol, snap));
        let fs = SledFs {
            handles_unknown: AtomicBool::new(resumed),
            store,
            vol,
            name: name.to_string(),
            namespace: Mutex::new(()),
            open_handles: Mutex::new(HashMap::new()),
            used_bytes: AtomicU64::new(0),
            inodes: AtomicU64::new(0),
            limit: AtomicU64::new(NO_LIMIT),
            at,
            _pin: pin,
        };
        fs.get_inode(ROOT_INO)?;
        Ok(fs)
    }

    fn open_inner(store: Store, vol: u64, name: &str, resumed: bool) -> FsResult<SledFs> {
        let fs = Self::new(store, vol, name, resumed, None)?;
        let orphans: Vec<Ino> = if resumed { Vec::new() } else { fs.orphans() };
        for ino in orphans {
            tracing::info!(volume = name, ino, "reclaiming inode unlinked while open");
            let mut batch = Change::default();
            fs.drop_inode(&mut batch, ino)?;
            fs.commit(batch, "reclaiming an orphan inode")?;
        }
        let usage = Self::scan_usage(&fs.store, vol)?;
        fs.used_bytes.store(usage.bytes, Ordering::Relaxed);
        fs.inodes.store(usage.inodes, Ordering::Relaxed);
        Ok(fs)
    }

    /// Opens snapshot `snap` of volume `vol`, read-only; the snapshot cannot be removed
    /// while this lives.
    pub fn open_snapshot(store: Store, vol: u64, snap: u64, name: &str) -> FsResult<SledFs> {
        let fs = Self::new(store, vol, name, false, Some(snap))?;
        let mut usage = Usage::default();
        for item in fs.scan(store::tag_prefix(vol, store::TAG_INODE)) {
            let (_, v) = item.map_err(|e| FsError::storage("counting snapshot usage", e))?;
            if let Some(r) = InodeRecord::decode(&v) {
                usage.bytes += r.stored + r.target.len() as u64;
                usage.inodes += 1;
            }
        }
        fs.used_bytes.store(usage.bytes, Ordering::Relaxed);
        fs.inodes.store(usage.inodes, Ordering::Relaxed);
        Ok(fs)
    }

    /// The inodes the kernel holds open (through any mount), as far as this daemon saw
    /// them opened.
    pub fn open_inodes(&self) -> Vec<Ino> {
        lock(&self.open_handles)
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(i, _)| *i)
            .collect()
    }

    /// The volume's name (`VOL@SNAP` for a snapshot).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts usage again from the records (after the content was replaced underneath).
    pub fn recount(&self) -> FsResult<()> {
        let usage = Self::scan_usage(&self.store, self.vol)?;
        self.used_bytes.store(usage.bytes, Ordering::Relaxed);
        self.inodes.store(usage.inodes, Ordering::Relaxed);
        Ok(())
    }

    /// Whether this serves a snapshot (read-only).
    pub fn snapshot(&self) -> Option<u64> {
        self.at
    }

    /// The value of `key` in the state this serves.
    fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<sled::IVec>> {
        self.store.get_at(self.vol, self.at, key.as_ref())
    }

    /// The keys in `[start, end]` in the state this serves.
    fn range_incl(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
    ) -> Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send + '_> {
        let mut end = end;
        end.push(0);
        self.store.range_at(self.vol, self.at, start, end)
    }

    /// The keys starting with `prefix` in the state this serves.
    fn scan(
        &self,
        prefix: Vec<u8>,
    ) -> Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send + '_> {
        let end = store::prefix_end(&prefix);
        self.store.range_at(self.vol, self.at, prefix, end)
    }

    /// Counts a volume's usage from its inode records, without opening it (a scan of one
    /// key per inode).
    pub fn scan_usage(store: &Store, vol: u64) -> FsResult<Usage> {
        let mut usage = Usage::default();
        for item in store
            .fs
            .scan_prefix(store::tag_prefix(vol, store::TAG_INODE))
        {
            let (_, v) = item.map_err(|e| FsError::storage("counting volume usage", e))?;
            if let Some(r) = InodeRecord::decode(&v) {
                usage.bytes += r.stored + r.target.len() as u64;
                usage.inodes += 1;
            }
        }
        Ok(usage)
    }

    /// The volume's usage now, from the counters kept in memory.
    pub fn usage(&self) -> Usage {
        Usage {
            bytes: self.used_bytes.load(Ordering::Relaxed),
            inodes: self.inodes.load(Ordering::Relaxed),
        }
    }

    /// Sets the quota: from then on, a write, create or fallocate that would take the
    /// bytes stored (chunk bytes and symlink targets, as [`SledFs::usage`] counts them)
    /// past `limit` fails with ENOSPC, and `statfs` reports `limit` as the size.
    pub fn set_limit(&self, limit: Option<u64>) {
        self.limit
            .store(limit.unwrap_or(NO_LIMIT), Ordering::Relaxed);
    }

    /// The directory holding the store's files (for the size of its disk).
    pub fn store_dir(&self) -> std::path::PathBuf {
        self.store.dir()
    }

    /// The quota, if any.
    pub fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::Relaxed)).filter(|l| *l != NO_LIMIT)
    }

    /// Takes `bytes` of the quota before a change that stores them; give them back with
    /// [`SledFs::unreserve`] if the change fails.
    fn reserve(&self, bytes: u64) -> FsResult<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.used_bytes.load(Ordering::Relaxed);
        loop {
            let new = cur.checked_add(bytes).ok_or(FsError::NoSpace)?;
            if new > limit {
                tracing::debug!(volume = %self.name, cur, bytes, limit, "quota reached: ENOSPC");
                return Err(FsError::NoSpace);
            }
            match self.used_bytes.compare_exchange_weak(
                cur,
                new,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(bytes),
                Err(now) => cur = now,
            }
        }
    }

    fn unreserve(&self, bytes: u64) {
        self.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Writes the root directory of a new volume.
    pub fn init_volume(store: &Store, vol: u64, uid: u32, gid: u32, perm: u32) -> FsResult<()> {
        let mut root = InodeRecord::new(FileKind::Directory, perm, uid, gid, Timestamp::now());
        root.parent = ROOT_INO;
        store
            .fs
            .insert(store::inode_key(vol, ROOT_INO), root.encode())
            .map_err(|e| FsError::storage("writing a new volume's root", e))?;
        Ok(())
    }

    fn stripe_locks(&self, inos: &[Ino]) -> Vec<MutexGuard<'_, ()>> {
        self.store.stripe_locks(self.vol, inos)
    }

    fn commit(&self, change: Change<'_>, what: &str) -> FsResult<()> {
        if self.at.is_some() {
            // A snapshot never changes; mounts of it are read-only.
            return Err(FsError::ReadOnly);
        }
        let r = self
            .store
            .commit_change(&change.ops, &change.released)
            .inspect_err(|e| {
                if let FsError::Io(_) = e {
                    tracing::error!(volume = %self.name, "{what} failed");
                }
            });
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                for a in change.appends {
                    a.abandon();
                }
                Err(e)
            }
        }
    }

    fn chunk_error(&self, ino: Ino, index: u64, err: ReadError) -> FsError {
        let offset = index * CHUNK_SIZE;
        match err {
            ReadError::Corrupt => {
                tracing::error!(
                    volume = %self.name,
                    ino,
                    offset,
                    "chunk checksum mismatch: refusing to return corrupt data (run scrub)"
                );
                FsError::Io(format!("corrupt chunk of inode {ino} at offset {offset}"))
            }
            ReadError::Io(e) => {
                tracing::error!(volume = %self.name, ino, offset, "reading chunk: {e}");
                FsError::Io(e.to_string())
            }
        }
    }

    fn decode_ptr(&self, ino: Ino, index: u64, v: &[u8]) -> FsResult<ChunkPtr> {
        ChunkPtr::decode(v).ok_or_else(|| {
            tracing::error!(volume = %self.name, ino, offset = index * CHUNK_SIZE, "corrupt chunk pointer");
            FsError::Io(format!("corrupt chunk pointer of inode {ino}"))
        })
    }

    fn get_inode(&self, ino: Ino) -> FsResult<InodeRecord> {
        let v = self
            .get(store::inode_key(self.vol, ino))
            .map_err(|e| FsError::storage("reading an inode", e))?
            .ok_or(FsError::NotFound)?;
        InodeRecord::decode(&v).ok_or_else(|| {
            tracing::error!(volume = %self.name, ino, "inode record is corrupt");
            FsError::Io(format!("corrupt inode {ino}"))
        })
    }

    fn get_dentry(&self, parent: Ino, name: &[u8]) -> FsResult<Option<DentryRecord>> {
        let Some(v) = self
            .get(store::dentry_key(self.vol, parent, name))
            .map_err(|e| FsError::storage("reading a directory entry", e))?
        else {
            return Ok(None);
        };
        DentryRecord::decode(&v).map(Some).ok_or_else(|| {
            tracing::error!(volume = %self.name, parent, "directory entry is corrupt");
            FsError::Io(format!("corrupt entry in directory {parent}"))
        })
    }

    fn get_xattr(&self, ino: Ino, name: &[u8]) -> FsResult<Option<sled::IVec>> {
        self.get(store::xattr_key(self.vol, ino, name))
            .map_err(|e| FsError::storage("reading an xattr", e))
    }

    fn dir_is_empty(&self, ino: Ino) -> FsResult<bool> {
        match self.scan(store::dentry_prefix(self.vol, ino)).next() {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(FsError::storage("listing a directory", e)),
        }
    }

    fn load(&self, inos: &[Ino]) -> FsResult<Dirty> {
        let mut m = BTreeMap::new();
        for &ino in inos {
            if let std::collections::btree_map::Entry::Vacant(e) = m.entry(ino) {
                e.insert(self.get_inode(ino)?);
            }
        }
        Ok(Dirty(m))
    }

    fn put_all(&self, batch: &mut Change<'_>, dirty: &Dirty) {
        for (ino, r) in &dirty.0 {
            if r.nlink > 0 || self.is_open(*ino) {
                batch.insert(store::inode_key(self.vol, *ino), r.encode());
            }
        }
    }

    fn orphans(&self) -> Vec<Ino> {
        self.scan(store::tag_prefix(self.vol, store::TAG_ORPHAN))
            .filter_map(|kv| kv.ok().and_then(|(k, _)| store::parse_orphan_key(&k)))
            .collect()
    }

    /// Drops `ino` if it is an orphan that nothing holds open.
    fn reclaim_if_orphan(&self, ino: Ino) -> FsResult<()> {
        let _ns = lock(&self.namespace);
        if self.is_open(ino) {
            return Ok(());
        }
        let _l = self.stripe_locks(&[ino]);
        let orphan = self
            .get(store::orphan_key(self.vol, ino))
            .map(|v| v.is_some())
            .map_err(|e| FsError::storage("checking for an orphan", e))?;
        if orphan {
            let mut batch = Change::default();
            self.drop_inode(&mut batch, ino)?;
            self.commit(batch, "reclaiming an unlinked inode")?;
        }
        Ok(())
    }

    fn is_open(&self, ino: Ino) -> bool {
        lock(&self.open_handles).get(&ino).copied().unwrap_or(0) > 0
    }

    /// Removes an inode with its data and xattrs into `change`.
    fn drop_inode(&self, change: &mut Change<'_>, ino: Ino) -> FsResult<()> {
        for item in self.scan(store::chunk_prefix(self.vol, ino)) {
            let (_, v) = item.map_err(|e| FsError::storage("listing an inode's data", e))?;
            if let Some(p) = ChunkPtr::decode(&v) {
                change.released.push(p);
            }
        }
        // Names are gone already (callers remove them first); then the record, then data.
        change.remove(store::inode_key(self.vol, ino));
        change.remove_prefix(store::chunk_prefix(self.vol, ino));
        change.remove_prefix(store::xattr_prefix(self.vol, ino));
        if let Ok(r) = self.get_inode(ino) {
            self.used_bytes
                .fetch_sub(r.stored + r.target.len() as u64, Ordering::Relaxed);
            self.inodes.fetch_sub(1, Ordering::Relaxed);
        }
        change.remove(store::orphan_key(self.vol, ino));
        Ok(())
    }

    /// Drops one name's reference to `ino` (already decremented in `dirty`): the inode goes
    /// when no name and no open handle is left.
    fn release_if_unlinked(&self, batch: &mut Change<'_>, dirty: &Dirty, ino: Ino) -> FsResult<()> {
        let Some(r) = dirty.0.get(&ino) else {
            return Ok(());
        };
        if r.nlink == 0 {
            if self.is_open(ino) {
                batch.insert(store::orphan_key(self.vol, ino), &[][..]);
            } else {
                self.drop_inode(batch, ino)?;
            }
        }
        Ok(())
    }

    fn create_node(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        node: NewNode<'_>,
    ) -> FsResult<Attr> {
        let NewNode {
            kind,
            perm,
            umask,
            rdev,
            target,
        } = node;
        check_name(name)?;
        self.store.check_space(0)?;
        // A full volume takes no new inodes either: their records are not counted, so
        // they could grow the store without bound.
        if self.used_bytes.load(Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed) {
            return Err(FsError::NoSpace);
        }
        let _ns = lock(&self.namespace);
        let ino = self.store.new_ino()?;
        let _l = self.stripe_locks(&[parent, ino]);
        let mut dirty = self.load(&[parent])?;
        let p = dirty.get(parent);
        if p.kind != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        if p.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if self.get_dentry(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Timestamp::now();
        let mut perm = perm & 0o7777;
        let mut gid = ctx.gid;
        if p.perm & libc::S_ISGID != 0 {
            gid = p.gid;
            if kind == FileKind::Directory {
                perm |= libc::S_ISGID;
            }
        }
        let mut batch = Change::default();
        let default_acl = if matches!(kind, FileKind::Symlink) {
            None
        } else {
            self.get_xattr(parent, acl::DEFAULT)?
        };
        if let Some(default) = &default_acl {
            // A default ACL replaces the umask (POSIX.1e).
            let (new_perm, access) = acl::inherit(default, perm)?;
            perm = new_perm;
            if let Some(a) = access {
                batch.insert(store::xattr_key(self.vol, ino, acl::ACCESS), a);
            }
            if kind == FileKind::Directory {
                batch.insert(
                    store::xattr_key(self.vol, ino, acl::DEFAULT),
                    default.clone(),
                );
            }
        } else {
            perm &= !umask;
        }
        let mut rec = InodeRecord::new(kind, perm, ctx.uid, gid, now);
        rec.rdev = rdev;
        rec.target = target.to_vec();
        rec.size = target.len() as u64;
        let p = dirty.get(parent);
        if kind == FileKind::Directory {
            rec.parent = parent;
            p.nlink += 1;
        }
        let cookie = p.next_cookie;
        p.next_cookie += 1;
        p.size += 1;
        p.mtime = now;
        p.ctime = now;
        batch.insert(store::inode_key(self.vol, ino), rec.encode());
        self.put_name(&mut batch, parent, name, DentryRecord { ino, kind, cookie });
        self.put_all(&mut batch, &dirty);
        let reserved = self.reserve(target.len() as u64)?;
        self.commit(batch, "creating a file")
            .inspect_err(|_| self.unreserve(reserved))?;
        self.inodes.fetch_add(1, Ordering::Relaxed);
        Ok(attr_of(ino, &rec))
    }

    /// The current version of one chunk and where it lives.
    /// Adds a name: its entry and its readdir index key.
    fn put_name(&self, change: &mut Change<'_>, parent: Ino, name: &[u8], d: DentryRecord) {
        change.insert(store::dentry_key(self.vol, parent, name), d.encode());
        change.insert(
            store::readdir_key(self.vol, parent, d.cookie),
            store::encode_readdir(d.ino, d.kind, name),
        );
    }

    /// Removes a name: its entry and its readdir index key.
    fn remove_name(&self, change: &mut Change<'_>, parent: Ino, name: &[u8], cookie: u64) {
        change.remove(store::dentry_key(self.vol, parent, name));
        change.remove(store::readdir_key(self.vol, parent, cookie));
    }

    fn read_chunk(&self, ino: Ino, index: u64) -> FsResult<Option<(Vec<u8>, ChunkPtr)>> {
        let key = store::chunk_key(self.vol, ino, index);
        // A pointer read just before the compactor moved the chunk finds its segment gone:
        // read the pointer again.
        for _ in 0..8 {
            let Some(v) = self
                .get(&key)
                .map_err(|e| FsError::storage("reading file data", e))?
            else {
                return Ok(None);
            };
            let ptr = self.decode_ptr(ino, index, &v)?;
            match self.store.chunks.read(&key, &ptr) {
                Ok(Some(d)) => return Ok(Some((d, ptr))),
                Ok(None) => continue,
                Err(e) => {
                    if self.pointer_moved(&key, &ptr) {
                        continue;
                    }
                    return Err(self.chunk_error(ino, index, e));
                }
            }
        }
        Err(FsError::Io(format!("chunk of inode {ino} kept moving")))
    }

    /// The bytes of a chunk found by a range scan.
    fn chunk_bytes(&self, ino: Ino, index: u64, key: &[u8], v: &[u8]) -> FsResult<Vec<u8>> {
        let ptr = self.decode_ptr(ino, index, v)?;
        match self.store.chunks.read(key, &ptr) {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Ok(self
                .read_chunk(ino, index)?
                .map(|c| c.0)
                .unwrap_or_default()),
            Err(_) if self.pointer_moved(key, &ptr) => Ok(self
                .read_chunk(ino, index)?
                .map(|c| c.0)
                .unwrap_or_default()),
            Err(e) => Err(self.chunk_error(ino, index, e)),
        }
    }

    /// Whether the chunk's key now points somewhere else than `ptr` (a write or the
    /// compactor replaced it while we read the old version).
    fn pointer_moved(&self, key: &[u8], ptr: &ChunkPtr) -> bool {
        match self.get(key) {
            Ok(Some(v)) => ChunkPtr::decode(&v) != Some(*ptr),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    fn append_chunks<'a>(
        &'a self,
        change: &mut Change<'a>,
        chunks: &[(Vec<u8>, Cow<'_, [u8]>)],
    ) -> FsResult<()> {
        let bytes: usize = chunks.iter().map(|(k, d)| k.len() + d.len() + 14).sum();
        self.store.check_space(bytes as u64)?;
        let pairs: Vec<(&[u8], &[u8])> = chunks
            .iter()
            .map(|(k, d)| (k.as_slice(), d.as_ref()))
            .collect();
        let pending = self.store.chunks.append(&pairs).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                tracing::warn!(volume = %self.name, "host disk full while writing data");
                FsError::NoSpace
            } else {
                tracing::error!(volume = %self.name, "appending file data: {e}");
                FsError::Io(e.to_string())
            }
        })?;
        for ((k, _), p) in chunks.iter().zip(pending.ptrs()) {
            change.insert(k.clone(), p.encode());
        }
        change.appends.push(pending);
        Ok(())
    }

    /// The stored chunks of `ino` with index in `first..=last`: `(index, key, pointer)`.
    fn chunks_in(
        &self,
        ino: Ino,
        first: u64,
        last: u64,
        what: &'static str,
    ) -> impl Iterator<Item = FsResult<(u64, sled::IVec, sled::IVec)>> + '_ {
        let start = store::chunk_key(self.vol, ino, first);
        let end = store::chunk_key(self.vol, ino, last);
        self.range_incl(start, end).map(move |item| {
            let (k, v) = item.map_err(|e| FsError::storage(what, e))?;
            let idx = store::parse_chunk_key(&k).unwrap_or(first);
            Ok((idx, k, v))
        })
    }

    /// Cuts the file to `new_size`: later chunks go, the last one is trimmed.
    fn truncate_into<'a>(
        &'a self,
        change: &mut Change<'a>,
        ino: Ino,
        rec: &mut InodeRecord,
        new_size: u64,
    ) -> FsResult<()> {
        if new_size < rec.size {
            let keep_partial = new_size % CHUNK_SIZE;
            let first_gone = new_size.div_ceil(CHUNK_SIZE);
            for item in self.chunks_in(ino, first_gone, u64::MAX, "truncating a file") {
                let (idx, _, v) = item?;
                let p = self.decode_ptr(ino, idx, &v)?;
                rec.stored = rec.stored.saturating_sub(u64::from(p.len));
                self.used_bytes
                    .fetch_sub(u64::from(p.len), Ordering::Relaxed);
                change.released.push(p);
            }
            change.ops.push(Op::DelRange(
                store::chunk_key(self.vol, ino, first_gone),
                store::prefix_end(&store::chunk_prefix(self.vol, ino)),
            ));
            if keep_partial != 0 {
                let idx = new_size / CHUNK_SIZE;
                if let Some((mut data, old)) = self.read_chunk(ino, idx)? {
                    if data.len() as u64 > keep_partial {
                        let cut = data.len() as u64 - keep_partial;
                        data.truncate(keep_partial as usize);
                        rec.stored = rec.stored.saturating_sub(cut);
                        self.used_bytes.fetch_sub(cut, Ordering::Relaxed);
                        let key = store::chunk_key(self.vol, ino, idx);
                        self.append_chunks(change, &[(key, Cow::Owned(data))])?;
                        change.released.push(old);
                    }
                }
            }
        }
        rec.size = new_size;
        Ok(())
    }

    /// Zeroes `[start, end)`: whole chunks are removed, partial ones rewritten with zeros.
    fn punch_into<'a>(
        &'a self,
        change: &mut Change<'a>,
        ino: Ino,
        rec: &mut InodeRecord,
        start: u64,
        end: u64,
    ) -> FsResult<()> {
        let end = end.min(rec.size);
        if start >= end {
            return Ok(());
        }
        let last = (end - 1) / CHUNK_SIZE;
        let mut rewrites = Vec::new();
        for item in self.chunks_in(ino, start / CHUNK_SIZE, last, "punching a hole") {
            let (idx, k, v) = item?;
            let old = self.decode_ptr(ino, idx, &v)?;
            let cs = idx * CHUNK_SIZE;
            let ce = cs + u64::from(old.len);
            if start <= cs && end >= ce {
                rec.stored = rec.stored.saturating_sub(u64::from(old.len));
                self.used_bytes
                    .fetch_sub(u64::from(old.len), Ordering::Relaxed);
                change.released.push(old);
                change.remove(k);
            } else if start < ce {
                let mut d = self.chunk_bytes(ino, idx, &k, &v)?;
                let a = (start.max(cs) - cs) as usize;
                let b = (end.min(ce) - cs) as usize;
                d[a..b].fill(0);
                change.released.push(old);
                rewrites.push((k.to_vec(), Cow::Owned(d)));
            }
        }
        if !rewrites.is_empty() {
            self.append_chunks(change, &rewrites)?;
        }
        Ok(())
    }

    /// With a quota: refuses (ENOSPC) to allocate `[offset, end)` when the bytes of it not
    /// stored yet do not fit. Nothing is reserved: space is taken by the writes.
    fn check_allocation(&self, ino: Ino, offset: u64, end: u64) -> FsResult<()> {
        let Some(limit) = self.limit() else {
            return Ok(());
        };
        if end <= offset {
            return Ok(());
        }
        let mut stored = 0u64;
        for item in self.chunks_in(
            ino,
            offset / CHUNK_SIZE,
            (end - 1) / CHUNK_SIZE,
            "allocating",
        ) {
            let (idx, _, v) = item?;
            let p = self.decode_ptr(ino, idx, &v)?;
            let cs = idx * CHUNK_SIZE;
            let (a, b) = (offset.max(cs), end.min(cs + u64::from(p.len)));
            stored += b.saturating_sub(a);
        }
        let need = (end - offset) - stored;
        if self.used_bytes.load(Ordering::Relaxed).saturating_add(need) > limit {
            return Err(FsError::NoSpace);
        }
        Ok(())
    }

    /// A data or namespace change: mtime strictly increases, even if the clock steps back
    /// or two changes share a timestamp, because other mounts' kernels drop cached pages
    /// only when they see mtime (or size) differ.
    fn touch(rec: &mut InodeRecord, now: Timestamp) {
        rec.mtime = later(rec.mtime, now);
        rec.ctime = now;
    }
}

impl FileSystem for SledFs {
    fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let d = self.get_dentry(parent, name)?.ok_or_else(|| {
            if self
                .get_inode(parent)
                .is_ok_and(|p| p.kind != FileKind::Directory)
            {
                FsError::NotDir
            } else {
                FsError::NotFound
            }
        })?;
        self.getattr(d.ino)
    }

    fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        Ok(attr_of(ino, &self.get_inode(ino)?))
    }

    fn setattr(&self, _ctx: &Ctx, ino: Ino, set: &SetAttr) -> FsResult<Attr> {
        let _l = self.stripe_locks(&[ino]);
        let mut rec = self.get_inode(ino)?;
        let now = Timestamp::now();
        let mut batch = Change::default();
        if let Some(mode) = set.mode {
            rec.perm = mode & 0o7777;
            if let Some(a) = self.get_xattr(ino, acl::ACCESS)? {
                let key = store::xattr_key(self.vol, ino, acl::ACCESS);
                batch.insert(key, acl::chmod(&a, rec.perm)?);
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            if let Some(uid) = set.uid {
                rec.uid = uid;
            }
            if let Some(gid) = set.gid {
                rec.gid = gid;
            }
            // chown clears setuid, and setgid when group-exec is set (as Linux does for
            // non-directories), unless the same call sets the mode explicitly.
            if set.mode.is_none() && rec.kind != FileKind::Directory {
                rec.perm &= !libc::S_ISUID;
                if rec.perm & libc::S_IXGRP != 0 {
                    rec.perm &= !libc::S_ISGID;
                }
            }
        }
        if let Some(size) = set.size {
            match rec.kind {
                FileKind::Regular => {}
                FileKind::Directory => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
            self.truncate_into(&mut batch, ino, &mut rec, size)?;
            rec.mtime = later(rec.mtime, now);
        }
        let resolve = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(t) => t,
        };
        if let Some(t) = set.atime {
            rec.atime = resolve(t);
        }
        if let Some(t) = set.mtime {
            rec.mtime = resolve(t);
        }
        rec.ctime = set.ctime.unwrap_or(now);
        batch.insert(store::inode_key(self.vol, ino), rec.encode());
        self.commit(batch, "changing attributes")?;
        Ok(attr_of(ino, &rec))
    }

    fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let r = self.get_inode(ino)?;
        if r.kind != FileKind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(r.target)
    }

    fn mknod(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let kind = FileKind::from_mode(mode).ok_or(FsError::Invalid)?;
        if kind == FileKind::Directory || kind == FileKind::Symlink {
            return Err(FsError::Invalid);
        }
        let rdev = if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
            rdev
        } else {
            0
        };
        self.create_node(
            ctx,
            parent,
            name,
            NewNode {
                kind,
                perm: mode,
                umask,
                rdev,
                target: b"",
            },
        )
    }

    fn mkdir(&self, ctx: &Ctx, parent: Ino, name: &[u8], mode: u32, umask: u32) -> FsResult<Attr> {
        self.create_node(
            ctx,
            parent,
            name,
            NewNode {
                kind: FileKind::Directory,
                perm: mode,
                umask,
                rdev: 0,
                target: b"",
            },
        )
    }

    fn symlink(&self, ctx: &Ctx, parent: Ino, name: &[u8], target: &[u8]) -> FsResult<Attr> {
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() > 4096 {
            return Err(FsError::NameTooLong);
        }
        self.create_node(
            ctx,
            parent,
            name,
            NewNode {
                kind: FileKind::Symlink,
                perm: 0o777,
                umask: 0,
                rdev: 0,
                target,
            },
        )
    }

    fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> FsResult<Attr> {
        check_name(newname)?;
        let _ns = lock(&self.namespace);
        let _l = self.stripe_locks(&[ino, newparent]);
        let mut dirty = self.load(&[ino, newparent])?;
        if dirty.get(newparent).kind != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        if dirty.get(ino).kind == FileKind::Directory {
            return Err(FsError::NotPermitted);
        }
        if dirty.get(ino).nlink == 0 {
            return Err(FsError::NotFound);
        }
        if dirty.get(ino).nlink == u32::MAX {
            return Err(FsError::TooManyLinks);
        }
        if self.get_dentry(newparent, newname)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Timestamp::now();
        let p = dirty.get(newparent);
        let cookie = p.next_cookie;
        p.next_cookie += 1;
        p.size += 1;
        Self::touch(p, now);
        let r = dirty.get(ino);
        r.nlink += 1;
        r.ctime = now;
        let kind = r.kind;
        let mut batch = Change::default();
        self.put_name(
            &mut batch,
            newparent,
            newname,
            DentryRecord { ino, kind, cookie },
        );
        self.put_all(&mut batch, &dirty);
        self.commit(batch, "linking")?;
        Ok(attr_of(ino, dirty.get(ino)))
    }

    fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        check_name(name)?;
        let _ns = lock(&self.namespace);
        let d = self.get_dentry(parent, name)?.ok_or(FsError::NotFound)?;
        let _l = self.stripe_locks(&[parent, d.ino]);
        let mut dirty = self.load(&[parent, d.ino])?;
        if dirty.get(d.ino).kind == FileKind::Directory {
            return Err(FsError::IsDir);
        }
        let now = Timestamp::now();
        let p = dirty.get(parent);
        p.size = p.size.saturating_sub(1);
        Self::touch(p, now);
        let r = dirty.get(d.ino);
        r.nlink = r.nlink.saturating_sub(1);
        r.ctime = now;
        let mut batch = Change::default();
        self.remove_name(&mut batch, parent, name, d.cookie);
        self.release_if_unlinked(&mut batch, &dirty, d.ino)?;
        self.put_all(&mut batch, &dirty);
        self.commit(batch, "unlinking")
    }

    fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid);
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        check_name(name)?;
        let _ns = lock(&self.namespace);
        let d = self.get_dentry(parent, name)?.ok_or(FsError::NotFound)?;
        let _l = self.stripe_locks(&[parent, d.ino]);
        let mut dirty = self.load(&[parent, d.ino])?;
        if dirty.get(d.ino).kind != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        if !self.dir_is_empty(d.ino)? {
            return Err(FsError::NotEmpty);
        }
        let now = Timestamp::now();
        let p = dirty.get(parent);
        p.size = p.size.saturating_sub(1);
        p.nlink = p.nlink.saturating_sub(1);
        Self::touch(p, now);
        let r = dirty.get(d.ino);
        r.nlink = 0;
        r.ctime = now;
        let mut batch = Change::default();
        self.remove_name(&mut batch, parent, name, d.cookie);
        self.release_if_unlinked(&mut batch, &dirty, d.ino)?;
        self.put_all(&mut batch, &dirty);
        self.commit(batch, "removing a directory")
    }

    fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        check_name(name)?;
        check_name(newname)?;
        if flags.exchange && flags.noreplace {
            return Err(FsError::Invalid);
        }
        let _ns = lock(&self.namespace);
        let src = self.get_dentry(parent, name)?.ok_or(FsError::NotFound)?;
        let dst = self.get_dentry(newparent, newname)?;
        let mut inos = vec![parent, newparent, src.ino];
        inos.extend(dst.map(|d| d.ino));
        let _l = self.stripe_locks(&inos);
        let mut dirty = self.load(&inos)?;
        if dirty.get(newparent).kind != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        let src_is_dir = src.kind == FileKind::Directory;
        let now = Timestamp::now();
        let mut batch = Change::default();

        if flags.exchange {
            let dst = dst.ok_or(FsError::NotFound)?;
            if dst.ino == src.ino {
                return Ok(());
            }
            let dst_is_dir = dst.kind == FileKind::Directory;
            self.put_name(
                &mut batch,
                parent,
                name,
                DentryRecord {
                    ino: dst.ino,
                    kind: dst.kind,
                    cookie: src.cookie,
                },
            );
            self.put_name(
                &mut batch,
                newparent,
                newname,
                DentryRecord {
                    ino: src.ino,
                    kind: src.kind,
                    cookie: dst.cookie,
                },
            );
            if parent != newparent {
                if src_is_dir {
                    dirty.get(parent).nlink -= 1;
                    dirty.get(newparent).nlink += 1;
                    dirty.get(src.ino).parent = newparent;
                }
                if dst_is_dir {
                    dirty.get(newparent).nlink -= 1;
                    dirty.get(parent).nlink += 1;
                    dirty.get(dst.ino).parent = parent;
                }
            }
            dirty.get(src.ino).ctime = now;
            dirty.get(dst.ino).ctime = now;
            Self::touch(dirty.get(parent), now);
            Self::touch(dirty.get(newparent), now);
            self.put_all(&mut batch, &dirty);
            return self.commit(batch, "exchanging names");
        }

        if let Some(d) = dst {
            if flags.noreplace {
                return Err(FsError::Exists);
            }
            if d.ino == src.ino {
                return Ok(());
            }
            let dst_is_dir = d.kind == FileKind::Directory;
            if src_is_dir && !dst_is_dir {
                return Err(FsError::NotDir);
            }
            if !src_is_dir && dst_is_dir {
                return Err(FsError::IsDir);
            }
            if dst_is_dir && !self.dir_is_empty(d.ino)? {
                return Err(FsError::NotEmpty);
            }
            batch.remove(store::readdir_key(self.vol, newparent, d.cookie));
            let np = dirty.get(newparent);
            np.size = np.size.saturating_sub(1);
            if dst_is_dir {
                np.nlink = np.nlink.saturating_sub(1);
                dirty.get(d.ino).nlink = 0;
            } else {
                let r = dirty.get(d.ino);
                r.nlink = r.nlink.saturating_sub(1);
            }
            dirty.get(d.ino).ctime = now;
        }
        let np = dirty.get(newparent);
        let cookie = np.next_cookie;
        np.next_cookie += 1;
        np.size += 1;
        // The new name first: a reader finds the file under one name or the other.
        self.put_name(
            &mut batch,
            newparent,
            newname,
            DentryRecord {
                ino: src.ino,
                kind: src.kind,
                cookie,
            },
        );
        self.remove_name(&mut batch, parent, name, src.cookie);
        let p = dirty.get(parent);
        p.size = p.size.saturating_sub(1);
        if src_is_dir && parent != newparent {
            dirty.get(parent).nlink -= 1;
            dirty.get(newparent).nlink += 1;
            dirty.get(src.ino).parent = newparent;
        }
        dirty.get(src.ino).ctime = now;
        Self::touch(dirty.get(parent), now);
        Self::touch(dirty.get(newparent), now);
        // The replaced inode goes only after the new name points elsewhere: a lookup of
        // `newname` always finds a file.
        if let Some(d) = dst {
            self.release_if_unlinked(&mut batch, &dirty, d.ino)?;
        }
        self.put_all(&mut batch, &dirty);
        self.commit(batch, "renaming")
    }

    fn open(&self, ino: Ino) -> FsResult<Attr> {
        let attr = self.getattr(ino)?;
        *lock(&self.open_handles).entry(ino).or_insert(0) += 1;
        Ok(attr)
    }

    fn release(&self, ino: Ino) -> FsResult<()> {
        let last = {
            let mut h = lock(&self.open_handles);
            match h.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    h.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if !last || self.handles_unknown.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.reclaim_if_orphan(ino)
    }

    fn forget(&self, ino: Ino) -> FsResult<()> {
        // Otherwise the last release already reclaimed it.
        if !self.handles_unknown.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.reclaim_if_orphan(ino)
    }

    fn inodes(&self) -> FsResult<Vec<Ino>> {
        self.scan(store::tag_prefix(self.vol, store::TAG_INODE))
            .map(|kv| {
                kv.map(|(k, _)| store::parse_inode_key(&k))
                    .map_err(|e| FsError::storage("listing inodes", e))
            })
            .filter_map(Result::transpose)
            .collect()
    }

    fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let rec = self.get_inode(ino)?;
        if rec.kind == FileKind::Directory {
            return Err(FsError::IsDir);
        }
        if offset >= rec.size || size == 0 {
            return Ok(Vec::new());
        }
        let end = rec.size.min(offset.saturating_add(u64::from(size)));
        let mut buf = vec![0u8; (end - offset) as usize];
        let last = (end - 1) / CHUNK_SIZE;
        for item in self.chunks_in(ino, offset / CHUNK_SIZE, last, "reading file data") {
            let (idx, k, v) = item?;
            let data = self.chunk_bytes(ino, idx, &k, &v)?;
            let cs = idx * CHUNK_SIZE;
            let a = offset.max(cs);
            let b = end.min(cs + data.len() as u64);
            if a < b {
                buf[(a - offset) as usize..(b - offset) as usize]
                    .copy_from_slice(&data[(a - cs) as usize..(b - cs) as usize]);
            }
        }
        Ok(buf)
    }

    fn write(&self, ino: Ino, offset: u64, data: &[u8], kill_suid: bool) -> FsResult<u32> {
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::TooBig)?;
        let _l = self.stripe_locks(&[ino]);
        let mut rec = self.get_inode(ino)?;
        if rec.kind != FileKind::Regular {
            return Err(if rec.kind == FileKind::Directory {
                FsError::IsDir
            } else {
                FsError::Invalid
            });
        }
        let mut change = Change::default();
        let mut grown: i64 = 0;
        let mut new_chunks = Vec::new();
        let mut idx = offset / CHUNK_SIZE;
        while idx * CHUNK_SIZE < end {
            let cs = idx * CHUNK_SIZE;
            let a = offset.max(cs);
            let b = end.min(cs + CHUNK_SIZE);
            let src = &data[(a - offset) as usize..(b - offset) as usize];
            let key = store::chunk_key(self.vol, ino, idx);
            let new = if a == cs && b == cs + CHUNK_SIZE {
                let old = self
                    .get(&key)
                    .map_err(|e| FsError::storage("reading file data", e))?;
                if let Some(v) = old {
                    let p = self.decode_ptr(ino, idx, &v)?;
                    grown -= i64::from(p.len);
                    change.released.push(p);
                }
                grown += CHUNK_SIZE as i64;
                Cow::Borrowed(src)
            } else {
                let (mut buf, old_len) = match self.read_chunk(ino, idx)? {
                    Some((d, p)) => {
                        change.released.push(p);
                        let l = d.len();
                        (d, l)
                    }
                    None => (Vec::new(), 0),
                };
                let need = (b - cs) as usize;
                if buf.len() < need {
                    buf.resize(need, 0);
                }
                buf[(a - cs) as usize..need].copy_from_slice(src);
                grown += buf.len() as i64 - old_len as i64;
                Cow::Owned(buf)
            };
            new_chunks.push((key, new));
            idx += 1;
        }
        let reserved = self.reserve(grown.max(0) as u64)?;
        if let Err(e) = self.append_chunks(&mut change, &new_chunks) {
            self.unreserve(reserved);
            return Err(e);
        }
        rec.size = rec.size.max(end);
        rec.stored = (rec.stored as i64 + grown).max(0) as u64;
        let now = Timestamp::now();
        Self::touch(&mut rec, now);
        if kill_suid {
            rec.perm &= !libc::S_ISUID;
            if rec.perm & libc::S_IXGRP != 0 {
                rec.perm &= !libc::S_ISGID;
            }
        }
        change.insert(store::inode_key(self.vol, ino), rec.encode());
        self.commit(change, "writing file data")
            .inspect_err(|_| self.unreserve(reserved))?;
        if grown < 0 {
            self.used_bytes
                .fetch_sub(grown.unsigned_abs(), Ordering::Relaxed);
        }
        Ok(data.len() as u32)
    }

    fn readdir(&self, ino: Ino, cookie: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        let rec = self.get_inode(ino)?;
        if rec.kind != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        let mut out = Vec::new();
        if cookie < 1 {
            out.push(DirEntry {
                ino,
                kind: FileKind::Directory,
                name: b".".to_vec(),
                cookie: 1,
            });
        }
        if cookie < 2 {
            out.push(DirEntry {
                ino: rec.parent,
                kind: FileKind::Directory,
                name: b"..".to_vec(),
                cookie: 2,
            });
        }
        let start = store::readdir_key(self.vol, ino, cookie.max(2).saturating_add(1));
        let end = store::readdir_key(self.vol, ino, u64::MAX);
        for item in self.range_incl(start, end) {
            if out.len() >= max {
                break;
            }
            let (k, v) = item.map_err(|e| FsError::storage("listing a directory", e))?;
            let (Some(cookie), Some((child, kind, name))) =
                (store::parse_readdir_key(&k), store::decode_readdir(&v))
            else {
                tracing::error!(volume = %self.name, dir = ino, "corrupt readdir index entry");
                return Err(FsError::Io(format!("corrupt entry in directory {ino}")));
            };
            out.push(DirEntry {
                ino: child,
                kind,
                name: name.to_vec(),
                cookie,
            });
        }
        Ok(out)
    }

    fn statfs(&self) -> FsResult<StatFs> {
        const BSIZE: u64 = 4096;
        let host = nix::sys::statvfs::statvfs(self.store.dir().as_path()).map_err(|e| {
            tracing::error!("statvfs of the store directory: {e}");
            FsError::Io(e.to_string())
        })?;
        let avail = host.blocks_available() * host.fragment_size();
        let used = self.used_bytes.load(Ordering::Relaxed);
        let inodes = self.inodes.load(Ordering::Relaxed);
        let mut free_blocks = avail / BSIZE;
        let mut blocks = used.div_ceil(BSIZE) + free_blocks;
        if let Some(limit) = self.limit() {
            // With a quota the volume looks like a disk of that size (though never with
            // more room than the host has).
            blocks = limit / BSIZE;
            free_blocks = free_blocks.min(limit.saturating_sub(used) / BSIZE);
        }
        Ok(StatFs {
            blocks,
            bfree: free_blocks,
            bavail: free_blocks,
            files: inodes + free_blocks,
            ffree: free_blocks,
            bsize: BSIZE as u32,
            namelen: NAME_MAX as u32,
        })
    }

    fn setxattr(
        &self,
        _ctx: &Ctx,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> FsResult<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let _l = self.stripe_locks(&[ino]);
        let mut rec = self.get_inode(ino)?;
        let key = store::xattr_key(self.vol, ino, name);
        let exists = self
            .store
            .fs
            .contains_key(&key)
            .map_err(|e| FsError::storage("reading an xattr", e))?;
        let mut batch = Change::default();
        if name == acl::ACCESS {
            let (perm, minimal) = acl::validate(value)?;
            rec.perm = (rec.perm & !0o777) | perm;
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(FsError::Exists);
            }
            if minimal {
                batch.remove(key);
            } else {
                batch.insert(key, value);
            }
        } else {
            if name == acl::DEFAULT {
                if rec.kind != FileKind::Directory {
                    return Err(FsError::Access);
                }
                acl::validate(value)?;
            }
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(FsError::Exists);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(FsError::NoData);
            }
            batch.insert(key, value);
        }
        rec.ctime = Timestamp::now();
        batch.insert(store::inode_key(self.vol, ino), rec.encode());
        self.commit(batch, "setting an xattr")
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        check_xattr_name(name)?;
        self.get_inode(ino)?;
        self.get_xattr(ino, name)?
            .map(|v| v.to_vec())
            .ok_or(FsError::NoData)
    }

    fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>> {
        self.get_inode(ino)?;
        let prefix = store::xattr_prefix(self.vol, ino);
        let mut out = Vec::new();
        for kv in self.scan(prefix.clone()) {
            let (k, _) = kv.map_err(|e| FsError::storage("listing xattrs", e))?;
            out.extend_from_slice(&k[prefix.len()..]);
            out.push(0);
        }
        Ok(out)
    }

    fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        check_xattr_name(name)?;
        let _l = self.stripe_locks(&[ino]);
        let mut rec = self.get_inode(ino)?;
        let key = store::xattr_key(self.vol, ino, name);
        if self.get_xattr(ino, name)?.is_none() {
            return Err(FsError::NoData);
        }
        rec.ctime = Timestamp::now();
        let mut batch = Change::default();
        batch.remove(key);
        batch.insert(store::inode_key(self.vol, ino), rec.encode());
        self.commit(batch, "removing an xattr")
    }

    fn fallocate(&self, ino: Ino, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let end = offset
            .checked_add(length)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::TooBig)?;
        let keep_size = mode & falloc::KEEP_SIZE != 0;
        let op = mode & !falloc::KEEP_SIZE;
        let _l = self.stripe_locks(&[ino]);
        let mut rec = self.get_inode(ino)?;
        if rec.kind != FileKind::Regular {
            return Err(FsError::Invalid);
        }
        let mut batch = Change::default();
        match op {
            0 => self.check_allocation(ino, offset, end)?,
            falloc::PUNCH_HOLE if keep_size => {
                self.punch_into(&mut batch, ino, &mut rec, offset, end)?;
            }
            falloc::ZERO_RANGE => {
                self.punch_into(&mut batch, ino, &mut rec, offset, end)?;
            }
            falloc::PUNCH_HOLE => return Err(FsError::Invalid),
            _ => return Err(FsError::Unsupported),
        }
        let now = Timestamp::now();
        if !keep_size && end > rec.size {
            rec.size = end;
            rec.mtime = later(rec.mtime, now);
        }
        if op != 0 {
            rec.mtime = later(rec.mtime, now);
        }
        rec.ctime = now;
        batch.insert(store::inode_key(self.vol, ino), rec.encode());
        self.commit(batch, "allocating file space")
    }

    fn lseek(&self, ino: Ino, offset: u64, whence: i32) -> FsResult<u64> {
        let rec = self.get_inode(ino)?;
        if offset >= rec.size {
            return Err(FsError::NoSeekData);
        }
        let mut expect = offset / CHUNK_SIZE;
        for item in self.chunks_in(ino, offset / CHUNK_SIZE, u64::MAX, "seeking in a file") {
            let (idx, _, _) = item?;
            match whence {
                libc::SEEK_DATA => return Ok(offset.max(idx * CHUNK_SIZE)),
                libc::SEEK_HOLE if idx != expect => break,
                _ => expect = idx + 1,
            }
        }
        match whence {
            libc::SEEK_DATA => Err(FsError::NoSeekData),
            libc::SEEK_HOLE => Ok(offset.max(expect * CHUNK_SIZE).min(rec.size)),
            _ => Err(FsError::Invalid),
        }
    }

    fn sync(&self) -> FsResult<()> {
        self.store.sync()
    }
}

fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(FsError::Range);
    }
    const NAMESPACES: [&[u8]; 4] = [b"user.", b"trusted.", b"security.", b"system."];
    if !NAMESPACES.iter().any(|ns| name.starts_with(ns)) {
        return Err(FsError::Unsupported);
    }
    if name.starts_with(b"system.") && name != acl::ACCESS && name != acl::DEFAULT {
        return Err(FsError::Unsupported);
    }
    Ok(())
}

/// Opens (creating it the first time) volume `vol` of a store under `root` whose
/// segments roll at 256 KiB, for tests.
#[cfg(test)]
pub(crate) fn test_volume(root: &std::path::Path, vol: u64) -> (Store, SledFs) {
    let store = Store::open_with(root, 256 * 1024).expect("store");
    if store
        .fs
        .get(store::inode_key(vol, ROOT_INO))
        .ok()
        .flatten()
        .is_none()
    {
        SledFs::init_volume(&store, vol, 0, 0, 0o755).expect("init");
    }
    let fs = SledFs::open(store.clone(), vol, "t").expect("open");
    (store, fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Ctx = Ctx::ROOT;

    fn volume(root: &std::path::Path) -> SledFs {
        super::test_volume(root, 1).1
    }

    #[test]
    fn compaction_frees_overwritten_segments_and_keeps_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let want: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let ino = {
            let fs = volume(dir.path());
            let a = fs
                .mknod(&CTX, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, 0)
                .expect("create");
            for round in 0..10u8 {
                let mut data = want.clone();
                data[0] = round;
                fs.write(a.ino, 0, &data, false).expect("write");
            }
            fs.write(a.ino, 0, &want, false).expect("write");
            let before = fs.store.chunks.disk_bytes();
            assert!(before > 10 * 1_000_000, "{before}");
            let freed = fs.store.collect_garbage().expect("gc");
            let after = fs.store.chunks.disk_bytes();
            assert!(
                freed > 0 && after < 3 * 1_000_000,
                "before {before} after {after}"
            );
            assert_eq!(fs.read(a.ino, 0, 2_000_000).expect("read"), want);
            fs.sync().expect("sync");
            a.ino
        };
        let fs = volume(dir.path());
        assert_eq!(fs.read(ino, 0, 2_000_000).expect("read"), want);
        assert_eq!(fs.getattr(ino).expect("attr").size, want.len() as u64);
    }

    #[test]
    fn quota_refuses_growth_past_the_limit_and_statfs_shows_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = volume(dir.path());
        let limit = 64 * 1024;
        fs.set_limit(Some(limit));
        assert_eq!(fs.limit(), Some(limit));
        let a = fs
            .mknod(&CTX, ROOT_INO, b"a", libc::S_IFREG | 0o644, 0, 0)
            .expect("create");
        let s = fs.statfs().expect("statfs");
        assert_eq!((s.blocks, s.bfree, s.bavail), (16, 16, 16));
        // Exactly the limit fits, in pieces that cross chunk boundaries.
        fs.write(a.ino, 0, &vec![1u8; 40_000], false)
            .expect("write");
        fs.write(a.ino, 40_000, &vec![2u8; 25_536], false)
            .expect("write to the limit");
        assert_eq!(fs.usage().bytes, limit);
        assert_eq!(fs.write(a.ino, limit, b"x", false), Err(FsError::NoSpace));
        // Overwriting stored bytes takes no more room.
        fs.write(a.ino, 100, &[9u8; 5000], false)
            .expect("overwrite");
        assert_eq!(fs.statfs().expect("statfs").bfree, 0);
        // A full volume takes no new file, and a symlink target needs room.
        assert_eq!(
            fs.mknod(&CTX, ROOT_INO, b"b", libc::S_IFREG | 0o644, 0, 0),
            Err(FsError::NoSpace)
        );
        assert_eq!(fs.fallocate(a.ino, limit, 1, 0), Err(FsError::NoSpace));
        assert_eq!(fs.getattr(a.ino).expect("attr").size, limit);
        // Freeing bytes gives room back.
        fs.unlink(ROOT_INO, b"a").expect("unlink");
        assert_eq!(fs.usage().bytes, 0);
        assert_eq!(
            fs.symlink(&CTX, ROOT_INO, b"l", &vec![b'x'; 4000])
                .map(|_| ()),
            Ok(())
        );
        assert_eq!(fs.usage().bytes, 4000);
        let c = fs
            .mknod(&CTX, ROOT_INO, b"c", libc::S_IFREG | 0o644, 0, 0)
            .expect("create after freeing");
        assert_eq!(
            fs.fallocate(c.ino, 0, limit - 3999, 0),
            Err(FsError::NoSpace)
        );
        fs.fallocate(c.ino, 0, limit - 4000, 0)
            .expect("fallocate what fits");
        let room = (limit - 4000) as usize;
        assert_eq!(
            fs.write(c.ino, 0, &vec![3u8; room + 1], false),
            Err(FsError::NoSpace)
        );
        fs.write(c.ino, 0, &vec![3u8; room], false)
            .expect("write what fits");
        assert_eq!(fs.usage().bytes, limit);
        let s = fs.statfs().expect("statfs");
        assert_eq!((s.blocks, s.bfree), (16, 0));
        // Without a limit the host's free space counts again.
        fs.set_limit(None);
        fs.write(c.ino, limit, b"more", false).expect("no quota");
    }

    #[test]
    fn truncate_punch_and_seek_agree_with_a_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = volume(dir.path());
        let a = fs
            .mknod(&CTX, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, 0)
            .expect("create");
        let mut model = vec![0u8; 0];
        let put = |model: &mut Vec<u8>, off: usize, data: &[u8]| {
            if model.len() < off + data.len() {
                model.resize(off + data.len(), 0);
            }
            model[off..off + data.len()].copy_from_slice(data);
        };
        let block: Vec<u8> = (0..40_000u32).map(|i| (i % 7 + 1) as u8).collect();
        fs.write(a.ino, 100_000, &block, false).expect("write");
        put(&mut model, 100_000, &block);
        fs.fallocate(
            a.ino,
            110_000,
            5_000,
            falloc::PUNCH_HOLE | falloc::KEEP_SIZE,
        )
        .expect("punch");
        model[110_000..115_000].fill(0);
        let set = SetAttr {
            size: Some(130_001),
            ..SetAttr::default()
        };
        fs.setattr(&CTX, a.ino, &set).expect("truncate");
        model.truncate(130_001);
        assert_eq!(fs.read(a.ino, 0, 1 << 20).expect("read"), model);
        assert_eq!(fs.lseek(a.ino, 0, libc::SEEK_DATA), Ok(6 * CHUNK_SIZE));
        assert_eq!(fs.lseek(a.ino, 0, libc::SEEK_HOLE), Ok(0));
        assert_eq!(fs.lseek(a.ino, 100_000, libc::SEEK_HOLE), Ok(130_001));
        assert_eq!(
            fs.lseek(a.ino, 200_000, libc::SEEK_DATA),
            Err(FsError::NoSeekData)
        );
    }
}
