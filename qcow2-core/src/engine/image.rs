//! An open qcow2 image: options, geometry, the shared handle, open, flush and close.

use crate::engine::cache::SliceCache;
use crate::engine::disk::{Disk, Format};
use crate::format::header::{self, Header};
use crate::format::l2::{self};
use crate::format::snapshot::{self, Snapshot};
use crate::io::{lock, EngineKind, FileOptions, Storage};
use crate::{Error, Result, ResultExt};
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default total size of the metadata caches (L2 + refcount), bytes.
pub const DEFAULT_CACHE_SIZE: usize = 32 << 20;

/// Default limit on the backing chain length.
pub const DEFAULT_MAX_CHAIN: usize = 64;

/// Bytes of decompressed clusters cached for an image and its backing chain together.
const ZCACHE_BYTES: u64 = 4 << 20;

/// Decompressed clusters by (depth of the image in its chain, host offset).
pub(crate) type ZCache = LruCache<(usize, u64), Arc<Vec<u8>>>;

/// How to open an image. Fields may be added: outside this crate, start from
/// `OpenOptions::default()` and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// I/O engine for every file of the chain.
    pub engine: EngineKind,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Ignore flushes of every file of the chain (QEMU's cache mode `unsafe`, see
    /// [`FileOptions::no_flush`]): [`Image::flush`] and the flushes the engine orders its
    /// metadata updates with write nothing to the disk.
    pub no_flush: bool,
    /// Write through (QEMU's cache modes `writethrough` and `directsync`, where the guest
    /// sees no write cache): every write, write-zeroes, discard and compressed write of the
    /// [`Image`] is followed by an [`Image::flush`] (data and metadata) before it
    /// completes, so a completed request is on the disk. Costs an `fdatasync` or more per
    /// request. With `no_flush` the metadata is still written but not synced.
    pub write_through: bool,
    /// Total bytes of metadata cache (L2 tables and refcount blocks) of the image and its
    /// backing chain together: an image with a qcow2 backing file keeps half, the backing
    /// file gets the other half (and shares it with its own backing file the same way).
    /// An image's L2 tables and refcount blocks share its part as one budget (reads give it
    /// all to L2 tables); at least two slices per shard, so very small budgets are rounded up.
    pub cache_size: usize,
    /// Refuse to open any file named inside the image (backing file, data file): for
    /// untrusted images.
    pub no_external_files: bool,
    /// Longest backing chain accepted.
    pub max_chain: usize,
    /// Use this external data file instead of the name in the image.
    pub data_file: Option<PathBuf>,
    /// Do not open the backing file: unallocated clusters read as zeros.
    pub no_backing: bool,
    /// Use this file as the backing file instead of the one the image names (also for an
    /// image that names none). Its format is `backing_format`, else probed. Applies to the
    /// top image only; allowed with `no_external_files`, since the caller names it.
    pub backing_file: Option<PathBuf>,
    /// The format of `backing_file` (probed when `None`).
    pub backing_format: Option<Format>,
    /// Open for `check -r`: a writable open of a corrupt-marked image is allowed (writes other
    /// than the repair's are still refused while the corrupt bit is set).
    pub for_repair: bool,
    /// Share every permission with other users of the files (qemu-img `-U`/`--force-share`):
    /// the open succeeds while another process writes the image, and the content read may be
    /// inconsistent. Read-only opens only.
    pub force_share: bool,
    /// Take QEMU-compatible locks on every file of the chain (see [`crate::io::lock`]), held
    /// until the last clone of the handle is dropped. `false` is QEMU's `locking=off`.
    pub locking: bool,
    /// Open for `check` (QEMU's `BDRV_O_CHECK`): damage that the check reports (L1 and
    /// refcount table entries pointing at misaligned offsets or past the end of the file,
    /// bad snapshot table entries, a snapshot table past the end of the file) does not fail
    /// the open. A handle opened so on a damaged image refuses guest reads and writes: use
    /// it for [`crate::check::check`] only. Backing files are opened normally.
    pub for_check: bool,
    /// Open this internal snapshot's content instead of the active state (read-only; the
    /// size is the snapshot's). `qemu-img convert -l`.
    pub snapshot: Option<crate::SnapshotKey>,
}

/// A cache mode as QEMU names it (`qemu-img -t`, `qemu-nbd --cache`): `none` and
/// `directsync` bypass the page cache (`O_DIRECT`), `unsafe` ignores flushes,
/// `writethrough` and `directsync` flush after every write request, `writeback` (QEMU's
/// default) is buffered I/O flushed when asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheMode {
    /// [`OpenOptions::direct`].
    pub direct: bool,
    /// [`OpenOptions::no_flush`].
    pub no_flush: bool,
    /// [`OpenOptions::write_through`].
    pub write_through: bool,
}

impl CacheMode {
    /// The mode `name` names, or `None` for a name QEMU does not know.
    pub fn parse(name: &str) -> Option<CacheMode> {
        let (direct, no_flush, write_through) = match name {
            "writeback" => (false, false, false),
            "writethrough" => (false, false, true),
            "unsafe" => (false, true, false),
            "none" => (true, false, false),
            "directsync" => (true, false, true),
            _ => return None,
        };
        Some(CacheMode {
            direct,
            no_flush,
            write_through,
        })
    }

    /// Sets `o`'s [`direct`](OpenOptions::direct), [`no_flush`](OpenOptions::no_flush) and
    /// [`write_through`](OpenOptions::write_through).
    pub fn apply(self, o: &mut OpenOptions) {
        o.direct = self.direct;
        o.no_flush = self.no_flush;
        o.write_through = self.write_through;
    }

    /// The mode `o` opens an image in.
    pub fn of(o: &OpenOptions) -> CacheMode {
        CacheMode {
            direct: o.direct,
            no_flush: o.no_flush,
            write_through: o.write_through,
        }
    }

    /// QEMU's name of this mode; `None` for the combinations QEMU has no name for (`unsafe`
    /// with `O_DIRECT` or with write-through).
    pub fn name(self) -> Option<&'static str> {
        Some(match (self.direct, self.no_flush, self.write_through) {
            (false, false, false) => "writeback",
            (false, false, true) => "writethrough",
            (false, true, false) => "unsafe",
            (true, false, false) => "none",
            (true, false, true) => "directsync",
            _ => return None,
        })
    }
}

impl OpenOptions {
    /// A job's target opened for writing with the engine, `O_DIRECT` and flush choice of
    /// `file` (the target's [`FileOptions`] of convert and dd), the rest default.
    pub(crate) fn writable_target(file: &FileOptions) -> OpenOptions {
        OpenOptions {
            writable: true,
            engine: file.engine,
            direct: file.direct,
            no_flush: file.no_flush,
            ..Default::default()
        }
    }

    /// How the image's files (and a raw disk's) are opened: writable or not, engine,
    /// `O_DIRECT` and flushes as these options say; never created or truncated.
    pub(crate) fn file_options(&self) -> FileOptions {
        FileOptions {
            writable: self.writable,
            direct: self.direct,
            engine: self.engine,
            no_flush: self.no_flush,
            ..Default::default()
        }
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            engine: EngineKind::Auto,
            direct: false,
            no_flush: false,
            write_through: false,
            cache_size: DEFAULT_CACHE_SIZE,
            no_external_files: false,
            max_chain: DEFAULT_MAX_CHAIN,
            data_file: None,
            no_backing: false,
            backing_file: None,
            backing_format: None,
            for_repair: false,
            force_share: false,
            locking: true,
            for_check: false,
            snapshot: None,
        }
    }
}

/// Geometry derived from the header.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Cluster size.
    pub cluster_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Bytes per L2 entry (8 or 16).
    pub l2_entry_size: u64,
    /// Extended L2 entries.
    pub extended: bool,
    /// Subcluster size (cluster size without extended L2).
    pub sc_size: u64,
    /// log2 subcluster size.
    pub sc_bits: u32,
    /// log2 refcount width.
    pub refcount_order: u32,
    /// Entries per refcount block.
    pub rb_entries: u64,
    /// Metadata slice size.
    pub slice_size: u64,
}

impl Layout {
    /// Geometry of `h`.
    pub fn new(h: &Header) -> Layout {
        let cs = h.cluster_size();
        let extended = h.extended_l2();
        let es = h.l2_entry_size();
        let sc_bits = if extended {
            h.cluster_bits - 5
        } else {
            h.cluster_bits
        };
        Layout {
            cluster_bits: h.cluster_bits,
            cluster_size: cs,
            l2_entries: cs / es,
            l2_entry_size: es,
            extended,
            sc_size: 1 << sc_bits,
            sc_bits,
            refcount_order: h.refcount_order,
            rb_entries: (cs * 8) >> h.refcount_order,
            slice_size: cs.min(4096),
        }
    }
    /// Offset rounded down to a cluster.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size - 1)
    }
}

/// A persistent bitmap's directory entry (for info and check).
#[derive(Debug, Clone)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Flags: in-use, auto.
    pub flags: u32,
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
}

pub(crate) struct Inner {
    pub path: PathBuf,
    pub file: Arc<dyn Storage>,
    /// Where guest data lives: `file`, or the external data file.
    pub data: Arc<dyn Storage>,
    pub data_path: Option<PathBuf>,
    pub header: RwLock<Header>,
    pub layout: Layout,
    /// The active L1 table (changed only through `write()`, which keeps the overlap check's
    /// bound right).
    pub l1: crate::engine::overlap::OffsetTable,
    /// L1 entries that lie inside the file at open (a truncated file cuts the table short).
    pub l1_in_file: u64,
    /// File length at open, for validating data offsets of read-only images.
    pub file_len_at_open: u64,
    /// The refcount table (as `l1`).
    pub reftable: crate::engine::overlap::OffsetTable,
    pub l2_cache: SliceCache,
    pub rc_cache: SliceCache,
    pub snapshots: RwLock<Vec<Snapshot>>,
    pub bitmaps: RwLock<Vec<BitmapInfo>>,
    pub backing: Option<Disk>,
    /// Decompressed clusters, one cache shared by the whole backing chain (so its memory is
    /// bounded per chain, not per image), keyed by (this image's depth in the chain, host
    /// offset).
    pub zcache: Arc<Mutex<ZCache>>,
    /// This image's depth in its chain (0 for the image opened): its part of `zcache`'s key.
    pub zdepth: usize,
    /// Bumped (under the `zcache` lock) whenever decompressed clusters are forgotten because
    /// their host cluster was freed or released: a read that began before does not fill the
    /// cache with what it read.
    pub zcache_gen: std::sync::atomic::AtomicU64,
    pub opts: OpenOptions,
    /// Write state, for images opened writable.
    pub w: Option<crate::engine::write::WriteState>,
    /// Whether the image looks metadata-preallocated (qemu's heuristic), computed once.
    pub prealloc: tokio::sync::OnceCell<bool>,
    /// The repair done when this dirty image was opened for writing, reported by a later
    /// `check -r` on the same handle.
    pub open_repair: Mutex<Option<crate::jobs::repair::Pass>>,
    /// Why the handle refuses changes (see `engine/poison.rs`), if it does.
    pub poisoned: Mutex<Option<String>>,
    /// QEMU-compatible locks on the image and data file, released when the last clone of
    /// the handle goes (backing files hold their own in their handles).
    /// Each with whether it is the data file's and the file's name (for messages).
    locks: Mutex<Vec<(bool, PathBuf, lock::FileLock)>>,
    /// Opened for check with damaged metadata (the first problem found): guest I/O through
    /// this handle is refused, since the engine relies on what a normal open validates.
    pub damage: Option<String>,
}

/// An open qcow2 image. Cheap to clone (shared handle); safe to use from many tasks and threads.
#[derive(Clone)]
pub struct Image {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn resolve_name(base: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}
impl Image {
    /// Open the qcow2 image at `path`.
    pub async fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let mut seen = HashSet::new();
        Self::open_chain(path, opts, &mut seen, 0).await
    }

    fn open_chain<'a>(
        path: &'a Path,
        opts: &'a OpenOptions,
        seen: &'a mut HashSet<PathBuf>,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Image>> + Send + 'a>> {
        Box::pin(async move {
            let canon = std::fs::canonicalize(path)
                .map_err(|e| Error::io(e, path.display().to_string()))?;
            if !seen.insert(canon.clone()) {
                return Err(Error::new(
                    crate::ErrorKind::Loop,
                    format!(
                        "{}: backing chain loop (the image is its own backing file)",
                        path.display()
                    ),
                ));
            }
            if depth > opts.max_chain {
                return Err(Error::new(
                    crate::ErrorKind::Loop,
                    format!(
                        "{}: backing chain longer than {} images",
                        path.display(),
                        opts.max_chain
                    ),
                ));
            }
            Self::open_one(path, None, None, opts, seen, depth)
                .await
                .map_err(|e| {
                    if e.message().starts_with(&path.display().to_string()) {
                        e
                    } else {
                        e.context(path.display())
                    }
                })
        })
    }

    /// Open an image whose file is `file` (any [`Storage`], e.g. a fault-injecting one in
    /// tests). `path` names it in messages and anchors relative backing/data file names.
    pub async fn open_storage(
        file: Arc<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let mut seen = HashSet::new();
        Self::open_one(path, Some(file), None, opts, &mut seen, 0)
            .await
            .map_err(|e| e.context(path.display()))
    }

    /// [`Image::open_storage`] for an image with an external data file, whose storage is
    /// `data` (instead of the file the image or `opts.data_file` names; `data_path` names it
    /// in messages). An image without an external data file does not use `data`.
    pub async fn open_storage_with_data(
        file: Arc<dyn Storage>,
        path: &Path,
        data: Arc<dyn Storage>,
        data_path: &Path,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let mut seen = HashSet::new();
        let data = Some((data, data_path.to_path_buf()));
        Self::open_one(path, Some(file), data, opts, &mut seen, 0)
            .await
            .map_err(|e| e.context(path.display()))
    }

    async fn open_one(
        path: &Path,
        storage: Option<Arc<dyn Storage>>,
        data_storage: Option<(Arc<dyn Storage>, PathBuf)>,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
        depth: usize,
    ) -> Result<Image> {
        let fo = opts.file_options();
        if opts.snapshot.is_some() && opts.writable {
            return Err(Error::invalid("a snapshot can only be opened read-only"));
        }
        if opts.writable && opts.force_share {
            return Err(Error::invalid(
                "force-share=on can only be used with read-only images",
            ));
        }
        let file = match storage {
            Some(s) => s,
            None => crate::io::open_file(path, &fo).map_err(|e| Error::io(e, "open"))?,
        };
        // Locks before the first read, as QEMU attaches its permissions before the format
        // driver reads the header; held by `Inner` for the handle's life.
        let mut locks = Vec::new();
        locks.extend(
            lock::take(
                &file,
                lock::Perms::qcow2(opts.writable, opts.force_share),
                path,
                opts,
            )?
            .map(|l| (false, path.to_path_buf(), l)),
        );
        let file_len = file.len()?;
        let first = read_first_cluster(&*file, file_len).await?;
        if first.len() >= 4 && crate::format::be32(&first, 0) != header::MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)"));
        }
        let hbuf = &first[..first.len().min(file_len.max(72) as usize)];
        let (mut h, header_damage) = if opts.for_check {
            let h = Header::parse_for_check(hbuf, file_len)?;
            (h, Header::parse(hbuf, file_len).err())
        } else {
            (Header::parse(hbuf, file_len)?, None)
        };
        let layout = Layout::new(&h);
        let mut h_l1_off = h.l1_table_offset;
        if opts.writable && h.corrupt() && !opts.for_repair {
            return Err(Error::read_only(
                "image is marked corrupt; it can only be opened read-only (or repaired)",
            ));
        }

        // L1 table.
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        file.read_at(&mut l1, h.l1_table_offset)
            .await
            .map_err(|e| Error::io(e, "reading the L1 table"))?;
        let mut l1: Vec<u64> = l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let cs = layout.cluster_size;
        // Damage that `check` reports: a normal open refuses the image; an open for check
        // records the first problem (the handle then refuses guest I/O) and goes on.
        let mut damage: Option<String> = header_damage.map(|e| e.message().to_string());
        let mut found = |msg: String| -> Result<()> {
            if opts.for_check {
                damage.get_or_insert(msg);
                Ok(())
            } else {
                Err(Error::corrupt(msg))
            }
        };
        for (i, &e) in l1.iter().enumerate() {
            let off = l2::l1_offset(e);
            if !off.is_multiple_of(cs) {
                found(format!(
                    "L1 entry {i}: L2 table offset 0x{off:x} is not cluster aligned"
                ))?;
            } else if off != 0 && off.saturating_add(cs) > file_len.div_ceil(cs) * cs {
                found(format!(
                    "L1 entry {i}: L2 table at 0x{off:x} lies beyond the end of the file"
                ))?;
            }
        }
        // Refcount table.
        let mut rt = vec![0u8; h.refcount_table_clusters as usize * cs as usize];
        file.read_at(&mut rt, h.refcount_table_offset)
            .await
            .map_err(|e| Error::io(e, "reading the refcount table"))?;
        let reftable: Vec<u64> = rt
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & !511;
            if off % cs != 0 {
                found(format!(
                    "refcount table entry {i}: refcount block offset 0x{off:x} is not cluster aligned"
                ))?;
            }
        }
        // Snapshots: for check, entries as stored (the check reports what is wrong with them),
        // and a table reaching past the end of the file reads as zeros, as in QEMU.
        let snapshots = if h.nb_snapshots > 0 {
            let (snaps, problem) = read_snapshots(&*file, &h, file_len, opts.for_check).await?;
            if let Some(p) = problem {
                found(p)?;
            }
            snaps
        } else {
            Vec::new()
        };
        // A snapshot's content instead of the active state.
        if let Some(key) = &opts.snapshot {
            let sn = key
                .find(&snapshots)
                .map(|i| snapshots[i].clone())
                .ok_or_else(|| {
                    Error::new(
                        crate::ErrorKind::NotFound,
                        format!("Can't find snapshot '{}'", key.text()),
                    )
                })?;
            let bytes = sn.l1_size as u64 * 8;
            if !sn.l1_table_offset.is_multiple_of(cs)
                || sn.l1_table_offset.saturating_add(bytes) > file_len
            {
                return Err(Error::corrupt(format!(
                    "L1 table of snapshot '{}' lies beyond the end of the file",
                    sn.name
                )));
            }
            let mut b = vec![0u8; bytes as usize];
            file.read_at(&mut b, sn.l1_table_offset)
                .await
                .map_err(|e| Error::io(e, "reading a snapshot L1 table"))?;
            l1 = b
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            for (i, &e) in l1.iter().enumerate() {
                let off = l2::l1_offset(e);
                if !off.is_multiple_of(cs) || off.saturating_add(cs) > file_len.div_ceil(cs) * cs {
                    return Err(Error::corrupt(format!(
                        "snapshot '{}': L1 entry {i}: L2 table offset 0x{off:x} is invalid",
                        sn.name
                    )));
                }
            }
            h.size = sn.disk_size.unwrap_or(h.size);
            if h.size > header::MAX_VIRTUAL_SIZE {
                return Err(Error::corrupt(format!(
                    "snapshot '{}': its virtual size is invalid",
                    sn.name
                )));
            }
            h.l1_size = sn.l1_size;
            h.l1_table_offset = sn.l1_table_offset;
            h_l1_off = sn.l1_table_offset;
        }
        // Bitmaps.
        let bitmaps = match &h.bitmaps {
            Some(ext) if h.autoclear_features & header::AUTOCLEAR_BITMAPS != 0 => {
                match read_bitmap_dir(&*file, ext, h.size, cs, file_len).await {
                    Ok(b) => b,
                    // `check` examines the directory itself.
                    Err(_) if opts.for_check => Vec::new(),
                    Err(e) => return Err(e),
                }
            }
            _ => Vec::new(),
        };

        // External data file.
        let (data, data_path) = if let (true, Some((d, p))) = (h.has_data_file(), data_storage) {
            (d, Some(p))
        } else if h.has_data_file() {
            let p = match (&opts.data_file, &h.data_file) {
                (Some(p), _) => p.clone(),
                (None, Some(name)) => {
                    if opts.no_external_files {
                        return Err(Error::invalid(format!(
                            "image names an external data file '{name}'; refused because external files are disabled"
                        )));
                    }
                    resolve_name(path, name)
                }
                (None, None) => {
                    return Err(Error::invalid(
                        "image needs an external data file but names none",
                    ));
                }
            };
            let f = crate::io::open_file(&p, &fo)
                .map_err(|e| Error::io(e, format!("data file '{}'", p.display())))?;
            locks.extend(
                lock::take(
                    &f,
                    lock::Perms::data_file(opts.writable, opts.force_share),
                    &p,
                    opts,
                )
                .map_err(|e| e.context(format!("data file '{}'", p.display())))?
                .map(|l| (true, p.clone(), l)),
            );
            (f, Some(p))
        } else {
            (file.clone(), None)
        };

        // Backing file: the caller's override, or the one the image names.
        let backing_src = if opts.no_backing {
            None
        } else if let Some(p) = &opts.backing_file {
            Some((p.clone(), p.display().to_string(), opts.backing_format))
        } else if let Some(name) = &h.backing_file {
            if opts.no_external_files {
                return Err(Error::invalid(format!(
                    "image names a backing file '{name}'; refused because external files are disabled"
                )));
            }
            let fmt = match h.backing_format.as_deref() {
                Some(f) => Some(Format::parse(f).ctx(format!("backing file '{name}'"))?),
                None => None,
            };
            Some((resolve_name(path, name), name.clone(), fmt))
        } else {
            None
        };
        let backing = match backing_src {
            Some((bpath, name, fmt)) => {
                // The chain shares one cache budget: the backing chain gets half of it
                // (and passes half of that on), this image keeps the rest; the total across
                // the chain stays within `cache_size`.
                let bopts = OpenOptions {
                    writable: false,
                    cache_size: opts.cache_size / 2,
                    data_file: None,
                    for_check: false,
                    backing_file: None,
                    backing_format: None,
                    snapshot: None,
                    ..opts.clone()
                };
                let fmt = match fmt {
                    Some(f) => f,
                    None => crate::engine::disk::probe(&bpath)
                        .await
                        .map_err(|e| e.context(format!("backing file '{name}'")))?,
                };
                Some(match fmt {
                    Format::Qcow2 => Disk::Qcow2(
                        Self::open_chain(&bpath, &bopts, seen, depth + 1)
                            .await
                            .map_err(|e| e.context(format!("backing file '{name}'")))?,
                    ),
                    Format::Raw => Disk::Raw(
                        crate::engine::disk::RawDisk::open(&bpath, &bopts)
                            .map_err(|e| e.context("backing file"))?,
                    ),
                })
            }
            None => None,
        };

        let slice = layout.slice_size as usize;
        let own_cache = match &backing {
            Some(Disk::Qcow2(_)) => opts.cache_size - opts.cache_size / 2,
            _ => opts.cache_size,
        };
        // L2 tables and refcount blocks share one budget (see `engine/cache.rs`).
        let pool = crate::engine::cache::CachePool::new(slice, own_cache, 2);
        // One decompressed-cluster cache of ZCACHE_BYTES (at least two clusters of the
        // largest cluster size) for the whole chain: taken over from the backing file.
        let zentries =
            NonZeroUsize::new((ZCACHE_BYTES / cs).max(2) as usize).unwrap_or(NonZeroUsize::MIN);
        let zcache = match &backing {
            Some(Disk::Qcow2(b)) => {
                let z = b.inner.zcache.clone();
                {
                    let mut g = z.lock();
                    if g.cap() > zentries {
                        g.resize(zentries);
                    }
                }
                z
            }
            _ => Arc::new(Mutex::new(LruCache::new(zentries))),
        };
        let inner = Inner {
            path: path.to_path_buf(),
            file,
            data,
            data_path,
            header: RwLock::new(h),
            layout,
            l1_in_file: file_len.saturating_sub(h_l1_off) / 8,
            file_len_at_open: file_len,
            l1: crate::engine::overlap::OffsetTable::new(l1, l2::OFFSET_MASK, cs),
            reftable: crate::engine::overlap::OffsetTable::new(reftable, !511, cs),
            l2_cache: SliceCache::in_pool("L2 table", pool.clone(), 0),
            rc_cache: SliceCache::in_pool("refcount block", pool, 1),
            snapshots: RwLock::new(snapshots),
            bitmaps: RwLock::new(bitmaps),
            backing,
            zcache,
            zdepth: depth,
            zcache_gen: std::sync::atomic::AtomicU64::new(0),
            opts: opts.clone(),
            w: if opts.writable {
                Some(crate::engine::write::WriteState::new(file_len.div_ceil(cs)))
            } else {
                None
            },
            prealloc: tokio::sync::OnceCell::new(),
            open_repair: Mutex::new(None),
            poisoned: Mutex::new(None),
            locks: Mutex::new(locks),
            damage,
        };
        let img = Image {
            inner: Arc::new(inner),
        };
        if opts.writable && img.inner.header.read().dirty() {
            img.repair_dirty_on_open().await?;
        }
        Ok(img)
    }

    /// Refuse guest I/O on a handle opened for check on damaged metadata.
    pub(crate) fn check_usable(&self) -> Result<()> {
        match &self.inner.damage {
            None => Ok(()),
            Some(d) => Err(Error::corrupt(format!(
                "{}: {d} (the image was opened for check only)",
                self.inner.path.display()
            ))),
        }
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.inner.header.read().size
    }
    /// Path as opened.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// A copy of the header.
    pub fn header(&self) -> Header {
        self.inner.header.read().clone()
    }
    /// Geometry.
    pub fn layout(&self) -> Layout {
        self.inner.layout
    }
    /// Change the locks this handle holds to a writable user's (`true`) or a read-only
    /// user's, on the same files, as QEMU does when a job reopens a node read-write
    /// (`qemu-img commit` on its base): another process using the image in a way that
    /// conflicts makes this fail and the locks stay as they were. The handle itself stays
    /// as opened. Nothing happens for a handle opened without locks.
    pub(crate) fn set_lock_writable(&self, writable: bool) -> Result<()> {
        let force_share = self.inner.opts.force_share && !writable;
        let mut locks = self.inner.locks.lock();
        let perms = |data: bool, writable: bool, force_share: bool| {
            if data {
                lock::Perms::data_file(writable, force_share)
            } else {
                lock::Perms::qcow2(writable, force_share)
            }
        };
        for i in 0..locks.len() {
            let (data, name, l) = &mut locks[i];
            if let Err(e) = l.change(perms(*data, writable, force_share), name) {
                // Put back the ones already changed.
                let (old, fs) = (self.inner.opts.writable, self.inner.opts.force_share);
                for (data, name, l) in locks.iter_mut().take(i) {
                    let _ = l.change(perms(*data, old, fs), name);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The backing disk.
    pub fn backing(&self) -> Option<&Disk> {
        self.inner.backing.as_ref()
    }
    /// Internal snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.inner.snapshots.read().clone()
    }
    /// Persistent bitmaps (when the bitmaps autoclear bit is set), in directory order.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.inner.bitmaps.read().clone()
    }
    /// The external data file path, if any.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.inner.data_path.as_deref()
    }
    /// The image file's storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.file
    }
    /// The storage holding guest data (the image file or the external data file).
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.inner.data
    }
    /// Bytes allocated on the host for the image file.
    pub fn actual_size(&self) -> Result<u64> {
        self.inner
            .file
            .allocated_size()
            .ctx(self.inner.path.display())
    }
    /// The open options.
    pub fn options(&self) -> &OpenOptions {
        &self.inner.opts
    }
    /// A copy of the active L1 table.
    pub fn l1_table(&self) -> Vec<u64> {
        self.inner.l1.read().clone()
    }
    /// Most bytes this image's metadata caches (L2 tables, refcount blocks) keep; the
    /// backing files' caches are theirs (see [`OpenOptions::cache_size`]).
    pub fn metadata_cache_capacity(&self) -> usize {
        // One pool for both.
        self.inner.l2_cache.capacity()
    }
    /// Bytes of this image's decompressed clusters held now in the decompressed-cluster
    /// cache, which the whole backing chain shares (4 MiB, or two clusters of the largest
    /// cluster size, for the chain together).
    pub fn decompressed_cache_bytes(&self) -> usize {
        let z = self.inner.zcache.lock();
        z.iter()
            .filter(|(k, _)| k.0 == self.inner.zdepth)
            .map(|(_, v)| v.len())
            .sum()
    }
    /// A copy of the refcount table.
    pub fn refcount_table(&self) -> Vec<u64> {
        self.inner.reftable.read().clone()
    }

    /// Make every completed write durable, and what the enabled persistent bitmaps recorded
    /// of them (they stay marked in use until [`Image::close`]; see `engine/dirty.rs`).
    pub async fn flush(&self) -> Result<()> {
        if let (Some(w), true) = (self.inner.w.as_ref(), self.tracking_active()) {
            let _gate = w.alloc_gate.read().await;
            let mut m = w.meta.lock().await;
            self.store_changes(&mut m).await?;
            return self.flush_metadata(&mut m).await;
        }
        self.flush_all().await
    }

    /// Flush and close. Other clones of this handle stay usable.
    /// Enabled persistent bitmaps that recorded changes are stored first (see
    /// `engine/dirty.rs`): an image dropped without `close` leaves them in use
    /// (inconsistent), as a crash does.
    pub async fn close(self) -> Result<()> {
        self.stop_tracking().await?;
        self.flush().await?;
        // Give back the space reserved ahead of allocations (see `reserve_space`).
        if let Some(w) = &self.inner.w {
            let m = w.meta.lock().await;
            let end =
                (m.high_water << self.inner.layout.cluster_bits).max(self.inner.file_len_at_open);
            if m.reserved_end > end && self.inner.file.len().map_err(Error::from)? > end {
                self.inner.file.set_len(end).map_err(|e| {
                    Error::io(e, format!("{}: truncate", self.inner.path.display()))
                })?;
                self.inner.file.flush().await.map_err(Error::from)?;
            }
        }
        Ok(())
    }
}

/// Read and parse the snapshot table. Strict: every entry validated, the table inside the
/// file. `for_check`: the entries as stored, zeros past the end of the file; the second value
/// then names the first problem a strict read would have refused.
async fn read_snapshots(
    file: &dyn Storage,
    h: &Header,
    file_len: u64,
    for_check: bool,
) -> Result<(Vec<Snapshot>, Option<String>)> {
    let mut want = 64 << 10;
    loop {
        let avail = if for_check {
            u64::MAX
        } else {
            file_len.saturating_sub(h.snapshots_offset)
        };
        let n = want.min(avail).min(snapshot::MAX_TABLE_BYTES);
        let mut buf = vec![0u8; n as usize];
        file.read_at(&mut buf, h.snapshots_offset)
            .await
            .map_err(|e| Error::io(e, "reading the snapshot table"))?;
        let parsed = if for_check {
            snapshot::parse_table_unchecked(&buf, h.nb_snapshots).map(|snaps| {
                let problem = snapshot::validate(&snaps, h.cluster_size())
                    .err()
                    .map(|e| e.message().to_string())
                    .or_else(|| {
                        let len = snapshot::table_len(&snaps);
                        (h.snapshots_offset.saturating_add(len) > file_len)
                            .then(|| "snapshot table lies beyond the end of the file".to_string())
                    });
                (snaps, problem)
            })
        } else {
            snapshot::parse_table(&buf, h.nb_snapshots, h.cluster_size()).map(|s| (s, None))
        };
        match parsed {
            Ok(r) => return Ok(r),
            Err(e)
                if n < avail.min(snapshot::MAX_TABLE_BYTES)
                    && e.message().contains("truncated") =>
            {
                want *= 4
            }
            Err(e) => return Err(e),
        }
    }
}

async fn read_bitmap_dir(
    file: &dyn Storage,
    ext: &header::BitmapsExt,
    size: u64,
    cs: u64,
    file_len: u64,
) -> Result<Vec<BitmapInfo>> {
    Ok(read_bitmap_directory(file, ext, size, cs, file_len)
        .await?
        .into_iter()
        .map(|e| BitmapInfo {
            granularity: e.granularity(),
            name: e.name,
            flags: e.flags,
            table_offset: e.table_offset,
            table_size: e.table_size,
        })
        .collect())
}

/// Read and validate the bitmap directory the extension `ext` points at.
pub(crate) async fn read_bitmap_directory(
    file: &dyn Storage,
    ext: &header::BitmapsExt,
    size: u64,
    cs: u64,
    file_len: u64,
) -> Result<Vec<crate::format::bitmaps::DirEntry>> {
    use crate::format::bitmaps;
    if ext.directory_size == 0
        || ext.directory_size > bitmaps::MAX_DIRECTORY_SIZE
        || !ext.directory_offset.is_multiple_of(cs)
        || ext.directory_offset == 0
        || ext.directory_offset.saturating_add(ext.directory_size) > file_len
    {
        return Err(Error::corrupt(format!(
            "bitmap directory (0x{:x}, {} bytes) is misplaced, too large or beyond the end of the file",
            ext.directory_offset, ext.directory_size
        )));
    }
    let mut buf = vec![0u8; ext.directory_size as usize];
    file.read_at(&mut buf, ext.directory_offset)
        .await
        .map_err(|e| Error::io(e, "reading the bitmap directory"))?;
    bitmaps::parse_directory(&buf, ext.nb_bitmaps, size, cs, file_len)
}

/// Bytes read first when opening: the header and its extensions of an image whose clusters
/// are at most this large (64 KiB, the default).
const FIRST_READ: u64 = 64 << 10;

/// The image's first cluster (the header and its extensions; the parser looks no further),
/// or the whole file if shorter, zero-padded to at least a version 3 header. The cluster
/// size is not known before the header is read: [`FIRST_READ`] bytes are read, and the rest
/// of a larger cluster after them. (Reading the largest cluster size, 2 MiB, every time cost
/// a 1.75 MiB O_DIRECT read at each open of an image whose first 2 MiB hold data.)
async fn read_first_cluster(file: &dyn Storage, file_len: u64) -> Result<Vec<u8>> {
    let want = |n: u64| n.min(file_len).max(header::V3_HEADER_LEN as u64) as usize;
    let mut first = vec![0u8; want(FIRST_READ)];
    file.read_at(&mut first, 0)
        .await
        .map_err(|e| Error::io(e, "reading the header"))?;
    let bits = crate::format::be32(&first, 20);
    if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        let done = first.len();
        let all = want(1u64 << bits);
        if all > done {
            first.resize(all, 0);
            file.read_at(&mut first[done..], done as u64)
                .await
                .map_err(|e| Error::io(e, "reading the header"))?;
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemStorage;

    /// Each of QEMU's five names parses to a mode that names itself again, through the
    /// options it sets; the combinations QEMU has no name for have none.
    #[test]
    fn cache_mode_names_round_trip() {
        for name in ["writeback", "writethrough", "unsafe", "none", "directsync"] {
            let mut o = OpenOptions::default();
            CacheMode::parse(name).unwrap().apply(&mut o);
            assert_eq!(CacheMode::of(&o).name(), Some(name));
        }
        assert_eq!(
            CacheMode::of(&OpenOptions::default()).name(),
            Some("writeback")
        );
        let mut o = OpenOptions {
            no_flush: true,
            write_through: true,
            ..Default::default()
        };
        assert_eq!(CacheMode::of(&o).name(), None);
        o.write_through = false;
        o.direct = true;
        assert_eq!(CacheMode::of(&o).name(), None);
    }

    /// An image made by `create_qcow2` with these options, its file padded with zeros to
    /// 4 MiB (as an image with data in its first clusters is), in memory.
    async fn image_bytes(co: crate::create::CreateOptions) -> (Vec<u8>, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.qcow2");
        crate::create::create_qcow2(&path, &co).await.unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.resize(bytes.len().max(4 << 20), 0);
        (bytes, path)
    }

    /// Opening reads the first cluster for the header, not the largest cluster size: an
    /// image with 64 KiB clusters read 2 MiB at offset 0 (a 1.75 MiB O_DIRECT read on
    /// every open when the first 2 MiB hold data).
    #[test]
    fn open_reads_the_first_cluster_only() {
        crate::io::block_on(async {
            let (bytes, path) = image_bytes(crate::create::CreateOptions {
                size: Some(64 << 20),
                cluster_size: 65536,
                ..Default::default()
            })
            .await;
            let file = Arc::new(MemStorage::from_vec(bytes));
            let img = Image::open_storage(file.clone(), &path, &Default::default())
                .await
                .unwrap();
            assert_eq!(img.size(), 64 << 20);
            // The header cluster, the L1 table and the refcount table: 64 KiB each at most.
            assert!(
                file.read_bytes() <= 3 * 65536,
                "open read {} bytes",
                file.read_bytes()
            );
        })
    }

    /// With clusters larger than the first read, the header's extensions are read to the
    /// end of the first cluster (here the backing file name and format).
    #[test]
    fn open_reads_a_large_first_cluster_whole() {
        crate::io::block_on(async {
            let (mut bytes, path) = image_bytes(crate::create::CreateOptions {
                size: Some(64 << 20),
                cluster_size: 2 << 20,
                backing_file: Some("base.raw".into()),
                backing_format: Some("raw".into()),
                unsafe_backing: true,
                ..Default::default()
            })
            .await;
            let file = Arc::new(MemStorage::from_vec(bytes.clone()));
            let h = Header::parse(&bytes[..2 << 20], bytes.len() as u64).unwrap();
            assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
            let opts = OpenOptions {
                no_backing: true,
                ..Default::default()
            };
            let img = Image::open_storage(file.clone(), &path, &opts)
                .await
                .unwrap();
            assert_eq!(img.header().backing_file.as_deref(), Some("base.raw"));
            assert_eq!(img.header().backing_format.as_deref(), Some("raw"));
            // Moved past the first 64 KiB, the backing file name is still found.
            let (off, len) = (h.backing_file_offset as usize, h.backing_file_size as usize);
            let name = bytes[off..off + len].to_vec();
            bytes[off..off + len].fill(0);
            let moved = 1 << 20;
            bytes[moved..moved + len].copy_from_slice(&name);
            bytes[8..16].copy_from_slice(&(moved as u64).to_be_bytes());
            let file = Arc::new(MemStorage::from_vec(bytes));
            let img = Image::open_storage(file, &path, &opts).await.unwrap();
            assert_eq!(img.header().backing_file.as_deref(), Some("base.raw"));
        })
    }
}
