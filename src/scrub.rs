//! `scrub`: reads and verifies every chunk version of a volume online — the live chunks
//! and those only snapshot layers hold — through `ChunkStore::read`, so that damage on the
//! host disk is found before a reader meets it.
//!
//! It takes no lock: keys come from sled range scans, and a chunk that a writer, the
//! compactor or a snapshot removal replaced while it was being read (its key now points
//! elsewhere, or is gone) is followed rather than reported. Writers never wait for it.

use std::collections::HashMap;

use crate::chunks::ChunkPtr;
use crate::fsck::{be, verify_chunk, verify_layer_chunk};
use crate::store::{self, CHUNK_SIZE, Store};

/// What [`scrub_volume`] read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scrubbed {
    pub chunks: u64,
    /// Chunk bytes read and verified.
    pub bytes: u64,
    /// One line per corrupt or unreadable chunk: volume (and snapshot), inode, offset, why.
    pub problems: Vec<String>,
}

/// Reads and verifies every chunk version of volume `vol` (named `name`); `progress` is
/// told the bytes of each chunk read.
pub fn scrub_volume(store: &Store, vol: u64, name: &str, progress: &dyn Fn(u64)) -> Scrubbed {
    let mut out = Scrubbed::default();
    let snaps: HashMap<u64, String> = store
        .snapshots(vol)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, r)| (id, r.name))
        .collect();
    // Live chunks.
    for item in store
        .fs
        .scan_prefix(store::tag_prefix(vol, store::TAG_CHUNK))
    {
        let (k, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                out.problems
                    .push(format!("{name}: reading the chunk index failed: {e}"));
                break;
            }
        };
        let Some(idx) = store::parse_chunk_key(&k) else {
            continue;
        };
        let ino = be(&k[9..17]);
        let offset = idx.saturating_mul(CHUNK_SIZE);
        out.chunks += 1;
        let Some(ptr) = ChunkPtr::decode(&v) else {
            out.problems.push(format!(
                "{name}: inode {ino} offset {offset}: the chunk pointer does not decode"
            ));
            continue;
        };
        let current = || {
            store
                .fs
                .get(&k)
                .ok()
                .map(|v| v.as_deref().and_then(ChunkPtr::decode))
        };
        match verify_chunk(store, &k, ptr, current) {
            Ok(n) => {
                out.bytes += n;
                progress(n);
            }
            Err(why) => out
                .problems
                .push(format!("{name}: inode {ino} offset {offset}: {why}")),
        }
    }
    // Chunk versions only snapshots hold.
    for item in store
        .fs
        .scan_prefix(store::tag_prefix(vol, store::TAG_LAYER))
    {
        let (lk, v) = match item {
            Ok(kv) => kv,
            Err(e) => {
                out.problems
                    .push(format!("{name}: reading the snapshot layers failed: {e}"));
                break;
            }
        };
        if lk.len() != 34 || lk[17] != store::TAG_CHUNK || v.first() != Some(&1) {
            continue;
        }
        let snap = be(&lk[9..17]);
        let origin = store::layer_key_origin(vol, &lk);
        let ino = be(&origin[9..17]);
        let offset = be(&origin[17..25]).saturating_mul(CHUNK_SIZE);
        let at = snaps
            .get(&snap)
            .map_or_else(|| format!("{name}@#{snap}"), |s| format!("{name}@{s}"));
        out.chunks += 1;
        let Some(ptr) = crate::snap::decode_pre_ptr(&v) else {
            out.problems.push(format!(
                "{at}: inode {ino} offset {offset}: the chunk pointer does not decode"
            ));
            continue;
        };
        match verify_layer_chunk(store, &lk, &origin, ptr) {
            Ok(n) => {
                out.bytes += n;
                progress(n);
            }
            Err(why) => out
                .problems
                .push(format!("{at}: inode {ino} offset {offset}: {why}")),
        }
    }
    out
}
