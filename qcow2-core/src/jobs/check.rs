//! Consistency check of a qcow2 image, as `qemu-img check` does it.
//!
//! The check rebuilds the expected reference count of every host cluster of the image file
//! from every structure that points at it (header, L1/L2 tables of the active state and of
//! every internal snapshot, data clusters, snapshot table, refcount table and blocks,
//! encryption header, persistent bitmaps) in an in-memory refcount array, and compares it with
//! the refcounts stored in the image. It also checks the structure of every table entry and
//! the "copied" flag (bit 63) of the active L1 and L2 entries.
//!
//! Counting rules, messages, statistics and the JSON/human output follow QEMU 10
//! (`block/qcow2-refcount.c: qcow2_check_refcounts`, `qemu-img.c: img_check`):
//! - a cluster whose stored refcount is lower than its references is a corruption
//!   (`ERROR cluster N refcount=R reference=X`); higher is a leak
//!   (`Leaked cluster N refcount=R reference=X`), even when it is referenced;
//! - the in-memory refcount array uses the image's refcount width, so a cluster referenced
//!   more often than the width allows is reported as an overflow (a corruption), as in QEMU;
//! - `allocated-clusters` counts the active layer's normal, preallocated-zero and compressed
//!   clusters; every compressed cluster is also counted as fragmented;
//! - `image-end-offset` is one cluster past the highest cluster that is either referenced or
//!   has a non-zero stored refcount.
//!
//! Where QEMU aborts the check (it prints `Check failed: ...` and exits with 1, without a
//! report) [`check`] returns an error.
//!
//! Memory: the refcount array holds one entry per cluster of the image *file* (not of the
//! virtual disk), at the image's refcount width; tables are read one at a time (L1 tables in
//! chunks, one L2 table or refcount block at a time).
//!
//! Repair (`-r leaks|all`) follows QEMU too: the same pass fixes what it may while it checks
//! (refcounts set to the number of references, copied flags, misaligned preallocated zero
//! clusters, refcount blocks outside the file) and rebuilds the whole refcount structure from
//! the refcount array when refcounts are missing or the structure itself is broken; then,
//! when anything was fixed, a second read-only check reports what remains. The write side of
//! the repair lives in [`crate::repair`].

use crate::engine::image::{Image, Layout};
use crate::format::header::{Header, AUTOCLEAR_BITMAPS};
use crate::format::l2::{self, CompressedDesc};
use crate::format::{be16, be32, be64, refcount};
use crate::io::Storage;
use crate::{Error, ErrorKind, Result};
use std::sync::Arc;

/// What `qemu-img check -r` would repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Leaked clusters only (`-r leaks`).
    Leaks,
    /// Leaks and corruptions (`-r all`).
    All,
}

/// Options of [`check`].
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Repair what was found (the image must be opened writable).
    pub repair: Option<Repair>,
}

/// The result of a check, with the fields of qemu-img's `ImageCheck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The image file name as given.
    pub filename: String,
    /// Always `"qcow2"`.
    pub format: &'static str,
    /// Internal errors that kept parts of the check from running.
    pub check_errors: u64,
    /// Corruptions found (and not repaired).
    pub corruptions: u64,
    /// Leaked clusters found (and not repaired).
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// One cluster past the last cluster in use (bytes).
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in this image's active state.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor in the same L2 table.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// The diagnostic lines qemu-img prints on stderr, in order.
    pub messages: Vec<String>,
    /// With repair: how many of `messages` the repairing pass printed; qemu-img prints the
    /// "found and repaired" summary after them and before the lines of the double check.
    pub repair_messages: usize,
}

impl CheckReport {
    /// The report as qemu-img's `--output=json` object: the same keys, in the same order,
    /// with the optional keys left out where qemu-img leaves them out (zero values).
    pub fn to_json(&self) -> serde_json::Value {
        // QEMU's QDict iterates its hash buckets in order; for these keys that gives this
        // fixed order.
        let mut m = serde_json::Map::new();
        let opt = |m: &mut serde_json::Map<String, serde_json::Value>, k: &str, v: u64| {
            if v != 0 {
                m.insert(k.to_string(), v.into());
            }
        };
        opt(&mut m, "image-end-offset", self.image_end_offset);
        opt(&mut m, "compressed-clusters", self.compressed_clusters);
        opt(&mut m, "total-clusters", self.total_clusters);
        opt(&mut m, "corruptions", self.corruptions);
        opt(&mut m, "corruptions-fixed", self.corruptions_fixed);
        m.insert("check-errors".into(), self.check_errors.into());
        opt(&mut m, "leaks", self.leaks);
        opt(&mut m, "leaks-fixed", self.leaks_fixed);
        opt(&mut m, "allocated-clusters", self.allocated_clusters);
        m.insert("filename".into(), self.filename.clone().into());
        m.insert("format".into(), self.format.into());
        opt(&mut m, "fragmented-clusters", self.fragmented_clusters);
        serde_json::Value::Object(m)
    }

    /// The text qemu-img prints without `--output=json`: the diagnostic lines (which qemu-img
    /// writes on stderr) first, then the summary.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let fixed = self.corruptions_fixed != 0 || self.leaks_fixed != 0;
        let split = if fixed {
            self.repair_messages.min(self.messages.len())
        } else {
            self.messages.len()
        };
        for m in &self.messages[..split] {
            s.push_str(m);
            s.push('\n');
        }
        if fixed {
            s.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} \
                 corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            ));
        }
        for m in &self.messages[split..] {
            s.push_str(m);
            s.push('\n');
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions != 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image \
                     may corrupt it.\n",
                    self.corruptions
                ));
            }
            if self.leaks != 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm \
                     to data.\n",
                    self.leaks
                ));
            }
            if self.check_errors != 0 {
                s.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                ));
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            s.push_str(&format!(
                "{}/{} = {} allocated, {} fragmented, {} compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                percent(a * 100.0 / self.total_clusters as f64),
                percent(self.fragmented_clusters as f64 * 100.0 / a),
                percent(self.compressed_clusters as f64 * 100.0 / a),
            ));
        }
        if self.image_end_offset != 0 {
            s.push_str(&format!("Image end offset: {}\n", self.image_end_offset));
        }
        s
    }

    /// qemu-img's exit status: 1 when the check could not complete (check errors), 2 when
    /// corruptions remain, 3 when only leaks remain, 0 for a clean image.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors != 0 {
            1
        } else if self.corruptions != 0 {
            2
        } else if self.leaks != 0 {
            3
        } else {
            0
        }
    }
}

/// `%0.2f%%` as C's printf renders it (round half to even on the exact binary value, which
/// is what Rust's formatter does too).
fn percent(v: f64) -> String {
    format!("{v:.2}%")
}

/// Check `img` like `qemu-img check`, and with `opts.repair` repair it like
/// `qemu-img check -r leaks|all` (the image must be opened writable).
///
/// The image file is read directly, not through the image's caches. On a handle opened
/// writable the check first holds off metadata changes (allocating writes, discards, flushes
/// and the like wait; in-place writes and reads go on), waits for allocating writes whose
/// new cluster is not referenced yet, and writes back the caches: it sees a consistent image
/// even while other tasks write through the same handle. Freed clusters kept from reuse
/// while requests that looked them up run (`engine/inflight.rs`) have refcount 0 on disk and
/// are not leaks. Another process writing the image is kept out by the image locks. A
/// repair writes its changes directly too, under the same exclusion, and drops the caches
/// afterwards.
///
/// Returns the report, or an error where qemu-img would fail with "Check failed" and print no
/// report (for example an unreadable table, a broken bitmap directory, an image file too
/// large for the in-memory refcount array, or `-r leaks` on an image whose refcount structure
/// needs a rebuild).
pub async fn check(img: &Image, opts: &CheckOptions) -> Result<CheckReport> {
    let ctx = |e: Error| {
        let p = img.path().display().to_string();
        if e.message().starts_with(&p) {
            e
        } else {
            e.context(p)
        }
    };
    if let Some(r) = opts.repair {
        return crate::jobs::repair::check_repair(img, r).await.map_err(ctx);
    }
    let quiet = img.quiesce().await.map_err(ctx)?;
    let mut c = Checker::new(img, Fix::NONE).map_err(ctx)?;
    c.run().await.map_err(ctx)?;
    drop(quiet);
    let msgs = c.take_msgs();
    Ok(make_report(img, &c.res, msgs, 0))
}

/// The report of a check run with counters `res`.
pub(crate) fn make_report(
    img: &Image,
    res: &Counters,
    messages: Vec<String>,
    repair_messages: usize,
) -> CheckReport {
    CheckReport {
        filename: img.path().display().to_string(),
        format: "qcow2",
        check_errors: res.check_errors,
        corruptions: res.corruptions,
        leaks: res.leaks,
        corruptions_fixed: res.corruptions_fixed,
        leaks_fixed: res.leaks_fixed,
        image_end_offset: res.image_end_offset,
        total_clusters: res.total_clusters,
        allocated_clusters: res.allocated_clusters,
        fragmented_clusters: res.fragmented_clusters,
        compressed_clusters: res.compressed_clusters,
        messages,
        repair_messages,
    }
}

// On-disk masks (QEMU names).
pub(crate) const L1E_OFFSET_MASK: u64 = l2::OFFSET_MASK;
const L1E_RESERVED_MASK: u64 = l2::L1_RESERVED;
const L2E_OFFSET_MASK: u64 = l2::OFFSET_MASK;
const L2E_STD_RESERVED_MASK: u64 = l2::L2_RESERVED;
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const REFT_RESERVED_MASK: u64 = 0x1ff;
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
const QCOW_OFLAG_COPIED: u64 = l2::COPIED;
pub(crate) const QCOW_OFLAG_ZERO: u64 = l2::ZERO;
/// QEMU's L1 size limit (bytes).
const MAX_L1_BYTES: u64 = crate::format::header::MAX_L1_BYTES;
/// QEMU's largest request offset/length (`BDRV_MAX_LENGTH`); beyond it reads fail with EIO.
const MAX_IO_OFFSET: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);
/// Diagnostic lines kept by one check pass (the counters count everything).
pub const MAX_MESSAGES: usize = 10_000;
/// Entries of an L1 table read at once.
const L1_CHUNK: u64 = 64 << 10;

// Bitmap directory limits (qcow2-bitmap.c).
const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
const BME_MAX_GRANULARITY_BITS: u8 = 31;
const BME_MIN_GRANULARITY_BITS: u8 = 9;
const BME_MAX_NAME_SIZE: u64 = 1023;
const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;
const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
const QCOW2_MAX_BITMAPS: u64 = 65535;
const QCOW2_MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * QCOW2_MAX_BITMAPS;

/// Which categories a check run may repair (QEMU's `BdrvCheckMode`); messages depend on it
/// the way QEMU's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fix(u8);

impl Fix {
    pub(crate) const NONE: Fix = Fix(0);
    pub(crate) const LEAKS: Fix = Fix(1);
    pub(crate) const ERRORS: Fix = Fix(2);
    /// `-r all`.
    pub(crate) const ALL: Fix = Fix(3);

    pub(crate) fn leaks(self) -> bool {
        self.0 & Self::LEAKS.0 != 0
    }
    pub(crate) fn errors(self) -> bool {
        self.0 & Self::ERRORS.0 != 0
    }
    pub(crate) fn any(self) -> bool {
        self.0 != 0
    }
    /// "Repairing" when errors are being fixed, else "ERROR".
    fn tag(self) -> &'static str {
        if self.errors() {
            "Repairing"
        } else {
            "ERROR"
        }
    }
}

/// QEMU's `BdrvCheckResult` + `BlockFragInfo`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) check_errors: u64,
    pub(crate) corruptions: u64,
    pub(crate) leaks: u64,
    pub(crate) corruptions_fixed: u64,
    pub(crate) leaks_fixed: u64,
    pub(crate) image_end_offset: u64,
    pub(crate) total_clusters: u64,
    pub(crate) allocated_clusters: u64,
    pub(crate) fragmented_clusters: u64,
    pub(crate) compressed_clusters: u64,
}

/// QEMU's cluster types (`QCow2ClusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

fn cluster_type(entry: u64, extended: bool, data_file: bool) -> ClusterType {
    if entry & l2::COMPRESSED != 0 {
        ClusterType::Compressed
    } else if entry & QCOW_OFLAG_ZERO != 0 && !extended {
        if entry & L2E_OFFSET_MASK != 0 {
            ClusterType::ZeroAlloc
        } else {
            ClusterType::ZeroPlain
        }
    } else if entry & L2E_OFFSET_MASK == 0 {
        // Offset 0 is a valid data offset in an external data file, where every allocated
        // cluster carries the copied flag.
        if data_file && entry & QCOW_OFLAG_COPIED != 0 {
            ClusterType::Normal
        } else {
            ClusterType::Unallocated
        }
    } else {
        ClusterType::Normal
    }
}

/// C's `%#x`: `0x`-prefixed hex, but plain `0` for zero.
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

pub(crate) fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let s = std::io::Error::from_raw_os_error(code).to_string();
            // Rust appends " (os error N)".
            match s.rfind(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        None => e.to_string(),
    }
}

pub(crate) fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

/// The in-memory refcount table (QEMU's "IMRT"): one entry per host cluster, at the image's
/// refcount width and in the on-disk refcount block layout, so a repair can write slices of
/// it as refcount blocks. Its length grows when a reference reaches into the partial
/// cluster past the end of the file.
pub(crate) struct RefArray {
    order: u32,
    cluster_size: u64,
    pub(crate) len: u64,
    buf: Vec<u8>,
}

impl RefArray {
    fn new(order: u32, cluster_size: u64, len: u64) -> Result<RefArray> {
        let mut a = RefArray {
            order,
            cluster_size,
            len: 0,
            buf: Vec::new(),
        };
        a.resize(len)?;
        Ok(a)
    }

    /// Bytes for `entries`, rounded up to whole clusters.
    fn byte_size(&self, entries: u64) -> Option<u64> {
        let bytes = (entries.checked_mul(1u64 << self.order)?).div_ceil(8);
        bytes
            .div_ceil(self.cluster_size)
            .checked_mul(self.cluster_size)
    }

    pub(crate) fn resize(&mut self, len: u64) -> Result<()> {
        let too_large = || {
            Error::new(
                ErrorKind::TooLarge,
                format!("cannot allocate the in-memory refcount table for {len} clusters"),
            )
        };
        let bytes = self.byte_size(len).ok_or_else(too_large)?;
        let bytes = usize::try_from(bytes).map_err(|_| too_large())?;
        if bytes > self.buf.len() {
            self.buf
                .try_reserve_exact(bytes - self.buf.len())
                .map_err(|_| too_large())?;
            self.buf.resize(bytes, 0);
        }
        self.len = len;
        Ok(())
    }

    pub(crate) fn get(&self, i: u64) -> u64 {
        refcount::get(&self.buf, self.order, i as usize)
    }

    pub(crate) fn set(&mut self, i: u64, v: u64) {
        refcount::set(&mut self.buf, self.order, i as usize, v)
    }

    /// Zero every entry (the length stays).
    pub(crate) fn clear(&mut self) {
        self.buf.fill(0);
    }

    /// Entries `[i * rb_entries, (i + 1) * rb_entries)` as the on-disk refcount block `i`.
    pub(crate) fn block(&self, i: u64) -> &[u8] {
        let cs = self.cluster_size as usize;
        &self.buf[i as usize * cs..(i as usize + 1) * cs]
    }
}

/// Raw sizes of a snapshot table entry that the parsed [`crate::format::snapshot::Snapshot`]
/// does not keep byte-exact.
pub(crate) struct SnapInfo {
    id: String,
    name: String,
    l1_table_offset: u64,
    l1_size: u32,
    extra_data_size: u32,
}

impl SnapInfo {
    /// The entry `s` as [`crate::format::snapshot::Snapshot::to_bytes`] writes it.
    pub(crate) fn of(s: &crate::format::snapshot::Snapshot) -> SnapInfo {
        SnapInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            l1_table_offset: s.l1_table_offset,
            l1_size: s.l1_size,
            // Only checked when the table is read back from the file.
            extra_data_size: 16,
        }
    }
}

/// A bitmap of the bitmap directory.
struct BitmapEntry {
    table_offset: u64,
    table_size: u32,
}

pub(crate) struct Checker<'a> {
    pub(crate) img: &'a Image,
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) h: Header,
    pub(crate) lay: Layout,
    pub(crate) file_len: u64,
    pub(crate) data_file: bool,
    pub(crate) fix: Fix,
    /// QEMU's refcount check result (without the snapshot table's corruptions).
    pub(crate) res: Counters,
    /// Corruptions of the snapshot table (QEMU counts them in a separate result).
    pub(crate) snap_corruptions: u64,
    pub(crate) msgs: Vec<String>,
    /// Messages not kept because `msgs` reached [`MAX_MESSAGES`].
    pub(crate) suppressed: u64,
    pub(crate) refs: RefArray,
    /// One L2 table.
    l2_buf: Vec<u8>,
    /// The last refcount block read: (offset, contents).
    pub(crate) rb: Option<(u64, Vec<u8>)>,
    /// `rb` holds repaired refcounts not yet written.
    pub(crate) rb_dirty: bool,
    /// Clusters whose refcount a repair set to 0 (discarded once the refcounts are durable).
    pub(crate) freed: Vec<u64>,
    pub(crate) reftable: Vec<u64>,
    /// A corruption was reported by a lookup (QEMU reports only the first).
    pub(crate) signaled_corruption: bool,
    /// The refcount structure was rebuilt.
    pub(crate) rebuilt: bool,
    /// Clusters holding metadata, for the overlap check of repair writes (built on demand).
    pub(crate) overlap: Option<std::collections::HashMap<u64, u16>>,
    /// Byte length of the snapshot table.
    pub(crate) snapshots_size: u64,
    /// Clusters a rebuild must not place structures in (quarantined: free on disk, but
    /// maybe still used by a request in flight).
    pub(crate) avoid: std::collections::HashSet<u64>,
    /// A rebuild places new refcount blocks and tables at or after this cluster index.
    pub(crate) alloc_floor: u64,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(img: &'a Image, fix: Fix) -> Result<Checker<'a>> {
        let file = img.storage().clone();
        let file_len = file
            .len()
            .map_err(|e| Error::io(e, "getting the image file length"))?;
        let h = img.header();
        let lay = img.layout();
        let cs = lay.cluster_size;
        let nb_clusters = file_len.div_ceil(cs);
        if nb_clusters > i32::MAX as u64 {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("image file too large to check ({nb_clusters} clusters)"),
            ));
        }
        let refs = RefArray::new(lay.refcount_order, cs, nb_clusters)?;
        Ok(Checker {
            img,
            file,
            data_file: h.has_data_file(),
            h,
            lay,
            file_len,
            fix,
            res: Counters::default(),
            snap_corruptions: 0,
            msgs: Vec::new(),
            suppressed: 0,
            refs,
            l2_buf: vec![0u8; cs as usize],
            rb: None,
            rb_dirty: false,
            freed: Vec::new(),
            reftable: img.refcount_table(),
            signaled_corruption: false,
            rebuilt: false,
            overlap: None,
            snapshots_size: 0,
            avoid: Default::default(),
            alloc_floor: 0,
        })
    }

    /// Record a diagnostic line. At most [`MAX_MESSAGES`] are kept (a hostile image can have
    /// a problem in every one of billions of clusters); the rest are counted.
    pub(crate) fn msg(&mut self, m: String) {
        if self.msgs.len() < MAX_MESSAGES {
            self.msgs.push(m);
        } else {
            self.suppressed += 1;
        }
    }

    /// The diagnostic lines, ending with how many were suppressed, if any.
    pub(crate) fn take_msgs(&mut self) -> Vec<String> {
        let mut v = std::mem::take(&mut self.msgs);
        if self.suppressed > 0 {
            v.push(format!(
                "... {} more messages suppressed (at most {MAX_MESSAGES} are shown)",
                self.suppressed
            ));
            self.suppressed = 0;
        }
        v
    }

    /// Read `buf.len()` bytes at `off` of the image file, as QEMU's `bdrv_pread` on the file
    /// node: zeros past the end of the file, EIO for offsets QEMU cannot address.
    pub(crate) async fn pread(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let len = buf.len() as u64;
        if off > MAX_IO_OFFSET || len > MAX_IO_OFFSET - off {
            return Err(eio());
        }
        if off >= self.file_len {
            buf.fill(0);
            return Ok(());
        }
        self.file.read_at(buf, off).await
    }

    /// The whole check (`qcow2_co_check_locked`), repairing what `self.fix` allows. The
    /// counters end up in `self.res` (snapshot table corruptions included).
    pub(crate) async fn run(&mut self) -> Result<()> {
        let (snaps, snapshots_size) = self.check_read_snapshot_table().await?;
        self.snapshots_size = snapshots_size;
        // Guest clusters: QEMU counts whole sectors of the virtual size.
        let vsize = self.h.size / 512 * 512;
        self.res.total_clusters = vsize.div_ceil(self.lay.cluster_size);
        let r = self.check_refcounts(&snaps, snapshots_size).await;
        self.res.corruptions += self.snap_corruptions;
        r
    }

    /// `qcow2_check_refcounts`: count, compare, repair or rebuild, check the copied flags.
    async fn check_refcounts(&mut self, snaps: &[SnapInfo], snapshots_size: u64) -> Result<()> {
        let fix = self.fix;
        let mut rebuild = false;
        self.calculate_refcounts(snaps, snapshots_size, &mut rebuild)
            .await?;
        // Without a rebuild, a repair compares again (with fixing) from this state.
        let pre_compare = self.res;
        let mut highest = self.compare_refcounts(Fix::NONE, &mut rebuild).await;

        if rebuild && fix.errors() {
            let old = self.res;
            self.msg("Rebuilding refcount structure".into());
            self.rebuild_refcount_structure().await?;
            self.res.corruptions = 0;
            self.res.leaks = 0;
            // Count the references again, now against the new structure.
            rebuild = false;
            self.refs.clear();
            self.fix = Fix::NONE;
            let r = self
                .calculate_refcounts(snaps, snapshots_size, &mut rebuild)
                .await;
            self.fix = fix;
            r?;
            let mut fresh_leaks = 0;
            if fix.leaks() {
                // The old structure is leaked now: free it. Only leaks that remain count.
                let saved = self.res;
                self.res = Counters::default();
                highest = self.compare_refcounts(Fix::LEAKS, &mut rebuild).await;
                if rebuild {
                    self.msg("ERROR rebuilt refcount structure is still broken".into());
                }
                fresh_leaks = self.res.leaks;
                self.res = saved;
            }
            if self.res.corruptions < old.corruptions {
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions;
            }
            if self.res.leaks < old.leaks {
                self.res.leaks_fixed += old.leaks - self.res.leaks;
            }
            self.res.leaks += fresh_leaks;
        } else if fix.any() {
            if rebuild {
                self.msg("ERROR need to rebuild refcount structures".into());
                self.res.check_errors += 1;
                return Err(Error::io(
                    eio(),
                    "Check failed: the refcount structure needs a rebuild (repair with -r all)",
                ));
            }
            if self.res.leaks != 0 || self.res.corruptions != 0 {
                self.res = pre_compare;
                highest = self.compare_refcounts(fix, &mut rebuild).await;
            }
        }

        if fix.any() {
            // The copied flags are set from these refcounts: make them durable first.
            self.flush_rb()
                .await
                .and(self.file.flush().await)
                .map_err(|e| Error::io(e, "writing a refcount block"))?;
        }
        self.check_oflag_copied(fix).await?;
        self.res.image_end_offset = (highest + 1) * self.lay.cluster_size;
        Ok(())
    }

    // ---- snapshot table (qcow2_check_read_snapshot_table) ----

    /// Walk the raw snapshot table: every entry's sizes and the table's exact byte length.
    async fn check_read_snapshot_table(&mut self) -> Result<(Vec<SnapInfo>, u64)> {
        let n = self.h.nb_snapshots;
        if n == 0 {
            return Ok((Vec::new(), 0));
        }
        let parsed = self.img.snapshots();
        let start = self.h.snapshots_offset;
        let mut off = start;
        let mut out = Vec::with_capacity(parsed.len());
        let fail = |e: std::io::Error| Error::io(e, "ERROR failed to read the snapshot table");
        for i in 0..n as usize {
            off = off.div_ceil(8) * 8;
            let mut hdr = [0u8; 40];
            self.pread(&mut hdr, off).await.map_err(fail)?;
            let extra = be32(&hdr, 36);
            let id_len = be16(&hdr, 12) as u64;
            let name_len = be16(&hdr, 14) as u64;
            off += 40 + extra as u64;
            let mut id = vec![0u8; id_len as usize];
            self.pread(&mut id, off).await.map_err(fail)?;
            off += id_len;
            let mut name = vec![0u8; name_len as usize];
            self.pread(&mut name, off).await.map_err(fail)?;
            off += name_len;
            // QEMU keeps the names as C strings.
            let cstr = |b: &[u8]| {
                let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
                String::from_utf8_lossy(&b[..end]).into_owned()
            };
            let (l1_table_offset, l1_size) = match parsed.get(i) {
                Some(s) => (s.l1_table_offset, s.l1_size),
                None => (be64(&hdr, 0), be32(&hdr, 8)),
            };
            out.push(SnapInfo {
                id: cstr(&id),
                name: cstr(&name),
                l1_table_offset,
                l1_size,
                extra_data_size: extra,
            });
        }
        // Version 3 entries must record at least the 64-bit VM state size and the disk size.
        if self.h.version >= 3 {
            for (i, s) in out.iter().enumerate() {
                if s.extra_data_size < 16 {
                    self.snap_corruptions += 1;
                    let m = format!("{} snapshot table entry {i} is incomplete", self.fix.tag());
                    self.msg(m);
                }
            }
        }
        Ok((out, off - start))
    }

    // ---- reference counting (calculate_refcounts) ----

    /// Add one reference to every cluster that `[offset, offset + size)` touches
    /// (`qcow2_inc_refcounts_imrt`).
    fn inc_refcounts(&mut self, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let cs = self.lay.cluster_size;
        // The last cluster may be partially allocated; a reference reaching one cluster or
        // more past the end of the file is an error.
        if offset as i128 + size as i128 - self.file_len as i128 >= cs as i128 {
            self.res.corruptions += 1;
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: \
                 offset 0x{offset:x} size 0x{size:x}"
            ));
            return Ok(());
        }
        let bits = self.lay.cluster_bits;
        let first = offset >> bits;
        let last = (offset + size - 1) >> bits;
        let max = refcount::max(self.lay.refcount_order);
        for k in first..=last {
            if k >= self.refs.len {
                if let Err(e) = self.refs.resize(k + 1) {
                    self.res.check_errors += 1;
                    return Err(e);
                }
            }
            let r = self.refs.get(k);
            if r == max {
                self.res.corruptions += 1;
                self.msg(format!("ERROR: overflow cluster offset=0x{:x}", k << bits));
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a \
                     clean copy if the image cannot be opened for writing"
                        .into(),
                );
                continue;
            }
            self.refs.set(k, r + 1);
        }
        Ok(())
    }

    async fn calculate_refcounts(
        &mut self,
        snaps: &[SnapInfo],
        snapshots_size: u64,
        rebuild: &mut bool,
    ) -> Result<()> {
        self.count_references(snaps, snapshots_size, Some(rebuild))
            .await
    }

    /// Count every reference of the state `self.h` describes (with `snaps` as its snapshot
    /// table, `snapshots_size` bytes long) into `self.refs`. With `rebuild` the refcount
    /// structure's own references are counted too (and checked); without, they are left
    /// out (for a caller that writes a new structure, see `jobs/repair.rs`).
    pub(crate) async fn count_references(
        &mut self,
        snaps: &[SnapInfo],
        snapshots_size: u64,
        rebuild: Option<&mut bool>,
    ) -> Result<()> {
        let cs = self.lay.cluster_size;
        // Header.
        self.inc_refcounts(0, cs)?;
        // Active L1 table.
        let (l1_off, l1_size) = (self.h.l1_table_offset, self.h.l1_size);
        self.check_refcounts_l1(l1_off, l1_size, true, true).await?;
        // Snapshots.
        if self.data_file && !snaps.is_empty() {
            self.res.corruptions += 1;
            self.msg(format!(
                "ERROR {} snapshots in image with data file",
                snaps.len()
            ));
        }
        for sn in snaps {
            if sn.l1_table_offset & (cs - 1) != 0 {
                self.res.corruptions += 1;
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry \
                     corrupted",
                    sn.id,
                    sn.name,
                    alt_hex(sn.l1_table_offset)
                ));
                continue;
            }
            if sn.l1_size as u64 > MAX_L1_BYTES / 8 {
                self.res.corruptions += 1;
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    alt_hex(sn.l1_size as u64)
                ));
                continue;
            }
            self.check_refcounts_l1(sn.l1_table_offset, sn.l1_size, false, false)
                .await?;
        }
        if !snaps.is_empty() {
            self.inc_refcounts(self.h.snapshots_offset, snapshots_size)?;
        }
        // Refcount table.
        if rebuild.is_some() {
            let rt_bytes = self.reftable.len() as u64 * 8;
            self.inc_refcounts(self.h.refcount_table_offset, rt_bytes)?;
        }
        // Encryption header.
        if let Some((off, len)) = self.h.crypto_header {
            self.inc_refcounts(off, len)?;
        }
        // Persistent bitmaps.
        self.check_bitmaps_refcounts().await?;
        // Refcount blocks.
        match rebuild {
            Some(rebuild) => self.check_refblocks(rebuild).await,
            None => Ok(()),
        }
    }

    async fn check_refcounts_l1(
        &mut self,
        l1_off: u64,
        l1_size: u32,
        frag: bool,
        active: bool,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let l1_bytes = l1_size as u64 * 8;
        self.inc_refcounts(l1_off, l1_bytes)?;
        let cs = self.lay.cluster_size;
        let mut done = 0u64;
        let mut chunk = Vec::new();
        while done < l1_size as u64 {
            let n = (l1_size as u64 - done).min(L1_CHUNK);
            chunk.resize(n as usize * 8, 0);
            if let Err(e) = self.pread(&mut chunk, l1_off + done * 8).await {
                self.res.check_errors += 1;
                self.msg("ERROR: I/O error in check_refcounts_l1".into());
                return Err(Error::io(e, "reading an L1 table"));
            }
            let entries: Vec<u64> = chunk
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            for e in entries {
                if e == 0 {
                    continue;
                }
                if e & L1E_RESERVED_MASK != 0 {
                    self.res.corruptions += 1;
                    self.msg(format!(
                        "ERROR found L1 entry with reserved bits set: {e:x}"
                    ));
                }
                let l2_off = e & L1E_OFFSET_MASK;
                self.inc_refcounts(l2_off, cs)?;
                if l2_off & (cs - 1) != 0 {
                    self.res.corruptions += 1;
                    self.msg(format!(
                        "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                    ));
                }
                self.check_refcounts_l2(l2_off, frag, active).await?;
            }
            done += n;
        }
        Ok(())
    }

    async fn check_refcounts_l2(&mut self, l2_off: u64, frag: bool, active: bool) -> Result<()> {
        let lay = self.lay;
        let cs = lay.cluster_size;
        let mut buf = std::mem::take(&mut self.l2_buf);
        let r = self.pread(&mut buf, l2_off).await;
        if let Err(e) = r {
            self.l2_buf = buf;
            self.res.check_errors += 1;
            self.msg("ERROR: I/O error in check_refcounts_l2".into());
            return Err(Error::io(e, "reading an L2 table"));
        }
        let mut next_contiguous = 0u64;
        let mut result = Ok(());
        for i in 0..lay.l2_entries as usize {
            let b = i * lay.l2_entry_size as usize;
            let mut entry = be64(&buf, b);
            let bitmap = if lay.extended { be64(&buf, b + 8) } else { 0 };
            let ty = cluster_type(entry, lay.extended, self.data_file);
            if ty != ClusterType::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
            }
            match ty {
                ClusterType::Compressed => {
                    let desc = CompressedDesc::decode(entry, lay.cluster_bits);
                    if entry & QCOW_OFLAG_COPIED != 0 {
                        self.res.corruptions += 1;
                        self.msg(format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            desc.offset
                        ));
                        entry &= !QCOW_OFLAG_COPIED;
                    }
                    if self.data_file {
                        self.res.corruptions += 1;
                        self.msg(format!(
                            "ERROR compressed cluster {i} with data file, entry=0x{entry:x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.res.corruptions += 1;
                        self.msg(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, \
                             entry=0x{entry:x}"
                        ));
                        continue;
                    }
                    if let Err(e) = self.inc_refcounts(desc.offset, desc.len) {
                        result = Err(e);
                        break;
                    }
                    if frag {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        // Compressed clusters are fragmented by nature.
                        self.res.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = entry & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.res.corruptions += 1;
                        self.msg(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if offset & (cs - 1) != 0 {
                        self.res.corruptions += 1;
                        let contains_data = if lay.extended {
                            bitmap & L2_BITMAP_ALL_ALLOC != 0
                        } else {
                            entry & QCOW_OFLAG_ZERO == 0
                        };
                        if !contains_data {
                            self.msg(format!(
                                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry \
                                 corrupted.",
                                self.fix.tag()
                            ));
                            if self.fix.errors() {
                                // Turn the entry into a plain zero cluster.
                                match self.fix_l2_entry_by_zero(&mut buf, l2_off, i, active).await {
                                    Ok(true) => continue,
                                    Ok(false) => {}
                                    Err(e) => {
                                        result = Err(e);
                                        break;
                                    }
                                }
                            }
                        } else {
                            self.msg(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    if frag {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + cs;
                    }
                    if !self.data_file {
                        if let Err(e) = self.inc_refcounts(offset, cs) {
                            result = Err(e);
                            break;
                        }
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        self.res.corruptions += 1;
                        self.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        self.l2_buf = buf;
        result
    }

    /// References of the persistent bitmaps (`qcow2_check_bitmaps_refcounts`): only when the
    /// bitmaps are marked consistent (autoclear bit), as QEMU ignores them otherwise.
    async fn check_bitmaps_refcounts(&mut self) -> Result<()> {
        let ext = match self.h.bitmaps {
            Some(ext)
                if self.h.autoclear_features & AUTOCLEAR_BITMAPS != 0 && ext.nb_bitmaps > 0 =>
            {
                ext
            }
            _ => return Ok(()),
        };
        self.inc_refcounts(ext.directory_offset, ext.directory_size)?;
        let list = match self
            .load_bitmap_list(ext.directory_offset, ext.directory_size, ext.nb_bitmaps)
            .await
        {
            Some(l) => l,
            None => {
                self.res.corruptions += 1;
                return Err(Error::corrupt("broken bitmap directory"));
            }
        };
        let cs = self.lay.cluster_size;
        for bm in list {
            let tbytes = bm.table_size as u64 * 8;
            self.inc_refcounts(bm.table_offset, tbytes)?;
            // table_size * cluster_size is at most BME_MAX_PHYS_SIZE: the table is < 8 MiB.
            let mut table = vec![0u8; tbytes as usize];
            let ok = self.pread(&mut table, bm.table_offset).await.is_ok()
                && table
                    .chunks_exact(8)
                    .all(|c| check_bitmap_table_entry(be64(c, 0), cs));
            if !ok {
                self.res.corruptions += 1;
                return Err(Error::corrupt("invalid bitmap table"));
            }
            for c in table.chunks_exact(8) {
                let off = be64(c, 0) & BME_TABLE_ENTRY_OFFSET_MASK;
                if off != 0 {
                    self.inc_refcounts(off, cs)?;
                }
            }
        }
        Ok(())
    }

    /// Parse and validate the bitmap directory as QEMU's `bitmap_list_load`; `None` when QEMU
    /// would reject it.
    async fn load_bitmap_list(
        &mut self,
        offset: u64,
        size: u64,
        nb_bitmaps: u32,
    ) -> Option<Vec<BitmapEntry>> {
        if size == 0 || size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
            return None;
        }
        // Past the end of the file the directory reads as zeros, and a zero entry is invalid:
        // a directory that does not fit in the file is always rejected.
        if offset.checked_add(size)? > self.file_len {
            return None;
        }
        let mut dir = vec![0u8; size as usize];
        self.pread(&mut dir, offset).await.ok()?;
        let vsize = self.h.size / 512 * 512;
        let cs = self.lay.cluster_size;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while pos < dir.len() {
            if pos + 24 > dir.len() {
                return None;
            }
            if out.len() as u64 + 1 > nb_bitmaps as u64 {
                return None;
            }
            let e = &dir[pos..];
            let table_offset = be64(e, 0);
            let table_size = be32(e, 8);
            let flags = be32(e, 12);
            let ty = e[16];
            let gran = e[17];
            let name_size = be16(e, 18) as u64;
            let extra = be32(e, 20) as u64;
            let esize = (24 + name_size + extra).div_ceil(8) * 8;
            if pos as u64 + esize > dir.len() as u64 {
                return None;
            }
            if extra != 0 {
                return None;
            }
            let bad = table_size == 0
                || table_offset == 0
                || table_offset & (cs - 1) != 0
                || table_size as u64 > BME_MAX_TABLE_SIZE
                || !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS).contains(&gran)
                || flags & BME_RESERVED_FLAGS != 0
                || name_size > BME_MAX_NAME_SIZE
                || ty != BT_DIRTY_TRACKING_BITMAP;
            if bad {
                return None;
            }
            let phys = table_size as u64 * cs;
            if phys > BME_MAX_PHYS_SIZE || vsize as u128 > ((phys as u128 * 8) << gran) {
                return None;
            }
            out.push(BitmapEntry {
                table_offset,
                table_size,
            });
            pos += esize as usize;
        }
        if out.len() as u64 != nb_bitmaps as u64 {
            return None;
        }
        Some(out)
    }

    /// Check the refcount table entries and count the refcount blocks (`check_refblocks`).
    /// Sets `rebuild` when the refcount structure itself is broken.
    async fn check_refblocks(&mut self, rebuild: &mut bool) -> Result<()> {
        let cs = self.lay.cluster_size;
        for i in 0..self.reftable.len() {
            let e = self.reftable[i];
            let offset = e & REFT_OFFSET_MASK;
            let cluster = offset >> self.lay.cluster_bits;
            if e & REFT_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                *rebuild = true;
                continue;
            }
            if offset & (cs - 1) != 0 {
                self.res.corruptions += 1;
                self.msg(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                *rebuild = true;
                continue;
            }
            if cluster >= self.refs.len {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{} refcount block {i} is outside image",
                    self.fix.tag()
                ));
                if self.fix.errors() {
                    // Grow the file so that it covers the block.
                    match self.grow_file_to(offset, cluster).await {
                        Ok(()) => {
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            // Freshly allocated and zeroed: its count can only be 1.
                            self.inc_refcounts(offset, cs)?;
                            continue;
                        }
                        Err(Some(e)) => {
                            *rebuild = true;
                            self.msg(format!("ERROR could not resize image: {}", strerror(&e)));
                        }
                        Err(None) => {
                            self.res.check_errors += 1;
                            return Err(Error::new(
                                ErrorKind::TooLarge,
                                "cannot grow the in-memory refcount table",
                            ));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc_refcounts(offset, cs)?;
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.res.corruptions += 1;
                    self.msg(format!("ERROR refcount block {i} refcount={r}"));
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    // ---- on-disk refcounts ----

    /// The stored refcount of cluster `ci` (`qcow2_get_refcount`), reading one refcount block
    /// at a time.
    pub(crate) async fn disk_refcount(&mut self, ci: u64) -> std::io::Result<u64> {
        let lay = self.lay;
        let rt_idx = ci / lay.rb_entries;
        let rb_off = match self.reftable.get(rt_idx as usize) {
            Some(&e) => e & REFT_OFFSET_MASK,
            None => return Ok(0),
        };
        if rb_off == 0 {
            return Ok(0);
        }
        if rb_off & (lay.cluster_size - 1) != 0 {
            // QEMU signals the corruption once (non-fatal on a read-only image) and fails
            // the lookup.
            if !self.signaled_corruption {
                self.signaled_corruption = true;
                self.msg(format!(
                    "qcow2: Image is corrupt: Refblock offset {} unaligned (reftable index: {}); further non-fatal \
                     corruption events will be suppressed",
                    alt_hex(rb_off),
                    alt_hex(rt_idx)
                ));
            }
            return Err(eio());
        }
        let idx = (ci % lay.rb_entries) as usize;
        if let Some((off, buf)) = &self.rb {
            if *off == rb_off {
                return Ok(refcount::get(buf, lay.refcount_order, idx));
            }
        }
        // A block holding repaired refcounts is written back before another one is loaded.
        self.flush_rb().await?;
        let mut buf = match self.rb.take() {
            Some((_, b)) => b,
            None => vec![0u8; lay.cluster_size as usize],
        };
        if let Err(e) = self.pread(&mut buf, rb_off).await {
            self.rb = None;
            return Err(e);
        }
        let v = refcount::get(&buf, lay.refcount_order, idx);
        self.rb = Some((rb_off, buf));
        Ok(v)
    }

    /// Compare stored and computed refcounts (`compare_refcounts`), fixing what `fix` allows;
    /// returns the highest cluster index in use. A stored refcount of 0 where there are
    /// references calls for a rebuild.
    async fn compare_refcounts(&mut self, fix: Fix, rebuild: &mut bool) -> u64 {
        let mut highest = 0u64;
        let mut i = 0u64;
        while i < self.refs.len {
            let r1 = match self.disk_refcount(i).await {
                Ok(r) => r,
                Err(e) => {
                    self.res.check_errors += 1;
                    self.msg(format!(
                        "Can't get refcount for cluster {i}: {}",
                        strerror(&e)
                    ));
                    i += 1;
                    continue;
                }
            };
            let r2 = self.refs.get(i);
            if r1 > 0 || r2 > 0 {
                highest = i;
            }
            if r1 != r2 {
                let fixing = if r1 == 0 {
                    *rebuild = true;
                    false
                } else {
                    (r1 > r2 && fix.leaks()) || (r1 < r2 && fix.errors())
                };
                let what = if fixing {
                    "Repairing"
                } else if r1 < r2 {
                    "ERROR"
                } else {
                    "Leaked"
                };
                self.msg(format!("{what} cluster {i} refcount={r1} reference={r2}"));
                if fixing && self.set_disk_refcount(i, r2).await.is_ok() {
                    if r1 > r2 {
                        self.res.leaks_fixed += 1;
                    } else {
                        self.res.corruptions_fixed += 1;
                    }
                    i += 1;
                    continue;
                }
                if r1 < r2 {
                    self.res.corruptions += 1;
                } else {
                    self.res.leaks += 1;
                }
            }
            i += 1;
        }
        highest
    }

    /// Check the copied flag of the active L1 and L2 entries (`check_oflag_copied`), setting
    /// or clearing it from the stored refcount where `fix` allows (with `-r leaks` only when
    /// the refcounts are known to be right).
    async fn check_oflag_copied(&mut self, fix: Fix) -> Result<()> {
        let lay = self.lay;
        let repair = if fix.errors() {
            true
        } else if fix.leaks() {
            self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
        } else {
            false
        };
        let tag = if repair { "Repairing" } else { "ERROR" };
        let l1 = self.img.l1_table();
        let mut buf = vec![0u8; lay.cluster_size as usize];
        for (i, &l1e) in l1.iter().enumerate() {
            let l2_off = l1e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let r = match self.disk_refcount(l2_off >> lay.cluster_bits).await {
                Ok(r) => r,
                Err(_) => continue,
            };
            if (r == 1) != (l1e & QCOW_OFLAG_COPIED != 0) {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{tag} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={r}"
                ));
                if repair {
                    let new = if r == 1 {
                        l1e | QCOW_OFLAG_COPIED
                    } else {
                        l1e & !QCOW_OFLAG_COPIED
                    };
                    if let Err(e) = self.write_l1_entry(i, new).await {
                        self.res.check_errors += 1;
                        return Err(e);
                    }
                    self.res.corruptions -= 1;
                    self.res.corruptions_fixed += 1;
                }
            }
            if let Err(e) = self.pread(&mut buf, l2_off).await {
                self.res.check_errors += 1;
                self.msg(format!("ERROR: Could not read L2 table: {}", strerror(&e)));
                return Err(Error::io(e, "reading an L2 table"));
            }
            let mut l2_dirty = 0u64;
            for j in 0..lay.l2_entries as usize {
                let pos = j * lay.l2_entry_size as usize;
                let e = be64(&buf, pos);
                let ty = cluster_type(e, lay.extended, self.data_file);
                if ty != ClusterType::Normal && ty != ClusterType::ZeroAlloc {
                    continue;
                }
                let r = if self.data_file {
                    1
                } else {
                    match self
                        .disk_refcount((e & L2E_OFFSET_MASK) >> lay.cluster_bits)
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                };
                if (r == 1) != (e & QCOW_OFLAG_COPIED != 0) {
                    self.res.corruptions += 1;
                    self.msg(format!(
                        "{tag} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}"
                    ));
                    if repair {
                        let new = if r == 1 {
                            e | QCOW_OFLAG_COPIED
                        } else {
                            e & !QCOW_OFLAG_COPIED
                        };
                        buf[pos..pos + 8].copy_from_slice(&new.to_be_bytes());
                        l2_dirty += 1;
                    }
                }
            }
            if l2_dirty > 0 {
                if let Err(e) = self.write_l2_table(&buf, l2_off).await {
                    self.res.check_errors += 1;
                    return Err(e);
                }
                self.res.corruptions -= l2_dirty;
                self.res.corruptions_fixed += l2_dirty;
            }
        }
        Ok(())
    }
}

/// A bitmap table entry as QEMU's `check_table_entry` accepts it.
fn check_bitmap_table_entry(entry: u64, cluster_size: u64) -> bool {
    if entry & BME_TABLE_ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let off = entry & BME_TABLE_ENTRY_OFFSET_MASK;
    if off != 0 && (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 || off & (cluster_size - 1) != 0) {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_key_order_matches_qemu() {
        let r = CheckReport {
            filename: "x.qcow2".into(),
            format: "qcow2",
            check_errors: 0,
            corruptions: 1,
            leaks: 2,
            corruptions_fixed: 3,
            leaks_fixed: 4,
            image_end_offset: 5,
            total_clusters: 6,
            allocated_clusters: 7,
            fragmented_clusters: 8,
            compressed_clusters: 9,
            messages: vec![],
            repair_messages: 0,
        };
        let keys: Vec<String> = r.to_json().as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "compressed-clusters",
                "total-clusters",
                "corruptions",
                "corruptions-fixed",
                "check-errors",
                "leaks",
                "leaks-fixed",
                "allocated-clusters",
                "filename",
                "format",
                "fragmented-clusters"
            ]
        );
        let empty = CheckReport {
            corruptions: 0,
            leaks: 0,
            corruptions_fixed: 0,
            leaks_fixed: 0,
            image_end_offset: 0,
            total_clusters: 0,
            allocated_clusters: 0,
            fragmented_clusters: 0,
            compressed_clusters: 0,
            ..r
        };
        let keys: Vec<String> = empty
            .to_json()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["check-errors", "filename", "format"]);
        assert_eq!(empty.exit_code(), 0);
    }

    #[test]
    fn cluster_types() {
        assert_eq!(cluster_type(0, false, false), ClusterType::Unallocated);
        assert_eq!(
            cluster_type(QCOW_OFLAG_COPIED, false, false),
            ClusterType::Unallocated
        );
        assert_eq!(
            cluster_type(QCOW_OFLAG_COPIED, false, true),
            ClusterType::Normal
        );
        assert_eq!(cluster_type(1, false, false), ClusterType::ZeroPlain);
        assert_eq!(cluster_type(0x10001, false, false), ClusterType::ZeroAlloc);
        assert_eq!(cluster_type(0x10001, true, false), ClusterType::Normal);
        assert_eq!(
            cluster_type(l2::COMPRESSED | 5, false, false),
            ClusterType::Compressed
        );
    }

    #[test]
    fn ref_array_widths() {
        for order in 0..=6 {
            let mut a = RefArray::new(order, 512, 100).unwrap();
            let max = refcount::max(order);
            a.set(99, max);
            assert_eq!(a.get(99), max);
            a.resize(5000).unwrap();
            assert_eq!(a.get(99), max);
            assert_eq!(a.get(4999), 0);
        }
    }

    #[test]
    fn c_formatting() {
        assert_eq!(alt_hex(0), "0");
        assert_eq!(alt_hex(0x200), "0x200");
        assert_eq!(strerror(&eio()), "Input/output error");
        assert_eq!(percent(1.66015625), "1.66%");
    }
}
