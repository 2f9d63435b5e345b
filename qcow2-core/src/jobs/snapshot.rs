//! Internal snapshots: create, apply (revert to) and delete, as `qemu-img snapshot -c/-a/-d`.
//!
//! Refcount semantics (as QEMU's and `check`'s): a cluster's refcount counts the paths that
//! reach it, one per L1 table (active or snapshot) that references it, directly (an L2 table)
//! or through an L2 table (a data cluster, or every host cluster a compressed cluster's bytes
//! touch). A shared L2 table therefore adds one reference per L1 table to each of its data
//! clusters. The copied flag (bit 63) of an active L1 or L2 entry says "refcount is 1"; it
//! is recomputed from the refcounts after every operation.
//!
//! Crash safety (each step durable before the next):
//! - create: the L1 copy and the refcount increments, then the active tables with their
//!   copied flags cleared, then the new snapshot table, then the header (`nb_snapshots` and
//!   `snapshots_offset` in one write), then the old table is freed;
//! - apply: the increments for the snapshot's clusters and a new active L1 table (a copy of
//!   the snapshot's, resized), then the header (size, L1 size and offset in one write), then
//!   the old active state's references are dropped through the engine's deferred-free path;
//! - delete: the new snapshot table and the header, then the snapshot's references are
//!   dropped through the deferred-free path, then the copied flags are set again where a
//!   refcount went back to 1.
//!
//! A crash leaves refcounts too high (leaks), never too low. Between a refcount change and
//! the copied-flag fix that follows it, the flags may disagree with the refcounts in the
//! safe direction only (flag clear while the refcount is 1: writes copy where they needed
//! not); `qemu-img check` reports such entries (QEMU's own snapshot code has the same
//! window) and `check -r all` fixes them.
//!
//! The operations take the metadata lock; like QEMU, which drains the device first, they
//! expect no guest request in flight on the handle (the fast write path into clusters with
//! the copied flag takes no lock).

use crate::engine::image::Image;
use crate::engine::metadata::Meta;
use crate::engine::overlap::Target;
use crate::format::l2::{self, ClusterEntry, COPIED};
use crate::format::snapshot::{self, Snapshot};
use crate::{Error, ErrorKind, Result};

/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: usize = 65536;

/// How a snapshot is named by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotKey {
    /// An ID, else a name (qemu-img's `-a`/`-d`/`-l ARG`): the first snapshot whose ID
    /// matches, else the first whose name matches.
    IdOrName(String),
    /// Only by ID (`snapshot.id=ID`).
    Id(String),
    /// Only by name (`snapshot.name=NAME`).
    Name(String),
    /// Both must match (`snapshot.id=ID,snapshot.name=NAME`).
    IdAndName(String, String),
}

impl SnapshotKey {
    /// The key as the user wrote it (for messages).
    pub fn text(&self) -> &str {
        match self {
            SnapshotKey::IdOrName(s) | SnapshotKey::Id(s) | SnapshotKey::Name(s) => s,
            SnapshotKey::IdAndName(_, n) => n,
        }
    }

    /// Index of the snapshot this key selects in `snaps`.
    pub fn find(&self, snaps: &[Snapshot]) -> Option<usize> {
        match self {
            SnapshotKey::IdOrName(k) => snaps
                .iter()
                .position(|s| &s.id == k)
                .or_else(|| snaps.iter().position(|s| &s.name == k)),
            SnapshotKey::Id(k) => snaps.iter().position(|s| &s.id == k),
            SnapshotKey::Name(k) => snaps.iter().position(|s| &s.name == k),
            SnapshotKey::IdAndName(i, n) => snaps.iter().position(|s| &s.id == i && &s.name == n),
        }
    }
}

impl From<&str> for SnapshotKey {
    fn from(s: &str) -> Self {
        SnapshotKey::IdOrName(s.to_string())
    }
}

fn not_found() -> Error {
    Error::new(ErrorKind::NotFound, "snapshot not found")
}

impl Image {
    /// Refuse snapshot changes where they cannot be made.
    fn snapshot_preconditions(&self) -> Result<()> {
        self.ws()?;
        self.check_poison()?;
        self.check_usable()?;
        if self.inner.header.read().corrupt() {
            return Err(Error::read_only(
                "image is marked corrupt; changing snapshots is refused",
            ));
        }
        if self.inner.data_path.is_some() {
            return Err(Error::unsupported(
                "internal snapshots are not supported with an external data file",
            ));
        }
        Ok(())
    }

    /// Read `n` L1 entries at `off` (a snapshot's L1 table) and validate them.
    pub(crate) async fn read_snapshot_l1(&self, off: u64, n: u32) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let cs = self.inner.layout.cluster_size;
        let file_len = self.inner.file.len().map_err(Error::from)?;
        let bytes = n as u64 * 8;
        if !off.is_multiple_of(cs) || off == 0 || bytes > crate::format::header::MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "snapshot L1 table at 0x{off:x} ({n} entries) is invalid"
            )));
        }
        if off.saturating_add(bytes) > file_len {
            return Err(Error::corrupt(format!(
                "snapshot L1 table at 0x{off:x} lies beyond the end of the file"
            )));
        }
        let mut buf = vec![0u8; bytes as usize];
        self.inner
            .file
            .read_at(&mut buf, off)
            .await
            .map_err(|e| Error::io(e, "reading a snapshot L1 table"))?;
        let l1: Vec<u64> = buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        for (i, &e) in l1.iter().enumerate() {
            let t = l2::l1_offset(e);
            if !t.is_multiple_of(cs) || t.saturating_add(cs) > file_len.div_ceil(cs) * cs {
                return Err(Error::corrupt(format!(
                    "snapshot L1 entry {i}: L2 table offset 0x{t:x} is invalid"
                )));
            }
        }
        Ok(l1)
    }

    /// Host cluster indices the L2 table at `l2_off` references, one per reference (data
    /// clusters, preallocated zero clusters, every host cluster of a compressed cluster).
    async fn l2_refs(&self, l2_off: u64) -> Result<Vec<u64>> {
        let lay = self.inner.layout;
        let ss = lay.slice_size;
        let es = lay.l2_entry_size as usize;
        let mut out = Vec::new();
        for s in 0..lay.cluster_size / ss {
            let slice = self
                .inner
                .l2_cache
                .get(&*self.inner.file, l2_off + s * ss)
                .await?;
            let d = slice.data.read();
            for chunk in d.chunks_exact(es) {
                let e = crate::format::be64(chunk, 0);
                match l2::decode(e, lay.cluster_bits, lay.extended) {
                    ClusterEntry::Unallocated | ClusterEntry::Zero { host: None } => {}
                    ClusterEntry::Zero { host: Some(h) } | ClusterEntry::Normal { host: h, .. } => {
                        out.push(h >> lay.cluster_bits)
                    }
                    ClusterEntry::Compressed(c) => {
                        let (first, last) = c.host_clusters(lay.cluster_bits);
                        for ci in (first >> lay.cluster_bits)..=(last >> lay.cluster_bits) {
                            out.push(ci);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Add one reference to every cluster reachable from `l1` (its L2 tables and theirs).
    async fn raise_refcounts(&self, l1: &[u64]) -> Result<()> {
        let bits = self.inner.layout.cluster_bits;
        for &e in l1 {
            let t = l2::l1_offset(e);
            if t == 0 {
                continue;
            }
            self.rc_add(t >> bits, 1).await?;
            for c in self.l2_refs(t).await? {
                self.rc_add(c, 1).await?;
            }
        }
        Ok(())
    }

    /// Queue one reference drop for every cluster reachable from `l1` on the engine's
    /// deferred-free path (applied by the next `flush_metadata`).
    async fn drop_refcounts(&self, m: &mut Meta, l1: &[u64]) -> Result<()> {
        let bits = self.inner.layout.cluster_bits;
        for &e in l1 {
            let t = l2::l1_offset(e);
            if t == 0 {
                continue;
            }
            let refs = self.l2_refs(t).await?;
            m.pending_free.extend(refs);
            m.pending_free.push(t >> bits);
        }
        Ok(())
    }

    /// Set the copied flag of every active L1 and L2 entry whose cluster has refcount 1, and
    /// clear it everywhere else (QEMU's `qcow2_update_snapshot_refcount` with addend 0).
    async fn fix_copied_flags(&self, m: &mut Meta) -> Result<()> {
        let lay = self.inner.layout;
        let bits = lay.cluster_bits;
        let ss = lay.slice_size;
        let es = lay.l2_entry_size as usize;
        let l1 = self.inner.l1.read().clone();
        for (i, &e) in l1.iter().enumerate() {
            let t = l2::l1_offset(e);
            if t == 0 {
                continue;
            }
            let want = self.refcount(t >> bits).await? == 1;
            if (e & COPIED != 0) != want {
                let ne = if want { e | COPIED } else { e & !COPIED };
                self.inner.l1.write()[i] = ne;
                m.l1_dirty.insert(i as u64);
            }
            for s in 0..lay.cluster_size / ss {
                let off = t + s * ss;
                let entries: Vec<u64> = {
                    let slice = self.inner.l2_cache.get(&*self.inner.file, off).await?;
                    let d = slice.data.read();
                    d.chunks_exact(es)
                        .map(|c| crate::format::be64(c, 0))
                        .collect()
                };
                let mut changes = Vec::new();
                for (j, &le) in entries.iter().enumerate() {
                    let host = match l2::decode(le, bits, lay.extended) {
                        ClusterEntry::Zero { host: Some(h) }
                        | ClusterEntry::Normal { host: h, .. } => h,
                        _ => continue,
                    };
                    let want = self.refcount(host >> bits).await? == 1;
                    if (le & COPIED != 0) != want {
                        changes.push((j, if want { le | COPIED } else { le & !COPIED }));
                    }
                }
                if !changes.is_empty() {
                    crate::engine::metadata::update_slice(
                        &self.inner.l2_cache,
                        &*self.inner.file,
                        off,
                        |d| {
                            for (j, ne) in &changes {
                                d[j * es..j * es + 8].copy_from_slice(&ne.to_be_bytes());
                            }
                        },
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Write `snaps` as the new snapshot table and switch the header to it (one write of
    /// `nb_snapshots` and `snapshots_offset`), then free the old table.
    async fn write_snapshot_table(&self, m: &mut Meta, snaps: Vec<Snapshot>) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        if snaps.len() > MAX_SNAPSHOTS {
            return Err(Error::invalid(format!(
                "too many snapshots (QEMU's limit is {MAX_SNAPSHOTS})"
            )));
        }
        let mut buf = Vec::new();
        for s in &snaps {
            buf.extend_from_slice(&s.to_bytes());
        }
        if buf.len() as u64 > snapshot::MAX_TABLE_BYTES {
            return Err(Error::invalid("snapshot table would exceed 64 MiB"));
        }
        let new_off = if snaps.is_empty() {
            0
        } else {
            let clusters = (buf.len() as u64).div_ceil(cs);
            let off = self.alloc_clusters(m, clusters).await?;
            buf.resize((clusters * cs) as usize, 0);
            self.check_overlap(off, buf.len() as u64, Target::Data)
                .await?;
            self.meta_write(&buf, off).await?;
            off
        };
        // The table and its refcounts durable before the header points at it.
        self.flush_metadata(m).await?;
        let (old_off, old_len) = {
            let h = self.inner.header.read();
            let len = if h.nb_snapshots > 0 {
                snapshot::table_len(&self.inner.snapshots.read())
            } else {
                0
            };
            (h.snapshots_offset, len)
        };
        let mut hb = [0u8; 12];
        hb[..4].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        hb[4..].copy_from_slice(&new_off.to_be_bytes());
        let mut guard = self.poison_guard("switching the header to a new snapshot table");
        self.meta_write(&hb, 60).await.map_err(|e| guard.fail(e))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| guard.fail(Error::io(e, "flush")))?;
        {
            let mut h = self.inner.header.write();
            h.nb_snapshots = snaps.len() as u32;
            h.snapshots_offset = new_off;
        }
        *self.inner.snapshots.write() = snaps;
        guard.disarm();
        if old_len > 0 && old_off != 0 {
            for c in 0..old_len.div_ceil(cs) {
                m.pending_free.push((old_off >> lay.cluster_bits) + c);
            }
        }
        self.flush_metadata(m).await
    }

    /// Create an internal snapshot named `name` of the current state (`qemu-img snapshot
    /// -c`). Returns the new table entry. IDs are numeric: one more than the largest.
    pub async fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        self.snapshot_preconditions()?;
        if name.len() > u16::MAX as usize {
            return Err(Error::invalid("snapshot name is too long"));
        }
        let w = self.ws()?;
        self.before_first_write().await?;
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let l1 = self.inner.l1.read().clone();
        if lay.refcount_order == 0 && l1.iter().any(|&e| l2::l1_offset(e) != 0) {
            return Err(Error::invalid(
                "Invalid argument: 1-bit refcounts cannot count a cluster shared with a snapshot",
            ));
        }
        let snaps = self.snapshots();
        if snaps.len() >= MAX_SNAPSHOTS {
            return Err(Error::invalid(format!(
                "too many snapshots (QEMU's limit is {MAX_SNAPSHOTS})"
            )));
        }
        // 1. The snapshot's L1 table: a copy of the active one, flags as they are.
        let bytes = l1.len() as u64 * 8;
        let clusters = bytes.div_ceil(cs).max(1);
        let sn_l1_off = self.alloc_clusters(&mut m, clusters).await?;
        let mut buf = vec![0u8; (clusters * cs) as usize];
        for (i, e) in l1.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.check_overlap(sn_l1_off, buf.len() as u64, Target::Data)
            .await?;
        self.meta_write(&buf, sn_l1_off).await?;
        // 2. One more reference to everything the active tables reach, then the copied
        // flags (refcount blocks are written and synced before the tables).
        self.raise_refcounts(&l1).await?;
        self.fix_copied_flags(&mut m).await?;
        self.flush_metadata(&mut m).await?;
        // 3. The new table entry, then the header.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let sn = Snapshot {
            l1_table_offset: sn_l1_off,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            // QEMU takes the time in microseconds.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size()),
            icount: Some(0),
            extra: Vec::new(),
        };
        let mut new = snaps;
        new.push(sn.clone());
        self.write_snapshot_table(&mut m, new).await?;
        Ok(sn)
    }

    /// Make the snapshot selected by `key` the active state (`qemu-img snapshot -a`): the
    /// current state is discarded, the virtual size becomes the snapshot's.
    pub async fn snapshot_apply(&self, key: &SnapshotKey) -> Result<()> {
        self.snapshot_preconditions()?;
        let w = self.ws()?;
        self.before_first_write().await?;
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let snaps = self.snapshots();
        let sn = snaps[key.find(&snaps).ok_or_else(not_found)?].clone();
        let sn_l1 = self
            .read_snapshot_l1(sn.l1_table_offset, sn.l1_size)
            .await?;
        let (cur_size, cur_l1_off, cur_l1_len, crypt) = {
            let h = self.inner.header.read();
            (h.size, h.l1_table_offset, h.l1_size as u64, h.crypt_method)
        };
        let new_size = sn.disk_size.unwrap_or(cur_size);
        if new_size > crate::format::header::MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt("snapshot has an invalid virtual size"));
        }
        let need = self.inner.header.read().l1_entries_for(new_size);
        let cur_l1 = self.inner.l1.read().clone();
        let new_len = (cur_l1.len() as u64).max(sn_l1.len() as u64).max(need);
        if new_len * 8 > crate::format::header::MAX_L1_BYTES {
            return Err(Error::invalid("L1 table would exceed 32 MiB"));
        }
        // 1. One more reference to everything the snapshot reaches, and the new active L1
        // table (the snapshot's, resized; copied flags are fixed at the end).
        self.raise_refcounts(&sn_l1).await?;
        let mut new_l1: Vec<u64> = sn_l1.iter().map(|&e| e & !COPIED).collect();
        new_l1.resize(new_len as usize, 0);
        let clusters = (new_len * 8).div_ceil(cs).max(1);
        let new_off = self.alloc_clusters(&mut m, clusters).await?;
        let mut buf = vec![0u8; (clusters * cs) as usize];
        for (i, e) in new_l1.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.check_overlap(new_off, buf.len() as u64, Target::Data)
            .await?;
        self.meta_write(&buf, new_off).await?;
        self.flush_metadata(&mut m).await?;
        // 2. The header: size, crypt method (unchanged), L1 size and offset in one write.
        let mut hb = [0u8; 24];
        hb[..8].copy_from_slice(&new_size.to_be_bytes());
        hb[8..12].copy_from_slice(&crypt.to_be_bytes());
        hb[12..16].copy_from_slice(&(new_len as u32).to_be_bytes());
        hb[16..].copy_from_slice(&new_off.to_be_bytes());
        let mut guard = self.poison_guard("switching the header to a snapshot's L1 table");
        self.meta_write(&hb, 24).await.map_err(|e| guard.fail(e))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| guard.fail(Error::io(e, "flush")))?;
        {
            let mut h = self.inner.header.write();
            h.size = new_size;
            h.l1_size = new_len as u32;
            h.l1_table_offset = new_off;
        }
        *self.inner.l1.write() = new_l1;
        m.l1_dirty.clear();
        guard.disarm();
        // 3. Drop the old active state's references (its L1 table, L2 tables, data).
        self.drop_refcounts(&mut m, &cur_l1).await?;
        if cur_l1_len > 0 {
            for c in 0..(cur_l1_len * 8).div_ceil(cs) {
                m.pending_free.push((cur_l1_off >> lay.cluster_bits) + c);
            }
        }
        self.flush_metadata(&mut m).await?;
        self.inner.zcache.lock().clear();
        // 4. Copied flags from the refcounts.
        self.fix_copied_flags(&mut m).await?;
        self.flush_metadata(&mut m).await
    }

    /// Delete the snapshot selected by `key` (`qemu-img snapshot -d`): the table entry goes
    /// first, then the references the snapshot held; clusters only it held are freed.
    pub async fn snapshot_delete(&self, key: &SnapshotKey) -> Result<()> {
        self.snapshot_preconditions()?;
        let w = self.ws()?;
        self.before_first_write().await?;
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let cs = self.inner.layout.cluster_size;
        let bits = self.inner.layout.cluster_bits;
        let mut snaps = self.snapshots();
        let idx = key.find(&snaps).ok_or_else(not_found)?;
        let sn = snaps[idx].clone();
        // Validated before anything changes: a bad L1 table is not followed.
        let sn_l1 = self
            .read_snapshot_l1(sn.l1_table_offset, sn.l1_size)
            .await?;
        snaps.remove(idx);
        self.write_snapshot_table(&mut m, snaps).await?;
        self.drop_refcounts(&mut m, &sn_l1).await?;
        for c in 0..(sn.l1_size as u64 * 8).div_ceil(cs) {
            m.pending_free.push((sn.l1_table_offset >> bits) + c);
        }
        self.flush_metadata(&mut m).await?;
        self.inner.zcache.lock().clear();
        self.fix_copied_flags(&mut m).await?;
        self.flush_metadata(&mut m).await
    }
}
