//! Creating images: qcow2 (every option qemu-img offers for the formats we write) and raw.

use crate::engine::disk::{Disk, Format};
use crate::engine::image::{Image, OpenOptions};
use crate::format::header::{self, CompressionType, FeatureKind, FeatureName, Header};
use crate::format::refcount;
use crate::io::lock::{FileLock, Perms};
use crate::io::{FileId, FileOptions, Storage};
use crate::{Error, Result, ResultExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Preallocation modes (as qemu-img `-o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing.
    #[default]
    Off,
    /// L2 tables and data cluster mappings, file sparse.
    Metadata,
    /// Metadata plus `fallocate` of the data.
    Falloc,
    /// Metadata plus writing zeros to the data.
    Full,
}

impl Preallocation {
    /// Parse qemu-img's names.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            o => Err(Error::invalid(format!(
                "invalid preallocation mode '{o}' (off, metadata, falloc or full)"
            ))),
        }
    }
}

/// Options for creating a qcow2 image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// Cluster size in bytes (512 B to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits (1 to 64, a power of two).
    pub refcount_bits: u32,
    /// Lazy refcounts (v3).
    pub lazy_refcounts: bool,
    /// Extended L2 entries (v3, cluster size at least 16 KiB).
    pub extended_l2: bool,
    /// Compression type for compressed clusters.
    pub compression_type: CompressionType,
    /// External data file name (as stored in the image; resolved against its folder).
    pub data_file: Option<String>,
    /// Keep the data file a valid raw image.
    pub data_file_raw: bool,
    /// Preallocation.
    pub preallocation: Preallocation,
    /// Backing file name (stored as given).
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// Do not open the backing file (size must then be given).
    pub unsafe_backing: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
        }
    }
}

/// The feature name table QEMU writes into v3 headers.
pub(crate) fn feature_table() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(FeatureKind::Incompatible, 0, "dirty bit"),
        f(FeatureKind::Incompatible, 1, "corrupt bit"),
        f(FeatureKind::Incompatible, 2, "external data file"),
        f(FeatureKind::Incompatible, 3, "compression type"),
        f(FeatureKind::Incompatible, 4, "extended L2 entries"),
        f(FeatureKind::Compatible, 0, "lazy refcounts"),
        f(FeatureKind::Autoclear, 0, "bitmaps"),
        f(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

impl CreateOptions {
    fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::invalid(format!(
                "cluster size must be a power of two between 512 and 2097152 bytes (got {cs})"
            )));
        }
        if self.version != 2 && self.version != 3 {
            return Err(Error::invalid("compat must be 0.10 or 1.1"));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::invalid(
                "refcount_bits must be a power of two up to 64",
            ));
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return Err(Error::invalid(
                    "refcount widths other than 16 bits require compat=1.1",
                ));
            }
            if self.lazy_refcounts {
                return Err(Error::invalid("lazy refcounts require compat=1.1"));
            }
            if self.extended_l2 {
                return Err(Error::invalid("extended L2 entries require compat=1.1"));
            }
            if self.compression_type != CompressionType::Zlib {
                return Err(Error::invalid(
                    "compression types other than zlib require compat=1.1",
                ));
            }
            if self.data_file.is_some() {
                return Err(Error::invalid("external data files require compat=1.1"));
            }
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::invalid(
                "extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::invalid("data_file_raw requires data_file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::invalid(
                "a backing file and data_file_raw cannot be used at the same time",
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(Error::invalid("backing_fmt requires a backing file"));
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return Err(Error::invalid("backing file and preallocation can only be used at the same time with preallocation=off"));
        }
        Ok(())
    }
}

/// Create a qcow2 image at `path` (replacing an existing file). Returns the virtual size.
pub async fn create_qcow2(path: &Path, opts: &CreateOptions) -> Result<u64> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    // The backing file must exist and open (unless -u); it stays open until the image is
    // written, so that its chain's locks refuse an image that is part of that chain.
    let backing = match &opts.backing_file {
        Some(b) if !opts.unsafe_backing => {
            let bpath = crate::engine::image::resolve_name(path, b);
            let fmt = match &opts.backing_format {
                Some(f) => Some(Format::parse(f)?),
                None => None,
            };
            Some(
                Disk::open(&bpath, fmt, &OpenOptions::default())
                    .await
                    .map_err(|e| e.context(format!("could not open backing file '{b}'")))?,
            )
        }
        _ => None,
    };
    // Size: given, or the backing file's.
    let size = match (opts.size, &backing) {
        (Some(s), _) => s,
        (None, Some(d)) => d.size(),
        _ => return Err(Error::invalid("image size must be given")),
    };
    let size = size.div_ceil(512) * 512;
    if size > header::MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!("image size {size} is too large")));
    }
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: if opts.version == 3 { 112 } else { 72 },
        compression_type_raw: opts.compression_type.value(),
        extra_fields: if opts.version == 3 {
            vec![0u8; 7]
        } else {
            Vec::new()
        },
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone(),
        feature_names: if opts.version == 3 {
            feature_table()
        } else {
            Vec::new()
        },
        bitmaps: None,
        crypto_header: None,
        unknown_extensions: Vec::new(),
    };
    if opts.version == 3 {
        if opts.lazy_refcounts {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        }
        if opts.extended_l2 {
            h.incompatible_features |= header::INCOMPAT_EXTL2;
        }
        if opts.compression_type != CompressionType::Zlib {
            h.incompatible_features |= header::INCOMPAT_COMPRESSION;
        }
        if opts.data_file.is_some() {
            h.incompatible_features |= header::INCOMPAT_DATA_FILE;
            if opts.data_file_raw {
                h.autoclear_features |= header::AUTOCLEAR_DATA_FILE_RAW;
            }
        }
    }
    let l1_size = h.l1_entries_for(size);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "image size {size} needs an L1 table of {} bytes (limit {}); use a larger cluster size",
            l1_size * 8,
            header::MAX_L1_BYTES
        )));
    }
    h.l1_size = l1_size as u32;
    // An empty disk has no L1 table (offset 0), as with qemu-img: a table cluster nothing
    // points at would be a leak.
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    // Fixed point: header + refcount table + refcount blocks + L1.
    let rb_entries = cs * 8 / opts.refcount_bits as u64;
    let (mut rt_clusters, mut n_rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + n_rb + l1_clusters;
        let need_rb = total.div_ceil(rb_entries);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb == n_rb && need_rt == rt_clusters {
            break;
        }
        n_rb = need_rb;
        rt_clusters = need_rt;
    }
    let total = 1 + rt_clusters + n_rb + l1_clusters;
    h.refcount_table_clusters = rt_clusters as u32;
    h.refcount_table_offset = cs;
    let rb_first = 1 + rt_clusters;
    h.l1_table_offset = if l1_clusters > 0 {
        (rb_first + n_rb) * cs
    } else {
        0
    };
    if rt_clusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(Error::invalid(
            "image too large for this cluster size and refcount width",
        ));
    }

    // Data file first, so a failure leaves no half-made image pointing at it. Nothing is
    // created or emptied that the new image would read.
    let fo = FileOptions::default();
    let dpath = opts
        .data_file
        .as_ref()
        .map(|df| crate::engine::image::resolve_name(path, df));
    refuse_own_files(path, opts, backing.as_ref(), None)?;
    if let (Some(df), Some(dpath)) = (&opts.data_file, &dpath) {
        refuse_own_files(dpath, opts, backing.as_ref(), Some(df))?;
        let d = create_file(dpath, &fo).ctx("data file")?;
        d.file.set_len(size).ctx(dpath.display())?;
    }
    let new = create_file(path, &fo)?;
    let file = new.file.clone();
    let hdr = h.to_bytes().ctx(path.display())?;
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..n_rb {
        let off = (rb_first + i) * cs;
        rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    let mut rbs = vec![0u8; (n_rb * cs) as usize];
    for c in 0..total {
        let b = (c / rb_entries) as usize;
        let blk = &mut rbs[b * cs as usize..(b + 1) * cs as usize];
        refcount::set(blk, refcount_order, (c % rb_entries) as usize, 1);
    }
    let w = |buf: Vec<u8>, off: u64| {
        let file = file.clone();
        async move { file.write_at(&buf, off).await }
    };
    w(rt, cs).await.ctx(path.display())?;
    w(rbs, rb_first * cs).await.ctx(path.display())?;
    file.set_len(total * cs).ctx(path.display())?;
    w(hdr, 0).await.ctx(path.display())?;
    file.flush().await.ctx(path.display())?;
    drop(file);
    drop(new);

    // Data mappings: preallocation, and data_file_raw (host offset == guest offset).
    if opts.preallocation != Preallocation::Off || opts.data_file_raw {
        let img = Image::open(
            path,
            &OpenOptions {
                writable: true,
                no_backing: true,
                ..Default::default()
            },
        )
        .await?;
        img.preallocate(opts.preallocation).await?;
        img.close().await?;
    }
    Ok(size)
}

/// Refuse to create (or empty) `target`, the image (`data_file` None) or its data file
/// (`data_file` = the name in the options), when it is a file the new image reads: its
/// backing file or a file of the backing file's chain, or (for the image) its data file.
/// Compares devices and inodes, so `./x`, links and other spellings are caught.
fn refuse_own_files(
    target: &Path,
    opts: &CreateOptions,
    backing: Option<&Disk>,
    data_file: Option<&str>,
) -> Result<()> {
    if data_file.is_none() {
        if let Some(df) = &opts.data_file {
            if crate::io::same_file(target, &crate::engine::image::resolve_name(target, df)) {
                return Err(Error::invalid(format!(
                    "the data file '{df}' is the image file itself"
                )));
            }
        }
    }
    if let (Some(b), None) = (&opts.backing_file, data_file) {
        if crate::io::same_file(target, &crate::engine::image::resolve_name(target, b)) {
            return Err(Error::invalid(format!(
                "Trying to create an image with the same file as its backing file '{b}'"
            )));
        }
    }
    if FileId::of(target).is_none() {
        return Ok(());
    }
    let what = match data_file {
        None => "image".to_string(),
        Some(df) => format!("data file '{df}'"),
    };
    if let Some(f) = backing.and_then(|d| d.same_file_in_chain(target)) {
        return Err(Error::invalid(format!(
            "the new {what} would overwrite '{}', a file of its own backing chain",
            f.display()
        )));
    }
    Ok(())
}

/// A file being created, with the locks that protect it until it is dropped.
pub(crate) struct NewFile {
    pub file: Arc<dyn Storage>,
    _lock: Option<FileLock>,
}

/// Create the file at `path`, or empty an existing one, as qemu-img does (`raw_co_create`):
/// open it without truncating, take the creation locks (write and resize, resize not
/// shared), and only then truncate it. A file that another process (QEMU, or one of our own
/// handles) uses is refused intact: its users unshare write, or use resize.
pub(crate) fn create_file(path: &Path, fo: &FileOptions) -> Result<NewFile> {
    let fo = FileOptions {
        writable: true,
        create: true,
        truncate: false,
        ..*fo
    };
    let file = crate::io::open_file(path, &fo).ctx(path.display())?;
    let lock = FileLock::acquire(&file, Perms::CREATE, path).ctx(path.display())?;
    file.set_len(0).ctx(path.display())?;
    Ok(NewFile { file, _lock: lock })
}

/// Create a raw image of `size` bytes (sparse unless preallocated).
pub async fn create_raw(path: &Path, size: u64, prealloc: Preallocation) -> Result<()> {
    // Rounded up to whole 512-byte sectors, as qemu-img creates them.
    let size = size
        .checked_next_multiple_of(512)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| Error::invalid(format!("image size {size} is too large")))?;
    let new = create_file(path, &FileOptions::default())?;
    let f = &new.file;
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => f.set_len(size).ctx(path.display())?,
        Preallocation::Falloc => f.allocate(0, size).await.ctx(path.display())?,
        Preallocation::Full => write_zeros_full(&**f, 0, size).await.ctx(path.display())?,
    }
    f.flush().await.ctx(path.display())?;
    Ok(())
}

/// Write real zeros over a range (preallocation=full).
pub(crate) async fn write_zeros_full(f: &dyn Storage, off: u64, len: u64) -> std::io::Result<()> {
    let z = vec![0u8; (1u64 << 20).min(len.max(1)) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(z.len() as u64) as usize;
        f.write_at(&z[..n], off + pos).await?;
        pos += n as u64;
    }
    Ok(())
}

impl Image {
    /// Map every guest cluster to a host cluster (preallocation), or to the data file at
    /// the guest offset (external data file).
    pub(crate) async fn preallocate(&self, mode: Preallocation) -> Result<()> {
        use crate::format::l2::COPIED;
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let size = self.size();
        let nclusters = size.div_ceil(cs);
        let w = self.ws()?;
        let external = self.inner.data_path.is_some();
        let mut gc = 0;
        while gc < nclusters {
            let n = (lay.l2_entries - gc % lay.l2_entries).min(nclusters - gc);
            let host = {
                let mut m = w.meta.lock().await;
                self.ensure_l2_writable(&mut m, gc).await?;
                let host = if external {
                    gc * cs
                } else {
                    self.alloc_clusters(&mut m, n).await?
                };
                for i in 0..n {
                    // Extended L2: in an external data file every subcluster is allocated
                    // (the data file's content is the guest content, as with a raw data
                    // file); in the image file the subclusters read as zeros until written.
                    let bm = match (lay.extended, external) {
                        (false, _) => 0,
                        (true, true) => 0xffff_ffffu64,
                        (true, false) => 0xffff_ffffu64 << 32,
                    };
                    self.set_l2_entry(&mut m, gc + i, (host + i * cs) | COPIED, bm)
                        .await?;
                }
                host
            };
            let len = (n * cs).min(size.saturating_sub(gc * cs).div_ceil(cs) * cs);
            match mode {
                Preallocation::Falloc => self
                    .inner
                    .data
                    .allocate(host, len)
                    .await
                    .map_err(Error::from)?,
                Preallocation::Full => write_zeros_full(&*self.inner.data, host, len)
                    .await
                    .map_err(Error::from)?,
                _ => {}
            }
            gc += n;
        }
        // The file covers every allocated cluster.
        if !external {
            let end = w.meta.lock().await.high_water * cs;
            if self.inner.file.len().map_err(Error::from)? < end {
                self.inner.file.set_len(end).map_err(Error::from)?;
            }
        }
        self.flush_all().await
    }
}

/// Parse a size as qemu-img reads one (`qemu_strtosz`): leading white space, an optional `+`,
/// a decimal number with an optional fraction and an optional suffix (`b`/`B` bytes, `k`/`K`,
/// `M`, `G`, `T`, `P`, `E`: powers of 1024), or a hexadecimal number `0x...` with neither
/// fraction nor suffix. A fraction needs a suffix unless it is zero ("1.5" is refused, "1.5M"
/// is 1.5 MiB); exponents, negative numbers, trailing characters (white space included) and
/// values past 2^64 are refused, the last with [`ErrorKind::OutOfRange`](crate::ErrorKind).
pub fn parse_size(s: &str) -> Result<u64> {
    let msg =
        || format!("invalid size '{s}' (use a number with an optional suffix k, M, G, T, P, E)");
    let bad = || Error::invalid(msg());
    // A well-formed number that does not fit in 64 bits (qemu-img's "Must be between" case).
    let big = || Error::out_of_range(msg());
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let t = t.strip_prefix('+').unwrap_or(t);
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(h, 16).map_err(|_| big());
    }
    let int_len = t.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = t.split_at(int_len);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => r.split_at(r.bytes().take_while(u8::is_ascii_digit).count()),
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    let shift = match rest.as_bytes() {
        [] => None,
        [c] => Some(match c.to_ascii_lowercase() {
            b'b' => 0,
            b'k' => 10,
            b'm' => 20,
            b'g' => 30,
            b't' => 40,
            b'p' => 50,
            b'e' => 60,
            _ => return Err(bad()),
        }),
        _ => return Err(bad()),
    };
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| big())?
    };
    let has_fraction = frac.bytes().any(|b| b != b'0');
    if has_fraction && shift.is_none() {
        return Err(bad());
    }
    let mult = 1u64 << shift.unwrap_or(0);
    let mut v = whole.checked_mul(mult).ok_or_else(big)?;
    if has_fraction {
        // The fraction's share of the unit, truncated to a byte: digits beyond 19 cannot
        // change it for units up to 2^60.
        let digits = &frac[..frac.len().min(19)];
        let scale = 10u128.pow(digits.len() as u32);
        let f: u128 = digits.parse().map_err(|_| bad())?;
        let part = u64::try_from(f * mult as u128 / scale).map_err(|_| big())?;
        v = v.checked_add(part).ok_or_else(big)?;
    }
    Ok(v)
}

/// Resolve a name stored in an image against the image's folder.
pub fn resolve(image: &Path, name: &str) -> PathBuf {
    crate::engine::image::resolve_name(image, name)
}

/// Split a qemu-img `-o` string ("a=b,c=d"; ",," is a literal comma) into pairs.
pub fn split_options(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut items = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    for it in items.into_iter().filter(|i| !i.is_empty()) {
        match it.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((it, "on".to_string())),
        }
    }
    Ok(out)
}

/// Whether a `-o` string asks for the option list instead (`help` or `?` among its items), as
/// qemu-img accepts it in create, convert, amend and measure.
pub fn wants_option_help(s: &str) -> bool {
    s.split(',').any(|i| i == "help" || i == "?")
}

/// The `-o` options of a format, as qemu-img lists them: (name, value type, description,
/// whether `amend` takes it).
const QCOW2_OPTIONS: &[(&str, &str, &str, bool)] = &[
    ("backing_file", "str", "File name of a base image", true),
    ("backing_fmt", "str", "Image format of the base image", true),
    ("cluster_size", "size", "qcow2 cluster size", false),
    (
        "compat",
        "str",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
        true,
    ),
    (
        "compression_type",
        "str",
        "Compression method used for image cluster compression",
        false,
    ),
    (
        "data_file",
        "str",
        "File name of an external data file",
        true,
    ),
    (
        "data_file_raw",
        "bool (on/off)",
        "The external data file must stay valid as a raw image",
        true,
    ),
    ("extended_l2", "bool (on/off)", "Extended L2 tables", false),
    (
        "lazy_refcounts",
        "bool (on/off)",
        "Postpone refcount updates",
        true,
    ),
    (
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
        false,
    ),
    (
        "refcount_bits",
        "num",
        "Width of a reference count entry in bits",
        true,
    ),
    ("size", "size", "Virtual disk size", true),
];

/// qemu-img's `-o help` text for `fmt`: the creation options (`amend` false) or the ones
/// `amend` changes. Encryption options, which qemu-img lists too, are left out: we neither
/// create nor amend encrypted images (giving one is refused as not supported).
/// Raw images have nothing to amend: an error, worded as qemu-img's.
pub fn options_help(fmt: Format, amend: bool) -> Result<String> {
    let mut out = match (fmt, amend) {
        (Format::Qcow2, false) => "Supported qcow2 options:\n".to_string(),
        (Format::Qcow2, true) => "Amend options for 'qcow2':\n".to_string(),
        (Format::Raw, false) => "Supported raw options:\n".to_string(),
        (Format::Raw, true) => {
            return Err(Error::unsupported(
                "Format driver 'raw' does not support option amendment",
            ))
        }
    };
    for (name, kind, help, amendable) in QCOW2_OPTIONS {
        if (fmt == Format::Raw && *name != "size") || (amend && !amendable) {
            continue;
        }
        let left = format!("{name}=<{kind}>");
        out.push_str(&format!("  {left:<22} - {help}\n"));
    }
    if !amend {
        out.push_str(
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
        );
    }
    Ok(out)
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid(format!(
            "parameter '{k}' expects 'on' or 'off' (got '{v}')"
        ))),
    }
}

impl CreateOptions {
    /// Apply one qemu-img creation option (`-o key=value`).
    pub fn set(&mut self, key: &str, v: &str) -> Result<()> {
        match key {
            "size" => self.size = Some(parse_size(v)?),
            "cluster_size" => self.cluster_size = parse_size(v)?,
            "compat" => {
                self.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(Error::invalid(format!(
                            "invalid compat level '{v}' (0.10 or 1.1)"
                        )))
                    }
                }
            }
            "refcount_bits" => {
                self.refcount_bits = v
                    .parse()
                    .map_err(|_| Error::invalid(format!("invalid refcount_bits '{v}'")))?
            }
            "lazy_refcounts" => self.lazy_refcounts = parse_bool(key, v)?,
            "extended_l2" => self.extended_l2 = parse_bool(key, v)?,
            "compression_type" => {
                self.compression_type = match v {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => {
                        return Err(Error::invalid(format!(
                            "invalid compression_type '{v}' (zlib or zstd)"
                        )))
                    }
                }
            }
            "data_file" => self.data_file = Some(v.to_string()),
            "data_file_raw" => self.data_file_raw = parse_bool(key, v)?,
            "preallocation" => self.preallocation = Preallocation::parse(v)?,
            "backing_file" => self.backing_file = Some(v.to_string()),
            "backing_fmt" => self.backing_format = Some(v.to_string()),
            k if k == "encryption" || k.starts_with("encrypt.") => {
                return Err(Error::unsupported(format!(
                    "Parameter '{k}' is not supported: qcow2rs does not create encrypted images"
                )))
            }
            _ => return Err(Error::invalid(format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }

    /// The "Formatting ..." summary qemu-img prints.
    pub fn summary(&self, path: &Path, size: u64) -> String {
        let mut s = format!(
            "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={}",
            path.display(),
            self.cluster_size,
            if self.extended_l2 { "on" } else { "off" },
            self.compression_type.name(),
            size
        );
        if let Some(b) = &self.backing_file {
            s += &format!(" backing_file={b}");
        }
        if let Some(f) = &self.backing_format {
            s += &format!(" backing_fmt={f}");
        }
        if let Some(d) = &self.data_file {
            s += &format!(" data_file={d}");
        }
        if self.data_file_raw {
            s += " data_file_raw=on";
        }
        if self.version == 2 {
            s += " compat=0.10";
        }
        if self.preallocation != Preallocation::Off {
            s += &format!(" preallocation={:?}", self.preallocation).to_lowercase();
        }
        s += &format!(
            " lazy_refcounts={} refcount_bits={}",
            if self.lazy_refcounts { "on" } else { "off" },
            self.refcount_bits
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_as_qemu_img_reads_them() {
        let ok = [
            ("0", 0),
            ("512", 512),
            ("  1M", 1 << 20),
            ("+1M", 1 << 20),
            ("1b", 1),
            ("1B", 1),
            ("4k", 4096),
            ("64K", 65536),
            ("1.5M", 3 << 19),
            ("1.k", 1024),
            ("1.0", 1),
            ("1.25k", 1280),
            (".5k", 512),
            ("08", 8),
            ("0x100000", 1 << 20),
            ("0X10", 16),
            ("1E", 1 << 60),
            ("15E", 15 << 60),
        ];
        for (s, v) in ok {
            assert_eq!(parse_size(s).ok(), Some(v), "{s:?}");
        }
        let bad = [
            "",
            " ",
            "k",
            "1M ",
            "1e3",
            "1.5",
            "-0",
            "-1",
            "0x",
            "0x1k",
            "0x1.8",
            "0xg",
            "1EB",
            "16E",
            "1x",
            "1..5k",
            "+",
            "1 M",
            "18446744073709551616",
        ];
        for s in bad {
            assert!(parse_size(s).is_err(), "{s:?} was accepted");
        }
        for (s, too_big) in [
            ("16E", true),
            ("18446744073709551616", true),
            ("0x1ffffffffffffffff", true),
            ("1.5", false),
            ("0x1k", false),
        ] {
            let kind = parse_size(s).unwrap_err().kind();
            assert_eq!(
                kind == crate::ErrorKind::OutOfRange,
                too_big,
                "{s:?}: {kind:?}"
            );
        }
    }
}
