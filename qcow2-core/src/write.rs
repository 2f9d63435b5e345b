//! Guest writes, write-zeroes, discard and the ordered metadata flush.
//!
//! Ordering (crash safety):
//! 1. Guest data is written (and completed) before the L2 entry that exposes it changes,
//!    even in the cache.
//! 2. Refcount increments live in dirty refcount slices; `flush_metadata` writes them (and
//!    syncs) before any dirty L2 slice or L1 entry, so no table on disk ever points at a
//!    cluster whose on-disk refcount is 0.
//! 3. Decrements are deferred (`Meta::pending_free`) until the tables that dropped the
//!    reference are on disk and synced; only then are holes punched and refcounts lowered,
//!    so a freed cluster is never reused while an on-disk table still points at it.
//!
//! Concurrency: metadata changes take one async mutex (`Meta`), held only for cache
//! updates, never across guest data I/O. Writes into clusters that are already allocated
//! with refcount 1 take no lock at all. Writes that must allocate or copy a cluster first
//! register the guest cluster as in flight; a second request for the same cluster waits for
//! the first to publish its mapping and then re-evaluates.

use crate::format::header::{self, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW};
use crate::format::l2::{self, ClusterEntry, COPIED, ZERO};
use crate::image::Image;
use crate::{Error, Result};
use parking_lot::Mutex as PMutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::{Mutex, Notify, OnceCell};

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
    /// The image file has space reserved (`fallocate`) up to this offset: allocations below it
    /// write into allocated blocks, which is much faster than extending the file write by write.
    pub reserved_end: u64,
}

/// Write state of an image opened writable.
pub struct WriteState {
    pub(crate) meta: Mutex<Meta>,
    inflight: PMutex<HashMap<u64, Arc<Notify>>>,
    first_write: OnceCell<()>,
}

impl WriteState {
    pub(crate) fn new(high_water: u64) -> Self {
        WriteState {
            meta: Mutex::new(Meta {
                free_hint: 0,
                pending_free: Vec::new(),
                l1_dirty: BTreeSet::new(),
                reftable_dirty: BTreeSet::new(),
                high_water,
                comp_cursor: 0,
                reserved_end: 0,
            }),
            inflight: PMutex::new(HashMap::new()),
            first_write: OnceCell::new(),
        }
    }
}

/// Releases a guest cluster's in-flight mark on drop and wakes waiters.
struct InflightGuard<'a> {
    w: &'a WriteState,
    gc: u64,
    notify: Arc<Notify>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.w.inflight.lock().remove(&self.gc);
        self.notify.notify_waiters();
    }
}

/// How `write_zeroes` treats allocated clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Keep host clusters allocated (zero flag with the host offset kept).
    Keep,
    /// Free host clusters (zero flag only).
    Unmap,
}

impl Image {
    pub(crate) fn ws(&self) -> Result<&WriteState> {
        self.inner.w.as_ref().ok_or_else(|| {
            Error::read_only(format!(
                "{}: image is opened read-only",
                self.inner.path.display()
            ))
        })
    }

    /// Write header bytes at `off` and make them durable.
    async fn write_header_bytes(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner
            .file
            .write_at(buf, off)
            .await
            .map_err(|e| Error::io(e, "writing the header"))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| Error::io(e, "flush"))
    }

    /// Whether the image was opened writable.
    pub fn is_writable(&self) -> bool {
        self.inner.w.is_some()
    }

    /// Before the first change: clear autoclear bits we do not maintain (bitmaps, unknown).
    pub(crate) async fn before_first_write(&self) -> Result<()> {
        let w = self.ws()?;
        w.first_write
            .get_or_try_init(|| async {
                let (ver, clear, bitmaps) = {
                    let h = self.inner.header.read();
                    let keep = AUTOCLEAR_DATA_FILE_RAW;
                    (h.version, h.autoclear_features & !keep, h.bitmaps)
                };
                if ver >= 3 && clear != 0 {
                    let bits = {
                        let mut h = self.inner.header.write();
                        h.autoclear_features &= !clear;
                        if clear & AUTOCLEAR_BITMAPS != 0 {
                            h.bitmaps = None;
                        }
                        h.autoclear_features
                    };
                    self.write_header_bytes(&bits.to_be_bytes(), 88).await?;
                    if clear & AUTOCLEAR_BITMAPS != 0 {
                        if let Some(ext) = bitmaps {
                            self.drop_bitmaps(&ext).await?;
                        }
                    }
                }
                Ok::<(), Error>(())
            })
            .await?;
        Ok(())
    }

    /// The bitmaps are stale once their autoclear bit is clear (done, and durable, before
    /// this): remove their header extension and free their clusters (directory, tables,
    /// data) at the next metadata flush, rather than leaking them as QEMU does. A crash in
    /// between only leaks them. Nothing is freed when the directory looks wrong.
    async fn drop_bitmaps(&self, ext: &header::BitmapsExt) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let file_len = self.inner.file.len().map_err(Error::from)?;
        let inside = |off: u64, len: u64| {
            off & (cs - 1) == 0 && off != 0 && off.checked_add(len).is_some_and(|e| e <= file_len)
        };
        let mut clusters = Vec::new();
        let mut ok = inside(ext.directory_offset, ext.directory_size) && ext.directory_size > 0;
        if ok {
            let first = ext.directory_offset / cs;
            clusters.extend(first..(ext.directory_offset + ext.directory_size).div_ceil(cs));
        }
        for b in &self.inner.bitmaps {
            let bytes = b.table_size as u64 * 8;
            if !ok || bytes == 0 || bytes > 64 << 20 || !inside(b.table_offset, bytes) {
                ok = false;
                break;
            }
            clusters.extend(b.table_offset / cs..(b.table_offset + bytes).div_ceil(cs));
            let mut t = vec![0u8; bytes as usize];
            self.inner
                .file
                .read_at(&mut t, b.table_offset)
                .await
                .map_err(|e| Error::io(e, "reading a bitmap table"))?;
            for e in t.chunks_exact(8) {
                let off = u64::from_be_bytes(e.try_into().unwrap()) & l2::OFFSET_MASK;
                if off != 0 {
                    if !inside(off, cs) {
                        ok = false;
                        break;
                    }
                    clusters.push(off / cs);
                }
            }
        }
        let hdr = self.inner.header.read().to_bytes()?;
        self.write_header_bytes(&hdr, 0).await?;
        if ok {
            clusters.sort_unstable();
            clusters.dedup();
            let w = self.ws()?;
            w.meta.lock().await.pending_free.extend(clusters);
        }
        Ok(())
    }

    fn check_write(&self, off: u64, len: u64) -> Result<()> {
        self.ws()?;
        if self.inner.header.read().corrupt() {
            return Err(Error::read_only(format!(
                "{}: image is marked corrupt; writes are refused",
                self.inner.path.display()
            )));
        }
        crate::disk::check_range(off, len, self.size())
    }

    /// Write `buf` at guest offset `off`.
    pub async fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_write(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.before_first_write().await?;
        let cs = self.inner.layout.cluster_size;
        let mut futs = Vec::new();
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = off + pos as u64;
            let n = ((cs - g % cs) as usize).min(buf.len() - pos);
            futs.push(self.write_cluster(g, Some(&buf[pos..pos + n]), n as u64));
            pos += n;
        }
        if futs.len() == 1 {
            futs.pop().unwrap().await?;
        } else {
            futures::future::try_join_all(futs).await?;
        }
        self.maybe_writeback().await
    }

    /// Write back metadata if evicted dirty slices are waiting.
    async fn maybe_writeback(&self) -> Result<()> {
        if self.inner.l2_cache.has_evicted_dirty() || self.inner.rc_cache.has_evicted_dirty() {
            let w = self.ws()?;
            let mut m = w.meta.lock().await;
            self.flush_metadata(&mut m).await?;
        }
        Ok(())
    }

    fn lookup_l2_off(&self, gc: u64) -> (u64, u64, bool) {
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

    async fn current_entry(&self, gc: u64) -> Result<(u64, u64, bool)> {
        let lay = self.inner.layout;
        let (_, l2_off, l2_copied) = self.lookup_l2_off(gc);
        if l2_off == 0 {
            return Ok((0, 0, false));
        }
        let (e, bm) = self.l2_entry(l2_off, gc % lay.l2_entries).await?;
        Ok((e, bm, l2_copied))
    }

    async fn acquire(&self, gc: u64) -> Option<InflightGuard<'_>> {
        let w = self.inner.w.as_ref()?;
        loop {
            let wait = {
                let mut map = w.inflight.lock();
                match map.get(&gc) {
                    Some(n) => {
                        // Register as a waiter before the map lock is released, so the
                        // owner's notify_waiters() cannot be missed.
                        let mut fut = Box::pin(n.clone().notified_owned());
                        fut.as_mut().enable();
                        fut
                    }
                    None => {
                        let n = Arc::new(Notify::new());
                        map.insert(gc, n.clone());
                        return Some(InflightGuard { w, gc, notify: n });
                    }
                }
            };
            wait.await;
        }
    }

    /// Write (or zero, when `data` is None) `len` bytes inside one guest cluster at `g`.
    async fn write_cluster(&self, g: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        let lay = self.inner.layout;
        let gc = g >> lay.cluster_bits;
        let within = g & (lay.cluster_size - 1);
        // Fast path: allocated, refcount 1, in place.
        if let Some(host) = self.in_place_target(gc, within, len).await? {
            return self.write_data(host + within, data, len).await;
        }
        let _guard = self.acquire(gc).await;
        self.write_cluster_guarded(g, data, len).await
    }

    /// `write_cluster` for a caller that holds the cluster's in-flight mark.
    async fn write_cluster_guarded(&self, g: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        let lay = self.inner.layout;
        let gc = g >> lay.cluster_bits;
        let within = g & (lay.cluster_size - 1);
        if let Some(host) = self.in_place_target(gc, within, len).await? {
            return self.write_data(host + within, data, len).await;
        }
        self.allocating_write(gc, within, data, len).await
    }

    /// Host cluster offset when the range can be written in place.
    async fn in_place_target(&self, gc: u64, within: u64, len: u64) -> Result<Option<u64>> {
        let lay = self.inner.layout;
        let (e, bm, l2_copied) = self.current_entry(gc).await?;
        if !l2_copied {
            return Ok(None);
        }
        match l2::decode(e, lay.cluster_bits, lay.extended) {
            ClusterEntry::Normal { host, copied: true } => {
                if lay.extended {
                    let first = (within >> lay.sc_bits) as u32;
                    let last = ((within + len - 1) >> lay.sc_bits) as u32;
                    let mask = subcluster_mask(first, last);
                    if bm & mask != mask {
                        return Ok(None);
                    }
                }
                self.check_host(gc, host)?;
                Ok(Some(host))
            }
            _ => Ok(None),
        }
    }

    fn check_host(&self, gc: u64, host: u64) -> Result<()> {
        if host & (self.inner.layout.cluster_size - 1) != 0
            || (host == 0 && self.inner.data_path.is_none())
        {
            return Err(Error::corrupt(format!(
                "{}: L2 entry for guest cluster {gc} has an invalid host offset 0x{host:x}",
                self.inner.path.display()
            )));
        }
        Ok(())
    }

    async fn write_data(&self, host: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        let r = match data {
            Some(d) => self.inner.data.write_at(d, host).await,
            None => self.inner.data.write_zeroes(host, len).await,
        };
        r.map_err(|e| {
            Error::io(
                e,
                format!(
                    "{}: writing data at host offset 0x{host:x}",
                    self.inner.path.display()
                ),
            )
        })
    }

    /// Guest content of a whole cluster as it reads now (for copy-on-write).
    async fn cluster_content(&self, gc: u64) -> Result<Vec<u8>> {
        let cs = self.inner.layout.cluster_size;
        let g = gc * cs;
        let mut buf = vec![0u8; cs as usize];
        let size = self.size();
        let n = (size - g).min(cs) as usize;
        self.read_at(&mut buf[..n], g).await?;
        Ok(buf)
    }

    /// Allocate (or copy) guest cluster `gc` and write the range into it.
    async fn allocating_write(
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

        // Build the new cluster content: current guest content with the range overlaid.
        let whole = within == 0 && len == cs;
        let fresh_possible =
            matches!(ce, ClusterEntry::Unallocated | ClusterEntry::Zero { .. }) && !lay.extended;
        let mut content = if whole {
            vec![0u8; cs as usize]
        } else {
            self.cluster_content(gc).await?
        };
        match data {
            Some(d) => content[within as usize..(within + len) as usize].copy_from_slice(d),
            None => content[within as usize..(within + len) as usize].fill(0),
        }
        let _ = fresh_possible;
        // Which subclusters end up allocated (extended L2): every subcluster, since the whole
        // cluster content is written.
        // Choose the host cluster.
        let (host, fresh, old_refs): (u64, bool, Vec<u64>) = {
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
                (gc * cs, false, old_refs)
            } else if let Some(h) = reuse {
                (h, false, old_refs)
            } else {
                let hw = m.high_water;
                let h = self.alloc_clusters(&mut m, 1).await?;
                self.check_overlap(h, cs, crate::overlap::Target::Data)
                    .await?;
                (h, (h >> lay.cluster_bits) >= hw, old_refs)
            }
        };
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
            return Err(Error::io(
                err,
                format!(
                    "{}: writing data at host offset 0x{host:x}",
                    self.inner.path.display()
                ),
            ));
        }
        // Publish the mapping.
        let mut m = w.meta.lock().await;
        let new_bm = if lay.extended { 0xffff_ffffu64 } else { 0 };
        self.set_l2_entry(&mut m, gc, host | COPIED, new_bm).await?;
        m.pending_free.extend(old_refs);
        Ok(())
    }

    /// Extended L2: write into unallocated/zero subclusters of an allocated cluster in place.
    async fn subcluster_alloc_write(
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
        let start = first * sc;
        let end = (last + 1) * sc;
        // Content of the touched subclusters as they read now, with our range overlaid.
        let g0 = gc * lay.cluster_size + start;
        let span = (end - start) as usize;
        let mut buf = vec![0u8; span];
        let readable = (self.size().saturating_sub(g0) as usize).min(span);
        if !(within == start && within + len == end) {
            self.read_at(&mut buf[..readable], g0).await?;
        }
        let a = (within - start) as usize;
        match data {
            Some(d) => buf[a..a + len as usize].copy_from_slice(d),
            None => buf[a..a + len as usize].fill(0),
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
        let _ = bm;
        self.set_l2_entry(&mut m, gc, e, new_bm).await
    }

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

    /// Write one whole guest cluster (`data.len()` == cluster size, or the tail of the disk)
    /// compressed with the image's compression type. Falls back to a normal write when the
    /// data does not compress. Compressed clusters share host clusters byte-wise.
    pub async fn write_compressed(&self, off: u64, data: &[u8]) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        if off & (cs - 1) != 0
            || (data.len() as u64 != cs && off + data.len() as u64 != self.size())
        {
            return Err(Error::invalid(
                "compressed writes must cover one whole cluster",
            ));
        }
        if self.inner.data_path.is_some() {
            return Err(Error::unsupported(
                "compressed clusters are not supported with an external data file",
            ));
        }
        self.check_write(off, data.len() as u64)?;
        self.before_first_write().await?;
        let ty = self.inner.header.read().compression_type();
        let mut input = vec![0u8; cs as usize];
        input[..data.len()].copy_from_slice(data);
        let comp = match crate::compress::compress_owned(ty, input).await? {
            Some(c) if (c.len() as u64) < cs - 512 => c,
            _ => return self.write_at(data, off).await,
        };
        let gc = off / cs;
        let w = self.ws()?;
        let _g = self.acquire(gc).await;
        let len = comp.len() as u64;
        let host = {
            let mut m = w.meta.lock().await;
            let cur = m.comp_cursor;
            // Share the cursor's host cluster while it has room and its refcount can take
            // one more reference (1-bit refcounts never can).
            let max = crate::format::refcount::max(lay.refcount_order);
            if cur != 0
                && cur % cs != 0
                && cs - cur % cs >= len
                && self.refcount(cur / cs).await? < max
            {
                self.rc_add(cur / cs, 1).await?;
                m.comp_cursor = cur + len;
                cur
            } else {
                let k = len.div_ceil(cs);
                let h = self.alloc_clusters(&mut m, k).await?;
                m.comp_cursor = h + len;
                h
            }
        };
        self.inner.file.write_at(&comp, host).await.map_err(|e| {
            Error::io(
                e,
                format!("{}: writing compressed data", self.inner.path.display()),
            )
        })?;
        // A compressed cluster freed earlier may have lived at this very offset: its
        // decompressed copy must not be served for the new one.
        self.inner.zcache.lock().pop(&host);
        let mut m = w.meta.lock().await;
        let (e, _, _) = self.current_entry(gc).await?;
        let old: Vec<u64> = match l2::decode(e, lay.cluster_bits, lay.extended) {
            ClusterEntry::Normal { host, .. } | ClusterEntry::Zero { host: Some(host) } => {
                vec![host / cs]
            }
            ClusterEntry::Compressed(d) => {
                let (a, b) = d.host_clusters(lay.cluster_bits);
                ((a / cs)..=(b / cs)).collect()
            }
            _ => Vec::new(),
        };
        let entry = l2::CompressedDesc::encode(host, len, lay.cluster_bits);
        self.set_l2_entry(&mut m, gc, entry, 0).await?;
        m.pending_free.extend(old);
        drop(m);
        self.maybe_writeback().await
    }

    /// Make `len` bytes at `off` read as zeros. Whole clusters get the zero flag (v3);
    /// partial clusters are written with zeros.
    pub async fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_write(off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.before_first_write().await?;
        self.zero_or_discard(off, len, Some(mode)).await?;
        self.maybe_writeback().await
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
        self.zero_or_discard(off, len, None).await?;
        self.maybe_writeback().await
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

    async fn zero_partial_extended(&self, gc: u64, within: u64, n: u64) -> Result<()> {
        // Keep it simple and correct: write zeros through the normal path.
        self.write_cluster(gc * self.inner.layout.cluster_size + within, None, n)
            .await
    }

    async fn zero_whole_cluster(&self, gc: u64, mode: Option<ZeroMode>) -> Result<()> {
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

    /// Write back all dirty metadata in the crash-safe order and apply deferred frees.
    pub(crate) async fn flush_metadata(&self, m: &mut Meta) -> Result<()> {
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
            self.write_back(&self.inner.l2_cache, crate::overlap::Target::L2)
                .await?;
            // 3. L1 entries (the sectors that hold dirty entries).
            if !m.l1_dirty.is_empty() {
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
            let frees = std::mem::take(&mut m.pending_free);
            for &c in &frees {
                if self.rc_slot(c).await?.is_none() {
                    continue;
                }
                let now = self.rc_add(c, -1).await?;
                if now == 0 {
                    // The compressed-data cursor must not point into a freed cluster: it
                    // would add references to it after it has been handed out again.
                    if m.comp_cursor / cs == c {
                        m.comp_cursor = 0;
                    }
                    let _ = self.inner.file.discard(c * cs, cs).await;
                    self.inner.l2_cache.invalidate_range(c * cs, (c + 1) * cs);
                    if c < m.free_hint {
                        m.free_hint = c;
                    }
                }
            }
            self.write_dirty_refblocks().await?;
            sync().await?;
        }
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
}

/// Change a cached metadata slice (under the metadata lock) so that the change cannot be
/// lost. The slice is marked dirty before it is changed, so an eviction from then on keeps
/// it on the cache's write-back list. An eviction between the lookup and `mark_dirty` (a
/// concurrent reader's lookup can evict it while it is still clean) drops it from the
/// cache: the next lookup would reload the old bytes from disk and the change would never
/// be written. That case is detected by looking the slice up again, and the changed copy
/// is put back.
pub(crate) async fn update_slice<R>(
    cache: &crate::cache::SliceCache,
    file: &dyn crate::io::Storage,
    off: u64,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Result<R> {
    let slice = cache.get(file, off).await?;
    slice.mark_dirty();
    let r = f(&mut slice.data.write());
    let now = cache.get(file, off).await?;
    if !Arc::ptr_eq(&slice, &now) {
        let data = slice.data.read().clone();
        cache.insert_new(off, data);
    }
    Ok(r)
}

/// Mask of subcluster bits `first..=last`.
pub(crate) fn subcluster_mask(first: u32, last: u32) -> u64 {
    let n = last - first + 1;
    (if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }) << first
}

/// The span `[first non-zero byte, end of last non-zero 4 KiB)` of `b`, if any.
fn nonzero_span(b: &[u8]) -> Option<(usize, usize)> {
    let g = 512usize.min(b.len());
    let chunks = b.len() / g;
    let first = (0..chunks).find(|&i| !crate::convert::is_zero(&b[i * g..(i + 1) * g]))?;
    let last = (0..chunks)
        .rev()
        .find(|&i| !crate::convert::is_zero(&b[i * g..(i + 1) * g]))?;
    Some((first * g, (last + 1) * g))
}
