//! Copy-on-write and allocation of guest clusters (and of subclusters with extended L2).

use crate::engine::image::Image;
use crate::engine::write::{nonzero_range, nonzero_span, subcluster_mask};
use crate::format::l2::{self, ClusterEntry, COPIED};
use crate::{Error, Result};

impl Image {
    /// Guest content of a whole cluster as it reads now (for copy-on-write).
    pub(crate) async fn cluster_content(&self, gc: u64) -> Result<Vec<u8>> {
        let cs = self.inner.layout.cluster_size;
        let g = gc * cs;
        let mut buf = vec![0u8; cs as usize];
        let size = self.size();
        let n = (size - g).min(cs) as usize;
        // Inside a request already: not `read_at` (see `enter_request`).
        self.read_inner(&mut buf[..n], g)
            .await
            .map_err(|e| self.named(e))?;
        Ok(buf)
    }

    /// Allocate (or copy) guest cluster `gc` and write the range into it.
    pub(crate) async fn allocating_write(
        &self,
        gc: u64,
        within: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let w = self.ws()?;
        let external = self.inner.data_path.is_some();
        let (e, bm, _) = self.current_entry(gc).await?;
        let ce = l2::decode(e, lay.cluster_bits, lay.extended);

        // Extended L2: an allocated cluster with refcount 1 gets new subclusters in place.
        if lay.extended {
            if let ClusterEntry::Normal { host, copied: true } = ce {
                if self.lookup_l2_off(gc).2 {
                    return self
                        .subcluster_alloc_write(gc, host, bm, within, data, len)
                        .await;
                }
            }
        }

        // The cluster reads as zeros now (and has no host cluster to reuse): if it gets a
        // fresh host cluster, only the request's own range has to be written.
        let reads_zero = !external
            && !lay.extended
            && match ce {
                ClusterEntry::Zero { host: None } => true,
                ClusterEntry::Unallocated => self.inner.backing.is_none(),
                _ => false,
            };
        // Otherwise the new cluster content: current guest content with the range overlaid
        // (built below once the host cluster is known not to be fresh).
        let whole = within == 0 && len == cs;
        // Which subclusters end up allocated (extended L2): every subcluster, since the whole
        // cluster content is written.
        // From the allocation until the mapping is published the new cluster is counted
        // but not referenced: `check` waits for that window to close (`alloc_gate`).
        let _gate = w.alloc_gate.read().await;
        // Choose the host cluster.
        let (host, fresh, old_refs, tail_needed): (u64, bool, Vec<u64>, bool) = {
            let mut m = w.meta.lock().await;
            self.ensure_l2_writable(&mut m, gc).await?;
            let mut old_refs = Vec::new();
            let reuse = match ce {
                ClusterEntry::Zero { host: Some(h) } if e & COPIED != 0 && !external => Some(h),
                _ => None,
            };
            match ce {
                ClusterEntry::Normal { host, .. } if !external => {
                    old_refs.push(host >> lay.cluster_bits)
                }
                ClusterEntry::Zero { host: Some(h) } if reuse.is_none() && !external => {
                    old_refs.push(h >> lay.cluster_bits)
                }
                ClusterEntry::Compressed(d) => {
                    let (a, b) = d.host_clusters(lay.cluster_bits);
                    let mut c = a;
                    while c <= b {
                        old_refs.push(c >> lay.cluster_bits);
                        c += cs;
                    }
                }
                _ => {}
            }
            if external {
                (gc * cs, false, old_refs, false)
            } else if let Some(h) = reuse {
                (h, false, old_refs, false)
            } else {
                let hw = m.high_water;
                let h = self.alloc_clusters(&mut m, 1).await?;
                self.check_overlap(h, cs, crate::engine::overlap::Target::Data)
                    .await?;
                // Space reserved ahead (`reserve_space`) extended the file past the cluster:
                // its end need not be written for the file to cover it.
                let covered = h + cs <= m.reserved_end;
                (h, (h >> lay.cluster_bits) >= hw, old_refs, !covered)
            }
        };
        if fresh && reads_zero {
            return self
                .fresh_zero_write(gc, host, within, data, len, tail_needed)
                .await;
        }
        let mut content = if whole {
            vec![0u8; cs as usize]
        } else {
            self.cluster_content(gc).await?
        };
        match data {
            Some(d) => content[within as usize..(within + len) as usize].copy_from_slice(d),
            None => content[within as usize..(within + len) as usize].fill(0),
        }
        // Write the data (outside the lock). A fresh cluster past the old end of file already
        // reads as zeros: write only the non-zero part, and the last sector (zeros) so that
        // the file covers the whole cluster (qemu-img check calls a cluster wholly past the
        // end of the file a corruption; readers may refuse to read past it).
        let res = if fresh {
            let c = content.len();
            let (a, b) = nonzero_span(&content).unwrap_or((c - 512, c));
            let data = &self.inner.data;
            let span = data.write_at(&content[a..b], host + a as u64);
            if b < c {
                let tail = data.write_at(&content[c - 512..], host + c as u64 - 512);
                futures::future::try_join(span, tail).await.map(|_| ())
            } else {
                span.await
            }
        } else {
            self.inner.data.write_at(&content, host).await
        };
        if let Err(err) = res {
            // Give the cluster back (it is not referenced by any table).
            if !external && old_refs.iter().all(|&c| c != host >> lay.cluster_bits) {
                let mut m = w.meta.lock().await;
                if !matches!(ce, ClusterEntry::Zero { host: Some(h) } if h == host) {
                    m.pending_free.push(host >> lay.cluster_bits);
                }
            }
            return Err(self.data_write_error(err, host));
        }
        // Publish the mapping.
        let mut m = w.meta.lock().await;
        let new_bm = if lay.extended { 0xffff_ffffu64 } else { 0 };
        self.set_l2_entry(&mut m, gc, host | COPIED, new_bm).await?;
        m.pending_free.extend(old_refs);
        Ok(())
    }

    /// `allocating_write` of a cluster that reads as zeros into fresh host cluster `host`
    /// (past everything ever allocated: its bytes read as zeros). Only the request's own
    /// range is written (its non-zero part), plus, when the file does not yet cover the
    /// cluster, its last sector; then later writes to the cluster may join (write their data
    /// into `host` alongside, see `inflight.rs`), and the mapping is published once this
    /// request's data is written. The caller holds the cluster's in-flight mark and the
    /// allocation gate.
    async fn fresh_zero_write(
        &self,
        gc: u64,
        host: u64,
        within: u64,
        data: Option<&[u8]>,
        len: u64,
        tail_needed: bool,
    ) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let w = self.ws()?;
        let file = &self.inner.data;
        // The part of the request that is not zeros (relative to `within`). Zeros need no
        // writing: the cluster reads as zeros, and a zero range left unwritten cannot
        // overwrite what a joined write puts there.
        let span = data.and_then(nonzero_range);
        let res = async {
            if tail_needed && span.is_none_or(|(_, b)| within + (b as u64) < cs) {
                // The last sector, with the request's bytes that fall into it. Written before
                // any joined write can start, so its zeros cannot overwrite one.
                let t0 = cs - 512;
                let mut tail = [0u8; 512];
                if let (Some(d), Some(_)) = (data, span) {
                    let (a, b) = (within.max(t0), (within + len).min(cs));
                    if a < b {
                        tail[(a - t0) as usize..(b - t0) as usize]
                            .copy_from_slice(&d[(a - within) as usize..(b - within) as usize]);
                    }
                }
                file.write_at(&tail, host + t0).await?;
            }
            let slot = self.announce_fresh(gc, host);
            if let (Some(d), Some((a, b))) = (data, span) {
                file.write_at(&d[a..b], host + within + a as u64).await?;
            }
            Ok::<_, std::io::Error>(slot)
        }
        .await;
        let slot = match res {
            Ok(s) => s,
            Err(err) => {
                // Give the cluster back (no table references it; writes that joined start
                // again when the mark is released, and their tickets keep the cluster from
                // being reused while their writes into it run).
                w.meta
                    .lock()
                    .await
                    .pending_free
                    .push(host >> lay.cluster_bits);
                return Err(self.data_write_error(err, host));
            }
        };
        let mut m = w.meta.lock().await;
        self.set_l2_entry(&mut m, gc, host | COPIED, 0).await?;
        drop(m);
        if let Some(slot) = slot {
            self.publish_fresh(&slot);
        }
        Ok(())
    }

    /// Extended L2: write into unallocated/zero subclusters of an allocated cluster in place.
    ///
    /// `bm` is the cluster's bitmap, read while holding the cluster's in-flight mark (so the
    /// unallocated and zero subclusters cannot change meanwhile). Only what must be written
    /// is: an unallocated or zero subcluster touched by the request gets its whole content
    /// (the request's bytes over what it reads as now: backing data or zeros); an allocated
    /// one gets only the request's bytes. Rewriting the rest of an allocated subcluster
    /// would overwrite a concurrent in-place write into it (which takes no lock) with the
    /// stale bytes read before.
    pub(crate) async fn subcluster_alloc_write(
        &self,
        gc: u64,
        host: u64,
        bm: u64,
        within: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<()> {
        let lay = self.inner.layout;
        let sc = lay.sc_size;
        let first = within / sc;
        let last = (within + len - 1) / sc;
        let allocated = |i: u64| bm & (1u64 << i) != 0;
        // Only the ends can be partial subclusters: the middle ones are wholly covered.
        let start = if allocated(first) { within } else { first * sc };
        let end = if allocated(last) {
            within + len
        } else {
            (last + 1) * sc
        };
        let cstart = gc * lay.cluster_size;
        let size = self.size();
        let mut buf = vec![0u8; (end - start) as usize];
        let a = (within - start) as usize;
        let b = a + len as usize;
        // The head and tail of unallocated subclusters as they read now (past the end of the
        // disk: zeros).
        for (lo, hi) in [(0, a), (b, buf.len())] {
            let g = cstart + start + lo as u64;
            let n = (size.saturating_sub(g) as usize).min(hi - lo);
            if n > 0 {
                self.read_inner(&mut buf[lo..lo + n], g)
                    .await
                    .map_err(|e| self.named(e))?;
            }
        }
        match data {
            Some(d) => buf[a..b].copy_from_slice(d),
            None => buf[a..b].fill(0),
        }
        self.check_host(gc, host)?;
        self.inner
            .data
            .write_at(&buf, host + start)
            .await
            .map_err(|e| Error::io(e, format!("{}: writing data", self.inner.path.display())))?;
        let w = self.ws()?;
        let mut m = w.meta.lock().await;
        let mask = subcluster_mask(first as u32, last as u32);
        let (e, cur_bm, _) = self.current_entry(gc).await?;
        let new_bm = (cur_bm | mask) & !(mask << 32);
        self.set_l2_entry(&mut m, gc, e, new_bm).await
    }
}
