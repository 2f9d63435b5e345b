//! Guest-to-host mapping: L1/L2 lookups, runs of like clusters, block status.

use crate::engine::disk::LayerStatus;
use crate::engine::image::Image;
use crate::format::be64;
use crate::format::l2::{self, ClusterEntry, SubState, COPIED};
use crate::{Error, Result};

/// The arguments of a block-status query: `off` inside the disk, `len` not zero.
pub(crate) fn check_status_range(off: u64, len: u64, size: u64) -> Result<()> {
    if off >= size {
        return Err(Error::out_of_range(format!(
            "block status at offset {off} is beyond the end of the disk ({size} bytes)"
        )));
    }
    if len == 0 {
        return Err(Error::invalid("block status of zero bytes"));
    }
    Ok(())
}

/// Where a guest range is, at this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub state: SubState,
    pub len: u64,
    /// Host offset of the cluster for unallocated subclusters of an allocated cluster.
    pub alloc_host: Option<u64>,
}
impl Image {
    pub(crate) fn lookup_l2_off(&self, gc: u64) -> (u64, u64, bool) {
        let lay = self.inner.layout;
        let l1_idx = gc / lay.l2_entries;
        let e = self
            .inner
            .l1
            .read()
            .get(l1_idx as usize)
            .copied()
            .unwrap_or(0);
        (l1_idx, l2::l1_offset(e), e & COPIED != 0)
    }

    pub(crate) async fn current_entry(&self, gc: u64) -> Result<(u64, u64, bool)> {
        let lay = self.inner.layout;
        let (_, l2_off, l2_copied) = self.lookup_l2_off(gc);
        if l2_off == 0 {
            return Ok((0, 0, false));
        }
        let (e, bm) = self.l2_entry(l2_off, gc % lay.l2_entries).await?;
        Ok((e, bm, l2_copied))
    }

    /// The slice at `slice_off` of the L2 table at `l2_off`, through the cache. A lookup that
    /// starts at the slice's first entry (`entering`) may read the slices after it too
    /// ([`crate::engine::cache::SliceCache::get_ahead`]: sequential scans).
    async fn l2_slice(
        &self,
        l2_off: u64,
        slice_off: u64,
        entering: bool,
    ) -> Result<std::sync::Arc<crate::engine::cache::Slice>> {
        let cache = &self.inner.l2_cache;
        let file = &*self.inner.file;
        if entering {
            let end = l2_off.saturating_add(self.inner.layout.cluster_size);
            cache.get_ahead(file, slice_off, l2_off, end).await
        } else {
            cache.get(file, slice_off).await
        }
    }

    /// Read the L2 entry (and bitmap, for extended L2) of guest cluster `gc` through the L2
    /// table at `l2_off`.
    pub(crate) async fn l2_entry(&self, l2_off: u64, idx: u64) -> Result<(u64, u64)> {
        let lay = &self.inner.layout;
        let byte = idx * lay.l2_entry_size;
        let slice_off = l2_off + byte / lay.slice_size * lay.slice_size;
        let within = (byte % lay.slice_size) as usize;
        let slice = self.l2_slice(l2_off, slice_off, within == 0).await?;
        let d = slice.data.read();
        let e = be64(&d, within);
        let bm = if lay.extended {
            be64(&d, within + 8)
        } else {
            0
        };
        Ok((e, bm))
    }

    /// Read a table slice of `l2_off` through the cache: returns the entries (and bitmaps)
    /// of guest clusters `[first, first+n)` where the run stays inside one slice.
    pub(crate) async fn l2_run(
        &self,
        l2_off: u64,
        first: u64,
        max: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let lay = &self.inner.layout;
        let per_slice = lay.slice_size / lay.l2_entry_size;
        let in_slice = per_slice - first % per_slice;
        let n = in_slice.min(max).min(lay.l2_entries - first);
        let slice_off = l2_off + first / per_slice * lay.slice_size;
        let slice = self
            .l2_slice(l2_off, slice_off, first.is_multiple_of(per_slice))
            .await?;
        let d = slice.data.read();
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let b = ((first % per_slice + i) * lay.l2_entry_size) as usize;
            let e = be64(&d, b);
            let bm = if lay.extended { be64(&d, b + 8) } else { 0 };
            out.push((e, bm));
        }
        Ok(out)
    }

    pub(crate) fn entry_state(
        &self,
        gc: u64,
        e: u64,
        bm: u64,
        sc: u32,
    ) -> Result<(SubState, Option<u64>)> {
        let lay = &self.inner.layout;
        let ce = l2::decode(e, lay.cluster_bits, lay.extended);
        let host = match ce {
            ClusterEntry::Normal { host, .. } => Some(host),
            ClusterEntry::Zero { host } => host,
            _ => None,
        };
        if let Some(h) = host {
            if h % lay.cluster_size != 0 {
                return Err(Error::corrupt(format!(
                    "L2 entry for guest offset 0x{:x}: host offset 0x{h:x} is not cluster aligned",
                    gc << lay.cluster_bits
                )));
            }
            if h == 0 && self.inner.data_path.is_none() {
                return Err(Error::corrupt(format!(
                    "L2 entry for guest offset 0x{:x} points at the header (offset 0)",
                    gc << lay.cluster_bits
                )));
            }
        }
        if let ClusterEntry::Compressed(d) = ce {
            if self.inner.data_path.is_some() {
                return Err(Error::corrupt(
                    "compressed cluster in an image with an external data file",
                ));
            }
            if d.offset < 512 {
                return Err(Error::corrupt(format!(
                    "L2 entry for guest offset 0x{:x}: compressed data at offset 0x{:x} overlaps the header",
                    gc << lay.cluster_bits,
                    d.offset
                )));
            }
        }
        if lay.extended {
            let st = l2::substate(ce, bm, sc, lay.sc_size).map_err(|_| {
                Error::corrupt(format!(
                    "L2 entry for guest offset 0x{:x}: invalid subcluster bitmap 0x{bm:016x}",
                    gc << lay.cluster_bits
                ))
            })?;
            let alloc_host = match (st, ce) {
                (SubState::Unallocated | SubState::Zero, ClusterEntry::Normal { host, .. }) => {
                    Some(host + sc as u64 * lay.sc_size)
                }
                (SubState::Zero, ClusterEntry::Zero { host: Some(h) }) => Some(h),
                _ => None,
            };
            Ok((st, alloc_host))
        } else {
            Ok(match ce {
                ClusterEntry::Unallocated => (SubState::Unallocated, None),
                ClusterEntry::Zero { host } => (SubState::Zero, host),
                ClusterEntry::Normal { host, .. } => (SubState::Data(host), None),
                ClusterEntry::Compressed(d) => (SubState::Compressed(d), None),
            })
        }
    }

    /// The mapping of the run starting at guest `off`, at most `max` bytes, at this layer.
    /// Runs of data are physically contiguous; compressed runs are one cluster.
    pub(crate) async fn run_at(&self, off: u64, max: u64) -> Result<Run> {
        self.check_usable()?;
        let lay = self.inner.layout;
        if max == 0 {
            return Err(Error::invalid("mapping lookup of zero bytes"));
        }
        let gc = off >> lay.cluster_bits;
        let l1_idx = gc / lay.l2_entries;
        let l2_idx = gc % lay.l2_entries;
        if l1_idx >= self.inner.l1_in_file && self.inner.w.is_none() {
            return Err(Error::corrupt(format!(
                "L1 table is truncated: entry {l1_idx} lies beyond the end of the file"
            )));
        }
        let l2_off = {
            let l1 = self.inner.l1.read();
            l1.get(l1_idx as usize)
                .map(|&e| l2::l1_offset(e))
                .unwrap_or(0)
        };
        let to_l2_end =
            (lay.l2_entries - l2_idx) * lay.cluster_size - (off & (lay.cluster_size - 1));
        if l2_off == 0 {
            return Ok(Run {
                state: SubState::Unallocated,
                len: max.min(to_l2_end),
                alloc_host: None,
            });
        }
        let ncl = (off + max).div_ceil(lay.cluster_size) - gc;
        let entries = self.l2_run(l2_off, l2_idx, ncl).await?;
        let mut pos = off;
        let end = off + max;
        let mut first: Option<(SubState, Option<u64>)> = None;
        let mut len = 0u64;
        'outer: for (i, &(e, bm)) in entries.iter().enumerate() {
            let cgc = gc + i as u64;
            let cstart = cgc << lay.cluster_bits;
            while pos < end && pos < cstart + lay.cluster_size {
                let sc = ((pos - cstart) >> lay.sc_bits) as u32;
                let sc_end = (cstart + ((sc as u64 + 1) << lay.sc_bits)).min(end);
                let (st, ah) = self.entry_state(cgc, e, bm, sc)?;
                let piece = sc_end - pos;
                match first {
                    None => {
                        first = Some((st, ah));
                    }
                    Some((fst, fah)) => {
                        let cont = match (fst, st) {
                            (SubState::Data(a), SubState::Data(b)) => a + len == b,
                            (SubState::Zero, SubState::Zero)
                            | (SubState::Unallocated, SubState::Unallocated) => match (fah, ah) {
                                (None, None) => true,
                                (Some(a), Some(b)) => a + len == b,
                                _ => false,
                            },
                            _ => false,
                        };
                        if !cont {
                            break 'outer;
                        }
                    }
                }
                len += piece;
                pos = sc_end;
                if matches!(first, Some((SubState::Compressed(_), _))) {
                    // One compressed cluster per run.
                    if pos >= cstart + lay.cluster_size || pos >= end {
                        break 'outer;
                    }
                }
            }
        }
        let Some((state, alloc_host)) = first else {
            // Unreachable with max > 0 (the first subcluster is always taken); an error
            // rather than a panic all the same.
            return Err(Error::invalid(format!(
                "mapping lookup at offset {off} found no cluster"
            )));
        };
        Ok(Run {
            state,
            len,
            alloc_host,
        })
    }

    /// qemu's block status of the run at `off` at this layer only (at most `len` bytes, at
    /// least one). Fails with an out-of-range error when `off` is not inside the disk, and an
    /// invalid-argument error when `len` is 0.
    pub async fn layer_status(&self, off: u64, len: u64) -> Result<LayerStatus> {
        self.layer_status_inner(off, len)
            .await
            .map_err(|e| self.named(e))
    }

    pub(crate) async fn layer_status_inner(&self, off: u64, len: u64) -> Result<LayerStatus> {
        let size = self.size();
        check_status_range(off, len, size)?;
        let len = len.min(size - off);
        let run = self.run_at(off, len).await?;
        let mut st = LayerStatus {
            len: run.len,
            allocated: true,
            data: false,
            zero: false,
            compressed: false,
            offset: None,
        };
        match run.state {
            SubState::Data(h) => {
                st.data = true;
                let host = h + (off & (self.inner.layout.sc_size - 1));
                st.offset = Some(host);
                if self.metadata_preallocated().await? {
                    let (n, is_data) = self
                        .inner
                        .data
                        .data_run(host, st.len)
                        .map_err(Error::from)?;
                    if !is_data {
                        st.zero = true;
                    }
                    if n > 0 {
                        st.len = st.len.min(n);
                    }
                }
            }
            SubState::Zero => {
                st.zero = true;
                // A preallocated zero cluster keeps its host offset.
                st.offset = run
                    .alloc_host
                    .map(|h| h + (off & (self.inner.layout.sc_size - 1)));
            }
            SubState::Compressed(_) => {
                st.data = true;
                st.compressed = true;
            }
            SubState::Unallocated => {
                st.allocated = false;
                st.offset = run
                    .alloc_host
                    .map(|h| h + (off & (self.inner.layout.sc_size - 1)));
                match &self.inner.backing {
                    None => st.zero = true,
                    Some(b) => {
                        let bs = b.size();
                        if off >= bs {
                            st.zero = true;
                        } else {
                            st.len = st.len.min(bs - off);
                        }
                    }
                }
            }
        }
        Ok(st)
    }

    /// qemu's heuristic for metadata preallocation: with `R` the clusters the file has
    /// allocated on the host (`st_blocks`), at least `max(R * 10 / 9, R + 2)` clusters have a
    /// refcount. Then data clusters that are holes in the file read as zeros in block status
    /// (`map`, NBD). The comparison is "at least", as QEMU's: an image right at the threshold
    /// (common for small images written by qemu-io) maps as qemu-img maps it.
    pub(crate) async fn metadata_preallocated(&self) -> Result<bool> {
        self.inner
            .prealloc
            .get_or_try_init(|| async {
                let cs = self.inner.layout.cluster_size;
                let file_len = self.inner.file.len().map_err(Error::from)?;
                let real = self.inner.file.allocated_size().map_err(Error::from)? / cs;
                let threshold = (real * 10 / 9).max(real + 2);
                let end = file_len.div_ceil(cs);
                let mut count = 0u64;
                let mut i = 0;
                while i < end && count < threshold {
                    if self.refcount(i).await? != 0 {
                        count += 1;
                    }
                    i += 1;
                }
                Ok::<bool, Error>(count >= threshold)
            })
            .await
            .copied()
    }
}
