//! The metadata overlap check: before the engine writes, it makes sure the target range does not
//! hit metadata it is not meant to change (QEMU's "overlap-check"). A hit means the image's
//! metadata or our state is inconsistent; the image is then marked corrupt and the write fails,
//! so that a bad image cannot be damaged further.

use crate::engine::image::Image;
use crate::format::l2;
use crate::Result;

/// What a write is allowed to overwrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Guest data (a data cluster).
    Data,
    /// An L2 table.
    L2,
    /// A refcount block.
    RefBlock,
    /// The active L1 table.
    L1,
    /// The refcount table.
    RefTable,
    /// The header.
    Header,
}

impl Image {
    /// Name of the metadata structure that `[off, off+len)` overlaps, other than `target`.
    /// Checks the header, active L1 table, refcount table, snapshot table, snapshot L1 tables,
    /// bitmap directory, every L2 table of the active L1 and every refcount block.
    pub(crate) fn overlapping_metadata(
        &self,
        off: u64,
        len: u64,
        target: Target,
    ) -> Option<String> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let end = off.saturating_add(len);
        let hits = |a: u64, l: u64| a < end && off < a.saturating_add(l);
        let h = self.inner.header.read();
        if target != Target::Header && hits(0, cs) {
            return Some("the header".into());
        }
        if target != Target::L1 && hits(h.l1_table_offset, h.l1_size as u64 * 8) {
            return Some("the active L1 table".into());
        }
        if target != Target::RefTable
            && hits(
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * cs,
            )
        {
            return Some("the refcount table".into());
        }
        if h.nb_snapshots > 0
            && hits(
                h.snapshots_offset,
                crate::format::snapshot::table_len(&self.inner.snapshots.read()).max(1),
            )
        {
            return Some("the snapshot table".into());
        }
        if let Some(b) = &h.bitmaps {
            if hits(b.directory_offset, b.directory_size) {
                return Some("the bitmap directory".into());
            }
        }
        drop(h);
        for s in self.inner.snapshots.read().iter() {
            if hits(s.l1_table_offset, s.l1_size as u64 * 8) {
                return Some(format!("the L1 table of snapshot '{}'", s.name));
            }
        }
        // The L1 and refcount tables are scanned whole on every allocation, so first with a
        // loop the compiler vectorises (no early exit); the entry is looked for only on a hit.
        // A cluster at `t` (non-zero) hits `[off, end)` iff `lo < t < end`, `lo` being
        // `off - cs` (0 when `off < cs`, where `t > 0` is all it takes).
        let lo = off.saturating_sub(cs);
        let any_hit = |tab: &[u64], mask: u64| {
            tab.iter().fold(false, |acc, &e| {
                let t = e & mask;
                acc | ((t > lo) & (t < end))
            })
        };
        if target != Target::L2 {
            let l1 = self.inner.l1.read();
            if any_hit(&l1, l2::OFFSET_MASK) {
                for (i, &e) in l1.iter().enumerate() {
                    let t = l2::l1_offset(e);
                    if t != 0 && hits(t, cs) {
                        return Some(format!("the L2 table of L1 entry {i}"));
                    }
                }
            }
        }
        if target != Target::RefBlock {
            let rt = self.inner.reftable.read();
            if any_hit(&rt, !511) {
                for (i, &e) in rt.iter().enumerate() {
                    let b = e & !511;
                    if b != 0 && hits(b, cs) {
                        return Some(format!("refcount block {i}"));
                    }
                }
            }
        }
        None
    }

    /// Fail (and mark the image corrupt) if a write of `target` kind at `[off, off+len)` would
    /// overwrite other metadata.
    pub(crate) async fn check_overlap(&self, off: u64, len: u64, target: Target) -> Result<()> {
        match self.overlapping_metadata(off, len, target) {
            None => Ok(()),
            Some(what) => Err(self
                .mark_corrupt(format!(
                    "a write at host offset 0x{off:x} ({len} bytes) would overwrite {what}"
                ))
                .await),
        }
    }
}
