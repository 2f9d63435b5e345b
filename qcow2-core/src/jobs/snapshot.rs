//! Internal snapshots: create, apply (revert to) and delete, as `qemu-img snapshot -c/-a/-d`.
//!
//! Refcount semantics (as QEMU's and `check`'s): a cluster's refcount counts the paths that
//! reach it, one per L1 table (active or snapshot) that references it, directly (an L2 table)
//! or through an L2 table (a data cluster, or every host cluster a compressed cluster's bytes
//! touch). A shared L2 table therefore adds one reference per L1 table to each of its data
//! clusters. The copied flag (bit 63) of an active L1 or L2 entry says "refcount is 1".
//!
//! Crash safety: every operation is atomic. The whole new state is built in clusters past
//! the end of the file, without touching anything the header reaches: the new snapshot
//! table, a new snapshot L1 table (create), a new active L1 table, copies of the active L2
//! tables whose copied flags change (flags are right for the new refcounts), and a complete
//! new refcount structure (blocks and table) counted from the new state by `check`'s
//! reference counting ([`crate::jobs::check`]) and written by the repair's rebuild
//! ([`crate::jobs::repair`]). All of it is made durable, then ONE header write of bytes
//! 24..72 (virtual size, L1 size and offset, refcount table offset and size, snapshot
//! count and table offset: one sector) switches to the new state, and is made durable. A
//! crash before that write leaves the old image (plus unreferenced clusters past its
//! end: not even leaks); after it, the new one. The old structures are free in the new
//! refcounts. Any reference count the new state would need beyond what the refcount width
//! holds (1-bit refcounts cannot share at all) is found while counting, before the header
//! is touched: the operation fails naming the overflow and the file is cut back to its
//! old length. An image whose references `check` finds corrupt is refused the same way.
//! Since the new refcounts are counted from scratch, clusters leaked before the operation
//! are free after it. After a create the active L2 tables are fresh copies with the copied
//! flags cleared on shared data clusters, and the snapshot keeps the old ones (QEMU instead
//! shares the L2 tables until the first write to each): one more L2 table per table in use.
//!
//! The operations drain the handle first: every guest request in flight finishes and new
//! ones wait until the operation is done (a write that looked its mapping up before a
//! create would otherwise write into a cluster the snapshot now shares).

use crate::engine::image::Image;
use crate::engine::metadata::Meta;
use crate::engine::overlap::Target;
use crate::format::l2::{self, ClusterEntry, COPIED};
use crate::format::snapshot::{self, Snapshot};
use crate::jobs::check::{Checker, Fix, SnapInfo};
use crate::{Error, ErrorKind, Result};

/// The state a snapshot operation switches to.
struct NewState {
    /// Virtual size.
    size: u64,
    /// Active L1 entries (their L2 offsets; the copied flags are computed).
    l1: Vec<u64>,
    /// The snapshot table.
    snaps: Vec<Snapshot>,
    /// A snapshot (index in `snaps`) whose L1 table is to be written with these entries.
    snap_l1: Option<(usize, Vec<u64>)>,
    /// Write `snaps` as a new table (else the current one stays).
    new_table: bool,
    /// Replace every snapshot L2 table that has zero entries by a copy without them (the
    /// downgrade to compat=0.10, where the zero flag does not exist): a zero entry becomes
    /// unallocated without a backing file (`false`), else a new cluster of zeros (`true`).
    expand_zeros: Option<bool>,
}

/// Where the new state is built: clusters past everything the live image uses.
struct Tail {
    /// Next free cluster index.
    next: u64,
    bits: u32,
}

impl Tail {
    fn alloc(&mut self, clusters: u64) -> u64 {
        let off = self.next << self.bits;
        self.next += clusters;
        off
    }
}

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

/// Whether L2 entry `le` (its first word) reads as a zero cluster.
fn is_zero_entry(lay: &crate::engine::image::Layout, le: u64) -> bool {
    matches!(
        l2::decode(le, lay.cluster_bits, lay.extended),
        ClusterEntry::Zero { .. }
    )
}

fn not_found() -> Error {
    Error::new(ErrorKind::NotFound, "snapshot not found")
}

impl Image {
    /// Read the L2 table at host offset `t` into `l2` (a cluster).
    async fn read_l2_table(&self, l2: &mut [u8], t: u64) -> Result<()> {
        self.inner
            .file
            .read_at(l2, t)
            .await
            .map_err(|err| Error::io(err, "reading an L2 table"))
    }

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

    /// Write `buf` into clusters past the end of the live image (the new state being built).
    async fn tail_write(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_overlap(off, buf.len() as u64, Target::Data)
            .await?;
        self.meta_write(buf, off).await
    }

    /// Build `st` past the end of the file and switch the header to it (see the module
    /// documentation). The caller holds the drain, the allocation gate and the metadata
    /// lock, and has written the metadata back.
    async fn switch_state(&self, m: &mut Meta, st: NewState) -> Result<()> {
        let cs = self.inner.layout.cluster_size;
        let end0 = self
            .inner
            .file
            .len()
            .map_err(|e| Error::io(e, "getting the image file length"))?;
        let mut tail = Tail {
            next: end0.div_ceil(cs).max(m.high_water),
            bits: self.inner.layout.cluster_bits,
        };
        let mut switched = false;
        let r = self.build_and_switch(m, &mut tail, st, &mut switched).await;
        if r.is_err() && !switched {
            // Nothing references what was written past the old end: cut it off (best
            // effort; left there it is harmless).
            if self.inner.file.len().is_ok_and(|l| l > end0) {
                let _ = self.inner.file.set_len(end0);
            }
        }
        r
    }

    async fn build_and_switch(
        &self,
        m: &mut Meta,
        tail: &mut Tail,
        st: NewState,
        switched: &mut bool,
    ) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let bits = lay.cluster_bits;
        let NewState {
            size,
            l1: mut new_l1,
            mut snaps,
            snap_l1,
            new_table,
            expand_zeros,
        } = st;
        let l1_bytes = |n: usize| (n as u64 * 8).div_ceil(cs).max(1) * cs;
        let table_bytes = |l1: &[u64]| {
            let mut buf = vec![0u8; l1_bytes(l1.len()) as usize];
            for (i, e) in l1.iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            buf
        };
        let mut snap_l1s: Vec<(usize, Vec<u64>)> = snap_l1.into_iter().collect();
        // 0. Snapshot L2 tables without zero entries (compat=0.10), and their L1 tables.
        if let Some(backing) = expand_zeros {
            snap_l1s.extend(self.expand_snapshot_zeros(tail, &snaps, backing).await?);
        }
        // 1. The new snapshot L1 tables (create; compat=0.10).
        // An empty table has offset 0, as QEMU writes it.
        for (idx, entries) in snap_l1s.into_iter().filter(|(_, e)| !e.is_empty()) {
            let buf = table_bytes(&entries);
            let off = tail.alloc(buf.len() as u64 / cs);
            self.tail_write(&buf, off).await?;
            snaps[idx].l1_table_offset = off;
        }
        // 2. The new active L1 table, with the current L2 offsets for now.
        let l1_off = if new_l1.is_empty() {
            self.inner.header.read().l1_table_offset
        } else {
            let buf = table_bytes(&new_l1);
            let off = tail.alloc(buf.len() as u64 / cs);
            self.tail_write(&buf, off).await?;
            off
        };
        // 3. The snapshot table.
        let (sn_off, sn_len) = if !new_table {
            (
                self.inner.header.read().snapshots_offset,
                snapshot::table_len(&snaps),
            )
        } else if snaps.is_empty() {
            (0, 0)
        } else {
            let mut buf = Vec::new();
            for s in &snaps {
                buf.extend_from_slice(&s.to_bytes());
            }
            if buf.len() as u64 > snapshot::MAX_TABLE_BYTES {
                return Err(Error::invalid("snapshot table would exceed 64 MiB"));
            }
            let len = buf.len() as u64;
            let clusters = len.div_ceil(cs);
            buf.resize((clusters * cs) as usize, 0);
            let off = tail.alloc(clusters);
            self.tail_write(&buf, off).await?;
            (off, len)
        };
        // 4. Count every reference of the new state.
        let mut c = Checker::new(self, Fix::NONE)?;
        c.h.size = size;
        c.h.l1_size = new_l1.len() as u32;
        c.h.l1_table_offset = l1_off;
        c.h.nb_snapshots = snaps.len() as u32;
        c.h.snapshots_offset = sn_off;
        if tail.next > c.refs.len {
            c.refs.resize(tail.next)?;
        }
        let infos: Vec<SnapInfo> = snaps.iter().map(SnapInfo::of).collect();
        c.count_references(&infos, sn_len, None).await?;
        if c.res.corruptions != 0 || c.res.check_errors != 0 {
            let msgs = c.take_msgs();
            if let Some(o) = msgs.iter().find(|l| l.contains("overflow")) {
                let at = o.rsplit("offset=").next().unwrap_or("?");
                return Err(Error::invalid(format!(
                    "Invalid argument: refcount overflow: cluster {at} would need more references \
                     than {}-bit \
                     refcounts can hold; nothing was changed (qemu-img amend -o refcount_bits=16 \
                     widens them)",
                    1u32 << lay.refcount_order
                )));
            }
            return Err(Error::corrupt(format!(
                "the image has errors ({}); nothing was changed (repair it with check -r all)",
                msgs.first().map(String::as_str).unwrap_or("check errors")
            )));
        }
        // 5. Copied flags from the new refcounts: an active L2 table whose flags change is
        // copied (it is live until the switch), and L1 entries get theirs.
        let es = lay.l2_entry_size as usize;
        let mut l2 = vec![0u8; cs as usize];
        for e in new_l1.iter_mut() {
            let t = l2::l1_offset(*e);
            if t == 0 {
                *e = 0;
                continue;
            }
            self.read_l2_table(&mut l2, t).await?;
            let mut changed = false;
            for chunk in l2.chunks_exact_mut(es) {
                let le = crate::format::be64(chunk, 0);
                let host = match l2::decode(le, bits, lay.extended) {
                    ClusterEntry::Zero { host: Some(h) } | ClusterEntry::Normal { host: h, .. } => {
                        h
                    }
                    _ => continue,
                };
                let want = c.refs.get(host >> bits) == 1;
                if (le & COPIED != 0) != want {
                    let ne = if want { le | COPIED } else { le & !COPIED };
                    chunk[..8].copy_from_slice(&ne.to_be_bytes());
                    changed = true;
                }
            }
            let mut at = t;
            if changed {
                at = tail.alloc(1);
                self.tail_write(&l2, at).await?;
                if tail.next > c.refs.len {
                    c.refs.resize(tail.next)?;
                }
                c.refs.set(at >> bits, 1);
                let old = c.refs.get(t >> bits);
                c.refs.set(t >> bits, old.saturating_sub(1));
            }
            *e = at
                | if c.refs.get(at >> bits) == 1 {
                    COPIED
                } else {
                    0
                };
        }
        if !new_l1.is_empty() {
            self.tail_write(&table_bytes(&new_l1), l1_off).await?;
        }
        // 6. A new refcount structure for all of it, after everything else (durable when
        // this returns, as is everything written before).
        if tail.next > c.refs.len {
            c.refs.resize(tail.next)?;
        }
        c.alloc_floor = tail.next;
        let (rt_off, rt_clusters, rt) = c.write_refcount_structure().await?;
        drop(c);
        // 7. The switch: one write inside the first sector.
        let crypt = self.inner.header.read().crypt_method;
        let mut hb = [0u8; 48];
        hb[..8].copy_from_slice(&size.to_be_bytes());
        hb[8..12].copy_from_slice(&crypt.to_be_bytes());
        hb[12..16].copy_from_slice(&(new_l1.len() as u32).to_be_bytes());
        hb[16..24].copy_from_slice(&l1_off.to_be_bytes());
        hb[24..32].copy_from_slice(&rt_off.to_be_bytes());
        hb[32..36].copy_from_slice(&rt_clusters.to_be_bytes());
        hb[36..40].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        hb[40..].copy_from_slice(&sn_off.to_be_bytes());
        *switched = true;
        let mut guard = self.poison_guard("switching the header to a new snapshot state");
        self.meta_write(&hb, 24).await.map_err(|e| guard.fail(e))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| guard.fail(Error::io(e, "flush")))?;
        // 8. The handle follows: tables, caches, allocator.
        {
            let mut h = self.inner.header.write();
            h.size = size;
            h.l1_size = new_l1.len() as u32;
            h.l1_table_offset = l1_off;
            h.refcount_table_offset = rt_off;
            h.refcount_table_clusters = rt_clusters;
            h.nb_snapshots = snaps.len() as u32;
            h.snapshots_offset = sn_off;
        }
        *self.inner.l1.write() = new_l1;
        *self.inner.reftable.write() = rt;
        *self.inner.snapshots.write() = snaps;
        self.inner.l2_cache.clear();
        self.inner.rc_cache.clear();
        {
            let mut z = self.inner.zcache.lock();
            self.inner
                .zcache_gen
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            z.clear();
        }
        m.l1_dirty.clear();
        m.reftable_dirty.clear();
        m.pending_free.clear();
        crate::jobs::repair::reset_allocator(self, m);
        guard.disarm();
        Ok(())
    }
    /// Copies (in the tail) of the snapshot L2 tables that have zero entries, with those
    /// entries made unallocated (`backing` false) or pointing at new clusters of zeros; a
    /// table shared by several snapshots gets one copy. Returns the new L1 entries of each
    /// snapshot that changed (index in `snaps`).
    async fn expand_snapshot_zeros(
        &self,
        tail: &mut Tail,
        snaps: &[Snapshot],
        backing: bool,
    ) -> Result<Vec<(usize, Vec<u64>)>> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let es = lay.l2_entry_size as usize;
        let zeros = vec![0u8; cs as usize];
        let mut seen: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        let mut out = Vec::new();
        let mut l2 = vec![0u8; cs as usize];
        for (i, sn) in snaps.iter().enumerate() {
            let mut l1 = self
                .read_snapshot_l1(sn.l1_table_offset, sn.l1_size)
                .await?;
            let mut changed = false;
            for e in l1.iter_mut() {
                let t = l2::l1_offset(*e);
                if t == 0 {
                    continue;
                }
                let at = match seen.get(&t) {
                    Some(&at) => at,
                    None => {
                        self.read_l2_table(&mut l2, t).await?;
                        let mut any = false;
                        for chunk in l2.chunks_exact_mut(es) {
                            if !is_zero_entry(&lay, crate::format::be64(chunk, 0)) {
                                continue;
                            }
                            any = true;
                            let ne = if backing {
                                let z = tail.alloc(1);
                                self.tail_write(&zeros, z).await?;
                                z
                            } else {
                                0
                            };
                            chunk[..8].copy_from_slice(&ne.to_be_bytes());
                        }
                        let at = if any {
                            let at = tail.alloc(1);
                            self.tail_write(&l2, at).await?;
                            at
                        } else {
                            t
                        };
                        seen.insert(t, at);
                        at
                    }
                };
                if at != t {
                    *e = at;
                    changed = true;
                }
            }
            if changed {
                out.push((i, l1));
            }
        }
        Ok(out)
    }

    /// Whether an internal snapshot's L2 tables have zero entries.
    pub(crate) async fn snapshots_have_zero_clusters(&self) -> Result<bool> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let mut l2 = vec![0u8; cs as usize];
        let mut seen = std::collections::HashSet::new();
        for sn in self.snapshots() {
            let l1 = self
                .read_snapshot_l1(sn.l1_table_offset, sn.l1_size)
                .await?;
            for e in l1 {
                let t = l2::l1_offset(e);
                if t == 0 || !seen.insert(t) {
                    continue;
                }
                self.read_l2_table(&mut l2, t).await?;
                if l2
                    .chunks_exact(lay.l2_entry_size as usize)
                    .any(|c| is_zero_entry(&lay, crate::format::be64(c, 0)))
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Make every zero entry of the internal snapshots' L2 tables unallocated (without a
    /// backing file) or a cluster of zeros (with one), atomically as the other snapshot
    /// operations (see the module documentation): what a downgrade to compat=0.10 needs,
    /// since v2 has no zero flag. The snapshots' content is unchanged.
    pub(crate) async fn expand_snapshot_zero_clusters(&self) -> Result<()> {
        self.snapshot_preconditions()?;
        let w = self.ws()?;
        self.before_first_write().await?;
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let backing = self.inner.header.read().backing_file.is_some();
        let st = NewState {
            size: self.size(),
            l1: self.inner.l1.read().clone(),
            snaps: self.snapshots(),
            snap_l1: None,
            new_table: true,
            expand_zeros: Some(backing),
        };
        self.switch_state(&mut m, st).await
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
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let l1 = self.inner.l1.read().clone();
        if self.inner.layout.refcount_order == 0 && l1.iter().any(|&e| l2::l1_offset(e) != 0) {
            return Err(Error::invalid(
                "Invalid argument: refcount overflow: 1-bit refcounts cannot count a cluster \
                 shared with a snapshot",
            ));
        }
        let snaps = self.snapshots();
        if snaps.len() >= MAX_SNAPSHOTS {
            return Err(Error::invalid(format!(
                "too many snapshots (QEMU's limit is {MAX_SNAPSHOTS})"
            )));
        }
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
            // Placed by `switch_state`.
            l1_table_offset: 0,
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
        new.push(sn);
        let idx = new.len() - 1;
        let st = NewState {
            size: self.size(),
            l1: l1.clone(),
            snaps: new,
            // The snapshot's L1 table: a copy of the active one, flags as they are.
            snap_l1: Some((idx, l1)),
            new_table: true,
            expand_zeros: None,
        };
        self.switch_state(&mut m, st).await?;
        Ok(self.snapshots()[idx].clone())
    }

    /// Make the snapshot selected by `key` the active state (`qemu-img snapshot -a`): the
    /// current state is discarded, the virtual size becomes the snapshot's.
    /// Refused when the image has persistent bitmaps (enabled or not), as by qemu-img.
    pub async fn snapshot_apply(&self, key: &SnapshotKey) -> Result<()> {
        self.snapshot_preconditions()?;
        if !self.bitmaps().is_empty() {
            return Err(Error::unsupported("Device has active dirty bitmaps"));
        }
        let w = self.ws()?;
        self.before_first_write().await?;
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let snaps = self.snapshots();
        let sn = snaps[key.find(&snaps).ok_or_else(not_found)?].clone();
        let sn_l1 = self
            .read_snapshot_l1(sn.l1_table_offset, sn.l1_size)
            .await?;
        let cur_size = self.size();
        let new_size = sn.disk_size.unwrap_or(cur_size);
        if new_size > crate::format::header::MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt("snapshot has an invalid virtual size"));
        }
        let need = self.inner.header.read().l1_entries_for(new_size);
        let cur_len = self.inner.l1.read().len() as u64;
        let new_len = cur_len.max(sn_l1.len() as u64).max(need);
        if new_len * 8 > crate::format::header::MAX_L1_BYTES {
            return Err(Error::invalid("L1 table would exceed 32 MiB"));
        }
        let mut l1: Vec<u64> = sn_l1.iter().map(|&e| e & !COPIED).collect();
        l1.resize(new_len as usize, 0);
        let st = NewState {
            size: new_size,
            l1,
            snaps,
            snap_l1: None,
            new_table: false,
            expand_zeros: None,
        };
        self.switch_state(&mut m, st).await
    }

    /// Delete the snapshot selected by `key` (`qemu-img snapshot -d`); clusters only it
    /// held become free.
    pub async fn snapshot_delete(&self, key: &SnapshotKey) -> Result<()> {
        self.snapshot_preconditions()?;
        let w = self.ws()?;
        self.before_first_write().await?;
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let mut snaps = self.snapshots();
        let idx = key.find(&snaps).ok_or_else(not_found)?;
        snaps.remove(idx);
        let st = NewState {
            size: self.size(),
            l1: self.inner.l1.read().clone(),
            snaps,
            snap_l1: None,
            new_table: true,
            expand_zeros: None,
        };
        self.switch_state(&mut m, st).await
    }
}
