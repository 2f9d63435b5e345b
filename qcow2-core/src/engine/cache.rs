//! Metadata caches: L2 tables and refcount blocks, cached in slices.
//!
//! A slice is a fixed-size piece of one table cluster (at most 4 KiB and at least
//! 512 bytes, never more than a cluster). The cache is split into shards, each an
//! LRU under its own short-held lock, so lookups from many threads do not serialize
//! on one lock. Loads happen outside the lock; concurrent misses on the same slice
//! share one read. Slices may be dirty (the write side): a dirty slice is never
//! dropped by eviction before it has been written back.
//!
//! An image's L2 table cache and refcount block cache are two parts of one [`CachePool`]:
//! one budget, the configured cache size, so a workload that only reads gives all of it
//! to L2 tables (a fixed 3:1 split left a quarter unused by reads).
//!
//! The capacity is one budget for the whole pool, not a share per shard: a slice's
//! shard comes from a hash of its offset, and the slices an access pattern keeps using
//! are never spread evenly, so a fixed share per shard let the fuller shards thrash (an
//! LRU scanned cyclically by more entries than it holds hits nothing) while others had
//! room. A miss over the budget evicts the least recently used slice of the shards of
//! both parts in turn (round robin, one shard lock at a time): a shard that misses more
//! grows until the shards' miss rates are even, which comes within a percent of one global LRU (see
//! `scripts/cache_sim.py`) without a global lock.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::OnceCell;

/// Most bytes [`SliceCache::get_ahead`] reads in one request (the slice asked for and the
/// ones after it).
pub const READ_AHEAD: usize = 64 << 10;

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
}

/// The slices of one cache (one kind of table) in a [`CachePool`].
struct Part {
    shards: Box<[Mutex<Shard>]>,
    /// Evicted dirty slices still waiting for write-back (found by lookups).
    evicted: Mutex<Vec<Arc<Slice>>>,
}

/// One memory budget shared by several caches: an image's L2 table and refcount block
/// caches, so a workload that only reads gives the whole budget to L2 tables and one that
/// allocates shares it as its misses need (a miss over the budget may evict from either).
pub struct CachePool {
    slice_size: usize,
    /// Most slices cached (all parts and shards together).
    cap: usize,
    /// Slices cached now.
    len: AtomicUsize,
    /// Where the next eviction takes from (round robin over every shard of every part).
    next_victim: AtomicUsize,
    parts: Box<[Part]>,
}

const SHARDS: usize = 16;

impl CachePool {
    /// A pool of `capacity` bytes (at least two slices per shard) in slices of `slice_size`
    /// bytes, for `parts` caches.
    pub fn new(slice_size: usize, capacity: usize, parts: usize) -> Arc<CachePool> {
        let cap = (capacity / slice_size).max(2 * SHARDS);
        let parts = (0..parts.max(1))
            .map(|_| Part {
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Shard {
                            lru: LruCache::unbounded(),
                        })
                    })
                    .collect(),
                evicted: Mutex::new(Vec::new()),
            })
            .collect();
        Arc::new(CachePool {
            slice_size,
            cap,
            len: AtomicUsize::new(0),
            next_victim: AtomicUsize::new(0),
            parts,
        })
    }

    /// Most bytes the pool keeps (dirty slices waiting for write-back aside).
    pub fn capacity(&self) -> usize {
        self.cap * self.slice_size
    }

    /// Slices cached now, in every part.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evict least recently used slices, taking from the shards of every part in turn,
    /// until the pool is within its capacity. Call with no shard lock held. Dirty slices
    /// go to their part's pending list. Concurrent misses may overshoot by one slice each,
    /// for as long as they run.
    fn evict_over_capacity(&self) {
        let all = self.parts.len() * SHARDS;
        let mut empty = 0;
        while self.len.load(Ordering::Relaxed) > self.cap && empty < all {
            let i = self.next_victim.fetch_add(1, Ordering::Relaxed) % all;
            let part = &self.parts[i / SHARDS];
            // A dirty slice moves to the pending list under its shard's lock, so a lookup
            // (which holds that lock) finds it in one place or the other, never in neither.
            let mut sh = part.shards[i % SHARDS].lock();
            match sh.lru.pop_lru() {
                Some((_, old)) => {
                    empty = 0;
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    if old.is_dirty() {
                        part.evicted.lock().push(old);
                    }
                }
                None => empty += 1,
            }
        }
    }
}

/// A sharded LRU cache of table slices: one part of a [`CachePool`].
pub struct SliceCache {
    name: &'static str,
    slice_size: usize,
    pool: Arc<CachePool>,
    part: usize,
}

impl SliceCache {
    /// A cache of `capacity` bytes of its own in slices of `slice_size` bytes.
    pub fn new(name: &'static str, slice_size: usize, capacity: usize) -> Self {
        Self::in_pool(name, CachePool::new(slice_size, capacity, 1), 0)
    }

    /// A cache holding part `part` of `pool` (each part is one cache's).
    pub fn in_pool(name: &'static str, pool: Arc<CachePool>, part: usize) -> Self {
        assert!(part < pool.parts.len());
        SliceCache {
            name,
            slice_size: pool.slice_size,
            pool,
            part,
        }
    }

    /// Most bytes the cache's pool keeps, shared with the pool's other caches (dirty
    /// slices waiting for write-back aside).
    pub fn capacity(&self) -> usize {
        self.pool.capacity()
    }

    /// Slices this cache holds now.
    pub fn len(&self) -> usize {
        self.p().shards.iter().map(|s| s.lock().lru.len()).sum()
    }

    /// Whether this cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn p(&self) -> &Part {
        &self.pool.parts[self.part]
    }

    /// Bytes in a slice.
    pub fn slice_size(&self) -> usize {
        self.slice_size
    }

    fn shard(&self, off: u64) -> &Mutex<Shard> {
        let k = off / self.slice_size as u64;
        let h = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 59;
        &self.p().shards[h as usize % SHARDS]
    }

    /// The cached slice at `offset`, or a new unloaded one put in its place (`true`: it was
    /// not cached). A dirty slice evicted but not yet written back is taken back.
    fn lookup_or_insert(&self, offset: u64) -> (Arc<Slice>, bool) {
        let mut sh = self.shard(offset).lock();
        if let Some(s) = sh.lru.get(&offset) {
            return (s.clone(), false);
        }
        let pending = {
            let ev = self.p().evicted.lock();
            ev.iter().find(|s| s.offset == offset).cloned()
        };
        let s = pending.unwrap_or_else(|| Arc::new(Slice::new(offset)));
        sh.lru.put(offset, s.clone());
        drop(sh);
        self.pool.len.fetch_add(1, Ordering::Relaxed);
        self.pool.evict_over_capacity();
        (s, true)
    }

    /// Whether a slice of this cache is at `offset` (cached or waiting for write-back),
    /// without touching its recency.
    fn holds(&self, offset: u64) -> bool {
        self.shard(offset).lock().lru.contains(&offset)
            || self.p().evicted.lock().iter().any(|s| s.offset == offset)
    }

    /// Get the slice at `offset` (slice-aligned), reading it from `file` on a miss.
    pub async fn get(&self, file: &dyn Storage, offset: u64) -> Result<Arc<Slice>> {
        debug_assert_eq!(offset % self.slice_size as u64, 0);
        let (slice, _) = self.lookup_or_insert(offset);
        self.load(file, &slice, offset, &[]).await?;
        Ok(slice)
    }

    /// [`SliceCache::get`] for a lookup that enters the slice at its first entry, in the
    /// table `[table_start, table_end)`: on a miss that looks like a sequential scan (the
    /// slice is the table's first, or the slice before it is cached), the slices after it
    /// up to [`READ_AHEAD`] bytes (within the table, up to the first one already cached)
    /// are read in the same request and cached. A scan then waits for one metadata read
    /// per `READ_AHEAD` bytes of table instead of one per slice (QEMU reads a whole
    /// 64 KiB table at once); random lookups rarely start at a slice's first entry, and
    /// read one slice as before.
    pub async fn get_ahead(
        &self,
        file: &dyn Storage,
        offset: u64,
        table_start: u64,
        table_end: u64,
    ) -> Result<Arc<Slice>> {
        debug_assert_eq!(offset % self.slice_size as u64, 0);
        let ss = self.slice_size as u64;
        let (slice, missed) = self.lookup_or_insert(offset);
        let mut ahead = Vec::new();
        if missed
            && !slice.loaded.initialized()
            && (offset == table_start || (offset >= table_start + ss && self.holds(offset - ss)))
        {
            let end = table_end.min(offset.saturating_add(READ_AHEAD as u64));
            let mut o = offset + ss;
            while o + ss <= end && !self.holds(o) {
                ahead.push(self.lookup_or_insert(o).0);
                o += ss;
            }
        }
        self.load(file, &slice, offset, &ahead).await?;
        Ok(slice)
    }

    /// Load `slice` (at `offset`) if nobody has, together with `ahead` (the slices right
    /// after it, not loaded when they were put in the cache) in one read. A read-ahead
    /// that fails is retried for `slice` alone; slices of `ahead` that someone else loaded
    /// meanwhile keep their content.
    async fn load(
        &self,
        file: &dyn Storage,
        slice: &Slice,
        offset: u64,
        ahead: &[Arc<Slice>],
    ) -> Result<()> {
        let size = self.slice_size;
        let name = self.name;
        let mut rest: Option<Vec<u8>> = None;
        slice
            .loaded
            .get_or_try_init(|| async {
                if !ahead.is_empty() {
                    let mut buf = vec![0u8; size * (1 + ahead.len())];
                    if file.read_at(&mut buf, offset).await.is_ok() {
                        let tail = buf.split_off(size);
                        *slice.data.write() = buf;
                        rest = Some(tail);
                        return Ok(());
                    }
                }
                let mut buf = vec![0u8; size];
                file.read_at(&mut buf, offset)
                    .await
                    .map_err(|e| Error::io(e, format!("reading {name} at 0x{offset:x}")))?;
                *slice.data.write() = buf;
                Ok::<(), Error>(())
            })
            .await?;
        if let Some(rest) = rest {
            for (s, chunk) in ahead.iter().zip(rest.chunks_exact(size)) {
                // Only while unloaded: a loaded slice may have changed since.
                s.loaded
                    .get_or_init(|| async {
                        *s.data.write() = chunk.to_vec();
                    })
                    .await;
            }
        }
        Ok(())
    }

    /// Insert a slice whose content is known (a newly allocated table), marked dirty.
    pub fn insert_new(&self, offset: u64, data: Vec<u8>) -> Arc<Slice> {
        let s = Arc::new(Slice::new(offset));
        *s.data.write() = data;
        let _ = s.loaded.set(());
        s.gen.store(1, Ordering::Release);
        let replaced = self.shard(offset).lock().lru.put(offset, s.clone());
        if replaced.is_none() {
            self.pool.len.fetch_add(1, Ordering::Relaxed);
            self.pool.evict_over_capacity();
        }
        s
    }

    /// Every dirty slice (cached or evicted but not yet written).
    pub fn dirty_slices(&self) -> Vec<Arc<Slice>> {
        let mut out: Vec<Arc<Slice>> = self.p().evicted.lock().clone();
        for sh in self.p().shards.iter() {
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
        !self.p().evicted.lock().is_empty()
    }

    /// Forget evicted slices that are clean now.
    pub fn prune_evicted(&self) {
        self.p().evicted.lock().retain(|s| s.is_dirty());
    }

    /// Drop every cached slice at host offsets in `[start, end)` (a freed table).
    pub fn invalidate_range(&self, start: u64, end: u64) {
        let mut off = start - start % self.slice_size as u64;
        while off < end {
            if self.shard(off).lock().lru.pop(&off).is_some() {
                self.pool.len.fetch_sub(1, Ordering::Relaxed);
            }
            off += self.slice_size as u64;
        }
        self.p()
            .evicted
            .lock()
            .retain(|s| s.offset < start || s.offset >= end);
    }

    /// Drop everything (clean or not).
    pub fn clear(&self) {
        for sh in self.p().shards.iter() {
            let mut sh = sh.lock();
            self.pool.len.fetch_sub(sh.lru.len(), Ordering::Relaxed);
            sh.lru.clear();
        }
        self.p().evicted.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemStorage;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    const SLICE: usize = 512;

    /// A cache of `n` slices over a file whose slice `i` starts with `i` (as u64).
    fn setup(n: usize, slices: u64) -> (SliceCache, MemStorage) {
        let mut bytes = vec![0u8; slices as usize * SLICE];
        for i in 0..slices {
            let o = i as usize * SLICE;
            bytes[o..o + 8].copy_from_slice(&i.to_be_bytes());
        }
        (
            SliceCache::new("test", SLICE, n * SLICE),
            MemStorage::from_vec(bytes),
        )
    }

    /// Hits while a set of slices that fits in the capacity is scanned cyclically: every
    /// round after the first hits everything, however unevenly the slices fall into shards
    /// (a share per shard let the fuller shards miss on every access).
    #[test]
    fn working_set_within_capacity_stays_cached() {
        run(async {
            let (c, file) = setup(64, 4096);
            // 60 slices that fall into 4 of the 16 shards (hashing never spreads a working
            // set perfectly; here it is made very uneven).
            let offs: Vec<u64> = (0..4096u64)
                .map(|i| i * SLICE as u64)
                .filter(|&o| {
                    let p: *const Mutex<Shard> = c.shard(o);
                    (0..4).any(|j| std::ptr::eq(p, &c.p().shards[j]))
                })
                .take(60)
                .collect();
            assert_eq!(offs.len(), 60);
            for &o in &offs {
                let s = c.get(&file, o).await.unwrap();
                assert_eq!(s.get64(0), o / SLICE as u64);
            }
            let loaded = c.len();
            assert_eq!(loaded, 60);
            for _ in 0..5 {
                for &o in &offs {
                    c.get(&file, o).await.unwrap();
                }
            }
            // No slice was evicted and loaded again.
            assert_eq!(c.len(), 60);
            for &o in &offs {
                assert!(
                    c.shard(o).lock().lru.contains(&o),
                    "slice {o:#x} was evicted"
                );
            }
        })
    }

    /// Memory stays bounded by the capacity (clean slices), the content stays right, and
    /// the count follows invalidation and clearing.
    #[test]
    fn bounded_by_capacity() {
        run(async {
            let (c, file) = setup(40, 1000);
            assert_eq!(c.capacity(), 40 * SLICE);
            for round in 0..3u64 {
                for i in 0..1000u64 {
                    let k = (i * 37 + round) % 1000;
                    let s = c.get(&file, k * SLICE as u64).await.unwrap();
                    assert_eq!(s.get64(0), k);
                    assert!(c.len() <= 40);
                }
            }
            assert_eq!(c.pool.len(), c.len());
            assert_eq!(c.len(), 40);
            c.invalidate_range(0, 1000 * SLICE as u64);
            assert!(c.is_empty());
            for k in 0..10u64 {
                c.get(&file, k * SLICE as u64).await.unwrap();
            }
            assert_eq!(c.len(), 10);
            c.clear();
            assert!(c.is_empty());
        })
    }

    /// Two caches in one pool: one that only reads gets the whole budget; misses of one
    /// evict from the other, whose dirty slices wait for write-back in its own list.
    #[test]
    fn pool_shared_by_two_caches() {
        run(async {
            let (_, file) = setup(1, 4096);
            let pool = CachePool::new(SLICE, 64 * SLICE, 2);
            let l2 = SliceCache::in_pool("L2", pool.clone(), 0);
            let rc = SliceCache::in_pool("rc", pool.clone(), 1);
            let d = rc.insert_new(4000 * SLICE as u64, vec![1u8; SLICE]);
            for k in 0..30u64 {
                rc.get(&file, k * SLICE as u64).await.unwrap();
            }
            assert_eq!(rc.len(), 31);
            for round in 0..3 {
                for k in 100..160u64 {
                    l2.get(&file, k * SLICE as u64).await.unwrap();
                }
                assert!(pool.len() <= 64, "round {round}: {}", pool.len());
            }
            // The reads took (nearly) the whole budget: rc was evicted in turn.
            assert!(l2.len() >= 56, "{}", l2.len());
            assert!(rc.is_empty() || rc.len() < 8);
            assert!(rc.has_evicted_dirty());
            assert!(!l2.has_evicted_dirty());
            assert!(Arc::ptr_eq(&rc.dirty_slices()[0], &d));
            assert_eq!(l2.capacity(), 64 * SLICE);
        })
    }

    /// An evicted dirty slice waits for write-back and is found again by a lookup.
    #[test]
    fn dirty_slices_survive_eviction() {
        run(async {
            let (c, file) = setup(32, 1000);
            let s = c.insert_new(0, vec![7u8; SLICE]);
            for k in 1..200u64 {
                c.get(&file, k * SLICE as u64).await.unwrap();
            }
            assert!(c.has_evicted_dirty());
            assert!(c.len() <= 32);
            let again = c.get(&file, 0).await.unwrap();
            assert!(Arc::ptr_eq(&s, &again));
            assert_eq!(again.data.read()[0], 7);
            assert_eq!(c.dirty_slices().len(), 1);
            let (_, gen) = again.snapshot();
            again.mark_written(gen);
            c.prune_evicted();
            assert!(!c.has_evicted_dirty());
        })
    }

    /// A scan that enters each slice at its first entry reads a table's slices in one
    /// request (up to `READ_AHEAD` bytes, never past the table); without read-ahead each
    /// slice was a read of its own, which a sequential scan waits for.
    #[test]
    fn sequential_scan_reads_ahead_within_the_table() {
        run(async {
            let (c, file) = setup(256, 64);
            let table = 16 * SLICE as u64;
            for i in 0..32u64 {
                let off = i * SLICE as u64;
                let start = off / table * table;
                let s = c.get_ahead(&file, off, start, start + table).await.unwrap();
                assert_eq!(s.get64(0), i);
                // Every slice of the table is loaded after the first lookup.
                if i % 16 == 0 {
                    assert_eq!(file.read_count(), i / 16 + 1);
                }
            }
            assert_eq!(file.read_count(), 2, "one read per table");
            assert_eq!(c.len(), 32);
            // The tables' slices hold their own bytes.
            for i in 0..32u64 {
                assert_eq!(c.get(&file, i * SLICE as u64).await.unwrap().get64(0), i);
            }
            assert_eq!(file.read_count(), 2);
        })
    }

    /// Read-ahead only follows a cached predecessor (or the table's start), stops at a
    /// slice already cached, and never replaces a cached slice's changed content.
    #[test]
    fn read_ahead_keeps_cached_slices() {
        run(async {
            let (c, file) = setup(256, 64);
            let table_end = 64 * SLICE as u64;
            let sl = |i: u64| i * SLICE as u64;
            // No predecessor cached, not the table's start: this slice alone.
            c.get_ahead(&file, sl(10), 0, table_end).await.unwrap();
            assert_eq!(file.read_count(), 1);
            assert_eq!(c.len(), 1);
            // Slice 14 changed in the cache (not written back).
            let s14 = c.get(&file, sl(14)).await.unwrap();
            s14.modify(|d| d[..8].copy_from_slice(&99u64.to_be_bytes()));
            assert_eq!(file.read_count(), 2);
            // Slice 11 follows the cached 10: read with 12 and 13, up to the cached 14.
            c.get_ahead(&file, sl(11), 0, table_end).await.unwrap();
            assert_eq!(file.read_count(), 3);
            assert_eq!(c.len(), 5);
            for i in 10..14u64 {
                assert_eq!(c.get(&file, sl(i)).await.unwrap().get64(0), i);
            }
            assert_eq!(c.get(&file, sl(14)).await.unwrap().get64(0), 99);
            assert!(s14.is_dirty());
            assert_eq!(file.read_count(), 3);
            // A hit reads nothing.
            c.get_ahead(&file, sl(12), 0, table_end).await.unwrap();
            assert_eq!(file.read_count(), 3);
        })
    }

    /// The "read ahead, then fill the slices" window: while a read-ahead's request is in
    /// flight (its bytes already read from the file), another request loads one of the
    /// slices being read ahead and changes it. The read-ahead's completion must leave that
    /// slice's new content alone, fill the slices nobody loaded, and a lookup of the first
    /// slice meanwhile waits for the read rather than reading again.
    #[test]
    fn read_ahead_completing_late_keeps_a_slice_loaded_meanwhile() {
        use crate::io::fault::{HookStorage, Match, Op};
        run(async {
            let (c, file) = setup(256, 64);
            let (c, file) = (Arc::new(c), Arc::new(file));
            let hs = HookStorage::new(file.clone());
            let sl = |i: u64| i * SLICE as u64;
            let table_end = 8 * SLICE as u64;
            // Hold the completion of the first read (the read-ahead of slices 0..8).
            let gate = hs.hold_after(Match::op(Op::Read));
            let scan = tokio::spawn({
                let (c, hs) = (c.clone(), hs.clone());
                async move { c.get_ahead(&*hs, 0, 0, table_end).await.map(|s| s.get64(0)) }
            });
            gate.wait_arrived(1).await;
            assert_eq!(file.read_count(), 1);
            assert_eq!(
                c.len(),
                8,
                "the slices read ahead are in the cache, not loaded"
            );
            // Slice 2 is loaded by another request (its own read) and changed.
            let s2 = c.get(&*hs, sl(2)).await.unwrap();
            assert_eq!(file.read_count(), 2);
            s2.modify(|d| d[..8].copy_from_slice(&77u64.to_be_bytes()));
            // A lookup of slice 0 waits for the held read instead of reading it again.
            let first = tokio::spawn({
                let (c, hs) = (c.clone(), hs.clone());
                async move { c.get(&*hs, 0).await.map(|s| s.get64(0)) }
            });
            tokio::task::yield_now().await;
            assert!(!first.is_finished());
            gate.release();
            assert_eq!(scan.await.unwrap().unwrap(), 0);
            assert_eq!(first.await.unwrap().unwrap(), 0);
            assert_eq!(file.read_count(), 2, "no slice of the table read twice");
            assert_eq!(c.get(&*hs, sl(2)).await.unwrap().get64(0), 77);
            assert!(s2.is_dirty());
            for i in [1u64, 3, 4, 5, 6, 7] {
                assert_eq!(c.get(&*hs, sl(i)).await.unwrap().get64(0), i);
            }
            assert_eq!(file.read_count(), 2);
        })
    }
}
