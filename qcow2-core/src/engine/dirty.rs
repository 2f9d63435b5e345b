//! Recording guest writes in the enabled persistent bitmaps, as QEMU does.
//!
//! Nothing happens until the first guest change (write, write-zeroes, discard) through a
//! writable handle. Then the enabled bitmaps (flag `auto`, not `in-use`) are loaded into
//! memory, each bitmap table is copied to new clusters, and the bitmaps are marked `in-use`
//! on disk: a new bitmap directory with the flag set, pointing at the copied tables, is
//! written to new clusters and the header switched to it (crash-safe, see `jobs/bitmap.rs`),
//! before that change reaches the disk. From then on every changed guest range sets, in
//! memory, the bits that cover it in every tracked bitmap (no I/O per request), and marks
//! the cluster-sized parts of the bitmap it touched as changed.
//!
//! [`Image::flush`] stores the changed parts, still `in-use`: a part whose data cluster
//! this session allocated is rewritten in place; any other part gets a new data cluster,
//! whose refcount is made durable (with a sync) before the table entry that points at it is
//! written into the session's table copy (also in place: nothing outside this session
//! points at it); the cluster it replaces is freed only after that table write is durable.
//! A crash at any point thus leaves no reference to a free cluster (at worst a leak), and
//! the bitmaps `in-use`. A flush with nothing changed since the last store writes nothing
//! for the bitmaps. A part is marked unchanged when its bits are copied, before its write:
//! a guest change meanwhile marks it again, and a store that fails or whose future is
//! dropped marks it again too (it is stored next time; a new cluster it had taken is
//! freed then). [`Image::close`] (and every bitmap operation, and resize) stores the
//! changed parts the same way, makes them durable, then switches to a directory without
//! the `in-use` flag; a later change starts again.
//!
//! An image whose handle was not closed (a crash, a killed process) keeps its bitmaps
//! `in-use`: they are inconsistent, as QEMU judges them, and can only be removed. Such a
//! bitmap found at the start is not tracked and stays `in-use`. Disabled bitmaps are left
//! untouched (QEMU marks them `in-use` too while the image is open, and rewrites them
//! unchanged on close).
//!
//! Memory: a bitmap takes `size / granularity / 8` bytes (2 MiB for 1 TiB at 64 KiB); the
//! tracked bitmaps of one image may take at most [`MAX_TRACKED_BYTES`], beyond which the
//! first change is refused with an error naming the limit.

use crate::engine::image::Image;
use crate::engine::metadata::Meta;
use crate::format::bitmaps::{self as fmt, TableEntry};
use crate::{Error, ErrorKind, Result};
use parking_lot::Mutex as PMutex;
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};

/// Most memory the tracked bitmaps of one image may take (1 GiB: 512 TiB of disk at a
/// 64 KiB granularity).
pub const MAX_TRACKED_BYTES: u64 = 1 << 30;

/// Not known yet whether there is anything to track (the next change finds out).
const UNKNOWN: u8 = 0;
/// Bitmaps are loaded and marked in use on disk.
const ACTIVE: u8 = 1;
/// No enabled consistent bitmap: nothing to do until the bitmaps change.
const IDLE: u8 = 2;

/// One tracked bitmap.
pub(crate) struct LiveBitmap {
    pub name: String,
    pub gran_bits: u8,
    pub bits: Vec<u8>,
    /// One bit per cluster-sized part of `bits`: changed since it was last stored.
    changed: Vec<u8>,
    /// Some bit of `changed` may be set.
    any_changed: bool,
    /// The session's copy of the bitmap table (the directory on disk points at it).
    table_offset: u64,
    /// Its entries as they are, or are to be, on disk.
    table: Vec<u64>,
    /// Clusters of the table (indices within it) whose copy on disk is stale.
    table_stale: BTreeSet<u64>,
    /// Data clusters (offsets) this session allocated and the table points at.
    owned: HashSet<u64>,
    /// Data clusters (indices) to free once the table on disk no longer points at them
    /// (or never did: a new cluster whose write failed or was dropped).
    unlinked: Vec<u64>,
}

impl LiveBitmap {
    /// Whether a store has anything to do.
    fn pending(&self) -> bool {
        self.any_changed || !self.table_stale.is_empty() || !self.unlinked.is_empty()
    }
}

/// Tracking state of a writable handle.
pub(crate) struct Tracking {
    state: AtomicU8,
    pub(crate) live: PMutex<Vec<LiveBitmap>>,
    /// Serialises starting the tracking.
    start: tokio::sync::Mutex<()>,
}

impl Default for Tracking {
    fn default() -> Self {
        Tracking {
            state: AtomicU8::new(UNKNOWN),
            live: PMutex::new(Vec::new()),
            start: tokio::sync::Mutex::new(()),
        }
    }
}

/// Set bits `first..=last` of `bits` (clamped to its length); whether any was clear.
fn set_bits(bits: &mut [u8], first: u64, last: u64) -> bool {
    let nbits = bits.len() as u64 * 8;
    if first >= nbits {
        return false;
    }
    let last = last.min(nbits - 1);
    let mut changed = false;
    let mut i = first;
    while i <= last {
        if i.is_multiple_of(8) && i + 7 <= last {
            let end = ((last + 1) / 8) as usize;
            let run = &mut bits[(i / 8) as usize..end];
            if !changed && run.iter().any(|&b| b != 0xff) {
                changed = true;
            }
            run.fill(0xff);
            i = end as u64 * 8;
        } else {
            let b = &mut bits[(i / 8) as usize];
            changed |= *b & (1 << (i % 8)) == 0;
            *b |= 1 << (i % 8);
            i += 1;
        }
    }
    changed
}

/// The first set bit of `bits` at or after `from`.
fn next_set(bits: &[u8], from: u64) -> Option<u64> {
    let mut byte = (from / 8) as usize;
    if byte >= bits.len() {
        return None;
    }
    let first = bits[byte] & (0xffu8 << (from % 8));
    if first != 0 {
        return Some(byte as u64 * 8 + first.trailing_zeros() as u64);
    }
    byte += 1;
    let k = bits[byte..].iter().position(|&b| b != 0)?;
    let b = byte + k;
    Some(b as u64 * 8 + bits[b].trailing_zeros() as u64)
}

/// Marks tracked bitmap `bi` changed again when dropped armed, and part `part` with it: a
/// store that fails, or whose future is dropped, while it writes a part's copy (whose
/// changed mark it cleared when it took the copy) leaves that part to the next store.
struct Restore<'a> {
    live: &'a PMutex<Vec<LiveBitmap>>,
    bi: usize,
    part: Option<u64>,
    armed: bool,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut live = self.live.lock();
        if let Some(b) = live.get_mut(self.bi) {
            b.any_changed = true;
            if let Some(c) = self.part {
                b.changed[(c / 8) as usize] |= 1 << (c % 8);
            }
        }
    }
}

impl Image {
    /// Record a change of `len` bytes at guest offset `off` in the enabled bitmaps, starting
    /// the tracking first if needed. Call inside the request (after `enter_request`), before
    /// the change reaches the disk.
    pub(crate) async fn track_change(&self, off: u64, len: u64) -> Result<()> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let mut st = w.dirty.state.load(Ordering::Acquire);
        if st == UNKNOWN {
            self.start_tracking().await?;
            st = w.dirty.state.load(Ordering::Acquire);
        }
        if st == ACTIVE {
            let cs = self.inner.layout.cluster_size;
            let mut live = w.dirty.live.lock();
            for b in live.iter_mut() {
                let (first, last) = (off >> b.gran_bits, (off + len - 1) >> b.gran_bits);
                if first / 8 >= b.bits.len() as u64 {
                    continue;
                }
                if !set_bits(&mut b.bits, first, last) {
                    // Nothing new to store.
                    continue;
                }
                let last_byte = (last / 8).min(b.bits.len() as u64 - 1);
                set_bits(&mut b.changed, first / 8 / cs, last_byte / cs);
                b.any_changed = true;
            }
        }
        Ok(())
    }

    /// Load the enabled consistent bitmaps, copy their tables, and mark them in use on disk.
    async fn start_tracking(&self) -> Result<()> {
        let w = self.ws()?;
        let _start = w.dirty.start.lock().await;
        if w.dirty.state.load(Ordering::Acquire) != UNKNOWN {
            return Ok(());
        }
        let candidates = self
            .bitmaps()
            .iter()
            .any(|b| b.flags & fmt::FLAG_AUTO != 0 && b.flags & fmt::FLAG_IN_USE == 0);
        if !candidates || self.inner.header.read().version < 3 {
            w.dirty.state.store(IDLE, Ordering::Release);
            return Ok(());
        }
        let _gate = w.alloc_gate.read().await;
        let mut m = w.meta.lock().await;
        let mut dir = self.bitmap_dir().await?;
        let size = self.size();
        let mut total = 0u64;
        for e in &dir {
            if e.flags & fmt::FLAG_AUTO != 0 && e.flags & fmt::FLAG_IN_USE == 0 {
                total += fmt::bit_count(size, e.granularity_bits).div_ceil(8);
            }
        }
        if total > MAX_TRACKED_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "{}: the enabled persistent bitmaps would take {total} bytes of memory \
                     (limit {MAX_TRACKED_BYTES}); disable or remove some before writing",
                    self.inner.path.display()
                ),
            ));
        }
        let cs = self.inner.layout.cluster_size;
        let mut live = Vec::new();
        let mut old = Vec::new();
        let mut a = crate::jobs::bitmap::Allocated::new(&mut m);
        let r = async {
            for e in dir.iter_mut() {
                if e.flags & fmt::FLAG_AUTO == 0 || e.flags & fmt::FLAG_IN_USE != 0 {
                    continue;
                }
                let bits = self.bitmap_bits(e).await?;
                let table: Vec<u64> = self
                    .bitmap_table(e)
                    .await?
                    .into_iter()
                    .map(|t| match t {
                        TableEntry::Zeros => 0,
                        TableEntry::Ones => fmt::TABLE_ENTRY_ALL_ONES,
                        TableEntry::Data(off) => off,
                    })
                    .collect();
                // The session's own copy of the table, which flushes rewrite in place.
                let mut buf = vec![0u8; (table.len() * 8).div_ceil(cs as usize) * cs as usize];
                for (i, t) in table.iter().enumerate() {
                    buf[i * 8..i * 8 + 8].copy_from_slice(&t.to_be_bytes());
                }
                let toff = self.bitmap_alloc(&mut a, buf.len() as u64 / cs).await?;
                self.bitmap_write(&buf, toff).await?;
                old.extend(
                    e.table_offset / cs..(e.table_offset + e.table_size as u64 * 8).div_ceil(cs),
                );
                live.push(LiveBitmap {
                    name: e.name.clone(),
                    gran_bits: e.granularity_bits,
                    changed: vec![0u8; (bits.len() as u64).div_ceil(cs).div_ceil(8) as usize],
                    bits,
                    any_changed: false,
                    table_offset: toff,
                    table,
                    table_stale: BTreeSet::new(),
                    owned: HashSet::new(),
                    unlinked: Vec::new(),
                });
                e.table_offset = toff;
                e.flags |= fmt::FLAG_IN_USE;
            }
            if live.is_empty() {
                return Ok(());
            }
            self.bitmap_commit(&mut a, &dir, old).await
        }
        .await;
        if let Err(e) = r {
            self.bitmap_abandon(&mut a).await;
            return Err(e.context("marking the persistent bitmaps in use"));
        }
        if live.is_empty() {
            w.dirty.state.store(IDLE, Ordering::Release);
            return Ok(());
        }
        // The header marks the bitmaps in use: they are tracked from now on, whatever
        // becomes of the frees of the old tables (left to the next flush if this one fails
        // or its future is dropped).
        *w.dirty.live.lock() = live;
        w.dirty.state.store(ACTIVE, Ordering::Release);
        self.flush_metadata(a.m)
            .await
            .map_err(|e| e.context("freeing the bitmap tables replaced by their copies"))
    }

    /// Store what changed in the tracked bitmaps since the last store, leaving them in use
    /// (see the module documentation). The caller holds the metadata lock (and the
    /// allocation gate); guest changes may go on meanwhile (they are stored next time).
    /// Durable once a `flush_metadata` has followed.
    pub(crate) async fn store_changes(&self, m: &mut Meta) -> Result<()> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(());
        };
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            return Ok(());
        }
        let n = w.dirty.live.lock().len();
        for bi in 0..n {
            if !w.dirty.live.lock()[bi].pending() {
                continue;
            }
            self.check_poison()?;
            self.store_bitmap_changes(m, bi)
                .await
                .map_err(|e| e.context("storing the persistent bitmaps"))?;
        }
        Ok(())
    }

    async fn store_bitmap_changes(&self, m: &mut Meta, bi: usize) -> Result<()> {
        let w = self.ws()?;
        let cs = self.inner.layout.cluster_size;
        // Until the loop below has stored every changed part, an error or a dropped future
        // leaves the bitmap marked changed, and the part on its way to the disk too.
        let mut restore = Restore {
            live: &w.dirty.live,
            bi,
            part: None,
            armed: true,
        };
        w.dirty.live.lock()[bi].any_changed = false;
        let mut buf = vec![0u8; cs as usize];
        let mut next = 0u64;
        loop {
            // Take the next changed part (its bits as they are now).
            let (c, entry, owned) = {
                let mut live = w.dirty.live.lock();
                let b = &mut live[bi];
                let Some(c) = next_set(&b.changed, next) else {
                    break;
                };
                b.changed[(c / 8) as usize] &= !(1 << (c % 8));
                let start = (c * cs) as usize;
                let end = (start + cs as usize).min(b.bits.len());
                buf.fill(0);
                buf[..end - start].copy_from_slice(&b.bits[start..end]);
                let entry = b.table[c as usize];
                (c, entry, b.owned.contains(&entry))
            };
            restore.part = Some(c);
            next = c + 1;
            let data = entry & fmt::TABLE_ENTRY_OFFSET_MASK;
            let r = if buf.iter().all(|&x| x == 0) {
                Ok(0)
            } else if data != 0 && owned {
                self.bitmap_write(&buf, data).await.map(|()| data)
            } else {
                match self.alloc_clusters(m, 1).await {
                    Ok(off) => {
                        // Nothing points at the new cluster until the table does: freed by
                        // the next store if this write fails or its future is dropped.
                        w.dirty.live.lock()[bi].unlinked.push(off / cs);
                        let r = self.bitmap_write(&buf, off).await;
                        if r.is_ok() {
                            let mut live = w.dirty.live.lock();
                            let u = &mut live[bi].unlinked;
                            if let Some(i) = u.iter().rposition(|&x| x == off / cs) {
                                u.swap_remove(i);
                            }
                        }
                        r.map(|()| off)
                    }
                    Err(e) => Err(e),
                }
            };
            let mut live = w.dirty.live.lock();
            let b = &mut live[bi];
            match r {
                Err(e) => {
                    // `restore` marks the part changed again: stored next time.
                    drop(live);
                    return Err(e);
                }
                Ok(new) if new != entry => {
                    if data != 0 {
                        b.owned.remove(&data);
                        b.unlinked.push(data / cs);
                    }
                    if new != 0 {
                        b.owned.insert(new);
                    }
                    b.table[c as usize] = new;
                    b.table_stale.insert(c * 8 / cs);
                }
                Ok(_) => {}
            }
            restore.part = None;
        }
        restore.armed = false;
        let (toff, stale) = {
            let live = w.dirty.live.lock();
            let b = &live[bi];
            (b.table_offset, b.table_stale.clone())
        };
        if !stale.is_empty() {
            // The refcounts of the new data clusters (and their content) are durable before
            // a table on disk points at them.
            self.flush_metadata(m).await?;
            for tc in stale {
                let part = {
                    let live = w.dirty.live.lock();
                    let t = &live[bi].table;
                    let per = (cs / 8) as usize;
                    let from = tc as usize * per;
                    let mut part = vec![0u8; cs as usize];
                    for (i, e) in t[from..(from + per).min(t.len())].iter().enumerate() {
                        part[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
                    }
                    part
                };
                self.bitmap_write(&part, toff + tc * cs).await?;
                w.dirty.live.lock()[bi].table_stale.remove(&tc);
            }
        }
        // Freed once the table that dropped them is durable (flush_metadata syncs before
        // it applies deferred frees).
        let unlinked = std::mem::take(&mut w.dirty.live.lock()[bi].unlinked);
        m.pending_free.extend(unlinked);
        Ok(())
    }

    /// Store the tracked bitmaps and clear their in-use flag (see the module documentation).
    /// The caller holds the drain and allocation gate exclusively and the metadata lock.
    /// Afterwards the next change looks at the bitmaps again.
    pub(crate) async fn stop_tracking_locked(&self, m: &mut Meta) -> Result<()> {
        let w = self.ws()?;
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            w.dirty.state.store(UNKNOWN, Ordering::Release);
            return Ok(());
        }
        self.store_changes(m).await?;
        let tables: Vec<(String, u64)> = w
            .dirty
            .live
            .lock()
            .iter()
            .map(|b| (b.name.clone(), b.table_offset))
            .collect();
        let mut dir = self.bitmap_dir().await?;
        for e in dir.iter_mut() {
            if let Some((_, t)) = tables.iter().find(|(n, _)| *n == e.name) {
                e.table_offset = *t;
                e.flags &= !fmt::FLAG_IN_USE;
            }
        }
        // The switch makes the stored parts durable before the header stops marking them
        // in use.
        let mut a = crate::jobs::bitmap::Allocated::new(m);
        if let Err(e) = self.bitmap_commit(&mut a, &dir, Vec::new()).await {
            // Keep the bits: a later close may succeed.
            self.bitmap_abandon(&mut a).await;
            return Err(e.context("storing the persistent bitmaps"));
        }
        // The header no longer marks them in use: not tracked from now on, whatever becomes
        // of the free of the old directory (left to the next flush if this one fails).
        w.dirty.live.lock().clear();
        w.dirty.state.store(UNKNOWN, Ordering::Release);
        self.flush_metadata(a.m)
            .await
            .map_err(|e| e.context("freeing the old bitmap directory"))
    }

    /// Store the tracked bitmaps now (waits for the requests in flight). Called by close.
    pub(crate) async fn stop_tracking(&self) -> Result<()> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(());
        };
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            return Ok(());
        }
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.stop_tracking_locked(&mut m).await
    }

    /// Whether the bitmaps are tracked now.
    pub(crate) fn tracking_active(&self) -> bool {
        self.inner
            .w
            .as_ref()
            .is_some_and(|w| w.dirty.state.load(Ordering::Acquire) == ACTIVE)
    }

    /// Calls `f` with the bits of bitmap `name` as this writable handle records them now
    /// (bit `i`, in bit `i % 8` of byte `i / 8`, covers the guest bytes from `i *
    /// granularity`) and its granularity in bytes: a view that shows every change made so
    /// far, such as an NBD export's `qemu:dirty-bitmap:NAME` context of the image it
    /// writes to. `f` runs under the lock that changes take: keep it short.
    ///
    /// Starts the tracking when it is not running, as the first change does (the enabled
    /// bitmaps are loaded and marked in use on disk, as QEMU marks them while it has the
    /// image open for writing). `None` when `name` is not tracked: not an enabled
    /// consistent bitmap, a read-only handle, or a handle that refuses changes (corrupt,
    /// poisoned); its bits then change only by bitmap operations (read them with
    /// `bitmap_content`).
    pub async fn with_live_bitmap<R>(
        &self,
        name: &str,
        f: impl FnOnce(&[u8], u64) -> R,
    ) -> Result<Option<R>> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(None);
        };
        // Held, storing the bits (close, bitmap operations) cannot run meanwhile: the bits
        // are either in memory (tracked) or current on disk.
        let _req = self.enter_request().await;
        if w.dirty.state.load(Ordering::Acquire) == UNKNOWN {
            if self.check_write(0, 0).is_err() {
                return Ok(None);
            }
            self.before_first_write().await?;
            self.start_tracking().await?;
        }
        Ok(self.peek_live(name, |bits, gran_bits| f(bits, 1u64 << gran_bits)))
    }

    /// The in-memory bits of tracked bitmap `name`, if it is tracked now.
    pub(crate) fn live_bits(&self, name: &str) -> Option<(Vec<u8>, u8)> {
        self.peek_live(name, |bits, gran_bits| (bits.to_vec(), gran_bits))
    }

    /// Calls `f` with the in-memory bits and granularity bits of tracked bitmap `name`,
    /// under the lock that changes take; `None` when it is not tracked now.
    fn peek_live<R>(&self, name: &str, f: impl FnOnce(&[u8], u8) -> R) -> Option<R> {
        let w = self.inner.w.as_ref()?;
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            return None;
        }
        let live = w.dirty.live.lock();
        live.iter()
            .find(|b| b.name == name)
            .map(|b| f(&b.bits, b.gran_bits))
    }
}

#[cfg(test)]
mod tests {
    use super::{next_set, set_bits};

    #[test]
    fn next_set_bit() {
        let b = [0u8, 0x10, 0, 0x81];
        assert_eq!(next_set(&b, 0), Some(12));
        assert_eq!(next_set(&b, 12), Some(12));
        assert_eq!(next_set(&b, 13), Some(24));
        assert_eq!(next_set(&b, 25), Some(31));
        assert_eq!(next_set(&b, 32), None);
        assert_eq!(next_set(&[0u8; 3], 0), None);
    }

    #[test]
    fn set_bit_ranges() {
        let mut b = vec![0u8; 4];
        assert!(set_bits(&mut b, 3, 3));
        assert_eq!(b, [0x08, 0, 0, 0]);
        assert!(!set_bits(&mut b, 3, 3));
        set_bits(&mut b, 6, 17);
        assert_eq!(b, [0xc8, 0xff, 0x03, 0]);
        set_bits(&mut b, 30, 100);
        assert_eq!(b, [0xc8, 0xff, 0x03, 0xc0]);
        let mut b = vec![0u8; 3];
        assert!(set_bits(&mut b, 8, 15));
        assert_eq!(b, [0, 0xff, 0]);
        assert!(!set_bits(&mut b, 8, 15));
        assert!(!set_bits(&mut b, 9, 14));
        assert!(set_bits(&mut b, 9, 16));
        assert_eq!(b, [0, 0xff, 1]);
        b[2] = 0;
        set_bits(&mut b, 40, 50);
        assert_eq!(b, [0, 0xff, 0]);
    }
}
