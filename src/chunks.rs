//! Chunk bytes: append-only segment files under `ROOT/data/`, addressed by [`ChunkPtr`]s
//! that live in the sled store (see the key table in `store`).
//!
//! Why not inside sled: sled 0.34 materialises whole leaf nodes (16 values) per access and
//! does not hold its memory to `cache_capacity`; measured here, 4 GiB of 64 KiB values
//! touched at random grew the process to 2.6 GiB RSS and ran 4 KiB read-modify-writes at
//! 1.2–2k/s. Segments leave caching to the kernel's page cache and keep the daemon small.
//!
//! Invariants:
//! - A chunk version is written once and never changed; an overwrite appends a new version
//!   and repoints the chunk's key in the same sled batch as the inode update.
//! - Every record carries its key and a crc32 over key and bytes, so a read verifies it got
//!   the chunk it asked for, and a segment can be scanned without the index.
//! - Durability order: segment data is fsynced before the sled batch pointing to it is
//!   flushed (see [`ChunkStore::sync`] and `Store::sync`).
//! - A segment is deleted only when nothing points into it and no append into it is still
//!   uncommitted, and only after the moved pointers are durable.
//! - The bytes of a released (overwritten or deleted) chunk version are given back to the
//!   host by punching a hole, but only after a sync that began after the release: by then
//!   no durable pointer can lead to them. A reader that raced the release sees a checksum
//!   mismatch, reads the pointer again and finds the new version.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Segments roll over at this size.
pub const SEGMENT_MAX: u64 = 64 * 1024 * 1024;
const MAGIC: &[u8; 4] = b"VCK1";
const PTR_VERSION: u8 = 1;
/// A sealed segment whose live bytes fall under this share of its size is compacted.
const GC_LIVE_RATIO: f64 = 0.5;

/// Where one chunk version lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkPtr {
    pub seg: u64,
    /// Offset of the chunk's bytes (after the record header).
    pub off: u64,
    pub len: u32,
    pub crc: u32,
}

impl ChunkPtr {
    pub const ENCODED_LEN: usize = 25;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::ENCODED_LEN);
        v.push(PTR_VERSION);
        v.extend_from_slice(&self.seg.to_be_bytes());
        v.extend_from_slice(&self.off.to_be_bytes());
        v.extend_from_slice(&self.len.to_be_bytes());
        v.extend_from_slice(&self.crc.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<ChunkPtr> {
        if b.len() != Self::ENCODED_LEN || b[0] != PTR_VERSION {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Some(ChunkPtr {
            seg: u64_at(1),
            off: u64_at(9),
            len: u32_at(17),
            crc: u32_at(21),
        })
    }
}

/// crc32 over the chunk's key and bytes.
pub fn chunk_crc(key: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(data);
    h.finalize()
}

/// Why a chunk could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The bytes do not match the checksum: corrupt or misplaced.
    Corrupt,
}

struct Active {
    seg: u64,
    file: Arc<File>,
    len: u64,
}

/// The segment files of one store.
pub struct ChunkStore {
    dir: PathBuf,
    segment_max: u64,
    active: Mutex<Active>,
    files: RwLock<HashMap<u64, Arc<File>>>,
    /// Live bytes per segment (committed pointers plus uncommitted appends).
    live: Mutex<HashMap<u64, i64>>,
    /// Appends not yet committed or abandoned, per segment: such a segment is never
    /// collected, since its index entries may still be on their way.
    pending: Mutex<HashMap<u64, u64>>,
    dirty: Mutex<HashSet<u64>>,
    /// Released chunk versions whose bytes are not yet given back.
    released: Mutex<Vec<ChunkPtr>>,
    /// Held by `sync` so concurrent fsyncs share one round of segment syncs.
    sync_lock: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.seg"))
}

/// An append whose pointers are not committed yet; drop it once the batch is applied (or
/// failed).
pub struct PendingAppend<'a> {
    store: &'a ChunkStore,
    seg: u64,
    ptrs: Vec<ChunkPtr>,
}

impl PendingAppend<'_> {
    pub fn ptrs(&self) -> &[ChunkPtr] {
        &self.ptrs
    }

    /// The batch failed: the appended bytes are garbage.
    pub fn abandon(self) {
        let total: i64 = self.ptrs.iter().map(|p| i64::from(p.len)).sum();
        *lock(&self.store.live).entry(self.seg).or_insert(0) -= total;
    }
}

impl Drop for PendingAppend<'_> {
    fn drop(&mut self) {
        let mut p = lock(&self.store.pending);
        if let Some(n) = p.get_mut(&self.seg) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.seg);
            }
        }
    }
}

impl ChunkStore {
    /// Opens the segment directory; new appends go to a fresh segment.
    pub fn open(dir: &Path) -> io::Result<ChunkStore> {
        Self::open_with(dir, SEGMENT_MAX)
    }

    /// As [`ChunkStore::open`], rolling segments at `segment_max` bytes.
    pub fn open_with(dir: &Path, segment_max: u64) -> io::Result<ChunkStore> {
        std::fs::create_dir_all(dir)?;
        let mut files = HashMap::new();
        let mut max = 0;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(seg) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            max = max.max(seg);
            files.insert(seg, Arc::new(File::open(e.path())?));
        }
        let seg = max + 1;
        let file = Arc::new(
            OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .open(seg_path(dir, seg))?,
        );
        files.insert(seg, file.clone());
        sync_dir(dir)?;
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            segment_max,
            active: Mutex::new(Active { seg, file, len: 0 }),
            files: RwLock::new(files),
            live: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            released: Mutex::new(Vec::new()),
            sync_lock: Mutex::new(()),
        })
    }

    /// Counts a committed pointer found at startup.
    pub fn account(&self, ptr: &ChunkPtr) {
        *lock(&self.live).entry(ptr.seg).or_insert(0) += i64::from(ptr.len);
    }

    /// A committed pointer was replaced or removed.
    pub fn release(&self, ptr: &ChunkPtr) {
        *lock(&self.live).entry(ptr.seg).or_insert(0) -= i64::from(ptr.len);
        lock(&self.released).push(*ptr);
    }

    /// Takes the released versions to give back after the next sync completes.
    pub fn take_released(&self) -> Vec<ChunkPtr> {
        std::mem::take(&mut *lock(&self.released))
    }

    /// Puts back a release whose sync failed.
    pub fn requeue(&self, ptr: &ChunkPtr) {
        lock(&self.released).push(*ptr);
    }

    /// Gives the bytes of released versions back to the host (the caller synced since they
    /// were released).
    pub fn punch(&self, ptrs: &[ChunkPtr]) {
        use std::os::fd::AsRawFd;
        for p in ptrs {
            let Some(f) = self.file(p.seg) else {
                continue;
            };
            let r = nix::fcntl::fallocate(
                f.as_raw_fd(),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                p.off as i64,
                i64::from(p.len),
            );
            if let Err(e) = r {
                // Not every host filesystem can punch holes; compaction still frees space.
                tracing::debug!("punching a released chunk in segment {:x}: {e}", p.seg);
            }
        }
    }

    /// Appends chunk versions `(key, bytes)` with one write; returns their pointers.
    pub fn append(&self, chunks: &[(&[u8], &[u8])]) -> io::Result<PendingAppend<'_>> {
        // Headers go in one buffer; the bytes are written from where they are (pwritev),
        // so a 1 MiB write is not copied once more in user space.
        let mut heads = Vec::with_capacity(chunks.iter().map(|(k, _)| 14 + k.len()).sum());
        let mut rel = Vec::with_capacity(chunks.len());
        let mut pos = 0u64;
        for (key, data) in chunks {
            let crc = chunk_crc(key, data);
            heads.extend_from_slice(MAGIC);
            heads.extend_from_slice(&(key.len() as u16).to_be_bytes());
            heads.extend_from_slice(key);
            heads.extend_from_slice(&(data.len() as u32).to_be_bytes());
            heads.extend_from_slice(&crc.to_be_bytes());
            pos += 14 + key.len() as u64;
            rel.push((pos, data.len() as u32, crc));
            pos += data.len() as u64;
        }
        let total_len = pos;
        let (seg, file, base) = {
            let mut a = lock(&self.active);
            if a.len > 0 && a.len + total_len > self.segment_max {
                let seg = a.seg + 1;
                let file = Arc::new(
                    OpenOptions::new()
                        .create_new(true)
                        .read(true)
                        .write(true)
                        .open(seg_path(&self.dir, seg))?,
                );
                self.files
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(seg, file.clone());
                lock(&self.dirty).insert(u64::MAX); // the directory entry
                *a = Active { seg, file, len: 0 };
            }
            let base = a.len;
            a.len += total_len;
            *lock(&self.pending).entry(a.seg).or_insert(0) += 1;
            (a.seg, a.file.clone(), base)
        };
        let total: i64 = rel.iter().map(|r| i64::from(r.1)).sum();
        *lock(&self.live).entry(seg).or_insert(0) += total;
        let pending = PendingAppend {
            store: self,
            seg,
            ptrs: rel
                .into_iter()
                .map(|(off, len, crc)| ChunkPtr {
                    seg,
                    off: base + off,
                    len,
                    crc,
                })
                .collect(),
        };
        let mut slices = Vec::with_capacity(chunks.len() * 2);
        let mut h = 0;
        for (key, data) in chunks {
            let n = 14 + key.len();
            slices.push(io::IoSlice::new(&heads[h..h + n]));
            slices.push(io::IoSlice::new(data));
            h += n;
        }
        if let Err(e) = pwritev_all(&file, &mut slices, base) {
            pending.abandon();
            return Err(e);
        }
        lock(&self.dirty).insert(seg);
        Ok(pending)
    }

    fn file(&self, seg: u64) -> Option<Arc<File>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&seg)
            .cloned()
    }

    /// Reads and verifies one chunk version. `Ok(None)`: its segment is gone (collected
    /// after the pointer was read); read the pointer again.
    pub fn read(&self, key: &[u8], ptr: &ChunkPtr) -> Result<Option<Vec<u8>>, ReadError> {
        let Some(file) = self.file(ptr.seg) else {
            return Ok(None);
        };
        let mut data = vec![0u8; ptr.len as usize];
        file.read_exact_at(&mut data, ptr.off).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ReadError::Corrupt
            } else {
                ReadError::Io(e)
            }
        })?;
        if chunk_crc(key, &data) != ptr.crc {
            return Err(ReadError::Corrupt);
        }
        Ok(Some(data))
    }

    /// Makes every append so far durable.
    pub fn sync(&self) -> io::Result<()> {
        let _one = lock(&self.sync_lock);
        let dirty: Vec<u64> = lock(&self.dirty).drain().collect();
        for seg in &dirty {
            if *seg == u64::MAX {
                sync_dir(&self.dir)?;
            } else if let Some(f) = self.file(*seg) {
                if let Err(e) = f.sync_data() {
                    lock(&self.dirty).extend(dirty.iter().copied());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Sealed segments worth compacting, emptiest first.
    pub fn gc_candidates(&self) -> Vec<u64> {
        let active = lock(&self.active).seg;
        let pending = lock(&self.pending);
        let live = lock(&self.live);
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        let mut c: Vec<(f64, u64)> = files
            .iter()
            .filter(|(seg, _)| **seg != active && !pending.contains_key(seg))
            .filter_map(|(seg, f)| {
                let size = f.metadata().ok()?.len().max(1) as f64;
                let ratio = live.get(seg).copied().unwrap_or(0).max(0) as f64 / size;
                (ratio < GC_LIVE_RATIO).then_some((ratio, *seg))
            })
            .collect();
        c.sort_by(|a, b| a.0.total_cmp(&b.0));
        c.into_iter().map(|(_, s)| s).collect()
    }

    /// Every record of a sealed segment: `(key, pointer)`. Stops at the first torn or
    /// unreadable record (the tail of a segment written when the daemon died).
    pub fn records(&self, seg: u64) -> io::Result<Vec<(Vec<u8>, ChunkPtr)>> {
        let Some(file) = self.file(seg) else {
            return Ok(Vec::new());
        };
        let size = file.metadata()?.len();
        let mut out = Vec::new();
        let mut off = 0u64;
        let mut head = [0u8; 6];
        while off + 6 <= size {
            if file.read_exact_at(&mut head, off).is_err() || &head[..4] != MAGIC {
                break;
            }
            let klen = u64::from(u16::from_be_bytes([head[4], head[5]]));
            let mut rest = vec![0u8; klen as usize + 8];
            if file.read_exact_at(&mut rest, off + 6).is_err() {
                break;
            }
            let k = klen as usize;
            let len = u32::from_be_bytes([rest[k], rest[k + 1], rest[k + 2], rest[k + 3]]);
            let crc = u32::from_be_bytes([rest[k + 4], rest[k + 5], rest[k + 6], rest[k + 7]]);
            let data_off = off + 6 + klen + 8;
            if data_off + u64::from(len) > size {
                break;
            }
            rest.truncate(k);
            out.push((
                rest,
                ChunkPtr {
                    seg,
                    off: data_off,
                    len,
                    crc,
                },
            ));
            off = data_off + u64::from(len);
        }
        Ok(out)
    }

    /// Deletes a segment nothing points into any more (the caller made the moves durable).
    pub fn remove_segment(&self, seg: u64) -> io::Result<()> {
        if lock(&self.pending).contains_key(&seg) || lock(&self.active).seg == seg {
            return Ok(());
        }
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seg);
        lock(&self.live).remove(&seg);
        std::fs::remove_file(seg_path(&self.dir, seg))?;
        sync_dir(&self.dir)
    }

    /// Bytes in all segment files (what the data takes on the host).
    pub fn disk_bytes(&self) -> u64 {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Writes every slice at `offset`, resuming after short writes.
fn pwritev_all(file: &File, mut slices: &mut [io::IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    use std::os::fd::AsFd;
    while !slices.is_empty() {
        let batch = slices.len().min(512);
        let n = nix::sys::uio::pwritev(file.as_fd(), &slices[..batch], offset as i64)
            .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "segment write wrote nothing",
            ));
        }
        offset += n as u64;
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_verify_and_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cs = ChunkStore::open(dir.path()).expect("open");
        let p = cs
            .append(&[(b"k1", b"hello"), (b"k2", b"world!")])
            .expect("append");
        let ptrs = p.ptrs().to_vec();
        drop(p);
        assert_eq!(
            cs.read(b"k1", &ptrs[0]).expect("read"),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            cs.read(b"k2", &ptrs[1]).expect("read"),
            Some(b"world!".to_vec())
        );
        assert!(matches!(cs.read(b"k9", &ptrs[0]), Err(ReadError::Corrupt)));
        let recs = cs.records(ptrs[0].seg).expect("records");
        assert_eq!(
            recs,
            vec![(b"k1".to_vec(), ptrs[0]), (b"k2".to_vec(), ptrs[1])]
        );
        assert_eq!(ChunkPtr::decode(&ptrs[1].encode()), Some(ptrs[1]));
        cs.sync().expect("sync");
    }

    #[test]
    fn flipped_byte_on_disk_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cs = ChunkStore::open(dir.path()).expect("open");
        let ptr = cs.append(&[(b"k", b"abcdef")]).expect("append").ptrs()[0];
        let f = OpenOptions::new()
            .write(true)
            .open(seg_path(dir.path(), ptr.seg))
            .expect("open seg");
        f.write_all_at(b"X", ptr.off + 2).expect("corrupt");
        assert!(matches!(cs.read(b"k", &ptr), Err(ReadError::Corrupt)));
    }
}
