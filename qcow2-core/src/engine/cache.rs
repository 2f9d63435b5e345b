//! Metadata caches: L2 tables and refcount blocks, cached in slices.
//!
//! A slice is a fixed-size piece of one table cluster (at most 4 KiB and at least
//! 512 bytes, never more than a cluster). The cache is split into shards, each an
//! LRU under its own short-held lock, so lookups from many threads do not serialize
//! on one lock. Loads happen outside the lock; concurrent misses on the same slice
//! share one read. Slices may be dirty (the write side): a dirty slice is never
//! dropped by eviction before it has been written back.
//!
//! Dirty tracking uses change generations: every change bumps the slice's generation under
//! its data lock; a write-back copies the data and the generation together, and after the
//! write has succeeded marks only that generation clean. A slice therefore stays dirty until
//! a write of its latest content has succeeded: a failed or cancelled write-back, or a change
//! made while the write was in flight, leaves it dirty.

use crate::io::Storage;
use crate::{Error, Result};
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::OnceCell;

/// One cached slice of a metadata table.
pub struct Slice {
    /// Host offset of the slice.
    pub offset: u64,
    loaded: OnceCell<()>,
    /// The raw on-disk bytes (big-endian entries). Change them only through
    /// [`Slice::modify`], which keeps the dirty tracking right.
    pub data: RwLock<Vec<u8>>,
    /// Change generation: bumped (under the data lock) by every change.
    gen: AtomicU64,
    /// The newest generation known to be written.
    clean_gen: AtomicU64,
}

impl Slice {
    fn new(offset: u64) -> Self {
        Slice {
            offset,
            loaded: OnceCell::new(),
            data: RwLock::new(Vec::new()),
            gen: AtomicU64::new(0),
            clean_gen: AtomicU64::new(0),
        }
    }
    /// Whether the slice has changes not yet written.
    pub fn is_dirty(&self) -> bool {
        self.gen.load(Ordering::Acquire) != self.clean_gen.load(Ordering::Acquire)
    }
    /// Change the content: the slice is dirty from before the change until a write-back of
    /// this (or a later) content has succeeded.
    pub fn modify<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut d = self.data.write();
        self.gen.fetch_add(1, Ordering::AcqRel);
        f(&mut d)
    }
    /// A copy of the content and its generation, for a write-back.
    pub fn snapshot(&self) -> (Vec<u8>, u64) {
        let d = self.data.read();
        (d.clone(), self.gen.load(Ordering::Acquire))
    }
    /// Record that the content of generation `gen` (from [`Slice::snapshot`]) is written.
    pub fn mark_written(&self, gen: u64) {
        self.clean_gen.fetch_max(gen, Ordering::AcqRel);
    }
    /// Read a big-endian u64 at byte `off` of the slice.
    pub fn get64(&self, off: usize) -> u64 {
        let d = self.data.read();
        u64::from_be_bytes(d[off..off + 8].try_into().unwrap())
    }
}

struct Shard {
    lru: LruCache<u64, Arc<Slice>>,
    bytes: usize,
}

/// A sharded LRU cache of table slices.
pub struct SliceCache {
    name: &'static str,
    slice_size: usize,
    cap_per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    /// Evicted dirty slices still waiting for write-back (found by lookups).
    evicted: Mutex<Vec<Arc<Slice>>>,
}

const SHARDS: usize = 16;

impl SliceCache {
    /// A cache of `capacity` bytes in slices of `slice_size` bytes (at least a few slices per shard).
    pub fn new(name: &'static str, slice_size: usize, capacity: usize) -> Self {
        let per = (capacity / SHARDS / slice_size).max(2);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::unbounded(),
                    bytes: 0,
                })
            })
            .collect();
        SliceCache {
            name,
            slice_size,
            cap_per_shard: per,
            shards,
            evicted: Mutex::new(Vec::new()),
        }
    }

    /// Most bytes the cache keeps (dirty slices waiting for write-back aside).
    pub fn capacity(&self) -> usize {
        self.cap_per_shard * SHARDS * self.slice_size
    }

    /// Bytes in a slice.
    pub fn slice_size(&self) -> usize {
        self.slice_size
    }

    fn shard(&self, off: u64) -> &Mutex<Shard> {
        let k = off / self.slice_size as u64;
        let h = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 59;
        &self.shards[h as usize % SHARDS]
    }

    /// Get the slice at `offset` (slice-aligned), reading it from `file` on a miss.
    pub async fn get(&self, file: &dyn Storage, offset: u64) -> Result<Arc<Slice>> {
        debug_assert_eq!(offset % self.slice_size as u64, 0);
        let slice = {
            let mut sh = self.shard(offset).lock();
            if let Some(s) = sh.lru.get(&offset) {
                s.clone()
            } else {
                let pending = {
                    let ev = self.evicted.lock();
                    ev.iter().find(|s| s.offset == offset).cloned()
                };
                let s = pending.unwrap_or_else(|| Arc::new(Slice::new(offset)));
                sh.lru.put(offset, s.clone());
                sh.bytes += 1;
                while sh.lru.len() > self.cap_per_shard {
                    // Evict the least recently used entry; dirty ones go to the pending list.
                    match sh.lru.pop_lru() {
                        Some((_, old)) => {
                            if old.is_dirty() {
                                self.evicted.lock().push(old);
                            }
                        }
                        None => break,
                    }
                }
                s
            }
        };
        let size = self.slice_size;
        let name = self.name;
        slice
            .loaded
            .get_or_try_init(|| async {
                let mut buf = vec![0u8; size];
                file.read_at(&mut buf, offset)
                    .await
                    .map_err(|e| Error::io(e, format!("reading {name} at 0x{offset:x}")))?;
                *slice.data.write() = buf;
                Ok::<(), Error>(())
            })
            .await?;
        Ok(slice)
    }

    /// Insert a slice whose content is known (a newly allocated table), marked dirty.
    pub fn insert_new(&self, offset: u64, data: Vec<u8>) -> Arc<Slice> {
        let s = Arc::new(Slice::new(offset));
        *s.data.write() = data;
        let _ = s.loaded.set(());
        s.gen.store(1, Ordering::Release);
        let mut sh = self.shard(offset).lock();
        sh.lru.put(offset, s.clone());
        while sh.lru.len() > self.cap_per_shard {
            match sh.lru.pop_lru() {
                Some((_, old)) if old.is_dirty() => self.evicted.lock().push(old),
                Some(_) => {}
                None => break,
            }
        }
        s
    }

    /// Every dirty slice (cached or evicted but not yet written).
    pub fn dirty_slices(&self) -> Vec<Arc<Slice>> {
        let mut out: Vec<Arc<Slice>> = self.evicted.lock().clone();
        for sh in self.shards.iter() {
            let sh = sh.lock();
            out.extend(
                sh.lru
                    .iter()
                    .filter(|(_, s)| s.is_dirty())
                    .map(|(_, s)| s.clone()),
            );
        }
        out.sort_by_key(|s| s.offset);
        out.dedup_by_key(|s| s.offset);
        out
    }

    /// Whether evicted dirty slices are waiting (the caller should write back soon).
    pub fn has_evicted_dirty(&self) -> bool {
        !self.evicted.lock().is_empty()
    }

    /// Forget evicted slices that are clean now.
    pub fn prune_evicted(&self) {
        self.evicted.lock().retain(|s| s.is_dirty());
    }

    /// Drop every cached slice at host offsets in `[start, end)` (a freed table).
    pub fn invalidate_range(&self, start: u64, end: u64) {
        let mut off = start - start % self.slice_size as u64;
        while off < end {
            self.shard(off).lock().lru.pop(&off);
            off += self.slice_size as u64;
        }
        self.evicted
            .lock()
            .retain(|s| s.offset < start || s.offset >= end);
    }

    /// Drop everything (clean or not).
    pub fn clear(&self) {
        for sh in self.shards.iter() {
            sh.lock().lru.clear();
        }
        self.evicted.lock().clear();
    }
}
