//! Refcount updates and host cluster allocation (the write side).
//!
//! All functions here run with the metadata lock held (`&mut Meta`). Refcount blocks are
//! changed in the cache and written back by `flush` before any table that points at the
//! new clusters (see `metadata.rs` for the ordering). New refcount blocks and refcount tables
//! are written through (and synced) before the pointers to them are published.

use crate::engine::image::Image;
use crate::engine::metadata::Meta;
use crate::format::refcount;
use crate::{Error, Result};

impl Image {
    /// Refcount slice and entry index for host cluster `ci`, or `None` when no refcount block
    /// covers it.
    pub(crate) async fn rc_slot(
        &self,
        ci: u64,
    ) -> Result<Option<(std::sync::Arc<crate::engine::cache::Slice>, usize)>> {
        let lay = self.inner.layout;
        let rt_idx = ci / lay.rb_entries;
        let rb = {
            let rt = self.inner.reftable.read();
            rt.get(rt_idx as usize).map(|&e| e & !511).unwrap_or(0)
        };
        if rb == 0 {
            return Ok(None);
        }
        let idx = ci % lay.rb_entries;
        let byte = (idx << lay.refcount_order) / 8;
        let slice_off = rb + byte / lay.slice_size * lay.slice_size;
        let slice = self
            .inner
            .rc_cache
            .get(&*self.inner.file, slice_off)
            .await?;
        let per_slice = (lay.slice_size * 8) >> lay.refcount_order;
        Ok(Some((slice, (idx % per_slice) as usize)))
    }

    /// Add `delta` to the refcount of host cluster `ci` (which must be covered by a block).
    pub(crate) async fn rc_add(&self, ci: u64, delta: i64) -> Result<u64> {
        let order = self.inner.layout.refcount_order;
        let (slice, i) = self
            .rc_slot(ci)
            .await?
            .ok_or_else(|| Error::corrupt(format!("no refcount block covers cluster {ci}")))?;
        let off = slice.offset;
        drop(slice);
        crate::engine::metadata::update_slice(&self.inner.rc_cache, &*self.inner.file, off, |d| {
            let old = refcount::get(d, order, i);
            let new = if delta >= 0 {
                old.checked_add(delta as u64)
                    .filter(|&n| n <= refcount::max(order))
            } else {
                old.checked_sub(delta.unsigned_abs())
            };
            let new = new.ok_or_else(|| {
                Error::corrupt(format!(
                    "refcount of cluster {ci} would overflow or underflow ({old} {delta:+})"
                ))
            })?;
            refcount::set(d, order, i, new);
            Ok(new)
        })
        .await?
    }

    /// Add `delta` to the refcounts of host clusters `[first, first + n)` (all covered by
    /// blocks), one cache update per refcount slice. A slice whose entries cannot all take
    /// the change is left unchanged (an error).
    pub(crate) async fn rc_add_run(&self, first: u64, n: u64, delta: i64) -> Result<()> {
        let order = self.inner.layout.refcount_order;
        let per_slice = (self.inner.layout.slice_size * 8) >> order;
        let end = first + n;
        let mut c = first;
        while c < end {
            let (slice, i) = self
                .rc_slot(c)
                .await?
                .ok_or_else(|| Error::corrupt(format!("no refcount block covers cluster {c}")))?;
            let k = (per_slice - i as u64).min(end - c);
            let off = slice.offset;
            drop(slice);
            crate::engine::metadata::update_slice(
                &self.inner.rc_cache,
                &*self.inner.file,
                off,
                |d| {
                    let max = refcount::max(order);
                    let new = |old: u64| {
                        if delta >= 0 {
                            old.checked_add(delta as u64).filter(|&x| x <= max)
                        } else {
                            old.checked_sub(delta.unsigned_abs())
                        }
                    };
                    for j in 0..k as usize {
                        let old = refcount::get(d, order, i + j);
                        if new(old).is_none() {
                            return Err(Error::corrupt(format!(
                                "refcount of cluster {} would overflow or underflow ({old} {delta:+})",
                                c + j as u64
                            )));
                        }
                    }
                    for j in 0..k as usize {
                        let old = refcount::get(d, order, i + j);
                        refcount::set(d, order, i + j, new(old).unwrap_or(old));
                    }
                    Ok(())
                },
            )
            .await??;
            c += k;
        }
        Ok(())
    }

    /// The refcount of host cluster index `ci` (offset / cluster_size).
    pub async fn refcount(&self, ci: u64) -> Result<u64> {
        Ok(match self.rc_slot(ci).await? {
            None => 0,
            Some((slice, i)) => {
                refcount::get(&slice.data.read(), self.inner.layout.refcount_order, i)
            }
        })
    }

    /// Whether cluster `ci` is free (refcount 0, or not covered by any block).
    pub(crate) async fn is_free(&self, ci: u64) -> Result<bool> {
        Ok(self.refcount(ci).await? == 0)
    }

    /// Allocate `n` contiguous host clusters with refcount 1. Returns the host offset.
    pub(crate) async fn alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let lay = self.inner.layout;
        if n == 0 {
            return Err(Error::invalid("allocation of zero clusters"));
        }
        let max_ci = (crate::format::l2::OFFSET_MASK >> lay.cluster_bits) - n;
        self.release_quarantine(m).await;
        'search: loop {
            // Find n free clusters in a row from the hint.
            let mut start = m.free_hint;
            let mut run = 0;
            let mut ci = start;
            let mut first_free = None;
            while run < n {
                if ci > max_ci {
                    return Err(Error::new(
                        crate::ErrorKind::NoSpace,
                        "image file has reached the maximum size",
                    ));
                }
                // A quarantined cluster has refcount 0 but may still be used by a request
                // in flight: skip it (past the end of the file there is always room).
                if !m.quarantine.contains(ci) && self.is_free(ci).await? {
                    first_free.get_or_insert(ci);
                    run += 1;
                } else {
                    run = 0;
                    start = ci + 1;
                }
                ci += 1;
            }
            // Every cluster of the run needs a refcount block.
            for c in start..start + n {
                if self.rc_slot(c).await?.is_none() {
                    self.new_refblock(m, c, start + n).await?;
                    continue 'search;
                }
            }
            // Space first: a reservation that fails (or whose future is dropped) must not
            // leave the run counted with nobody to free it.
            self.reserve_space(m, (start + n) << lay.cluster_bits)
                .await?;
            self.rc_add_run(start, n, 1).await?;
            // Everything below the first free cluster seen is in use.
            m.free_hint = match first_free {
                Some(f) if f < start => f,
                _ => start + n,
            };
            m.high_water = m.high_water.max(start + n);
            return Ok(start << lay.cluster_bits);
        }
    }

    /// Make sure the image file has blocks reserved up to `end`, reserving ahead in chunks so
    /// that new clusters are written into allocated space instead of extending the file on
    /// every write (which file systems serialize, and which is slow with `O_DIRECT`). Not in
    /// memory (tmpfs): there it only makes every new page be looked up twice (measured: a
    /// third of the system time of a raw -> qcow2 convert).
    pub(crate) async fn reserve_space(&self, m: &mut Meta, end: u64) -> Result<()> {
        let reserved = m.reserved_end.max(self.inner.file_len_at_open);
        if end <= reserved || self.inner.file.in_memory() {
            return Ok(());
        }
        let cs = self.inner.layout.cluster_size;
        let chunk = (8u64 << 20).max(4 * cs);
        let new_end = (end + chunk).div_ceil(cs) * cs;
        let cur = self.inner.file.len().map_err(Error::from)?;
        if new_end > cur {
            let from = cur.max(reserved);
            self.inner
                .file
                .allocate(from, new_end - from)
                .await
                .map_err(|e| {
                    Error::io(e, format!("{}: reserving space", self.inner.path.display()))
                })?;
        }
        m.reserved_end = new_end;
        Ok(())
    }

    /// Create the refcount block that covers cluster `ci`, a cluster of the free run
    /// `[.., run_end)` being allocated (the caller then searches again). The block goes to
    /// the first free cluster `x` at or after `run_end`, never into the run: a block placed
    /// inside its own range would split every free run, so runs of a range's length or more
    /// could never be found. `x` in the block's own range: the block describes itself. `x`
    /// in a range with a block: counted there. `x` in another range without a block: that
    /// range gets its block first (at `x`, describing itself), and the next search places
    /// this one.
    pub(crate) async fn new_refblock(&self, m: &mut Meta, ci: u64, run_end: u64) -> Result<()> {
        let lay = self.inner.layout;
        let rt_len = self.inner.reftable.read().len() as u64;
        let rt_idx = ci / lay.rb_entries;
        if rt_idx >= rt_len {
            // The new table and its blocks go after the run.
            return self.grow_reftable(m, ci.max(run_end - 1)).await;
        }
        let mut x = run_end;
        while m.quarantine.contains(x) || !self.is_free(x).await? {
            x += 1;
        }
        let rx = x / lay.rb_entries;
        let (block_rt, self_described) = if rx == rt_idx {
            (rt_idx, true)
        } else if self.rc_slot(x).await?.is_some() {
            self.rc_add(x, 1).await?;
            (rt_idx, false)
        } else if rx < rt_len {
            (rx, true)
        } else {
            return self.grow_reftable(m, x).await;
        };
        let cs = lay.cluster_size as usize;
        let mut block = vec![0u8; cs];
        if self_described {
            refcount::set(
                &mut block,
                lay.refcount_order,
                (x % lay.rb_entries) as usize,
                1,
            );
        }
        let off = x << lay.cluster_bits;
        self.meta_write(&block, off).await?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| Error::io(e, "flush"))?;
        self.inner.rc_cache.invalidate_range(off, off + cs as u64);
        self.inner.l2_cache.invalidate_range(off, off + cs as u64);
        self.inner.reftable.write()[block_rt as usize] = off;
        m.reftable_dirty.insert(block_rt);
        m.high_water = m.high_water.max(x + 1);
        Ok(())
    }

    /// Grow the refcount table so that it covers cluster `ci`: the new table and the blocks
    /// that describe it are placed after every used cluster, written and synced, then the
    /// header switches to it and the old table is freed.
    pub(crate) async fn grow_reftable(&self, m: &mut Meta, ci: u64) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let old = self.inner.reftable.read().clone();
        let old_len = old.len() as u64;
        // Put the new structures at the end of everything used so far.
        let base = m
            .high_water
            .max(ci + 1)
            .max(self.inner.file.len().map_err(Error::from)?.div_ceil(cs));
        let entries_per_cluster = cs / 8;
        let mut table_clusters = (old_len * 3 / 2 + 1).div_ceil(entries_per_cluster).max(1);
        let (new_len, rb_first, n_rb) = loop {
            let new_len = table_clusters * entries_per_cluster;
            // Blocks needed for [base, base + table_clusters + n_rb): iterate to a fixed point.
            let mut n_rb = 0;
            loop {
                let end = base + table_clusters + n_rb;
                let first_rt = base / lay.rb_entries;
                let last_rt = (end - 1) / lay.rb_entries;
                let missing = (first_rt..=last_rt)
                    .filter(|&r| (r as usize) >= old.len() || old[r as usize] == 0)
                    .count() as u64;
                if missing == n_rb {
                    break;
                }
                n_rb = missing;
            }
            let end = base + table_clusters + n_rb;
            if (end - 1) / lay.rb_entries < new_len && ci / lay.rb_entries < new_len {
                break (new_len, base + table_clusters, n_rb);
            }
            table_clusters += 1;
        };
        if new_len * 8 > crate::format::header::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                crate::ErrorKind::NoSpace,
                "refcount table would exceed its maximum size",
            ));
        }
        let end = base + table_clusters + n_rb;
        let mut table = old.clone();
        table.resize(new_len as usize, 0);
        // Assign the new blocks to the missing ranges among [base, end).
        let mut next_rb = rb_first;
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for r in base / lay.rb_entries..=(end - 1) / lay.rb_entries {
            if table[r as usize] == 0 {
                table[r as usize] = next_rb << lay.cluster_bits;
                blocks.push((r, vec![0u8; cs as usize]));
                next_rb += 1;
            }
        }
        // Refcounts of the new table and blocks: those in new blocks are set there; those in
        // existing blocks are incremented in the cache.
        for c in base..end {
            let r = c / lay.rb_entries;
            if let Some((_, b)) = blocks.iter_mut().find(|(br, _)| *br == r) {
                refcount::set(b, lay.refcount_order, (c % lay.rb_entries) as usize, 1);
            } else {
                self.rc_add(c, 1).await?;
            }
        }
        for (r, b) in &blocks {
            self.meta_write(b, table[*r as usize]).await?;
        }
        let mut tb = vec![0u8; (table_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            tb[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        let new_off = base << lay.cluster_bits;
        self.meta_write(&tb, new_off).await?;
        // Existing dirty blocks must be on disk before the new table is published (they
        // hold the increments for the new clusters above).
        self.write_dirty_refblocks().await?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| Error::io(e, "flush"))?;
        let (old_off, old_clusters) = {
            let h = self.inner.header.read();
            (h.refcount_table_offset, h.refcount_table_clusters as u64)
        };
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        // From the header write until memory follows, a failure or a dropped future leaves
        // the file maybe pointing at the new table and memory at the old one: poison.
        let mut guard = self.poison_guard("switching the header to a new refcount table");
        self.meta_write(&hdr, 48).await.map_err(|e| guard.fail(e))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| guard.fail(Error::io(e, "flush")))?;
        {
            let mut h = self.inner.header.write();
            h.refcount_table_offset = new_off;
            h.refcount_table_clusters = table_clusters as u32;
        }
        *self.inner.reftable.write() = table;
        guard.disarm();
        m.reftable_dirty.clear();
        m.high_water = m.high_water.max(end);
        for c in 0..old_clusters {
            m.pending_free.push((old_off >> lay.cluster_bits) + c);
        }
        Ok(())
    }
}
