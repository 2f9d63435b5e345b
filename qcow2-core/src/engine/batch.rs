//! Allocating writes of runs of whole guest clusters (large writes into unallocated space,
//! as `convert` makes): one allocation of contiguous host clusters per L2 table, refcounts
//! updated a refcount slice at a time, one data write per L2 table, and the L2 entries set a
//! slice at a time, instead of one of each per cluster (with a zero-filled cluster buffer,
//! a copy of the data into it and an overlap check per cluster).
//!
//! The ordering rules are those of `allocating_write` (`metadata.rs`): the host clusters are
//! counted (in the refcount cache) before the data is written, the data is written and
//! complete before any L2 entry that points at it changes (even in the cache), and the
//! flush writes refcount blocks before L2 slices. From the allocation until the mapping is
//! published the request holds `alloc_gate` shared, as every allocating write does.

use crate::engine::image::Image;
use crate::engine::metadata::{update_slice, Meta};
use crate::format::l2::{self, ClusterEntry, COPIED};
use crate::{Error, Result};

impl Image {
    /// Whether a guest cluster with L2 entry `e` can get a fresh host cluster holding only
    /// the new data, with nothing to read, copy or free: unallocated, or a zero cluster
    /// without a host cluster (with extended L2: any entry without a host cluster), and the
    /// data lives in the image file.
    pub(crate) fn fresh_candidate(&self, e: u64) -> bool {
        let lay = self.inner.layout;
        self.inner.data_path.is_none()
            && matches!(
                l2::decode(e, lay.cluster_bits, lay.extended),
                ClusterEntry::Unallocated | ClusterEntry::Zero { host: None }
            )
    }

    /// Write `data` (whole clusters) at guest cluster `gc0`, allocating fresh host clusters
    /// in runs for the clusters that need them (see the module documentation). Clusters
    /// that turn out to be allocated by the time their in-flight marks are held take the
    /// per-cluster path.
    pub(crate) async fn write_fresh_run(&self, gc0: u64, data: &[u8]) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size as usize;
        debug_assert!(data.len().is_multiple_of(cs) && !data.is_empty());
        let n = data.len() / cs;
        let w = self.ws()?;
        // The marks in ascending order. Deadlock-free: every other holder of a mark holds
        // only that one and never waits for another mark while holding it, and every
        // holder of several took them in this order.
        let mut guards = Vec::with_capacity(n);
        for i in 0..n as u64 {
            guards.push(self.acquire(gc0 + i).await);
        }
        // Under the marks, decide per cluster; cut the fresh runs at L2 table ends.
        let mut segs: Vec<(usize, usize)> = Vec::new();
        let mut others = Vec::new();
        for i in 0..n {
            let gc = gc0 + i as u64;
            let (e, _, _) = self.current_entry(gc).await?;
            if !self.fresh_candidate(e) {
                others.push(self.write_cluster_guarded(
                    gc << lay.cluster_bits,
                    Some(&data[i * cs..(i + 1) * cs]),
                    cs as u64,
                ));
                continue;
            }
            match segs.last_mut() {
                Some((a, k)) if *a + *k == i && !gc.is_multiple_of(lay.l2_entries) => *k += 1,
                _ => segs.push((i, 1)),
            }
        }
        let fresh = async {
            if segs.is_empty() {
                return Ok(());
            }
            let _gate = w.alloc_gate.read().await;
            let hosts = {
                let mut m = w.meta.lock().await;
                let mut hosts: Vec<u64> = Vec::with_capacity(segs.len());
                for &(i, k) in &segs {
                    let r = self.alloc_fresh(&mut m, gc0 + i as u64, k as u64).await;
                    match r {
                        Ok(h) => hosts.push(h),
                        Err(e) => {
                            self.give_back(&mut m, &segs, &hosts);
                            return Err(e);
                        }
                    }
                }
                hosts
            };
            let writes = segs
                .iter()
                .zip(&hosts)
                .map(|(&(i, k), &h)| self.inner.data.write_at(&data[i * cs..(i + k) * cs], h));
            if let Err(err) = futures::future::try_join_all(writes).await {
                let mut m = w.meta.lock().await;
                self.give_back(&mut m, &segs, &hosts);
                return Err(Error::io(
                    err,
                    format!("{}: writing data", self.inner.path.display()),
                ));
            }
            // Publish the mappings.
            let mut m = w.meta.lock().await;
            for (&(i, k), &h) in segs.iter().zip(&hosts) {
                self.set_l2_run(&mut m, gc0 + i as u64, k as u64, h).await?;
            }
            Ok(())
        };
        let (a, b) = futures::future::join(fresh, futures::future::try_join_all(others)).await;
        drop(guards);
        a?;
        b.map(|_| ())
    }

    /// Make the L2 table of guest clusters `[gc, gc + k)` (one table) writable, then
    /// allocate `k` contiguous host clusters for them (in that order, as a single cluster's
    /// allocation does: the table first). Returns the host offset.
    async fn alloc_fresh(&self, m: &mut Meta, gc: u64, k: u64) -> Result<u64> {
        let cs = self.inner.layout.cluster_size;
        self.ensure_l2_writable(m, gc).await?;
        let h = self.alloc_clusters(m, k).await?;
        if let Err(e) = self
            .check_overlap(h, k * cs, crate::engine::overlap::Target::Data)
            .await
        {
            let bits = self.inner.layout.cluster_bits;
            m.pending_free.extend((h >> bits)..(h >> bits) + k);
            return Err(e);
        }
        Ok(h)
    }

    /// Give back the host clusters allocated for `segs` (not referenced by any table):
    /// their references are dropped at the next metadata flush.
    fn give_back(&self, m: &mut Meta, segs: &[(usize, usize)], hosts: &[u64]) {
        let bits = self.inner.layout.cluster_bits;
        for (&(_, k), &h) in segs.iter().zip(hosts) {
            m.pending_free.extend((h >> bits)..(h >> bits) + k as u64);
        }
    }

    /// Point guest clusters `[gc, gc + k)` (inside one L2 table) at the host clusters from
    /// `host` on, one cache update per L2 slice (all subclusters allocated with extended L2).
    pub(crate) async fn set_l2_run(&self, m: &mut Meta, gc: u64, k: u64, host: u64) -> Result<()> {
        let lay = self.inner.layout;
        let l2_off = self.ensure_l2_writable(m, gc).await?;
        let per_slice = lay.slice_size / lay.l2_entry_size;
        let mut i = 0u64;
        while i < k {
            let idx = (gc + i) % lay.l2_entries;
            let in_slice = (per_slice - idx % per_slice).min(k - i);
            let slice_off = l2_off + idx / per_slice * lay.slice_size;
            let first = host + (i << lay.cluster_bits);
            update_slice(&self.inner.l2_cache, &*self.inner.file, slice_off, |d| {
                for j in 0..in_slice {
                    let at = ((idx % per_slice + j) * lay.l2_entry_size) as usize;
                    let e = (first + (j << lay.cluster_bits)) | COPIED;
                    d[at..at + 8].copy_from_slice(&e.to_be_bytes());
                    if lay.extended {
                        d[at + 8..at + 16].copy_from_slice(&0xffff_ffffu64.to_be_bytes());
                    }
                }
            })
            .await?;
            i += in_slice;
        }
        Ok(())
    }
}
