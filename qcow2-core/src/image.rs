//! An open qcow2 image: open, read, map, flush, close.

use crate::cache::SliceCache;
use crate::compress;
use crate::disk::{check_range, Disk, Format, LayerStatus};
use crate::format::header::{self, Header};
use crate::format::l2::{self, ClusterEntry, SubState};
use crate::format::snapshot::{self, Snapshot};
use crate::format::{be64, refcount};
use crate::io::{EngineKind, FileOptions, Storage};
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

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// I/O engine for every file of the chain.
    pub engine: EngineKind,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Total bytes of metadata cache (L2 tables and refcount blocks) per image.
    pub cache_size: usize,
    /// Refuse to open any file named inside the image (backing file, data file): for
    /// untrusted images.
    pub no_external_files: bool,
    /// Longest backing chain accepted.
    pub max_chain: usize,
    /// Use this external data file instead of the name in the image.
    pub data_file: Option<PathBuf>,
    /// Do not open the backing file (reads of unallocated clusters fail).
    pub no_backing: bool,
    /// Open for `check -r`: a writable open of a corrupt-marked image is allowed (writes other
    /// than the repair's are still refused while the corrupt bit is set).
    pub for_repair: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            engine: EngineKind::Auto,
            direct: false,
            cache_size: DEFAULT_CACHE_SIZE,
            no_external_files: false,
            max_chain: DEFAULT_MAX_CHAIN,
            data_file: None,
            no_backing: false,
            for_repair: false,
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
    pub l1: RwLock<Vec<u64>>,
    /// L1 entries that lie inside the file at open (a truncated file cuts the table short).
    pub l1_in_file: u64,
    /// File length at open, for validating data offsets of read-only images.
    pub file_len_at_open: u64,
    pub reftable: RwLock<Vec<u64>>,
    pub l2_cache: SliceCache,
    pub rc_cache: SliceCache,
    pub snapshots: RwLock<Vec<Snapshot>>,
    pub bitmaps: Vec<BitmapInfo>,
    pub backing: Option<Disk>,
    pub zcache: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    pub opts: OpenOptions,
    /// Write state, for images opened writable.
    pub w: Option<crate::write::WriteState>,
    /// Whether the image looks metadata-preallocated (qemu's heuristic), computed once.
    pub prealloc: tokio::sync::OnceCell<bool>,
    /// The repair done when this dirty image was opened for writing, reported by a later
    /// `check -r` on the same handle.
    pub open_repair: Mutex<Option<crate::repair::Pass>>,
}

/// An open qcow2 image. Cheap to clone (shared handle); safe to use from many tasks and threads.
#[derive(Clone)]
pub struct Image {
    pub(crate) inner: Arc<Inner>,
}

/// Where a guest range is, at this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub state: SubState,
    pub len: u64,
    /// Host offset of the cluster for unallocated subclusters of an allocated cluster.
    pub alloc_host: Option<u64>,
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
            Self::open_one(path, None, opts, seen, depth)
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
        Self::open_one(path, Some(file), opts, &mut seen, 0)
            .await
            .map_err(|e| e.context(path.display()))
    }

    async fn open_one(
        path: &Path,
        storage: Option<Arc<dyn Storage>>,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
        depth: usize,
    ) -> Result<Image> {
        let fo = FileOptions {
            writable: opts.writable,
            direct: opts.direct,
            engine: opts.engine,
            ..Default::default()
        };
        let file = match storage {
            Some(s) => s,
            None => crate::io::open_file(path, &fo).map_err(|e| Error::io(e, "open"))?,
        };
        let file_len = file.len()?;
        let mut first =
            vec![0u8; (2 << 20).min(file_len.max(header::V3_HEADER_LEN as u64)) as usize];
        file.read_at(&mut first, 0)
            .await
            .map_err(|e| Error::io(e, "reading the header"))?;
        if first.len() >= 4 && crate::format::be32(&first, 0) != header::MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)"));
        }
        let h = Header::parse(
            &first[..first.len().min(file_len.max(72) as usize)],
            file_len,
        )?;
        let layout = Layout::new(&h);
        let h_l1_off = h.l1_table_offset;
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
        let l1: Vec<u64> = l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let cs = layout.cluster_size;
        for (i, &e) in l1.iter().enumerate() {
            let off = l2::l1_offset(e);
            if !off.is_multiple_of(cs) {
                return Err(Error::corrupt(format!(
                    "L1 entry {i}: L2 table offset 0x{off:x} is not cluster aligned"
                )));
            }
            if off != 0 && off.saturating_add(cs) > file_len.div_ceil(cs) * cs {
                return Err(Error::corrupt(format!(
                    "L1 entry {i}: L2 table at 0x{off:x} lies beyond the end of the file"
                )));
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
                return Err(Error::corrupt(format!(
                    "refcount table entry {i}: refcount block offset 0x{off:x} is not cluster aligned"
                )));
            }
        }
        // Snapshots.
        let snapshots = if h.nb_snapshots > 0 {
            read_snapshots(&*file, &h, file_len).await?
        } else {
            Vec::new()
        };
        // Bitmaps.
        let bitmaps = match &h.bitmaps {
            Some(ext) if h.autoclear_features & header::AUTOCLEAR_BITMAPS != 0 => {
                read_bitmap_dir(&*file, ext, file_len).await?
            }
            _ => Vec::new(),
        };

        // External data file.
        let (data, data_path) = if h.has_data_file() {
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
            (f, Some(p))
        } else {
            (file.clone(), None)
        };

        // Backing file.
        let backing = match &h.backing_file {
            Some(name) if !opts.no_backing => {
                if opts.no_external_files {
                    return Err(Error::invalid(format!(
                        "image names a backing file '{name}'; refused because external files are disabled"
                    )));
                }
                let bpath = resolve_name(path, name);
                let fmt = match h.backing_format.as_deref() {
                    Some(f) => Some(Format::parse(f).ctx(format!("backing file '{name}'"))?),
                    None => None,
                };
                let bopts = OpenOptions {
                    writable: false,
                    data_file: None,
                    ..opts.clone()
                };
                let fmt = match fmt {
                    Some(f) => f,
                    None => crate::disk::probe(&bpath)
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
                        crate::disk::RawDisk::open(&bpath, &bopts)
                            .map_err(|e| e.context("backing file"))?,
                    ),
                })
            }
            _ => None,
        };

        let slice = layout.slice_size as usize;
        let l2_cap = opts.cache_size * 3 / 4;
        let rc_cap = opts.cache_size - l2_cap;
        let zentries = ((4u64 << 20) / cs).max(2) as usize;
        let inner = Inner {
            path: path.to_path_buf(),
            file,
            data,
            data_path,
            header: RwLock::new(h),
            layout,
            l1_in_file: file_len.saturating_sub(h_l1_off) / 8,
            file_len_at_open: file_len,
            l1: RwLock::new(l1),
            reftable: RwLock::new(reftable),
            l2_cache: SliceCache::new("L2 table", slice, l2_cap),
            rc_cache: SliceCache::new("refcount block", slice, rc_cap),
            snapshots: RwLock::new(snapshots),
            bitmaps,
            backing,
            zcache: Mutex::new(LruCache::new(NonZeroUsize::new(zentries).unwrap())),
            opts: opts.clone(),
            w: if opts.writable {
                Some(crate::write::WriteState::new(file_len.div_ceil(cs)))
            } else {
                None
            },
            prealloc: tokio::sync::OnceCell::new(),
            open_repair: Mutex::new(None),
        };
        let img = Image {
            inner: Arc::new(inner),
        };
        if opts.writable && img.inner.header.read().dirty() {
            img.repair_dirty_on_open().await?;
        }
        Ok(img)
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
    /// The backing disk.
    pub fn backing(&self) -> Option<&Disk> {
        self.inner.backing.as_ref()
    }
    /// Internal snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.inner.snapshots.read().clone()
    }
    /// Persistent bitmaps (when the bitmaps autoclear bit is set).
    pub fn bitmaps(&self) -> &[BitmapInfo] {
        &self.inner.bitmaps
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
    /// A copy of the refcount table.
    pub fn refcount_table(&self) -> Vec<u64> {
        self.inner.reftable.read().clone()
    }

    /// Read the L2 entry (and bitmap, for extended L2) of guest cluster `gc` through the L2
    /// table at `l2_off`.
    pub(crate) async fn l2_entry(&self, l2_off: u64, idx: u64) -> Result<(u64, u64)> {
        let lay = &self.inner.layout;
        let byte = idx * lay.l2_entry_size;
        let slice_off = l2_off + byte / lay.slice_size * lay.slice_size;
        let slice = self
            .inner
            .l2_cache
            .get(&*self.inner.file, slice_off)
            .await?;
        let within = (byte % lay.slice_size) as usize;
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
    async fn l2_run(&self, l2_off: u64, first: u64, max: u64) -> Result<Vec<(u64, u64)>> {
        let lay = &self.inner.layout;
        let per_slice = lay.slice_size / lay.l2_entry_size;
        let in_slice = per_slice - first % per_slice;
        let n = in_slice.min(max).min(lay.l2_entries - first);
        let slice_off = l2_off + first / per_slice * lay.slice_size;
        let slice = self
            .inner
            .l2_cache
            .get(&*self.inner.file, slice_off)
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

    fn entry_state(&self, gc: u64, e: u64, bm: u64, sc: u32) -> Result<(SubState, Option<u64>)> {
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
        let lay = self.inner.layout;
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
        let (state, alloc_host) = first.expect("at least one cluster");
        Ok(Run {
            state,
            len,
            alloc_host,
        })
    }

    /// Read `buf.len()` bytes of guest data at `off`.
    pub async fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_inner(buf, off).await.map_err(|e| self.named(e))
    }

    /// Prefix an error with the image's name unless it already names it.
    pub(crate) fn named(&self, e: Error) -> Error {
        let p = self.inner.path.display().to_string();
        if e.message().starts_with(&p) {
            e
        } else {
            e.context(p)
        }
    }

    async fn read_inner(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        let mut rest: &mut [u8] = buf;
        let mut pos = off;
        let mut futs = Vec::new();
        while !rest.is_empty() {
            let run = self.run_at(pos, rest.len() as u64).await?;
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(run.len as usize);
            rest = tail;
            futs.push(self.read_run(run, piece, pos));
            pos += run.len;
        }
        if futs.len() == 1 {
            return futs.pop().unwrap().await;
        }
        futures::future::try_join_all(futs).await?;
        Ok(())
    }

    async fn read_run(&self, run: Run, buf: &mut [u8], guest: u64) -> Result<()> {
        let lay = &self.inner.layout;
        match run.state {
            SubState::Zero => {
                buf.fill(0);
                Ok(())
            }
            SubState::Unallocated => match &self.inner.backing {
                Some(b) => b.read_padded(buf, guest).await,
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            SubState::Data(host) => {
                let host = host + (guest & (lay.sc_size - 1));
                if self.inner.w.is_none()
                    && self.inner.data_path.is_none()
                    && (host & !(lay.cluster_size - 1)) >= self.inner.file_len_at_open
                {
                    return Err(Error::corrupt(format!(
                        "L2 entry for guest offset 0x{guest:x} points at host offset 0x{host:x}, in a cluster beyond the end of the file"
                    )));
                }
                self.inner.data.read_at(buf, host).await.map_err(|e| {
                    Error::io(
                        e,
                        format!(
                            "{}: reading data at host offset 0x{host:x}",
                            self.inner.path.display()
                        ),
                    )
                })
            }
            SubState::Compressed(d) => {
                let cluster = self.decompressed(d).await?;
                let within = (guest & (lay.cluster_size - 1)) as usize;
                buf.copy_from_slice(&cluster[within..within + buf.len()]);
                Ok(())
            }
        }
    }

    /// The decompressed content of a compressed cluster (cached).
    pub(crate) async fn decompressed(&self, d: l2::CompressedDesc) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.inner.zcache.lock().get(&d.offset) {
            return Ok(c.clone());
        }
        let cs = self.inner.layout.cluster_size as usize;
        let mut input = vec![0u8; d.len as usize];
        self.inner
            .file
            .read_at(&mut input, d.offset)
            .await
            .map_err(|e| {
                Error::io(
                    e,
                    format!(
                        "{}: reading compressed cluster at 0x{:x}",
                        self.inner.path.display(),
                        d.offset
                    ),
                )
            })?;
        let ty = self.inner.header.read().compression_type();
        let out = compress::decompress_owned(ty, input, cs)
            .await
            .map_err(|e| {
                e.context(format!(
                    "{}: host offset 0x{:x}",
                    self.inner.path.display(),
                    d.offset
                ))
            })?;
        let out = Arc::new(out);
        self.inner.zcache.lock().put(d.offset, out.clone());
        Ok(out)
    }

    /// qemu's block status of the run at `off` at this layer only.
    pub async fn layer_status(&self, off: u64, len: u64) -> Result<LayerStatus> {
        self.layer_status_inner(off, len)
            .await
            .map_err(|e| self.named(e))
    }

    async fn layer_status_inner(&self, off: u64, len: u64) -> Result<LayerStatus> {
        let size = self.size();
        let len = len.min(size.saturating_sub(off));
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

    /// The refcount of host cluster index `ci` (offset / cluster_size).
    pub async fn refcount(&self, ci: u64) -> Result<u64> {
        Ok(match self.rc_slot(ci).await? {
            None => 0,
            Some((slice, i)) => {
                refcount::get(&slice.data.read(), self.inner.layout.refcount_order, i)
            }
        })
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> Result<()> {
        self.flush_all().await
    }

    /// Flush and close. Other clones of this handle stay usable.
    pub async fn close(self) -> Result<()> {
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

    /// qemu's heuristic for metadata preallocation: more clusters have a refcount than the
    /// file has allocated blocks. Then data clusters that are holes in the file read as zeros
    /// in block status.
    async fn metadata_preallocated(&self) -> Result<bool> {
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
                while i < end && count <= threshold {
                    if self.refcount(i).await? != 0 {
                        count += 1;
                    }
                    i += 1;
                }
                Ok::<bool, Error>(count > threshold)
            })
            .await
            .copied()
    }
}

async fn read_snapshots(file: &dyn Storage, h: &Header, file_len: u64) -> Result<Vec<Snapshot>> {
    let mut want = 64 << 10;
    loop {
        let avail = file_len.saturating_sub(h.snapshots_offset);
        let n = want.min(avail).min(snapshot::MAX_TABLE_BYTES);
        let mut buf = vec![0u8; n as usize];
        file.read_at(&mut buf, h.snapshots_offset)
            .await
            .map_err(|e| Error::io(e, "reading the snapshot table"))?;
        match snapshot::parse_table(&buf, h.nb_snapshots, h.cluster_size()) {
            Ok(s) => return Ok(s),
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
    file_len: u64,
) -> Result<Vec<BitmapInfo>> {
    use crate::format::{be16, be32};
    if ext.directory_size > 64 << 20
        || ext.directory_offset.saturating_add(ext.directory_size) > file_len
    {
        return Err(Error::corrupt(
            "bitmap directory lies beyond the end of the file or is too large",
        ));
    }
    let mut buf = vec![0u8; ext.directory_size as usize];
    file.read_at(&mut buf, ext.directory_offset)
        .await
        .map_err(|e| Error::io(e, "reading the bitmap directory"))?;
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..ext.nb_bitmaps {
        if off + 24 > buf.len() {
            return Err(Error::corrupt("bitmap directory is truncated"));
        }
        let e = &buf[off..];
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let gran_bits = e[17] as u32;
        let name_size = be16(e, 18) as usize;
        let extra = be32(e, 20) as usize;
        let total = 24 + extra + name_size;
        if off + total > buf.len() || gran_bits > 63 {
            return Err(Error::corrupt("bitmap directory entry is truncated"));
        }
        let name = String::from_utf8_lossy(&e[24 + extra..total]).into_owned();
        out.push(BitmapInfo {
            name,
            granularity: 1u64 << gran_bits,
            flags,
            table_offset,
            table_size,
        });
        off += total.div_ceil(8) * 8;
    }
    Ok(out)
}
