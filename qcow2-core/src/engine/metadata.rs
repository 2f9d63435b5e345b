//! Metadata state of a writable image, L2 table updates, and the ordered write-back of
//! dirty metadata (`flush`).
//!
//! Ordering (crash safety): every "table, then the pointer to it" pair has a barrier (a
//! sync of the file) between the two writes.
//! 1. Guest data is written (and completed) before the L2 entry that exposes it changes,
//!    even in the cache.
//! 2. Refcount increments live in dirty refcount slices; `flush_metadata` writes them (and
//!    syncs) before any dirty L2 slice or L1 entry, so no table on disk ever points at a
//!    cluster whose on-disk refcount is 0. New refcount blocks are written and synced before
//!    the refcount table entry that points at them (`new_refblock`), and a new refcount
//!    table, L1 table or snapshot table before the header that points at it.
//! 3. L2 slices are written and synced before the L1 entries that point at their tables.
//! 4. Decrements are deferred (`Meta::pending_free`) until the tables that dropped the
//!    reference are on disk and synced; only then are refcounts lowered, so a freed cluster
//!    is never reused while an on-disk table still points at it. A cluster reaching 0 is
//!    quarantined until the requests that may use it are done, and punched at its release
//!    (`inflight.rs`).

use crate::engine::image::Image;
use crate::format::l2::COPIED;
use crate::{Error, Result};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Metadata state of a writable image; held under the metadata lock.
pub(crate) struct Meta {
    /// First host cluster index that may be free.
    pub free_hint: u64,
    /// One index per reference to drop after the next table write-back.
    pub pending_free: Vec<u64>,
    /// Dirty L1 entries.
    pub l1_dirty: BTreeSet<u64>,
    /// Dirty refcount table entries.
    pub reftable_dirty: BTreeSet<u64>,
    /// Clusters at or above this index were never used since open and lie past the original
    /// end of file: they read as zeros.
    pub high_water: u64,
    /// Byte offset where the next compressed cluster may go (0: start a new cluster).
    pub comp_cursor: u64,
    /// Write-back of the compressed data has been started up to this offset (see
    /// `Image::write_compressed`).
    pub comp_written_back: u64,
    /// The image file has space reserved (`fallocate`) up to this offset: allocations below it
    /// write into allocated blocks, which is much faster than extending the file write by write.
    pub reserved_end: u64,
    /// Freed clusters not yet allocatable (see `engine/inflight.rs`).
    pub quarantine: crate::engine::inflight::Quarantine,
}
impl Image {
    /// Make sure guest cluster `gc` has an L2 table with refcount 1 (allocating or copying it).
    pub(crate) async fn ensure_l2_writable(&self, m: &mut Meta, gc: u64) -> Result<u64> {
        let lay = self.inner.layout;
        let (l1_idx, l2_off, copied) = self.lookup_l2_off(gc);
        if l2_off != 0 && copied {
            return Ok(l2_off);
        }
        if l1_idx as usize >= self.inner.l1.read().len() {
            return Err(Error::out_of_range("guest offset beyond the L1 table"));
        }
        let cs = lay.cluster_size as usize;
        let content = if l2_off == 0 {
            vec![0u8; cs]
        } else {
            let mut b = vec![0u8; cs];
            // Read through the cache so dirty slices are seen.
            let ss = lay.slice_size;
            for i in 0..(cs as u64 / ss) {
                let s = self
                    .inner
                    .l2_cache
                    .get(&*self.inner.file, l2_off + i * ss)
                    .await?;
                b[(i * ss) as usize..((i + 1) * ss) as usize].copy_from_slice(&s.data.read());
            }
            b
        };
        let new = self.alloc_clusters(m, 1).await?;
        let ss = lay.slice_size as usize;
        for i in 0..cs / ss {
            self.inner.l2_cache.insert_new(
                new + (i * ss) as u64,
                content[i * ss..(i + 1) * ss].to_vec(),
            );
        }
        self.inner.l1.write()[l1_idx as usize] = new | COPIED;
        m.l1_dirty.insert(l1_idx);
        if l2_off != 0 {
            m.pending_free.push(l2_off >> lay.cluster_bits);
        }
        Ok(new)
    }

    /// Set the L2 entry (and bitmap) of guest cluster `gc`; the L2 table must be writable.
    pub(crate) async fn set_l2_entry(
        &self,
        m: &mut Meta,
        gc: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        let lay = self.inner.layout;
        let l2_off = self.ensure_l2_writable(m, gc).await?;
        let idx = gc % lay.l2_entries;
        let byte = idx * lay.l2_entry_size;
        let slice_off = l2_off + byte / lay.slice_size * lay.slice_size;
        let within = (byte % lay.slice_size) as usize;
        update_slice(&self.inner.l2_cache, &*self.inner.file, slice_off, |d| {
            d[within..within + 8].copy_from_slice(&entry.to_be_bytes());
            if lay.extended {
                d[within + 8..within + 16].copy_from_slice(&bitmap.to_be_bytes());
            }
        })
        .await
    }

    /// Write back all dirty metadata in the crash-safe order and apply deferred frees.
    pub(crate) async fn flush_metadata(&self, m: &mut Meta) -> Result<()> {
        self.check_poison()?;
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let sync = || async {
            self.inner
                .file
                .flush()
                .await
                .map_err(|e| Error::io(e, format!("{}: flush", self.inner.path.display())))
        };
        // 0. Guest data in an external data file must be durable before tables point at it.
        if self.inner.data_path.is_some() {
            self.inner
                .data
                .flush()
                .await
                .map_err(|e| Error::io(e, "flush of the data file"))?;
        }
        // 1. Refcount blocks, then the refcount table entries.
        self.write_dirty_refblocks().await?;
        if !m.reftable_dirty.is_empty() {
            sync().await?;
            let rt_off = self.inner.header.read().refcount_table_offset;
            let entries: Vec<(u64, u64)> = {
                let rt = self.inner.reftable.read();
                m.reftable_dirty
                    .iter()
                    .map(|&i| (i, rt[i as usize]))
                    .collect()
            };
            for (i, v) in entries {
                self.meta_write(&v.to_be_bytes(), rt_off + i * 8).await?;
            }
            m.reftable_dirty.clear();
        }
        let have_tables = !m.l1_dirty.is_empty() || !self.inner.l2_cache.dirty_slices().is_empty();
        if have_tables {
            sync().await?;
            // 2. L2 slices.
            self.write_back(&self.inner.l2_cache, crate::engine::overlap::Target::L2)
                .await?;
            // 3. L1 entries (the sectors that hold dirty entries), after a barrier: an L1
            // entry points at a new (or copied) L2 table, which must be durable first, or a
            // power cut could leave the entry pointing at garbage.
            if !m.l1_dirty.is_empty() {
                sync().await?;
                let l1_off = self.inner.header.read().l1_table_offset;
                let l1 = self.inner.l1.read().clone();
                let mut sectors: BTreeSet<u64> = BTreeSet::new();
                for &i in &m.l1_dirty {
                    sectors.insert(i / 64);
                }
                for s in sectors {
                    let a = (s * 64) as usize;
                    let b = (a + 64).min(l1.len());
                    let mut buf = Vec::with_capacity((b - a) * 8);
                    for e in &l1[a..b] {
                        buf.extend_from_slice(&e.to_be_bytes());
                    }
                    self.meta_write(&buf, l1_off + a as u64 * 8).await?;
                }
                m.l1_dirty.clear();
            }
        }
        sync().await?;
        // 4. Deferred frees: punch holes while still referenced by refcount, then decrement.
        if !m.pending_free.is_empty() {
            // One at a time: an error leaves the rest (and the failed one) pending for the
            // next flush instead of leaking them. Each is taken off the list before its
            // decrement, so a dropped future can leak one reference but never drop it twice.
            while let Some(c) = m.pending_free.pop() {
                let now = match self.rc_slot(c).await {
                    Ok(None) => continue,
                    Ok(Some(_)) => self.rc_add(c, -1).await,
                    Err(e) => Err(e),
                };
                let now = match now {
                    Ok(n) => n,
                    Err(e) => {
                        // Retry after an I/O error; a refcount that cannot be decremented
                        // (already 0: a corrupt image) is not retried forever.
                        if e.kind() != crate::ErrorKind::Corrupt {
                            m.pending_free.push(c);
                        }
                        return Err(e);
                    }
                };
                if now == 0 {
                    // The compressed-data cursor must not point into a freed cluster: it
                    // would add references to it after it has been handed out again.
                    if m.comp_cursor / cs == c {
                        m.comp_cursor = 0;
                    }
                    // Not allocatable (nor punched) until the requests that may still use
                    // it are done (the in-flight rule, `engine/inflight.rs`).
                    self.quarantine(m, c);
                }
            }
            self.write_dirty_refblocks().await?;
            sync().await?;
        }
        self.release_quarantine(m).await;
        Ok(())
    }

    /// Make every completed write durable (data and metadata, in order).
    pub async fn flush_all(&self) -> Result<()> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(());
        };
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await
    }

    /// Write metadata bytes at `off`, refusing writes that would hit guest data or the header
    /// (the overlap check); a violation marks the image corrupt.
    pub(crate) async fn meta_write(&self, buf: &[u8], off: u64) -> Result<()> {
        if off == 0 && buf.len() > 512 {
            return Err(self
                .mark_corrupt(format!(
                    "metadata write of {} bytes over the header",
                    buf.len()
                ))
                .await);
        }
        self.inner.file.write_at(buf, off).await.map_err(|e| {
            Error::io(
                e,
                format!(
                    "{}: writing metadata at 0x{off:x}",
                    self.inner.path.display()
                ),
            )
        })
    }

    /// Set the corrupt bit (best effort) and return an error describing `why`.
    pub(crate) async fn mark_corrupt(&self, why: String) -> Error {
        let bits = {
            let mut h = self.inner.header.write();
            if h.version >= 3 {
                h.incompatible_features |= crate::format::header::INCOMPAT_CORRUPT;
            }
            h.incompatible_features
        };
        let _ = self.inner.file.write_at(&bits.to_be_bytes(), 72).await;
        let _ = self.inner.file.flush().await;
        Error::corrupt(format!(
            "{}: {why}; the image has been marked corrupt",
            self.inner.path.display()
        ))
    }

    /// Write every dirty refcount block slice.
    pub(crate) async fn write_dirty_refblocks(&self) -> Result<()> {
        self.write_back(
            &self.inner.rc_cache,
            crate::engine::overlap::Target::RefBlock,
        )
        .await
    }

    /// Write every dirty slice of `cache` (after the overlap check for `target`). A slice is
    /// marked clean only once the write of its content has succeeded (and only for the
    /// content written: see `Slice::snapshot`), so a slice whose write fails, is refused by
    /// the overlap check, or is cancelled (the future dropped) stays dirty and is written by
    /// the next write-back. Every write is attempted even when some fail; the first error is
    /// returned.
    pub(crate) async fn write_back(
        &self,
        cache: &crate::engine::cache::SliceCache,
        target: crate::engine::overlap::Target,
    ) -> Result<()> {
        let dirty = cache.dirty_slices();
        let futs = dirty.iter().map(|s| async move {
            if !s.is_dirty() {
                return Ok(());
            }
            let (data, gen) = s.snapshot();
            self.check_overlap(s.offset, data.len() as u64, target)
                .await?;
            self.meta_write(&data, s.offset).await?;
            s.mark_written(gen);
            Ok::<(), Error>(())
        });
        let results = futures::future::join_all(futs).await;
        cache.prune_evicted();
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }
}

/// Change a cached metadata slice (under the metadata lock) so that the change cannot be
/// lost. The slice is dirty from the moment it is changed (`Slice::modify`), so an eviction
/// from then on keeps it on the cache's write-back list. An eviction between the lookup and
/// the change (a concurrent reader's lookup can evict it while it is still clean) drops it
/// from the cache: the next lookup would reload the old bytes from disk and the change would
/// never be written. That case is detected by looking the slice up again, and the changed
/// copy is put back.
pub(crate) async fn update_slice<R>(
    cache: &crate::engine::cache::SliceCache,
    file: &dyn crate::io::Storage,
    off: u64,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Result<R> {
    let slice = cache.get(file, off).await?;
    let r = slice.modify(f);
    let now = cache.get(file, off).await?;
    if !Arc::ptr_eq(&slice, &now) {
        let data = slice.data.read().clone();
        cache.insert_new(off, data);
    }
    Ok(r)
}
