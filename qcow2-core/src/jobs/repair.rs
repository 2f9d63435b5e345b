//! Repair of qcow2 images: `qemu-img check -r leaks|all` and the refcount rebuild of dirty
//! images (lazy refcounts after a crash).
//!
//! The repair runs inside the check (see [`crate::check`]), as QEMU's does
//! (`block/qcow2-refcount.c: qcow2_check_refcounts`, `qemu-img.c: img_check`):
//! - leaked clusters (stored refcount higher than the references) get the number of
//!   references (`-r leaks`), refcounts that are too low (but not 0) too (`-r all`);
//! - a stored refcount of 0 where there are references, or a broken refcount structure (refcount
//!   table entries with reserved bits or unaligned, refcount blocks shared with other data),
//!   calls for a rebuild (`-r all`; `-r leaks` fails then): new refcount blocks are written from
//!   the in-memory refcount array into free clusters (placed like QEMU places them), then a new
//!   refcount table after them, everything is synced, and only then does the header switch to
//!   the new table (one 12-byte write of bytes 48..60, synced). The old structure becomes leaked
//!   clusters, which the same pass frees;
//! - copied flags (bit 63) of active L1/L2 entries are set or cleared from the refcounts;
//!   misaligned preallocated zero clusters become plain zero clusters; a refcount block
//!   beyond the end of the file gets the file grown over it; incomplete snapshot table entries
//!   are rewritten (the table moves to new clusters);
//! - when nothing remains broken the dirty and corrupt bits are cleared (after everything else
//!   is durable).
//!
//! Every write of the repair is checked against the image's metadata (QEMU's "overlap check"):
//! a write that would hit another structure is refused and the image is marked corrupt.
//!
//! The repair writes to the image file directly, holding the metadata lock, after writing back
//! the image's caches; it drops the caches (and resets the allocator's hints) afterwards.
//!
//! When anything was fixed, [`crate::jobs::check::check`] runs a second, read-only check and reports
//! its result with the fixed counts, as qemu-img does ("Double checking the fixed image now").
//!
//! An image with the dirty bit that is opened writable is repaired like `-r all` before the
//! open returns (QEMU does this for every writable open outside `qemu-img check`). A later
//! `check -r` on that handle reports that repair as its first pass, so the report is the
//! one qemu-img gives for the dirty image.

use crate::engine::image::Image;
use crate::engine::metadata::Meta;
use crate::format::header::{AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::format::{be64, refcount};
use crate::jobs::check::{
    eio, make_report, strerror, CheckReport, Checker, Counters, Fix, Repair, L1E_OFFSET_MASK,
    QCOW_OFLAG_ZERO, REFT_OFFSET_MASK,
};
use crate::{Error, ErrorKind, Result};
use std::collections::HashMap;

// Metadata kinds of the overlap check (QEMU's `QCow2MetadataOverlap`).
const OL_MAIN_HEADER: u16 = 1 << 0;
const OL_ACTIVE_L1: u16 = 1 << 1;
const OL_ACTIVE_L2: u16 = 1 << 2;
const OL_REFCOUNT_TABLE: u16 = 1 << 3;
const OL_REFCOUNT_BLOCK: u16 = 1 << 4;
const OL_SNAPSHOT_TABLE: u16 = 1 << 5;
const OL_INACTIVE_L1: u16 = 1 << 6;
/// Not checked (QEMU's default "cached" template leaves inactive L2 tables out).
const OL_INACTIVE_L2: u16 = 1 << 7;
const OL_BITMAP_DIRECTORY: u16 = 1 << 8;

/// The kinds in the order QEMU tests them, with QEMU's names.
const OL_ORDER: [(u16, &str); 8] = [
    (OL_MAIN_HEADER, "qcow2_header"),
    (OL_ACTIVE_L1, "active L1 table"),
    (OL_REFCOUNT_TABLE, "refcount table"),
    (OL_SNAPSHOT_TABLE, "snapshot table"),
    (OL_INACTIVE_L1, "inactive L1 table"),
    (OL_ACTIVE_L2, "active L2 table"),
    (OL_REFCOUNT_BLOCK, "refcount block"),
    (OL_BITMAP_DIRECTORY, "bitmap directory"),
];

/// The outcome of one repairing check pass (QEMU's first `bdrv_check` of `img_check`).
#[derive(Debug, Clone)]
pub(crate) struct Pass {
    res: Counters,
    msgs: Vec<String>,
    rebuilt: bool,
}

fn take_open_repair(img: &Image) -> Option<Pass> {
    img.inner.open_repair.lock().take()
}

fn record_open_repair(img: &Image, pass: Pass) {
    *img.inner.open_repair.lock() = Some(pass);
}

/// `qemu-img check -r leaks|all` on a writable image.
pub(crate) async fn check_repair(img: &Image, r: Repair) -> Result<CheckReport> {
    img.ws()?;
    let fix = match r {
        Repair::Leaks => Fix::LEAKS,
        Repair::All => Fix::ALL,
    };
    let first =
        match take_open_repair(img) {
            // The open already did what `-r all` does; `-r leaks` could not have rebuilt the
            // refcounts (the image is repaired anyway).
            Some(p) if fix == Fix::LEAKS && p.rebuilt => return Err(Error::io(
                eio(),
                "Check failed: the refcount structure needed a rebuild (it was rebuilt when the \
                 dirty image was opened for writing)",
            )),
            Some(p) => p,
            None => repair_pass(img, fix).await?,
        };
    if first.res.corruptions_fixed == 0 && first.res.leaks_fixed == 0 {
        let n = first.msgs.len();
        return Ok(make_report(img, &first.res, first.msgs, n));
    }
    // Double check the fixed image, read-only, and report what remains.
    let quiet = img.quiesce().await?;
    let mut c = Checker::new(img, Fix::NONE)?;
    c.run().await?;
    drop(quiet);
    let mut res = c.res;
    res.corruptions_fixed = first.res.corruptions_fixed;
    res.leaks_fixed = first.res.leaks_fixed;
    let n = first.msgs.len();
    let mut msgs = first.msgs;
    msgs.append(&mut c.take_msgs());
    Ok(make_report(img, &res, msgs, n))
}

/// One repairing check pass (`qcow2_co_check_locked` with `fix`), under the metadata lock.
async fn repair_pass(img: &Image, fix: Fix) -> Result<Pass> {
    let ws = img.ws()?;
    // No cluster allocated and not yet referenced while the repair runs: it would be a
    // leak to free (see `WriteState::alloc_gate`).
    let _gate = ws.alloc_gate.write().await;
    let mut m = ws.meta.lock().await;
    // Everything the caches hold goes to disk first: the check reads the file.
    img.flush_metadata(&mut m).await?;
    img.inner.l2_cache.clear();
    img.inner.rc_cache.clear();
    let mut c = Checker::new(img, fix)?;
    c.avoid = m.quarantine.clusters().collect();
    let r = c.run().await;
    // Whatever happened, repaired refcounts reach the disk and the caches forget what the
    // repair may have changed underneath them.
    let fin = c.finish().await;
    let r = r.and(fin);
    img.inner.l2_cache.clear();
    img.inner.rc_cache.clear();
    reset_allocator(img, &mut m);
    r?;
    if c.snap_corruptions != 0 && fix.errors() {
        fix_snapshot_table(img, &mut m, &mut c).await?;
    }
    if c.res.check_errors == 0 && c.res.corruptions == 0 {
        mark_clean(img).await?;
    }
    Ok(Pass {
        res: c.res,
        msgs: c.take_msgs(),
        rebuilt: c.rebuilt,
    })
}

/// After a repair the allocator must search from the start (clusters were freed) and know
/// about everything written past the old end of the file.
pub(crate) fn reset_allocator(img: &Image, m: &mut Meta) {
    let cs = img.inner.layout.cluster_size;
    m.free_hint = 0;
    m.comp_cursor = 0;
    if let Ok(len) = img.inner.file.len() {
        m.high_water = m.high_water.max(len.div_ceil(cs));
    }
}

/// Clear the dirty and corrupt bits (`qcow2_mark_clean`, `qcow2_mark_consistent`): the
/// refcounts are right and durable.
async fn mark_clean(img: &Image) -> Result<()> {
    let (ver, bits) = {
        let h = img.inner.header.read();
        (h.version, h.incompatible_features)
    };
    if ver < 3 || bits & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) == 0 {
        return Ok(());
    }
    let file = &img.inner.file;
    let sync = || async { file.flush().await.map_err(|e| Error::io(e, "flush")) };
    sync().await?;
    let new = bits & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    file.write_at(&new.to_be_bytes(), 72)
        .await
        .map_err(|e| Error::io(e, "writing the header"))?;
    sync().await?;
    img.inner.header.write().incompatible_features = new;
    Ok(())
}

/// Rewrite the snapshot table with complete entries (`qcow2_check_fix_snapshot_table`): the
/// new table goes to new clusters, the header switches to it, the old one is freed.
async fn fix_snapshot_table(img: &Image, m: &mut Meta, c: &mut Checker<'_>) -> Result<()> {
    match write_snapshot_table(img, m).await {
        Err(e) => {
            c.res.check_errors += 1;
            c.msg(format!(
                "ERROR failed to update snapshot table: {}",
                e.message()
            ));
            return Err(e);
        }
        // QEMU reports the failed free and goes on (the old clusters leak).
        Ok(false) => c.msg("qcow2_free_clusters failed: Invalid argument".into()),
        Ok(true) => {}
    }
    c.res.corruptions -= c.snap_corruptions;
    c.res.corruptions_fixed += c.snap_corruptions;
    c.snap_corruptions = 0;
    Ok(())
}

/// Returns whether the old table's clusters were freed.
async fn write_snapshot_table(img: &Image, m: &mut Meta) -> Result<bool> {
    let lay = img.inner.layout;
    let cs = lay.cluster_size;
    // Allocating goes through the refcount table; a handle opened for check may hold one
    // with misaligned entries (a normal open refuses those), which would send refcount
    // updates into the wrong clusters.
    if let Some(i) = img
        .refcount_table()
        .iter()
        .position(|&e| (e & !511) % cs != 0)
    {
        return Err(Error::corrupt(format!(
            "refcount table entry {i} is not cluster aligned"
        )));
    }
    let vsize = img.size() / 512 * 512;
    let mut snaps = img.snapshots();
    for s in &mut snaps {
        // QEMU reads a missing disk size as the current one.
        s.disk_size.get_or_insert(vsize);
    }
    let mut table = Vec::new();
    for s in &snaps {
        table.extend_from_slice(&s.to_bytes());
    }
    let (old_off, nb) = {
        let h = img.inner.header.read();
        (h.snapshots_offset, h.nb_snapshots)
    };
    let old_len = crate::format::snapshot::table_len(&img.snapshots());
    let len = table.len() as u64;
    let new_off = if len == 0 {
        0
    } else {
        let off = img.alloc_clusters(m, len.div_ceil(cs)).await?;
        img.flush_metadata(m).await?;
        img.meta_write(&table, off).await?;
        off
    };
    let sync = || async {
        img.inner
            .file
            .flush()
            .await
            .map_err(|e| Error::io(e, "flush"))
    };
    sync().await?;
    let mut hdr = [0u8; 12];
    hdr[..4].copy_from_slice(&nb.to_be_bytes());
    hdr[4..].copy_from_slice(&new_off.to_be_bytes());
    let mut guard = img.poison_guard("switching the header to a new snapshot table");
    img.meta_write(&hdr, 60).await.map_err(|e| guard.fail(e))?;
    sync().await.map_err(|e| guard.fail(e))?;
    img.inner.header.write().snapshots_offset = new_off;
    *img.inner.snapshots.write() = snaps;
    guard.disarm();
    // Free the old table (`qcow2_free_clusters`): all of it or, when a cluster of it has no
    // reference to drop (a table that lay past the end of the file, say), none of it.
    let mut freed = true;
    if old_off != 0 && old_len != 0 {
        let first = old_off / cs;
        let last = (old_off + old_len - 1) / cs;
        for ci in first..=last {
            if img.refcount(ci).await? == 0 {
                freed = false;
                break;
            }
        }
        if freed {
            m.pending_free.extend(first..=last);
        }
    }
    img.flush_metadata(m).await?;
    img.inner.rc_cache.clear();
    reset_allocator(img, m);
    Ok(freed)
}

impl Image {
    /// Rebuild the refcounts of an image opened writable with the dirty bit set (lazy
    /// refcounts after a crash), like `check -r all`, then clear the dirty bit. Fails (and
    /// so the open fails) where QEMU reports "Could not repair dirty image".
    pub(crate) async fn repair_dirty_on_open(&self) -> Result<()> {
        let pass = repair_pass(self, Fix::ALL)
            .await
            .map_err(|e| e.context("could not repair the dirty image"))?;
        if pass.res.check_errors != 0 {
            return Err(Error::io(
                eio(),
                "could not repair the dirty image: internal errors during the check",
            ));
        }
        record_open_repair(self, pass);
        Ok(())
    }
}

// ---- the write side of the repairing check ----

impl Checker<'_> {
    /// End of a repairing pass: write back repaired refcounts, make everything durable, then
    /// discard the clusters that became free.
    pub(crate) async fn finish(&mut self) -> Result<()> {
        if !self.fix.any() {
            return Ok(());
        }
        self.flush_rb()
            .await
            .map_err(|e| Error::io(e, "writing a refcount block"))?;
        self.file.flush().await.map_err(|e| Error::io(e, "flush"))?;
        let cs = self.lay.cluster_size;
        for c in std::mem::take(&mut self.freed) {
            let _ = self.file.discard(c * cs, cs).await;
        }
        Ok(())
    }

    /// Write back the cached refcount block if it holds repaired refcounts.
    pub(crate) async fn flush_rb(&mut self) -> std::io::Result<()> {
        if !self.rb_dirty {
            return Ok(());
        }
        let off = match &self.rb {
            Some((off, _)) => *off,
            None => return Ok(()),
        };
        let cs = self.lay.cluster_size;
        if self
            .overlap_check(OL_REFCOUNT_BLOCK, off, cs)
            .await
            .is_err()
        {
            return Err(eio());
        }
        if let Some((off, buf)) = &self.rb {
            self.file.write_at(buf, *off).await?;
        }
        self.rb_dirty = false;
        Ok(())
    }

    /// Set the stored refcount of cluster `ci` (covered by an existing refcount block).
    pub(crate) async fn set_disk_refcount(&mut self, ci: u64, v: u64) -> std::io::Result<()> {
        // Loads (and validates) the block.
        self.disk_refcount(ci).await?;
        let lay = self.lay;
        let rb_off = self
            .reftable
            .get((ci / lay.rb_entries) as usize)
            .map(|&e| e & REFT_OFFSET_MASK)
            .unwrap_or(0);
        match &mut self.rb {
            Some((off, buf)) if rb_off != 0 && *off == rb_off => {
                refcount::set(buf, lay.refcount_order, (ci % lay.rb_entries) as usize, v)
            }
            _ => return Err(eio()),
        }
        self.rb_dirty = true;
        if v == 0 {
            self.freed.push(ci);
        }
        Ok(())
    }

    /// Set active L1 entry `i` (in memory and on disk).
    pub(crate) async fn write_l1_entry(&mut self, i: usize, v: u64) -> Result<()> {
        self.img.inner.l1.write()[i] = v;
        let off = self.h.l1_table_offset + i as u64 * 8;
        self.overlap_check(OL_ACTIVE_L1, off, 8).await?;
        self.file
            .write_at(&v.to_be_bytes(), off)
            .await
            .map_err(|e| Error::io(e, "writing an L1 entry"))?;
        self.file.flush().await.map_err(|e| Error::io(e, "flush"))
    }

    /// Write a whole active L2 table.
    pub(crate) async fn write_l2_table(&mut self, buf: &[u8], l2_off: u64) -> Result<()> {
        if let Err(e) = self
            .overlap_check(OL_ACTIVE_L2, l2_off, self.lay.cluster_size)
            .await
        {
            self.msg(format!(
                "ERROR: Could not write L2 table; metadata overlap check failed: {}",
                strerror(&eio())
            ));
            return Err(e);
        }
        if let Err(e) = self.file.write_at(buf, l2_off).await {
            self.msg(format!("ERROR: Could not write L2 table: {}", strerror(&e)));
            return Err(Error::io(e, "writing an L2 table"));
        }
        Ok(())
    }

    /// Turn entry `i` of the L2 table `buf` (at `l2_off`) into a plain zero cluster
    /// (`fix_l2_entry_by_zero`). `Ok(false)`: the write failed (counted as a check error);
    /// an error: the write would have hit other metadata.
    pub(crate) async fn fix_l2_entry_by_zero(
        &mut self,
        buf: &mut [u8],
        l2_off: u64,
        i: usize,
        active: bool,
    ) -> Result<bool> {
        let lay = self.lay;
        let es = lay.l2_entry_size as usize;
        let pos = i * es;
        if lay.extended {
            let bm = be64(buf, pos + 8);
            // Allocated subclusters read as zeros.
            let nb = (bm | (bm << 32)) & 0xffff_ffff_0000_0000;
            buf[pos + 8..pos + 16].copy_from_slice(&nb.to_be_bytes());
            buf[pos..pos + 8].copy_from_slice(&0u64.to_be_bytes());
        } else {
            buf[pos..pos + 8].copy_from_slice(&QCOW_OFLAG_ZERO.to_be_bytes());
        }
        let off = l2_off + pos as u64;
        let ign = if active { OL_ACTIVE_L2 } else { OL_INACTIVE_L2 };
        if let Err(e) = self.overlap_check(ign, off, es as u64).await {
            self.msg("ERROR: Overlap check failed".into());
            self.res.check_errors += 1;
            return Err(e);
        }
        let w = self.file.write_at(&buf[pos..pos + es], off).await;
        let w = match w {
            Ok(()) => self.file.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = w {
            self.msg(format!(
                "ERROR: Failed to overwrite L2 table entry: {}",
                strerror(&e)
            ));
            self.res.check_errors += 1;
            return Ok(false);
        }
        self.res.corruptions -= 1;
        self.res.corruptions_fixed += 1;
        Ok(true)
    }

    /// Grow the image file so that it covers the refcount block at `offset` (cluster
    /// `cluster`). `Err(None)`: the in-memory refcount array cannot grow.
    pub(crate) async fn grow_file_to(
        &mut self,
        offset: u64,
        cluster: u64,
    ) -> std::result::Result<(), Option<std::io::Error>> {
        let cs = self.lay.cluster_size;
        let einval = || Some(std::io::Error::from_raw_os_error(libc::EINVAL));
        if offset > i64::MAX as u64 - cs {
            return Err(einval());
        }
        self.file.set_len(offset + cs).map_err(Some)?;
        let size = self.file.len().map_err(Some)?;
        self.file_len = size;
        self.overlap = None;
        let nb = size.div_ceil(cs);
        if nb > self.refs.len {
            self.refs.resize(nb).map_err(|_| None)?;
        }
        if cluster >= self.refs.len {
            return Err(einval());
        }
        Ok(())
    }

    // ---- overlap check ----

    fn build_overlap_map(&self) -> HashMap<u64, u16> {
        let cs = self.lay.cluster_size;
        let mut map: HashMap<u64, u16> = HashMap::new();
        let mut mark = |off: u64, len: u64, kind: u16| {
            if len == 0 || off >= crate::format::l2::OFFSET_MASK {
                return;
            }
            let first = off / cs;
            let last = off.saturating_add(len - 1) / cs;
            for c in first..=last.min(first + (64 << 20) / cs) {
                *map.entry(c).or_default() |= kind;
            }
        };
        mark(0, cs, OL_MAIN_HEADER);
        mark(
            self.h.l1_table_offset,
            self.h.l1_size as u64 * 8,
            OL_ACTIVE_L1,
        );
        mark(
            self.h.refcount_table_offset,
            self.reftable.len() as u64 * 8,
            OL_REFCOUNT_TABLE,
        );
        if self.h.nb_snapshots > 0 {
            mark(
                self.h.snapshots_offset,
                self.snapshots_size,
                OL_SNAPSHOT_TABLE,
            );
        }
        for s in self.img.snapshots() {
            mark(s.l1_table_offset, s.l1_size as u64 * 8, OL_INACTIVE_L1);
        }
        for e in self.img.l1_table() {
            let off = e & L1E_OFFSET_MASK;
            if off != 0 {
                mark(off, cs, OL_ACTIVE_L2);
            }
        }
        for &e in &self.reftable {
            let off = e & REFT_OFFSET_MASK;
            if off != 0 {
                mark(off, cs, OL_REFCOUNT_BLOCK);
            }
        }
        if self.h.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            if let Some(b) = self.h.bitmaps {
                mark(b.directory_offset, b.directory_size, OL_BITMAP_DIRECTORY);
            }
        }
        map
    }

    /// QEMU's `qcow2_pre_write_overlap_check`: refuse a metadata write that would hit another
    /// structure (the kinds in `ign` excepted), marking the image corrupt.
    async fn overlap_check(&mut self, ign: u16, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.overlap.is_none() {
            self.overlap = Some(self.build_overlap_map());
        }
        let cs = self.lay.cluster_size;
        let map = self.overlap.as_ref().unwrap();
        let mut hit = 0u16;
        let first = off / cs;
        let last = (off + len - 1) / cs;
        for c in first..=last {
            if let Some(&k) = map.get(&c) {
                hit |= k;
            }
        }
        hit &= !(ign | OL_INACTIVE_L2);
        let Some(&(_, name)) = OL_ORDER.iter().find(|(k, _)| hit & k != 0) else {
            return Ok(());
        };
        let why = format!("Preventing invalid write on metadata (overlaps with {name})");
        if !self.signaled_corruption {
            self.signaled_corruption = true;
            self.msg(format!(
                "qcow2: Marking image as corrupt: {why}; further corruption events will be suppressed"
            ));
        }
        Err(self.img.mark_corrupt(why).await)
    }

    // ---- refcount rebuild (rebuild_refcount_structure) ----

    /// Allocate `count` contiguous clusters in the refcount array, from `*first_free` on
    /// (`alloc_clusters_imrt`); `*first_free` becomes the first free cluster seen.
    fn alloc_clusters_imrt(&mut self, count: u64, first_free: &mut u64) -> Result<u64> {
        let mut cluster = (*first_free).max(self.alloc_floor);
        let mut first_gap = true;
        let mut contiguous = 0u64;
        while cluster < self.refs.len && contiguous < count {
            if self.refs.get(cluster) == 0 && !self.avoid.contains(&cluster) {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            // Append the missing free clusters at the end of the image.
            self.refs.resize(cluster + count - contiguous)?;
        }
        cluster -= contiguous;
        for i in 0..count {
            self.refs.set(cluster + i, 1);
        }
        Ok(cluster << self.lay.cluster_bits)
    }

    /// Write the refcount blocks of every cluster in use in `[first, end)` from the refcount
    /// array, allocating (in the array) the blocks that `rt` does not have yet
    /// (`rebuild_refcounts_write_refblocks`). Returns whether `rt` grew.
    async fn write_refblocks(&mut self, first: u64, end: u64, rt: &mut Vec<u64>) -> Result<bool> {
        let lay = self.lay;
        let cs = lay.cluster_size;
        let rbe = lay.rb_entries;
        let mut end = end;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if self.refs.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let rb_index = cluster / rbe;
            let rb_start = rb_index * rbe;
            let rb_off = match rt.get(rb_index as usize) {
                Some(&off) if off != 0 => off,
                _ => {
                    // Never inside a block already written.
                    first_free = first_free.max(rb_start);
                    let off = self
                        .alloc_clusters_imrt(1, &mut first_free)
                        .map_err(|e| e.context("ERROR allocating refblock"))?;
                    let ci = off / cs;
                    if ci >= end {
                        // The block that counts this block must be written too.
                        end = ci + 1;
                    }
                    if rt.len() as u64 <= rb_index {
                        let n = ((rb_index + 1) * 8).div_ceil(cs) * cs / 8;
                        rt.resize(n as usize, 0);
                        grown = true;
                    }
                    rt[rb_index as usize] = off;
                    off
                }
            };
            self.overlap_check(0, rb_off, cs)
                .await
                .map_err(|e| e.context("ERROR writing refblock"))?;
            self.file
                .write_at(self.refs.block(rb_index), rb_off)
                .await
                .map_err(|e| Error::io(e, "ERROR writing refblock"))?;
            cluster = rb_start + rbe;
        }
        Ok(grown)
    }

    /// Build a new refcount structure from the refcount array (which receives the new
    /// structure's own references) and switch the header to it. The old structure is leaked
    /// afterwards.
    pub(crate) async fn rebuild_refcount_structure(&mut self) -> Result<()> {
        let r = self.rebuild_inner().await;
        if r.is_err() {
            self.res.check_errors += 1;
        }
        r
    }

    async fn rebuild_inner(&mut self) -> Result<()> {
        self.flush_rb()
            .await
            .map_err(|e| Error::io(e, "writing a refcount block"))?;
        self.rb = None;
        self.img.inner.rc_cache.clear();
        let (rt_off, rt_clusters, rt) = self.write_refcount_structure().await?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&rt_off.to_be_bytes());
        hdr[8..].copy_from_slice(&rt_clusters.to_be_bytes());
        self.file
            .write_at(&hdr, 48)
            .await
            .map_err(|e| Error::io(e, "ERROR setting reftable"))?;
        self.file
            .flush()
            .await
            .map_err(|e| Error::io(e, "ERROR setting reftable"))?;

        {
            let mut h = self.img.inner.header.write();
            h.refcount_table_offset = rt_off;
            h.refcount_table_clusters = rt_clusters;
        }
        *self.img.inner.reftable.write() = rt.clone();
        self.img.inner.rc_cache.clear();
        self.h.refcount_table_offset = rt_off;
        self.h.refcount_table_clusters = rt_clusters;
        self.reftable = rt;
        self.file_len = self
            .file
            .len()
            .map_err(|e| Error::io(e, "getting the image file length"))?;
        self.overlap = None;
        self.rebuilt = true;
        Ok(())
    }

    /// Write new refcount blocks for every cluster in use in the refcount array, then a new
    /// refcount table, into clusters free in the array (at or after `alloc_floor`), and make
    /// them durable; the array receives their references. Returns the table's offset,
    /// length in clusters and entries. Nothing points at the new structure yet.
    pub(crate) async fn write_refcount_structure(&mut self) -> Result<(u64, u32, Vec<u64>)> {
        let lay = self.lay;
        let cs = lay.cluster_size;
        let mut rt: Vec<u64> = Vec::new();
        let end = self.refs.len;
        let grown = self.write_refblocks(0, end, &mut rt).await?;
        debug_assert!(grown, "the header cluster is always in use");
        // Place the table, then write the blocks that count it; when that needs a larger
        // table, place it again.
        let (rt_off, rt_clusters) = loop {
            let rt_clusters = (rt.len() as u64 * 8).div_ceil(cs);
            let mut first_free = 0;
            let off = self
                .alloc_clusters_imrt(rt_clusters, &mut first_free)
                .map_err(|e| e.context("ERROR allocating reftable"))?;
            let start = off / cs;
            if !self
                .write_refblocks(start, start + rt_clusters, &mut rt)
                .await?
            {
                break (off, rt_clusters);
            }
        };
        if rt.len() as u64 * 8 > crate::format::header::MAX_REFTABLE_BYTES
            || rt_clusters > u32::MAX as u64
        {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "ERROR writing reftable: the refcount table would exceed its maximum size",
            ));
        }
        let mut tb = vec![0u8; rt.len() * 8];
        for (i, e) in rt.iter().enumerate() {
            tb[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.overlap_check(0, rt_off, tb.len() as u64)
            .await
            .map_err(|e| e.context("ERROR writing reftable"))?;
        self.file
            .write_at(&tb, rt_off)
            .await
            .map_err(|e| Error::io(e, "ERROR writing reftable"))?;
        // The new structure is durable before the header points at it.
        self.file
            .flush()
            .await
            .map_err(|e| Error::io(e, "ERROR writing reftable"))?;
        Ok((rt_off, rt_clusters as u32, rt))
    }
}
