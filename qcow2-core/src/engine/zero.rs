//! Write-zeroes and discard.

use crate::engine::image::Image;
use crate::format::l2::{self, ClusterEntry, COPIED, ZERO};
use crate::Result;

/// How `write_zeroes` treats allocated clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Keep host clusters allocated (zero flag with the host offset kept).
    Keep,
    /// Free host clusters (zero flag only).
    Unmap,
}
impl Image {
    /// Make `len` bytes at `off` read as zeros. Whole clusters get the zero flag (v3);
    /// partial clusters are written with zeros.
    pub async fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_write(off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.before_first_write().await?;
        let _req = self.enter_request().await;
        self.track_change(off, len).await?;
        self.zero_or_discard(off, len, Some(mode)).await?;
        self.finish_write(_req).await
    }

    /// Discard `len` bytes at `off`: whole clusters are deallocated (read as zeros afterwards,
    /// never as backing data) and their host clusters freed and punched; partial clusters are
    /// zeroed.
    pub async fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_write(off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.before_first_write().await?;
        let _req = self.enter_request().await;
        self.track_change(off, len).await?;
        self.zero_or_discard(off, len, None).await?;
        self.finish_write(_req).await
    }

    pub(crate) async fn zero_or_discard(
        &self,
        off: u64,
        len: u64,
        mode: Option<ZeroMode>,
    ) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let size = self.size();
        let _ticket = self.ticket();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let gc = pos / cs;
            let cstart = gc * cs;
            let cend = (cstart + cs).min(size);
            let n = (cend.min(end)) - pos;
            let whole = pos == cstart && pos + n == cend;
            if whole {
                let _g = self.acquire(gc).await;
                // Holds the in-flight mark: must not call write_cluster (it would wait for
                // the mark forever).
                self.zero_whole_cluster(gc, mode).await?;
            } else if lay.extended && mode.is_some() {
                // Whole subclusters can use the zero bits; the rest is written.
                self.zero_partial_extended(gc, pos - cstart, n).await?;
            } else {
                self.write_cluster(pos, None, n).await?;
            }
            pos += n;
        }
        Ok(())
    }

    pub(crate) async fn zero_partial_extended(&self, gc: u64, within: u64, n: u64) -> Result<()> {
        // Keep it simple and correct: write zeros through the normal path.
        self.write_cluster(gc * self.inner.layout.cluster_size + within, None, n)
            .await
    }

    pub(crate) async fn zero_whole_cluster(&self, gc: u64, mode: Option<ZeroMode>) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let w = self.ws()?;
        let (v3, raw_df) = {
            let h = self.inner.header.read();
            (h.version >= 3, h.data_file_raw())
        };
        let has_backing = self.inner.backing.is_some();
        let external = self.inner.data_path.is_some();
        if (!v3 && has_backing) || raw_df {
            // v2 has no zero flag, so only real zeros hide the backing file; a raw data file
            // must hold the zeros itself.
            return self.write_cluster_guarded(gc * cs, None, cs).await;
        }
        let mut m = w.meta.lock().await;
        let (e, bm, _) = self.current_entry(gc).await?;
        let ce = l2::decode(e, lay.cluster_bits, lay.extended);
        let host_copied = match ce {
            ClusterEntry::Normal { host, copied } => Some((host, copied)),
            ClusterEntry::Zero { host: Some(h) } => Some((h, e & COPIED != 0)),
            _ => None,
        };
        // References this entry holds, dropped unless the host cluster is kept.
        let mut frees: Vec<u64> = Vec::new();
        let mut keep_host = None;
        match (ce, host_copied) {
            (_, Some((host, copied))) => {
                if mode == Some(ZeroMode::Keep) && (copied || external) {
                    keep_host = Some(host);
                } else if !external {
                    frees.push(host >> lay.cluster_bits);
                }
            }
            (ClusterEntry::Compressed(d), None) => {
                let (first, last) = d.host_clusters(lay.cluster_bits);
                frees.extend((first >> lay.cluster_bits)..=(last >> lay.cluster_bits));
            }
            _ => {}
        }
        if !v3 && keep_host.is_some() {
            // v2 has no zero flag: keeping the cluster means writing zeros into it.
            drop(m);
            return self.write_cluster_guarded(gc * cs, None, cs).await;
        }
        // Zero flag where it is needed (backing file) or asked for (write-zeroes on v3).
        let flag = v3 && (has_backing || mode.is_some());
        let (entry, new_bm) = if lay.extended {
            let zbits = if flag { 0xffff_ffffu64 << 32 } else { 0 };
            match keep_host {
                Some(h) => (h | COPIED, 0xffff_ffffu64 << 32),
                None => (0, zbits),
            }
        } else {
            match keep_host {
                Some(h) => (h | COPIED | ZERO, 0),
                None if flag => (ZERO, 0),
                None => (0, 0),
            }
        };
        if e == entry && (!lay.extended || bm == new_bm) {
            return Ok(());
        }
        self.set_l2_entry(&mut m, gc, entry, new_bm).await?;
        m.pending_free.extend(frees);
        drop(m);
        if external && keep_host.is_none() && host_copied.is_some() {
            // Data file clusters are not refcounted; release their space now that the
            // mapping is gone (the table is written back before anything reuses it).
            let _ = self.inner.data.discard(gc * cs, cs).await;
        }
        Ok(())
    }
}
