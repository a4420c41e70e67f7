//! `fsck`: checks that a volume's keys (table in `crate::store`) hold every invariant the
//! filesystem (`crate::vfs::SledFs`) and the snapshot machinery (`crate::snap`) keep, and
//! repairs what can be repaired without guessing.
//!
//! What is checked, per view (the live volume, or one snapshot read through
//! [`Store::range_at`] / [`Store::get_at`], so each snapshot is checked as a consistent tree):
//! - every inode record decodes, the root exists and is a directory;
//! - every entry (`d`) decodes, sits in an existing directory and names an existing inode of
//!   the kind it records; a directory has exactly one name (the root none) and its `parent`
//!   is the directory holding that name;
//! - the readdir index (`r`) and the entries correspond one to one (same name, inode, kind
//!   and cookie), cookies are unique per directory, at least [`FIRST_COOKIE`] and below the
//!   directory's `next_cookie`;
//! - a directory's size is its number of entries and its link count 2 plus its
//!   subdirectories; any other inode's link count is the number of entries naming it;
//! - every inode is reachable from the root, or unlinked while open: link count 0, no name,
//!   and an orphan key (`o`); no orphan key marks a missing or linked inode;
//! - chunks (`c`) belong to regular files, their pointers decode, no chunk holds bytes at
//!   or past the file's size, `stored` is the sum of the chunks' lengths (the quota counts
//!   `stored` plus symlink targets), and every chunk's checksum verifies (read through
//!   `ChunkStore::read`);
//! - a symlink's size is its target's length; xattrs (`x`) belong to existing inodes.
//!
//! Per volume, on the raw keys: snapshot records (`T`) decode; every layer entry (`S`)
//! belongs to an existing snapshot record, decodes, and its chunk version verifies (each
//! chunk version is read once: live ones by the live check, the others here); no key has
//! an unknown tag. For the store (`fsck --all`): doomed marks, interrupted changes, and
//! keys of volume ids that no name reaches and no doomed mark covers.
//!
//! Memory: the check keeps every inode record and every entry (with its name) of the view
//! in memory, so it is O(inodes + entries); chunks and xattrs are streamed.
//!
//! [`repair`] works on the live volume only (snapshots are read-only) and must not run
//! while the volume is mounted (open files make orphans legitimate, and the mount's
//! caches would go stale): the registry refuses it then. Every change goes through
//! [`Store::commit_change`], so snapshots keep their pre-images.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

use crate::chunks::{ChunkPtr, ReadError};
use crate::snap::SnapshotRecord;
use crate::store::{
    self, CHUNK_SIZE, DentryRecord, FIRST_COOKIE, FileKind, InodeRecord, Op, ROOT_INO, Store,
    Timestamp,
};

/// What is wrong, as a category (the test suite and `repair` match on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The store could not be read.
    Storage,
    MissingRoot,
    /// A record that does not decode.
    BadRecord,
    /// A key of no known shape.
    UnknownKey,
    /// An entry naming an inode that does not exist.
    DanglingEntry,
    /// An entry in something that is not an existing directory.
    EntryOutsideDirectory,
    /// An entry recording another kind than its inode's.
    WrongEntryKind,
    /// An entry without its readdir index key.
    MissingIndex,
    /// A readdir index key without its entry, or disagreeing with it.
    StrayIndex,
    /// A cookie repeated in a directory, below the first, or not below `next_cookie`.
    BadCookie,
    /// Neither reachable from the root nor unlinked while open.
    Unreachable,
    /// An orphan key on an inode that still has names.
    LinkedOrphan,
    /// An orphan key or xattr of an inode that does not exist.
    StrayKey,
    WrongLinkCount,
    WrongDirSize,
    WrongParent,
    /// A directory with more than one name.
    DirectoryLinkedTwice,
    WrongSymlinkSize,
    /// A chunk holding bytes at or past the file's size.
    ChunkPastSize,
    /// A chunk pointer that does not decode, or an impossible length.
    BadChunk,
    /// A chunk whose bytes do not match their checksum (or cannot be read).
    CorruptChunk,
    /// A chunk of an inode that does not exist or is not a regular file.
    StrayChunk,
    /// `stored` differs from the sum of the chunks' lengths.
    WrongStored,
    /// A layer entry of a snapshot that has no record.
    StrayLayer,
    /// A doomed mark, an interrupted change, or keys of a volume id nothing names.
    StoreState,
}

/// One problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The snapshot the problem is in; `None`: the live volume.
    pub snapshot: Option<String>,
    pub ino: Option<u64>,
    /// The inode's path, when a name reaches it.
    pub path: Option<String>,
    /// The key at fault, rendered by [`show_key`].
    pub key: String,
    pub detail: String,
}

impl Problem {
    /// The problem as one line naming volume `volume`.
    pub fn line(&self, volume: &str) -> String {
        let mut s = volume.to_string();
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s.push_str(": ");
        if let Some(ino) = self.ino {
            s.push_str(&format!("inode {ino}"));
            if let Some(p) = &self.path {
                s.push_str(&format!(" ({p})"));
            }
            s.push_str(": ");
        }
        s.push_str(&self.detail);
        if !self.key.is_empty() {
            s.push_str(&format!(" [key {}]", self.key));
        }
        s
    }
}

/// What [`check_volume`] (or [`check`]) found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub volume: String,
    pub problems: Vec<Problem>,
    pub inodes: u64,
    pub entries: u64,
    pub chunks: u64,
    /// Chunk bytes read and verified.
    pub bytes: u64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Every problem as one line.
    pub fn lines(&self) -> Vec<String> {
        self.problems.iter().map(|p| p.line(&self.volume)).collect()
    }

    /// The kinds found, sorted, for tests.
    pub fn kinds(&self) -> Vec<ProblemKind> {
        let mut k: Vec<ProblemKind> = self.problems.iter().map(|p| p.kind).collect();
        k.sort();
        k
    }

    fn absorb(&mut self, other: Report) {
        self.problems.extend(other.problems);
        self.inodes += other.inodes;
        self.entries += other.entries;
        self.chunks += other.chunks;
        self.bytes += other.bytes;
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in self.lines() {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

/// A key made readable: `VOL/TAG/ID/rest` with the rest as an escaped string or number.
pub fn show_key(key: &[u8]) -> String {
    if key.len() < 17 {
        return format!("{key:02x?}");
    }
    let n = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    let mut s = format!("{}/{}/{}", n(&key[..8]), key[8] as char, n(&key[9..17]));
    let rest = &key[17..];
    match key[8] {
        store::TAG_READDIR | store::TAG_CHUNK if rest.len() == 8 => {
            s.push_str(&format!("/{}", n(rest)));
        }
        store::TAG_LAYER => s.push_str(&format!("/{}", show_key(&store::layer_key_origin(0, key)))),
        _ if !rest.is_empty() => s.push_str(&format!("/{}", rest.escape_ascii())),
        _ => {}
    }
    s
}

/// One name in a directory, as the scan found it.
#[derive(Debug, Clone)]
struct Entry {
    parent: u64,
    name: Vec<u8>,
    ino: u64,
    kind: FileKind,
    cookie: u64,
    /// Its readdir index key agrees with it.
    indexed: bool,
    /// Still present (repair removes entries).
    live: bool,
    /// Made by the repair (in `/lost+found`).
    fresh: bool,
}

/// A chunk found holding bytes at or past its file's size: `(key, index, pointer)`.
type PastSize = (Vec<u8>, u64, ChunkPtr);

/// Everything one view's scan collected; `repair` works from it.
#[derive(Default)]
struct Scan {
    snapshot: Option<String>,
    inodes: BTreeMap<u64, InodeRecord>,
    entries: Vec<Entry>,
    /// Entry indices naming each inode (entries in existing directories only).
    names: HashMap<u64, Vec<usize>>,
    /// Sum of chunk lengths per inode.
    stored: HashMap<u64, u64>,
    orphans: HashSet<u64>,
    past_size: Vec<(u64, PastSize)>,
    /// Keys to delete outright: stray chunks, xattrs and orphan keys, bad pointers,
    /// stray index keys.
    stray: Vec<Vec<u8>>,
    problems: Vec<Problem>,
    chunks: u64,
    bytes: u64,
}

impl Scan {
    fn path(&self, ino: u64) -> Option<String> {
        if ino == ROOT_INO {
            return Some("/".into());
        }
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == ROOT_INO {
                parts.reverse();
                let mut p = String::new();
                for part in parts {
                    p.push('/');
                    p.push_str(&String::from_utf8_lossy(part));
                }
                return Some(p);
            }
            let e = &self.entries[*self.names.get(&cur)?.first()?];
            parts.push(e.name.as_slice());
            cur = e.parent;
        }
        None
    }

    fn problem(&mut self, kind: ProblemKind, ino: Option<u64>, key: &[u8], detail: String) {
        let path = ino.and_then(|i| self.path(i));
        self.problems.push(Problem {
            kind,
            snapshot: self.snapshot.clone(),
            ino,
            path,
            key: if key.is_empty() {
                String::new()
            } else {
                show_key(key)
            },
            detail,
        });
    }
}

pub(crate) fn be(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]))
}

/// Reads and verifies chunk version `ptr`, checksummed under `crc_key`, found at `at_key`
/// (which `current` reads again). A version that moved or went while it was read (a write,
/// the compactor, a snapshot merge) is followed, so a live volume checks without false
/// alarms. `Ok(bytes)` verified (0 when the key is gone), `Err(why)` corrupt.
pub(crate) fn verify_chunk(
    store: &Store,
    crc_key: &[u8],
    mut ptr: ChunkPtr,
    current: impl Fn() -> Option<Option<ChunkPtr>>,
) -> Result<u64, String> {
    for _ in 0..8 {
        let failure = match store.chunks.read(crc_key, &ptr) {
            Ok(Some(d)) => return Ok(d.len() as u64),
            Ok(None) => format!("its segment {:016x}.seg is missing", ptr.seg),
            Err(ReadError::Corrupt) => format!(
                "checksum mismatch ({} bytes at offset {} of segment {:016x}.seg)",
                ptr.len, ptr.off, ptr.seg
            ),
            Err(ReadError::Io(e)) => format!("unreadable: {e}"),
        };
        match current() {
            // The key now points elsewhere, or is gone: check what it holds now.
            Some(Some(p)) if p != ptr => ptr = p,
            Some(None) => return Ok(0),
            _ => return Err(failure),
        }
    }
    Ok(0)
}

/// [`verify_chunk`] of the chunk version `ptr` that snapshot layer key `lk` holds for the
/// chunk key `origin`.
pub(crate) fn verify_layer_chunk(
    store: &Store,
    lk: &[u8],
    origin: &[u8],
    ptr: ChunkPtr,
) -> Result<u64, String> {
    let current = || {
        store
            .fs
            .get(lk)
            .ok()
            .map(|v| v.as_deref().and_then(crate::snap::decode_pre_ptr))
    };
    verify_chunk(store, origin, ptr, current)
}

/// Checks one view of volume `vol` (named `name`): the live volume (`at` None) or snapshot
/// `at`, as a tree, reading and verifying every chunk it points at.
pub fn check(store: &Store, vol: u64, name: &str, at: Option<u64>) -> Report {
    let snapshot = at.map(|id| snapshot_name(store, vol, id));
    let scan = scan(store, vol, at, snapshot, true);
    report_of(name, scan)
}

fn report_of(name: &str, s: Scan) -> Report {
    Report {
        volume: name.to_string(),
        inodes: s.inodes.len() as u64,
        entries: s.entries.len() as u64,
        chunks: s.chunks,
        bytes: s.bytes,
        problems: s.problems,
    }
}

fn snapshot_name(store: &Store, vol: u64, id: u64) -> String {
    store
        .fs
        .get(store::snapshot_key(vol, id))
        .ok()
        .flatten()
        .and_then(|v| SnapshotRecord::decode(&v))
        .map_or_else(|| format!("#{id}"), |r| r.name)
}

/// Checks everything of volume `vol`: the snapshot machinery on the raw keys, the tree
/// `view` (the live volume, or a snapshot of it taken for the check when it is in use),
/// and the tree of every snapshot. Each chunk version is read once.
pub fn check_volume(store: &Store, vol: u64, name: &str, view: Option<u64>) -> Report {
    let mut report = Report {
        volume: name.to_string(),
        ..Report::default()
    };
    let mut raw = Scan::default();
    check_raw(store, vol, &mut raw);
    report.chunks += raw.chunks;
    report.bytes += raw.bytes;
    report.problems.extend(raw.problems);
    let mut main = scan(store, vol, view, None, true);
    // A snapshot taken for the check stands for the live volume.
    main.problems.iter_mut().for_each(|p| p.snapshot = None);
    report.absorb(report_of(name, main));
    let snaps = store.snapshots(vol).unwrap_or_default();
    for (id, rec) in snaps {
        if rec.deleting || rec.temporary || Some(id) == view {
            continue;
        }
        // Chunk versions are verified by the live check and the layer scan.
        let s = scan(store, vol, Some(id), Some(rec.name.clone()), false);
        report.problems.extend(s.problems);
    }
    report
}

/// What [`check_store`] found: problems, and notes on work in progress (doomed volumes
/// being purged, changes being applied) that are no damage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCheck {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

/// Problems of the store as a whole: doomed marks (removals not finished), interrupted
/// changes, and keys of volume ids that no volume name reaches.
pub fn check_store(store: &Store) -> StoreCheck {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let doomed = match store.doomed() {
        Ok(d) => d,
        Err(e) => {
            out.push(format!("store: {e}"));
            Vec::new()
        }
    };
    for (vol, rec) in &doomed {
        notes.push(format!(
            "store: volume id {vol} ({}) is marked for removal ({:?}); its keys are purged \
             in the background",
            rec.name, rec.reason
        ));
    }
    match store.pending_intents() {
        Ok(0) => {}
        Ok(n) => notes.push(format!(
            "store: {n} change(s) in progress or interrupted (finished at the next start)"
        )),
        Err(e) => out.push(format!("store: {e}")),
    }
    let mut known: HashSet<u64> = doomed.iter().map(|(v, _)| *v).collect();
    for item in store.volumes.iter() {
        match item {
            Ok((_, v)) => {
                if let Ok(r) = store::VolumeRecord::decode(&v) {
                    known.insert(r.id);
                }
            }
            Err(e) => out.push(format!("store: listing volumes: {e}")),
        }
    }
    let mut next: Vec<u8> = Vec::new();
    loop {
        let first = match store.fs.range(next.clone()..).next() {
            None => break,
            Some(Err(e)) => {
                out.push(format!("store: listing volume ids: {e}"));
                break;
            }
            Some(Ok((k, _))) => k,
        };
        let Some(prefix) = first.get(..8) else {
            out.push(format!(
                "store: a key too short to name a volume: {first:02x?}"
            ));
            next = first.to_vec();
            next.push(0);
            continue;
        };
        let vol = be(prefix);
        if !known.contains(&vol) {
            let n = store.fs.scan_prefix(prefix).count();
            out.push(format!(
                "store: {n} key(s) of volume id {vol}, which no volume name reaches"
            ));
        }
        next = store::prefix_end(prefix);
    }
    StoreCheck {
        problems: out,
        notes,
    }
}

/// Snapshot records and layers, and unknown tags, from the raw keys of `vol`.
fn check_raw(store: &Store, vol: u64, s: &mut Scan) {
    let mut records = HashMap::new();
    for item in store
        .fs
        .scan_prefix(store::tag_prefix(vol, store::TAG_SNAPSHOT))
    {
        let Ok((k, v)) = item else {
            s.problem(
                ProblemKind::Storage,
                None,
                &[],
                "listing snapshots failed".into(),
            );
            return;
        };
        match (k.len() == 17, SnapshotRecord::decode(&v)) {
            (true, Some(r)) => {
                records.insert(be(&k[9..17]), r.name);
            }
            _ => s.problem(
                ProblemKind::BadRecord,
                None,
                &k,
                "snapshot record does not decode".into(),
            ),
        }
    }
    for item in store
        .fs
        .scan_prefix(store::tag_prefix(vol, store::TAG_LAYER))
    {
        let Ok((lk, v)) = item else {
            s.problem(
                ProblemKind::Storage,
                None,
                &[],
                "listing layers failed".into(),
            );
            return;
        };
        if lk.len() < 18 {
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &lk,
                "layer key too short".into(),
            );
            continue;
        }
        let snap = be(&lk[9..17]);
        let origin = store::layer_key_origin(vol, &lk);
        let ino = (origin.len() >= 17).then(|| be(&origin[9..17]));
        let Some(name) = records.get(&snap) else {
            s.problem(
                ProblemKind::StrayLayer,
                ino,
                &lk,
                format!("layer entry of snapshot id {snap}, which has no record"),
            );
            s.stray.push(lk.to_vec());
            continue;
        };
        if !matches!(v.first(), Some(0 | 1)) {
            s.problem(
                ProblemKind::BadRecord,
                ino,
                &lk,
                format!("pre-image in snapshot {name} does not decode"),
            );
            continue;
        }
        if origin.len() == 25 && origin[8] == store::TAG_CHUNK && v[0] == 1 {
            let Some(ptr) = crate::snap::decode_pre_ptr(&v) else {
                s.problem(
                    ProblemKind::BadChunk,
                    ino,
                    &lk,
                    format!("chunk pointer in snapshot {name} does not decode"),
                );
                continue;
            };
            s.chunks += 1;
            match verify_layer_chunk(store, &lk, &origin, ptr) {
                Ok(n) => s.bytes += n,
                Err(why) => s.problem(
                    ProblemKind::CorruptChunk,
                    ino,
                    &lk,
                    format!(
                        "chunk at offset {} in snapshot {name}: {why}",
                        be(&origin[17..25]) * CHUNK_SIZE
                    ),
                ),
            }
        }
    }
    // Tags nothing writes.
    let mut next = vol.to_be_bytes().to_vec();
    let end = store::prefix_end(&vol.to_be_bytes());
    loop {
        let Some(Ok((k, _))) = store.fs.range(next.clone()..end.clone()).next() else {
            break;
        };
        let Some(&tag) = k.get(8) else {
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &k,
                "key without a tag".into(),
            );
            next = k.to_vec();
            next.push(0);
            continue;
        };
        let known = [
            store::TAG_INODE,
            store::TAG_DENTRY,
            store::TAG_READDIR,
            store::TAG_CHUNK,
            store::TAG_XATTR,
            store::TAG_ORPHAN,
            store::TAG_LAYER,
            store::TAG_SNAPSHOT,
        ];
        let prefix = store::tag_prefix(vol, tag);
        if !known.contains(&tag) {
            let n = store.fs.scan_prefix(&prefix).count();
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &k,
                format!("{n} key(s) with the unknown tag {:?}", tag as char),
            );
        }
        next = store::prefix_end(&prefix);
    }
}

/// Scans one view of `vol`; `verify` reads every chunk.
fn scan(store: &Store, vol: u64, at: Option<u64>, snapshot: Option<String>, verify: bool) -> Scan {
    let mut s = Scan {
        snapshot,
        ..Scan::default()
    };
    let range = |tag: u8| {
        let p = store::tag_prefix(vol, tag);
        let end = store::prefix_end(&p);
        store.range_at(vol, at, p, end)
    };
    macro_rules! next_kv {
        ($item:expr, $what:expr) => {
            match $item {
                Ok(kv) => kv,
                Err(e) => {
                    s.problem(
                        ProblemKind::Storage,
                        None,
                        &[],
                        format!("reading {} failed: {e}", $what),
                    );
                    return s;
                }
            }
        };
    }

    // Inodes.
    for item in range(store::TAG_INODE) {
        let (k, v) = next_kv!(item, "inodes");
        let Some(ino) = store::parse_inode_key(&k) else {
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &k,
                "malformed inode key".into(),
            );
            continue;
        };
        match InodeRecord::decode(&v) {
            Some(r) => {
                s.inodes.insert(ino, r);
            }
            None => s.problem(
                ProblemKind::BadRecord,
                Some(ino),
                &k,
                "inode record does not decode".into(),
            ),
        }
    }
    match s.inodes.get(&ROOT_INO).map(|r| r.kind) {
        Some(FileKind::Directory) => {}
        Some(k) => s.problem(
            ProblemKind::MissingRoot,
            Some(ROOT_INO),
            &store::inode_key(vol, ROOT_INO),
            format!("the root is a {k:?}, not a directory"),
        ),
        None => s.problem(
            ProblemKind::MissingRoot,
            Some(ROOT_INO),
            &store::inode_key(vol, ROOT_INO),
            "the root directory is missing".into(),
        ),
    }

    // Entries.
    let mut by_cookie: HashMap<(u64, u64), usize> = HashMap::new();
    for item in range(store::TAG_DENTRY) {
        let (k, v) = next_kv!(item, "directory entries");
        if k.len() <= 17 {
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &k,
                "malformed entry key".into(),
            );
            continue;
        }
        let parent = be(&k[9..17]);
        let name = k[17..].to_vec();
        let Some(d) = DentryRecord::decode(&v) else {
            s.problem(
                ProblemKind::BadRecord,
                Some(parent),
                &k,
                format!(
                    "entry {:?} does not decode",
                    name.escape_ascii().to_string()
                ),
            );
            s.stray.push(k.to_vec());
            continue;
        };
        let i = s.entries.len();
        s.entries.push(Entry {
            parent,
            name,
            ino: d.ino,
            kind: d.kind,
            cookie: d.cookie,
            indexed: false,
            live: true,
            fresh: false,
        });
        let parent_is_dir = s
            .inodes
            .get(&parent)
            .is_some_and(|p| p.kind == FileKind::Directory);
        if parent_is_dir {
            s.names.entry(d.ino).or_default().push(i);
        }
        if let Some(other) = by_cookie.insert((parent, d.cookie), i) {
            let (a, b) = (&s.entries[other].name, &s.entries[i].name);
            let detail = format!(
                "entries {:?} and {:?} share readdir cookie {}",
                a.escape_ascii().to_string(),
                b.escape_ascii().to_string(),
                d.cookie
            );
            s.problem(ProblemKind::BadCookie, Some(parent), &k, detail);
        }
    }
    for i in 0..s.entries.len() {
        let e = s.entries[i].clone();
        let key = store::dentry_key(vol, e.parent, &e.name);
        let shown = e.name.escape_ascii().to_string();
        match s.inodes.get(&e.parent).map(|p| p.kind) {
            Some(FileKind::Directory) => {}
            Some(k) => {
                s.problem(
                    ProblemKind::EntryOutsideDirectory,
                    Some(e.parent),
                    &key,
                    format!("entry {shown:?} in a {k:?}, not a directory"),
                );
                continue;
            }
            None => {
                s.problem(
                    ProblemKind::EntryOutsideDirectory,
                    Some(e.parent),
                    &key,
                    format!(
                        "entry {shown:?} in directory {}, which does not exist",
                        e.parent
                    ),
                );
                continue;
            }
        }
        match s.inodes.get(&e.ino).map(|r| r.kind) {
            None => s.problem(
                ProblemKind::DanglingEntry,
                Some(e.parent),
                &key,
                format!(
                    "entry {shown:?} names inode {}, which does not exist",
                    e.ino
                ),
            ),
            Some(k) if k != e.kind => s.problem(
                ProblemKind::WrongEntryKind,
                Some(e.ino),
                &key,
                format!(
                    "entry {shown:?} records a {:?}, the inode is a {k:?}",
                    e.kind
                ),
            ),
            Some(_) => {}
        }
    }

    // The readdir index.
    for item in range(store::TAG_READDIR) {
        let (k, v) = next_kv!(item, "the readdir index");
        let Some(cookie) = store::parse_readdir_key(&k) else {
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &k,
                "malformed readdir key".into(),
            );
            s.stray.push(k.to_vec());
            continue;
        };
        let parent = be(&k[9..17]);
        let Some((ino, kind, name)) = store::decode_readdir(&v) else {
            s.problem(
                ProblemKind::BadRecord,
                Some(parent),
                &k,
                format!("readdir index entry at cookie {cookie} does not decode"),
            );
            s.stray.push(k.to_vec());
            continue;
        };
        let matched = by_cookie.get(&(parent, cookie)).copied().filter(|&i| {
            let e = &s.entries[i];
            e.ino == ino && e.kind == kind && e.name == name
        });
        match matched {
            Some(i) => s.entries[i].indexed = true,
            None => {
                let detail = format!(
                    "readdir index entry {:?} (inode {ino}, cookie {cookie}) has no matching \
                     directory entry",
                    name.escape_ascii().to_string()
                );
                s.problem(ProblemKind::StrayIndex, Some(parent), &k, detail);
                s.stray.push(k.to_vec());
            }
        }
    }
    for i in 0..s.entries.len() {
        let e = s.entries[i].clone();
        if !e.indexed {
            let detail = format!(
                "entry {:?} (inode {}, cookie {}) is missing from the readdir index",
                e.name.escape_ascii().to_string(),
                e.ino,
                e.cookie
            );
            let key = store::dentry_key(vol, e.parent, &e.name);
            s.problem(ProblemKind::MissingIndex, Some(e.parent), &key, detail);
        }
        if let Some(p) = s.inodes.get(&e.parent) {
            if e.cookie < FIRST_COOKIE || e.cookie >= p.next_cookie {
                let detail = format!(
                    "entry {:?} has cookie {}, outside {FIRST_COOKIE}..{} (next_cookie)",
                    e.name.escape_ascii().to_string(),
                    e.cookie,
                    p.next_cookie
                );
                let key = store::dentry_key(vol, e.parent, &e.name);
                s.problem(ProblemKind::BadCookie, Some(e.parent), &key, detail);
            }
        }
    }

    // Chunks.
    for item in range(store::TAG_CHUNK) {
        let (k, v) = next_kv!(item, "file data");
        let Some(idx) = store::parse_chunk_key(&k) else {
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &k,
                "malformed chunk key".into(),
            );
            continue;
        };
        let ino = be(&k[9..17]);
        let offset = idx.saturating_mul(CHUNK_SIZE);
        s.chunks += 1;
        let (kind, size) = match s.inodes.get(&ino) {
            Some(r) => (Some(r.kind), r.size),
            None => (None, 0),
        };
        if kind != Some(FileKind::Regular) {
            let what = kind.map_or("a missing inode".to_string(), |k| format!("a {k:?}"));
            s.problem(
                ProblemKind::StrayChunk,
                Some(ino),
                &k,
                format!("chunk at offset {offset} belongs to {what}"),
            );
            s.stray.push(k.to_vec());
            continue;
        }
        let Some(ptr) = ChunkPtr::decode(&v) else {
            s.problem(
                ProblemKind::BadChunk,
                Some(ino),
                &k,
                format!("chunk pointer at offset {offset} does not decode"),
            );
            s.stray.push(k.to_vec());
            continue;
        };
        *s.stored.entry(ino).or_default() += u64::from(ptr.len);
        if u64::from(ptr.len) > CHUNK_SIZE {
            s.problem(
                ProblemKind::BadChunk,
                Some(ino),
                &k,
                format!("chunk at offset {offset} is {} bytes long", ptr.len),
            );
        }
        let end = offset.saturating_add(u64::from(ptr.len));
        if end > size {
            s.problem(
                ProblemKind::ChunkPastSize,
                Some(ino),
                &k,
                format!("chunk at offset {offset} holds bytes up to {end}, past the size {size}"),
            );
            s.past_size.push((ino, (k.to_vec(), idx, ptr)));
        }
        if verify {
            let current = || {
                store
                    .get_at(vol, at, &k)
                    .ok()
                    .map(|v| v.as_deref().and_then(ChunkPtr::decode))
            };
            match verify_chunk(store, &k, ptr, current) {
                Ok(n) => s.bytes += n,
                Err(why) => s.problem(
                    ProblemKind::CorruptChunk,
                    Some(ino),
                    &k,
                    format!("chunk at offset {offset}: {why}"),
                ),
            }
        }
    }

    // Xattrs and orphan keys.
    for item in range(store::TAG_XATTR) {
        let (k, _) = next_kv!(item, "xattrs");
        let ino = (k.len() > 17).then(|| be(&k[9..17]));
        if ino.is_none_or(|i| !s.inodes.contains_key(&i)) {
            s.problem(
                ProblemKind::StrayKey,
                ino,
                &k,
                "xattr of an inode that does not exist".into(),
            );
            s.stray.push(k.to_vec());
        }
    }
    for item in range(store::TAG_ORPHAN) {
        let (k, _) = next_kv!(item, "orphan keys");
        let Some(ino) = store::parse_orphan_key(&k) else {
            s.problem(
                ProblemKind::UnknownKey,
                None,
                &k,
                "malformed orphan key".into(),
            );
            continue;
        };
        if s.inodes.contains_key(&ino) {
            s.orphans.insert(ino);
        } else {
            s.problem(
                ProblemKind::StrayKey,
                Some(ino),
                &k,
                "orphan key of an inode that does not exist".into(),
            );
            s.stray.push(k.to_vec());
        }
    }

    // Counts, links and reachability.
    let reachable = reachable(&s);
    let inos: Vec<u64> = s.inodes.keys().copied().collect();
    for ino in inos {
        let r = s.inodes[&ino].clone();
        let key = store::inode_key(vol, ino);
        let names: Vec<usize> = s.names.get(&ino).cloned().unwrap_or_default();
        let orphan = s.orphans.contains(&ino);
        if r.kind == FileKind::Directory {
            let (mut entries, mut subdirs) = (0u64, 0u32);
            for e in s.entries.iter().filter(|e| e.parent == ino) {
                entries += 1;
                if s.inodes.get(&e.ino).map(|c| c.kind) == Some(FileKind::Directory) {
                    subdirs += 1;
                }
            }
            let unnamed = names.is_empty() && ino != ROOT_INO;
            let want_nlink = if unnamed && orphan { 0 } else { 2 + subdirs };
            let lost = unnamed && !orphan;
            if r.nlink != want_nlink && !lost {
                s.problem(
                    ProblemKind::WrongLinkCount,
                    Some(ino),
                    &key,
                    format!("directory link count {}, expected {want_nlink}", r.nlink),
                );
            }
            if r.size != entries {
                s.problem(
                    ProblemKind::WrongDirSize,
                    Some(ino),
                    &key,
                    format!("directory size {}, but it has {entries} entries", r.size),
                );
            }
            let want_parent = if ino == ROOT_INO {
                Some(ROOT_INO)
            } else {
                names.first().map(|&i| s.entries[i].parent)
            };
            if names.len() > 1 || (ino == ROOT_INO && !names.is_empty()) {
                s.problem(
                    ProblemKind::DirectoryLinkedTwice,
                    Some(ino),
                    &key,
                    format!("directory has {} names", names.len()),
                );
            }
            if let Some(p) = want_parent {
                if r.parent != p {
                    s.problem(
                        ProblemKind::WrongParent,
                        Some(ino),
                        &key,
                        format!(
                            "directory's parent is {}, but directory {p} holds it",
                            r.parent
                        ),
                    );
                }
            }
        } else {
            let want = names.len() as u32;
            // An inode no name reaches is reported once, as unreachable.
            let lost = names.is_empty() && !orphan;
            if r.nlink != want && !lost {
                s.problem(
                    ProblemKind::WrongLinkCount,
                    Some(ino),
                    &key,
                    format!("link count {}, but {want} entries name it", r.nlink),
                );
            }
        }
        if r.kind == FileKind::Symlink && r.size != r.target.len() as u64 {
            s.problem(
                ProblemKind::WrongSymlinkSize,
                Some(ino),
                &key,
                format!("symlink size {}, target {} bytes", r.size, r.target.len()),
            );
        }
        let stored = s.stored.get(&ino).copied().unwrap_or(0);
        if r.stored != stored {
            s.problem(
                ProblemKind::WrongStored,
                Some(ino),
                &key,
                format!("stored {} bytes, its chunks hold {stored}", r.stored),
            );
        }
        if orphan && !names.is_empty() {
            s.problem(
                ProblemKind::LinkedOrphan,
                Some(ino),
                &store::orphan_key(vol, ino),
                format!(
                    "marked unlinked-while-open but {} entries name it",
                    names.len()
                ),
            );
        }
        let open_unlinked = orphan && names.is_empty();
        if !reachable.contains(&ino) && !open_unlinked {
            s.problem(
                ProblemKind::Unreachable,
                Some(ino),
                &key,
                format!(
                    "{:?} is reachable from no directory and not marked unlinked-while-open",
                    r.kind
                ),
            );
        }
    }
    s
}

/// The inodes reachable from the root through live entries.
fn reachable(s: &Scan) -> HashSet<u64> {
    let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
    for e in s.entries.iter().filter(|e| e.live) {
        children.entry(e.parent).or_default().push(e.ino);
    }
    let mut seen = HashSet::new();
    if !s.inodes.contains_key(&ROOT_INO) {
        return seen;
    }
    let mut queue = VecDeque::from([ROOT_INO]);
    seen.insert(ROOT_INO);
    while let Some(d) = queue.pop_front() {
        if s.inodes.get(&d).map(|r| r.kind) != Some(FileKind::Directory) {
            continue;
        }
        for &c in children.get(&d).map(Vec::as_slice).unwrap_or_default() {
            if s.inodes.contains_key(&c) && seen.insert(c) {
                queue.push_back(c);
            }
        }
    }
    seen
}

/// What [`repair`] did and could not do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repair {
    pub fixed: Vec<String>,
    /// Problems left (from a check after the repair).
    pub remaining: Report,
}

/// Ops committed in one change at most.
const BATCH: usize = 1024;

/// Repairs the live volume `vol` (which nothing may have mounted): removes entries naming
/// missing inodes or sitting outside directories, extra names of directories, stray
/// readdir index keys, chunks, xattrs and orphan keys, and layer entries of missing
/// snapshots; rebuilds missing index keys and repeated cookies; links inodes nothing
/// reaches into `/lost+found` as `#INO`; reclaims inodes unlinked while open; cuts chunks
/// past the file's size; rewrites link counts, directory sizes and parents, `stored` and
/// `next_cookie`, and symlink sizes. Corrupt chunks and problems in snapshots are left:
/// the report after the repair lists them.
pub fn repair(store: &Store, vol: u64, name: &str) -> Result<Repair, String> {
    let mut s = scan(store, vol, None, None, true);
    let mut raw = Scan::default();
    check_raw(store, vol, &mut raw);
    if s.problems.iter().any(|p| p.kind == ProblemKind::Storage)
        || !s.inodes.contains_key(&ROOT_INO)
    {
        return Err(format!(
            "volume {name} cannot be repaired: {}",
            s.problems
                .iter()
                .map(|p| p.line(name))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let mut fixed = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    let err = |e: crate::error::FsError| format!("repairing volume {name}: {e}");

    // Keys that are simply wrong to have.
    let mut stray = std::mem::take(&mut s.stray);
    stray.extend(std::mem::take(&mut raw.stray));
    for k in &stray {
        fixed.push(format!("removed {}", show_key(k)));
    }
    remove_keys(store, vol, &stray).map_err(err)?;

    // Entries that cannot stand; a directory keeps one name (the one its parent says).
    for i in 0..s.entries.len() {
        let e = s.entries[i].clone();
        let parent_ok = s
            .inodes
            .get(&e.parent)
            .is_some_and(|p| p.kind == FileKind::Directory);
        let extra_dir_name = match s.inodes.get(&e.ino) {
            Some(r) if parent_ok && r.kind == FileKind::Directory => {
                let names = s.names.get(&e.ino).map(Vec::as_slice).unwrap_or_default();
                let keep = names
                    .iter()
                    .copied()
                    .find(|&j| s.entries[j].parent == r.parent)
                    .or(names.first().copied());
                e.ino == ROOT_INO || keep != Some(i)
            }
            _ => false,
        };
        if !parent_ok || !s.inodes.contains_key(&e.ino) || extra_dir_name {
            s.entries[i].live = false;
            ops.push(Op::Del(store::dentry_key(vol, e.parent, &e.name)));
            if e.indexed {
                ops.push(Op::Del(store::readdir_key(vol, e.parent, e.cookie)));
            }
            fixed.push(format!(
                "removed entry {:?} of directory {} (inode {})",
                e.name.escape_ascii().to_string(),
                e.parent,
                e.ino
            ));
        }
    }

    // Inodes unlinked while open, with nothing open now: reclaimed as `SledFs` would.
    let live_names = |s: &Scan, ino: u64| s.entries.iter().any(|e| e.live && e.ino == ino);
    let orphans: Vec<u64> = s.orphans.iter().copied().collect();
    for ino in orphans {
        if live_names(&s, ino) {
            ops.push(Op::Del(store::orphan_key(vol, ino)));
            fixed.push(format!("removed the orphan mark of linked inode {ino}"));
        } else if ino != ROOT_INO {
            reclaim(store, vol, ino).map_err(err)?;
            s.inodes.remove(&ino);
            fixed.push(format!("reclaimed inode {ino}, unlinked while open"));
        }
    }

    // Unreachable inodes go to /lost+found.
    let mut lost_found: Option<u64> = None;
    loop {
        let reach = reachable(&s);
        let lost: Vec<u64> = s
            .inodes
            .keys()
            .copied()
            .filter(|i| !reach.contains(i))
            .collect();
        if lost.is_empty() {
            break;
        }
        let lost_set: HashSet<u64> = lost.iter().copied().collect();
        let named_by_lost = |s: &Scan, ino: u64| {
            s.entries
                .iter()
                .any(|e| e.live && e.ino == ino && lost_set.contains(&e.parent))
        };
        let mut tops: Vec<u64> = lost
            .iter()
            .copied()
            .filter(|&i| !named_by_lost(&s, i))
            .collect();
        if tops.is_empty() {
            // A cycle of directories: break it at its smallest inode.
            tops.push(lost[0]);
            for e in s.entries.iter_mut().filter(|e| e.live && e.ino == lost[0]) {
                e.live = false;
                ops.push(Op::Del(store::dentry_key(vol, e.parent, &e.name)));
                ops.push(Op::Del(store::readdir_key(vol, e.parent, e.cookie)));
            }
        }
        let lf = match lost_found {
            Some(lf) => lf,
            None => {
                let (lf, created) = lost_and_found(store, &mut s).map_err(err)?;
                if created {
                    fixed.push(format!("created /lost+found (inode {lf})"));
                }
                lost_found = Some(lf);
                lf
            }
        };
        for ino in tops {
            let kind = s.inodes[&ino].kind;
            let parent = s.inodes.get_mut(&lf).ok_or("lost+found vanished")?;
            let cookie = parent.next_cookie;
            parent.next_cookie += 1;
            let name = format!("#{ino}").into_bytes();
            s.entries.push(Entry {
                parent: lf,
                name: name.clone(),
                ino,
                kind,
                cookie,
                indexed: false,
                live: true,
                fresh: true,
            });
            fixed.push(format!(
                "linked unreachable inode {ino} as /lost+found/#{ino}"
            ));
        }
    }

    // Entries: kinds, cookies and the index, rebuilt where they disagree.
    let mut used: HashSet<(u64, u64)> = HashSet::new();
    for i in 0..s.entries.len() {
        let e = s.entries[i].clone();
        if !e.live {
            continue;
        }
        let kind = s.inodes[&e.ino].kind;
        let parent = s.inodes.get_mut(&e.parent).ok_or("a parent vanished")?;
        let mut cookie = e.cookie;
        if cookie < FIRST_COOKIE || !used.insert((e.parent, cookie)) {
            cookie = parent.next_cookie.max(FIRST_COOKIE);
            parent.next_cookie = cookie + 1;
            used.insert((e.parent, cookie));
        }
        parent.next_cookie = parent.next_cookie.max(cookie + 1);
        if kind != e.kind || cookie != e.cookie || !e.indexed {
            if e.indexed && cookie != e.cookie {
                ops.push(Op::Del(store::readdir_key(vol, e.parent, e.cookie)));
            }
            let d = DentryRecord {
                ino: e.ino,
                kind,
                cookie,
            };
            ops.push(Op::Put(
                store::dentry_key(vol, e.parent, &e.name),
                d.encode(),
            ));
            ops.push(Op::Put(
                store::readdir_key(vol, e.parent, cookie),
                store::encode_readdir(e.ino, kind, &e.name),
            ));
            if !e.fresh {
                fixed.push(format!(
                    "rewrote entry {:?} of directory {} and its index key",
                    e.name.escape_ascii().to_string(),
                    e.parent
                ));
            }
            s.entries[i].kind = kind;
            s.entries[i].cookie = cookie;
            s.entries[i].indexed = true;
        }
    }

    // Chunks past the size.
    for (ino, (key, idx, ptr)) in std::mem::take(&mut s.past_size) {
        let Some(r) = s.inodes.get(&ino) else {
            continue;
        };
        let start = idx * CHUNK_SIZE;
        if start >= r.size {
            remove_keys(store, vol, std::slice::from_ref(&key)).map_err(err)?;
            fixed.push(format!(
                "removed the chunk of inode {ino} at offset {start}, past its size"
            ));
        } else if trim_chunk(store, vol, &key, ptr, (r.size - start) as usize).map_err(err)? {
            fixed.push(format!(
                "cut the chunk of inode {ino} at offset {start} to its size"
            ));
        }
    }

    // Counts, from what is left.
    let stored = chunk_sums(store, vol).map_err(err)?;
    let mut nlink: HashMap<u64, u32> = HashMap::new();
    let mut size: HashMap<u64, u64> = HashMap::new();
    let mut parent_of: HashMap<u64, u64> = HashMap::new();
    for e in s.entries.iter().filter(|e| e.live) {
        *size.entry(e.parent).or_default() += 1;
        if s.inodes[&e.ino].kind == FileKind::Directory {
            *nlink.entry(e.parent).or_default() += 1;
            parent_of.insert(e.ino, e.parent);
        } else {
            *nlink.entry(e.ino).or_default() += 1;
        }
    }
    let now = Timestamp::now();
    for (&ino, r) in &s.inodes {
        let mut want = r.clone();
        match r.kind {
            FileKind::Directory => {
                want.nlink = 2 + nlink.get(&ino).copied().unwrap_or(0);
                want.size = size.get(&ino).copied().unwrap_or(0);
                want.parent = if ino == ROOT_INO {
                    ROOT_INO
                } else {
                    parent_of.get(&ino).copied().unwrap_or(r.parent)
                };
            }
            kind => {
                want.nlink = nlink.get(&ino).copied().unwrap_or(0);
                if kind == FileKind::Symlink {
                    want.size = r.target.len() as u64;
                }
            }
        }
        want.stored = stored.get(&ino).copied().unwrap_or(0);
        if want != *r || !s.inodes_unchanged(ino, store, vol) {
            let what = describe_change(r, &want);
            want.ctime = now;
            ops.push(Op::Put(store::inode_key(vol, ino), want.encode()));
            if !what.is_empty() {
                fixed.push(format!("inode {ino}: {what}"));
            }
        }
    }

    // In the order made (a key removed then written again stays written). Each batch is
    // atomic; a repair a crash cut short is finished by running it again.
    for batch in ops.chunks(BATCH) {
        store.commit_change(batch, &[]).map_err(err)?;
    }
    store.sync().map_err(err)?;
    let remaining = check_volume(store, vol, name, None);
    Ok(Repair { fixed, remaining })
}

impl Scan {
    /// Whether the record of `ino` in the store is still the one scanned (a new
    /// lost+found is not in the store yet).
    fn inodes_unchanged(&self, ino: u64, store: &Store, vol: u64) -> bool {
        store
            .fs
            .get(store::inode_key(vol, ino))
            .ok()
            .flatten()
            .and_then(|v| InodeRecord::decode(&v))
            .is_some_and(|r| Some(&r) == self.inodes.get(&ino))
    }
}

fn describe_change(old: &InodeRecord, new: &InodeRecord) -> String {
    let mut v = Vec::new();
    if old.nlink != new.nlink {
        v.push(format!("link count {} -> {}", old.nlink, new.nlink));
    }
    if old.size != new.size {
        v.push(format!("size {} -> {}", old.size, new.size));
    }
    if old.parent != new.parent {
        v.push(format!("parent {} -> {}", old.parent, new.parent));
    }
    if old.stored != new.stored {
        v.push(format!("stored {} -> {}", old.stored, new.stored));
    }
    if old.next_cookie != new.next_cookie {
        v.push(format!(
            "next cookie {} -> {}",
            old.next_cookie, new.next_cookie
        ));
    }
    v.join(", ")
}

/// `/lost+found` (created when missing): its inode, and whether it is new.
fn lost_and_found(store: &Store, s: &mut Scan) -> crate::error::FsResult<(u64, bool)> {
    for name in ["lost+found", "lost+found.volfs"] {
        let existing = s
            .entries
            .iter()
            .find(|e| e.live && e.parent == ROOT_INO && e.name == name.as_bytes())
            .map(|e| e.ino);
        match existing {
            Some(ino) if s.inodes[&ino].kind == FileKind::Directory => return Ok((ino, false)),
            Some(_) => continue,
            None => {
                let ino = store.new_ino()?;
                let mut rec = InodeRecord::new(FileKind::Directory, 0o700, 0, 0, Timestamp::now());
                rec.parent = ROOT_INO;
                s.inodes.insert(ino, rec);
                let root = s
                    .inodes
                    .get_mut(&ROOT_INO)
                    .ok_or(crate::error::FsError::NotFound)?;
                let cookie = root.next_cookie;
                root.next_cookie += 1;
                s.entries.push(Entry {
                    parent: ROOT_INO,
                    name: name.as_bytes().to_vec(),
                    ino,
                    kind: FileKind::Directory,
                    cookie,
                    indexed: false,
                    live: true,
                    fresh: true,
                });
                return Ok((ino, true));
            }
        }
    }
    Err(crate::error::FsError::Exists)
}

/// Removes keys, those of chunks (live or in a layer) under their inodes' stripe locks as
/// the compactor moves chunks under them, releasing the chunk versions they point at now.
fn remove_keys(store: &Store, vol: u64, keys: &[Vec<u8>]) -> crate::error::FsResult<()> {
    let chunk_ino = |k: &[u8]| match (k.len(), k.get(8)) {
        (25, Some(&store::TAG_CHUNK)) => Some(be(&k[9..17])),
        (34, Some(&store::TAG_LAYER)) if k[17] == store::TAG_CHUNK => Some(be(&k[18..26])),
        _ => None,
    };
    for group in keys.chunks(BATCH) {
        let inos: Vec<u64> = group.iter().filter_map(|k| chunk_ino(k)).collect();
        let _l = store.stripe_locks(vol, &inos);
        let mut ops = Vec::new();
        let mut released = Vec::new();
        for k in group {
            let cur = store
                .fs
                .get(k)
                .map_err(|e| crate::error::FsError::storage("repairing", e))?;
            if let Some(p) = cur.as_deref().and_then(|v| store::chunk_value(k, v)) {
                released.push(p);
            }
            ops.push(Op::Del(k.clone()));
        }
        store.commit_change(&ops, &released)?;
    }
    Ok(())
}

/// Cuts the chunk at `key` to `keep` bytes. False when it could not be read (it stays,
/// reported as corrupt).
fn trim_chunk(
    store: &Store,
    vol: u64,
    key: &[u8],
    ptr: ChunkPtr,
    keep: usize,
) -> crate::error::FsResult<bool> {
    let _l = store.stripe_locks(vol, &[be(&key[9..17])]);
    let cur = store
        .fs
        .get(key)
        .map_err(|e| crate::error::FsError::storage("repairing", e))?
        .and_then(|v| ChunkPtr::decode(&v))
        .unwrap_or(ptr);
    let Ok(Some(mut data)) = store.chunks.read(key, &cur) else {
        return Ok(false);
    };
    data.truncate(keep);
    let pending = store
        .chunks
        .append(&[(key, &data)])
        .map_err(|e| crate::error::FsError::Io(e.to_string()))?;
    let new = pending.ptrs()[0];
    match store.commit_change(&[Op::Put(key.to_vec(), new.encode())], &[cur]) {
        Ok(()) => Ok(true),
        Err(e) => {
            pending.abandon();
            Err(e)
        }
    }
}

/// Drops an inode with its chunks and xattrs, as `SledFs` reclaims an orphan.
fn reclaim(store: &Store, vol: u64, ino: u64) -> crate::error::FsResult<()> {
    let _l = store.stripe_locks(vol, &[ino]);
    let mut released = Vec::new();
    for item in store.fs.scan_prefix(store::chunk_prefix(vol, ino)) {
        let (_, v) = item.map_err(|e| crate::error::FsError::storage("repairing", e))?;
        if let Some(p) = ChunkPtr::decode(&v) {
            released.push(p);
        }
    }
    let range = |p: Vec<u8>| {
        let end = store::prefix_end(&p);
        Op::DelRange(p, end)
    };
    let ops = [
        Op::Del(store::inode_key(vol, ino)),
        range(store::chunk_prefix(vol, ino)),
        range(store::xattr_prefix(vol, ino)),
        Op::Del(store::orphan_key(vol, ino)),
    ];
    store.commit_change(&ops, &released)
}

/// The sum of chunk lengths per inode, live.
fn chunk_sums(store: &Store, vol: u64) -> crate::error::FsResult<HashMap<u64, u64>> {
    let mut out = HashMap::new();
    for item in store
        .fs
        .scan_prefix(store::tag_prefix(vol, store::TAG_CHUNK))
    {
        let (k, v) = item.map_err(|e| crate::error::FsError::storage("repairing", e))?;
        if let (Some(_), Some(p)) = (store::parse_chunk_key(&k), ChunkPtr::decode(&v)) {
            *out.entry(be(&k[9..17])).or_default() += u64::from(p.len);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::vfs::{Ctx, FileSystem, RenameFlags, SetAttr, SledFs};

    const CTX: Ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 0,
    };
    const VOL: u64 = 7;

    fn open(root: &std::path::Path) -> (Store, SledFs) {
        let store = Store::open_with(root, 256 * 1024).expect("store");
        if store
            .fs
            .get(store::inode_key(VOL, ROOT_INO))
            .ok()
            .flatten()
            .is_none()
        {
            SledFs::init_volume(&store, VOL, 0, 0, 0o755).expect("init");
        }
        let fs = SledFs::open(store.clone(), VOL, "t").expect("open");
        (store, fs)
    }

    fn file(fs: &SledFs, parent: u64, name: &[u8], len: usize) -> u64 {
        let a = fs
            .mknod(&CTX, parent, name, libc::S_IFREG | 0o644, 0, 0)
            .expect("create");
        if len > 0 {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            fs.write(a.ino, 0, &data, false).expect("write");
        }
        a.ino
    }

    fn put_inode(store: &Store, ino: u64, f: impl FnOnce(&mut InodeRecord)) {
        let k = store::inode_key(VOL, ino);
        let v = store.fs.get(&k).expect("get").expect("inode");
        let mut r = InodeRecord::decode(&v).expect("decode");
        f(&mut r);
        store.fs.insert(k, r.encode()).expect("insert");
    }

    fn dentry(store: &Store, parent: u64, name: &[u8]) -> DentryRecord {
        let v = store
            .fs
            .get(store::dentry_key(VOL, parent, name))
            .expect("get")
            .expect("dentry");
        DentryRecord::decode(&v).expect("decode")
    }

    fn assert_clean(r: &Report) {
        assert!(r.is_clean(), "unexpected problems:\n{r}");
    }

    /// A random workload: files written, truncated, punched, renamed (across directories,
    /// over other files, exchanged), linked, removed while open, with xattrs and symlinks.
    fn step(fs: &SledFs, rng: &mut rand::rngs::StdRng, open: &mut Vec<u64>) {
        let dirs: Vec<u64> = [b"d1".as_slice(), b"d2"]
            .iter()
            .map(|n| match fs.lookup(ROOT_INO, n) {
                Ok(a) => a.ino,
                Err(_) => fs.mkdir(&CTX, ROOT_INO, n, 0o755, 0).expect("mkdir").ino,
            })
            .chain([ROOT_INO])
            .collect();
        let pick = |rng: &mut rand::rngs::StdRng| dirs[rng.gen_range(0..dirs.len())];
        let parent = pick(rng);
        let name = format!("f{}", rng.gen_range(0..10)).into_bytes();
        let f = match fs.lookup(parent, &name) {
            Ok(a) => a,
            Err(_) => fs
                .mknod(&CTX, parent, &name, libc::S_IFREG | 0o644, 0, 0)
                .expect("create"),
        };
        if f.kind != FileKind::Regular {
            return;
        }
        match rng.gen_range(0..11) {
            0..=2 => {
                let off = rng.gen_range(0..80_000u64);
                let len = rng.gen_range(1..40_000usize);
                fs.write(f.ino, off, &vec![rng.r#gen::<u8>(); len], false)
                    .expect("write");
            }
            3 => {
                let set = SetAttr {
                    size: Some(rng.gen_range(0..60_000)),
                    ..SetAttr::default()
                };
                fs.setattr(&CTX, f.ino, &set).expect("truncate");
            }
            4 => {
                let to = format!("f{}", rng.gen_range(0..10)).into_bytes();
                let flags = RenameFlags {
                    exchange: rng.gen_bool(0.3),
                    ..RenameFlags::default()
                };
                let _ = fs.rename(parent, &name, pick(rng), &to, flags);
            }
            5 => {
                let to = format!("l{}", rng.gen_range(0..5)).into_bytes();
                let _ = fs.link(f.ino, pick(rng), &to);
            }
            6 => fs.unlink(parent, &name).expect("unlink"),
            7 => {
                // Unlinked while open: an orphan until released.
                fs.open(f.ino).expect("open");
                open.push(f.ino);
                fs.unlink(parent, &name).expect("unlink");
            }
            8 => {
                if let Some(ino) = open.pop() {
                    fs.release(ino).expect("release");
                }
            }
            9 => {
                let t = format!("t{}", rng.gen_range(0..3)).into_bytes();
                let _ = fs.symlink(&CTX, pick(rng), &t, b"somewhere/else");
                let _ = fs.unlink(pick(rng), &t);
            }
            _ => {
                fs.setxattr(&CTX, f.ino, b"user.k", &[rng.r#gen::<u8>(); 9], 0)
                    .expect("setxattr");
                let _ = fs.fallocate(
                    f.ino,
                    1000,
                    20_000,
                    crate::vfs::falloc::PUNCH_HOLE | crate::vfs::falloc::KEEP_SIZE,
                );
            }
        }
    }

    #[test]
    fn fsck_a_random_workload_with_snapshots_is_clean() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xf5c4);
        let (store, fs) = open(dir.path());
        let mut open_files = Vec::new();
        let mut snaps = Vec::new();
        for i in 0..600 {
            step(&fs, &mut rng, &mut open_files);
            if i % 100 == 99 {
                let (id, _, _) = store
                    .create_snapshot(VOL, &format!("s{i}"), || (0, 0))
                    .expect("snapshot");
                snaps.push(id);
            }
            if i == 450 {
                store.remove_snapshot(VOL, snaps.remove(1)).expect("remove");
            }
        }
        // Files still open: their orphan keys are legitimate.
        let r = check_volume(&store, VOL, "t", None);
        assert_clean(&r);
        assert!(r.inodes > 5 && r.chunks > 10 && r.bytes > 0, "{r:?}");
        for id in &snaps {
            assert_clean(&check(&store, VOL, "t", Some(*id)));
        }
        store.collect_garbage().expect("gc");
        assert_clean(&check_volume(&store, VOL, "t", None));
        // The repair of a clean volume changes nothing.
        while let Some(ino) = open_files.pop() {
            fs.release(ino).expect("release");
        }
        let fixed = repair(&store, VOL, "t").expect("repair");
        assert_eq!(fixed.fixed, Vec::<String>::new());
        assert_clean(&fixed.remaining);
        // No name was ever registered for the test's volume id.
        let st = check_store(&store);
        assert!(
            st.problems.len() == 1
                && st.problems[0].contains("of volume id 7, which no volume name reaches")
                && st.notes.is_empty(),
            "{st:?}"
        );
    }

    #[test]
    fn fsck_reports_each_corruption_and_repair_fixes_what_it_safely_can() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, fs) = open(dir.path());
        let d = fs.mkdir(&CTX, ROOT_INO, b"d", 0o755, 0).expect("mkdir").ino;
        let e = fs.mkdir(&CTX, d, b"e", 0o755, 0).expect("mkdir").ino;
        let a = file(&fs, ROOT_INO, b"a", 1000);
        fs.link(a, d, b"a2").expect("link");
        let x = file(&fs, ROOT_INO, b"x", 0);
        let u = file(&fs, e, b"u", 5000);
        let p = file(&fs, d, b"p", 40_000);
        let c = file(&fs, ROOT_INO, b"c", 20_000);
        fs.symlink(&CTX, ROOT_INO, b"s", b"a").expect("symlink");
        fs.setxattr(&CTX, a, b"user.x", b"v", 0).expect("xattr");
        assert_clean(&check_volume(&store, VOL, "t", None));
        drop(fs);

        // A wrong link count.
        put_inode(&store, a, |r| r.nlink = 5);
        // An entry naming a missing inode.
        store.fs.remove(store::inode_key(VOL, x)).expect("remove");
        // A readdir index key gone.
        let de = dentry(&store, d, b"e");
        store
            .fs
            .remove(store::readdir_key(VOL, d, de.cookie))
            .expect("remove");
        // An inode no entry names, without an orphan key (its directory's size follows).
        let du = dentry(&store, e, b"u");
        store
            .fs
            .remove(store::dentry_key(VOL, e, b"u"))
            .expect("rm");
        store
            .fs
            .remove(store::readdir_key(VOL, e, du.cookie))
            .expect("rm");
        put_inode(&store, e, |r| r.size -= 1);
        // Chunks past the size: bytes 16384.. of a 40000-byte file.
        put_inode(&store, p, |r| r.size = CHUNK_SIZE);
        // A flipped byte in a segment, inside chunk 1 of `c`.
        let v = store
            .fs
            .get(store::chunk_key(VOL, c, 1))
            .expect("get")
            .expect("chunk");
        let ptr = ChunkPtr::decode(&v).expect("ptr");
        let seg = dir.path().join(format!("data/{:016x}.seg", ptr.seg));
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg)
                .expect("segment");
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, ptr.off + 5).expect("read");
            f.write_all_at(&[b[0] ^ 0xff], ptr.off + 5).expect("flip");
        }
        // A layer entry of a snapshot that does not exist.
        store
            .fs
            .insert(
                store::layer_key(VOL, 999, &store::inode_key(VOL, a)),
                vec![0],
            )
            .expect("insert");

        let r = check_volume(&store, VOL, "t", None);
        use ProblemKind::*;
        assert_eq!(
            r.kinds(),
            vec![
                DanglingEntry,
                MissingIndex,
                Unreachable,
                WrongLinkCount,
                ChunkPastSize,
                ChunkPastSize,
                CorruptChunk,
                StrayLayer
            ],
            "{r}"
        );
        let text = r.to_string();
        for want in [
            format!("t: inode {a} (/a): link count 5, but 2 entries name it"),
            format!("entry \"x\" names inode {x}, which does not exist"),
            format!(
                "inode {d} (/d): entry \"e\" (inode {e}, cookie {}) is missing",
                de.cookie
            ),
            format!("t: inode {u}: Regular is reachable from no directory"),
            format!(
                "inode {p} (/d/p): chunk at offset 32768 holds bytes up to 40000, past the size 16384"
            ),
            format!("inode {c} (/c): chunk at offset 16384: checksum mismatch"),
            "layer entry of snapshot id 999, which has no record".to_string(),
        ] {
            assert!(text.contains(&want), "missing {want:?} in:\n{text}");
        }

        let rep = repair(&store, VOL, "t").expect("repair");
        // The corrupt chunk cannot be repaired: the file must come from elsewhere.
        assert_eq!(
            rep.remaining.kinds(),
            vec![CorruptChunk],
            "{}",
            rep.remaining
        );
        assert!(
            rep.fixed.iter().any(|f| f.contains("/lost+found/#")),
            "{:?}",
            rep.fixed
        );
        let fs = SledFs::open(store.clone(), VOL, "t").expect("open");
        assert_eq!(fs.getattr(a).expect("a").nlink, 2);
        assert!(fs.lookup(ROOT_INO, b"x").is_err());
        let lf = fs.lookup(ROOT_INO, b"lost+found").expect("lost+found").ino;
        let got = fs.lookup(lf, format!("#{u}").as_bytes()).expect("u found");
        assert_eq!(fs.read(got.ino, 0, 10_000).expect("read").len(), 5000);
        assert_eq!(fs.getattr(p).expect("p").blocks, CHUNK_SIZE / 512);
        let names: Vec<Vec<u8>> = fs
            .readdir(d, 0, 100)
            .expect("readdir")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.contains(&b"e".to_vec()), "{names:?}");
        fs.unlink(ROOT_INO, b"c").expect("unlink the corrupt file");
        assert_clean(&check_volume(&store, VOL, "t", None));
    }
}
