//! The metadata overlap check: before the engine writes, it makes sure the target range does not
//! hit metadata it is not meant to change (QEMU's "overlap-check"). A hit means the image's
//! metadata or our state is inconsistent; the image is then marked corrupt and the write fails,
//! so that a bad image cannot be damaged further.

use crate::engine::image::Image;
use crate::format::l2;
use crate::Result;
use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A table of host offsets that the overlap check scans (the active L1 table, the refcount
/// table), kept with the end of the highest cluster it points at under the same lock.
///
/// The check scans these tables whole on every allocation of a data cluster; a host range
/// at or past `end` cannot hit any of their clusters, so the scan is skipped there (new data
/// clusters mostly go to the end of the file, past every L2 table and refcount block). The
/// bound is not taken from the allocator (whose state the check exists to distrust): every
/// change of the table goes through [`OffsetTable::write`], whose guard recomputes it from
/// the entries before the lock is released, so a reader always sees the bound of the entries
/// it reads; a table or block allocated later at the end of the file raises it.
pub(crate) struct OffsetTable {
    lock: RwLock<TableState>,
    /// Bits of an entry that hold the offset.
    mask: u64,
    cluster_size: u64,
}

pub(crate) struct TableState {
    entries: Vec<u64>,
    /// End of the highest cluster an entry points at (0: none).
    end: u64,
}

impl TableState {
    fn bound(entries: &[u64], mask: u64, cs: u64) -> u64 {
        entries
            .iter()
            .map(|&e| e & mask)
            .filter(|&t| t != 0)
            .max()
            .map_or(0, |t| t.saturating_add(cs))
    }
}

/// Write access to an [`OffsetTable`]; recomputes the bound when dropped (lock still held).
pub(crate) struct TableWriteGuard<'a> {
    g: RwLockWriteGuard<'a, TableState>,
    mask: u64,
    cluster_size: u64,
}

impl std::ops::Deref for TableWriteGuard<'_> {
    type Target = Vec<u64>;
    fn deref(&self) -> &Vec<u64> {
        &self.g.entries
    }
}

impl std::ops::DerefMut for TableWriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut Vec<u64> {
        &mut self.g.entries
    }
}

impl Drop for TableWriteGuard<'_> {
    fn drop(&mut self) {
        self.g.end = TableState::bound(&self.g.entries, self.mask, self.cluster_size);
    }
}

impl OffsetTable {
    /// A table whose entries hold an offset in the bits of `mask`, pointing at clusters of
    /// `cluster_size` bytes.
    pub(crate) fn new(entries: Vec<u64>, mask: u64, cluster_size: u64) -> Self {
        let end = TableState::bound(&entries, mask, cluster_size);
        OffsetTable {
            lock: RwLock::new(TableState { entries, end }),
            mask,
            cluster_size,
        }
    }

    /// The entries.
    pub(crate) fn read(&self) -> MappedRwLockReadGuard<'_, Vec<u64>> {
        RwLockReadGuard::map(self.lock.read(), |s| &s.entries)
    }

    /// The entries and the bound.
    fn read_state(&self) -> RwLockReadGuard<'_, TableState> {
        self.lock.read()
    }

    /// Change the entries (the bound follows when the guard is dropped).
    pub(crate) fn write(&self) -> TableWriteGuard<'_> {
        TableWriteGuard {
            g: self.lock.write(),
            mask: self.mask,
            cluster_size: self.cluster_size,
        }
    }
}

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
        // The L1 and refcount tables: nothing to scan when the range starts at or past the
        // end of the highest cluster they point at (see `OffsetTable`). Else they are scanned
        // whole, first with a loop the compiler vectorises (no early exit); the entry is
        // looked for only on a hit. A cluster at `t` (non-zero) hits `[off, end)` iff
        // `lo < t < end`, `lo` being `off - cs` (0 when `off < cs`, where `t > 0` is all it
        // takes).
        let lo = off.saturating_sub(cs);
        let any_hit = |tab: &TableState, mask: u64| {
            off < tab.end
                && tab.entries.iter().fold(false, |acc, &e| {
                    let t = e & mask;
                    acc | ((t > lo) & (t < end))
                })
        };
        if target != Target::L2 {
            let l1 = self.inner.l1.read_state();
            if any_hit(&l1, l2::OFFSET_MASK) {
                for (i, &e) in l1.entries.iter().enumerate() {
                    let t = l2::l1_offset(e);
                    if t != 0 && hits(t, cs) {
                        return Some(format!("the L2 table of L1 entry {i}"));
                    }
                }
            }
        }
        if target != Target::RefBlock {
            let rt = self.inner.reftable.read_state();
            if any_hit(&rt, !511) {
                for (i, &e) in rt.entries.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::Target;
    use crate::format::l2::OFFSET_MASK;
    use crate::{create, Image, OpenOptions};

    /// The bound that lets the check skip the L1 and refcount table scans follows metadata
    /// allocated after open at the end of the file: every new L2 table and refcount block
    /// (512-byte clusters: one L2 table per 32 KiB of guest, one refcount block per 256 host
    /// clusters) is found by the check as soon as it is referenced, and a range past all of
    /// them is not reported. Fails if a table change leaves the bound behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metadata_allocated_after_open_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        let cs = 512u64;
        create::create_qcow2(
            &path,
            &create::CreateOptions {
                size: Some(64 << 20),
                cluster_size: cs,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let img = Image::open(
            &path,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let blocks_at_open = img.refcount_table().iter().filter(|&&e| e != 0).count();
        for k in 0..400u64 {
            img.write_at(&[7u8; 512], k * 32768).await.unwrap();
            let mut top = 0;
            for (i, &e) in img.l1_table().iter().enumerate() {
                let t = e & OFFSET_MASK;
                if t != 0 {
                    let what = img.overlapping_metadata(t, cs, Target::Data);
                    let want = format!("the L2 table of L1 entry {i}");
                    assert_eq!(what.as_deref(), Some(&*want), "after write {k}");
                    top = top.max(t);
                }
            }
            for (i, &e) in img.refcount_table().iter().enumerate() {
                let b = e & !511;
                if b != 0 {
                    let what = img.overlapping_metadata(b, cs, Target::Data);
                    let want = format!("refcount block {i}");
                    assert_eq!(what.as_deref(), Some(&*want), "after write {k}");
                    top = top.max(b);
                }
            }
            assert_eq!(
                img.overlapping_metadata(top + cs, 4 * cs, Target::Data),
                None
            );
        }
        let blocks = img.refcount_table().iter().filter(|&&e| e != 0).count();
        assert!(blocks > blocks_at_open, "no refcount block was allocated");
        img.close().await.unwrap();
    }
}
