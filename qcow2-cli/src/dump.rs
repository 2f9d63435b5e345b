//! `dump`: the qcow2 metadata of one image, for humans (`--output=human`) and as JSON.
//!
//! Shows the header fields, the feature bits with their names, every header extension
//! decoded, the L1/L2 and refcount structures, snapshots and bitmaps, and statistics from a
//! walk of the active L1/L2 tables. The walk reads one L2 table at a time (bounded memory)
//! and never follows files named inside the image: the backing file is not opened and the
//! external data file (if any) is not needed, so `dump` is safe on untrusted images. Every
//! offset taken from the image is bounds-checked; problems end in one error line.

use crate::cmds::output_json;
use crate::Fail;
use qcow2_core::format::header::{self, FeatureKind, Header};
use qcow2_core::format::l2::{self, ClusterEntry};
use qcow2_core::format::snapshot::{self, Snapshot};
use qcow2_core::image::{BitmapInfo, Layout};
use qcow2_core::info::size_to_str;
use qcow2_core::{Image, OpenOptions};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;

/// Longest table piece read at once when scanning snapshot L1 and bitmap tables.
const SCAN_CHUNK: u64 = 1 << 20;
/// Bytes of an unknown header extension shown (as hex).
const HEX_LIMIT: usize = 256;

/// `qcow2rs dump [-f qcow2] [--output=human|json] [--untrusted] IMG`.
pub async fn cmd_dump(p: crate::cli::DumpArgs) -> Result<u8, Fail> {
    let file = match crate::cli::operands(&[&p.file], &p.extra).as_slice() {
        [f] => f.clone(),
        [] => return Err(Fail::new("dump: expecting an image file name")),
        _ => return Err(Fail::new("dump: too many arguments (expecting one image)")),
    };
    let json = output_json(p.output.as_deref())?;
    if p.common.image_opts {
        return Err(Fail::new("dump: --image-opts is not supported"));
    }
    match p.format.as_deref() {
        None | Some("qcow2") => {}
        Some(f) => {
            return Err(Fail::new(format!(
                "{file}: dump shows qcow2 metadata; format '{f}' has none"
            )))
        }
    }
    let path = Path::new(&file);
    let mut opts = OpenOptions::default();
    opts.no_backing = true;
    opts.no_external_files = true;
    // The data file holds guest data only; dump never reads it. Pointing it at the image
    // itself keeps dump from opening a file named inside the image.
    opts.data_file = Some(path.to_path_buf());
    opts.force_share = p.force_share;
    let img = Image::open(path, &opts).await.map_err(|e| {
        let m = e.to_string();
        if m.starts_with(file.as_str()) {
            Fail::new(m)
        } else {
            Fail::new(format!("{file}: {m}"))
        }
    })?;
    let d = collect(&img, &file).await?;
    if json {
        crate::cmds::print_json(&d.to_json());
    } else {
        print!("{}", d.to_human());
    }
    Ok(0)
}

/// Big-endian integers that read as 0 when out of bounds (never panic on short input).
fn be_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off.saturating_add(8))
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}
fn be_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off.saturating_add(4))
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn lossy(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 10000.0 / whole as f64).round() / 100.0
    }
}

fn clusters_for(bytes: u64, cs: u64) -> u64 {
    bytes.div_ceil(cs)
}

/// Name of a known feature bit (used when the image has no feature name table entry).
fn known_feature(kind: FeatureKind, bit: u8) -> Option<&'static str> {
    match (kind, bit) {
        (FeatureKind::Incompatible, 0) => Some("dirty"),
        (FeatureKind::Incompatible, 1) => Some("corrupt"),
        (FeatureKind::Incompatible, 2) => Some("external data file"),
        (FeatureKind::Incompatible, 3) => Some("compression type"),
        (FeatureKind::Incompatible, 4) => Some("extended L2"),
        (FeatureKind::Compatible, 0) => Some("lazy refcounts"),
        (FeatureKind::Autoclear, 0) => Some("bitmaps"),
        (FeatureKind::Autoclear, 1) => Some("raw external data"),
        _ => None,
    }
}

fn kind_name(k: FeatureKind) -> &'static str {
    match k {
        FeatureKind::Incompatible => "incompatible",
        FeatureKind::Compatible => "compatible",
        FeatureKind::Autoclear => "autoclear",
    }
}

/// One set feature bit.
struct FeatureBit {
    bit: u8,
    name: Option<String>,
    /// Name came from the image's feature name table.
    from_table: bool,
}

fn feature_bits(h: &Header, kind: FeatureKind, value: u64) -> Vec<FeatureBit> {
    (0..64u8)
        .filter(|b| value & (1u64 << b) != 0)
        .map(|bit| match h.feature_name(kind, bit) {
            Some(n) => FeatureBit {
                bit,
                name: Some(n.to_string()),
                from_table: true,
            },
            None => FeatureBit {
                bit,
                name: known_feature(kind, bit).map(str::to_string),
                from_table: false,
            },
        })
        .collect()
}

/// A decoded header extension.
enum ExtData {
    Text(String),
    FeatureTable(Vec<(u8, u8, String)>),
    Bitmaps {
        nb_bitmaps: u32,
        reserved: u32,
        directory_size: u64,
        directory_offset: u64,
    },
    Crypto {
        offset: u64,
        length: u64,
    },
    Raw {
        hex: String,
        truncated: bool,
    },
}

struct Extension {
    ty: u32,
    len: u32,
    data: ExtData,
}

fn ext_name(ty: u32) -> &'static str {
    match ty {
        header::EXT_BACKING_FORMAT => "backing file format",
        header::EXT_FEATURE_TABLE => "feature name table",
        header::EXT_BITMAPS => "bitmaps",
        header::EXT_CRYPTO => "full disk encryption header",
        header::EXT_DATA_FILE => "external data file",
        _ => "unknown",
    }
}

fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn raw_ext(data: &[u8]) -> ExtData {
    ExtData::Raw {
        hex: to_hex(&data[..data.len().min(HEX_LIMIT)]),
        truncated: data.len() > HEX_LIMIT,
    }
}

/// Walk the header extension list in the first cluster (`first`), in on-disk order.
/// Returns the extensions and a note when the list is malformed.
fn parse_extensions(h: &Header, first: &[u8]) -> (Vec<Extension>, Option<String>) {
    let cs = h.cluster_size() as usize;
    let limit = cs.min(first.len());
    let end = if h.backing_file_offset != 0 && h.backing_file_offset < limit as u64 {
        h.backing_file_offset as usize
    } else {
        limit
    };
    let mut off = h.header_length as usize;
    let mut out = Vec::new();
    while off.saturating_add(8) <= end {
        let ty = be_u32(first, off);
        let len = be_u32(first, off + 4);
        off += 8;
        if ty == header::EXT_END {
            return (out, None);
        }
        let n = len as usize;
        if n > end - off {
            return (
                out,
                Some(format!(
                    "extension {ty:#010x} of {len} bytes runs past the first cluster"
                )),
            );
        }
        let data = &first[off..off + n];
        let decoded = match ty {
            header::EXT_BACKING_FORMAT | header::EXT_DATA_FILE => ExtData::Text(lossy(data)),
            header::EXT_FEATURE_TABLE => ExtData::FeatureTable(
                data.chunks_exact(48)
                    .map(|e| (e[0], e[1], lossy(&e[2..])))
                    .collect(),
            ),
            header::EXT_BITMAPS if n >= 24 => ExtData::Bitmaps {
                nb_bitmaps: be_u32(data, 0),
                reserved: be_u32(data, 4),
                directory_size: be_u64(data, 8),
                directory_offset: be_u64(data, 16),
            },
            header::EXT_CRYPTO if n >= 16 => ExtData::Crypto {
                offset: be_u64(data, 0),
                length: be_u64(data, 8),
            },
            _ => raw_ext(data),
        };
        out.push(Extension {
            ty,
            len,
            data: decoded,
        });
        off = off.saturating_add(n.div_ceil(8) * 8);
    }
    (out, None)
}

/// Counts from the walk of the active L1/L2 tables.
#[derive(Default)]
struct Stats {
    virtual_clusters: u64,
    allocated: u64,
    zero_plain: u64,
    zero_prealloc: u64,
    compressed: u64,
    /// Host bytes the compressed clusters' descriptors cover (sector granularity).
    compressed_bytes: u64,
    unallocated: u64,
    shared: u64,
    fragmented: u64,
    /// Allocated clusters whose host offset lies past the end of the file.
    beyond_eof: u64,
    /// Extended L2 only: subclusters (allocated, zero, unallocated) of non-compressed clusters.
    subclusters: Option<[u64; 3]>,
    /// Refcount lookups skipped because the refcount block offset is invalid.
    bad_refblocks: u64,
}

/// Metadata clusters by kind.
#[derive(Default)]
struct Metadata {
    header: u64,
    l1: u64,
    l2: u64,
    refcount_table: u64,
    refcount_blocks: u64,
    snapshot_table: u64,
    snapshot_l1: u64,
    snapshot_l2: u64,
    bitmap_directory: u64,
    bitmap_tables: u64,
    bitmap_data: u64,
}

impl Metadata {
    fn total(&self) -> u64 {
        self.header
            + self.l1
            + self.l2
            + self.refcount_table
            + self.refcount_blocks
            + self.snapshot_table
            + self.snapshot_l1
            + self.snapshot_l2
            + self.bitmap_directory
            + self.bitmap_tables
            + self.bitmap_data
    }
    fn parts(&self) -> [(&'static str, u64); 11] {
        [
            ("header", self.header),
            ("l1", self.l1),
            ("l2", self.l2),
            ("refcount-table", self.refcount_table),
            ("refcount-blocks", self.refcount_blocks),
            ("snapshot-table", self.snapshot_table),
            ("snapshot-l1", self.snapshot_l1),
            ("snapshot-l2", self.snapshot_l2),
            ("bitmap-directory", self.bitmap_directory),
            ("bitmap-tables", self.bitmap_tables),
            ("bitmap-data", self.bitmap_data),
        ]
    }
}

/// Everything `dump` shows.
struct Dump {
    filename: String,
    file_size: u64,
    h: Header,
    lay: Layout,
    extensions: Vec<Extension>,
    ext_note: Option<String>,
    l1_used: u64,
    l2_tables: u64,
    l2_range: Option<(u64, u64)>,
    rt_entries: u64,
    rt_used: u64,
    refblocks: u64,
    rb_range: Option<(u64, u64)>,
    snapshots: Vec<Snapshot>,
    bitmaps: Vec<BitmapInfo>,
    stats: Stats,
    meta: Metadata,
}

fn min_max(r: &mut Option<(u64, u64)>, v: u64) {
    *r = Some(match *r {
        None => (v, v),
        Some((a, b)) => (a.min(v), b.max(v)),
    });
}

fn io_fail(file: &str, what: &str, off: u64, e: std::io::Error) -> Fail {
    Fail::new(format!("{file}: reading {what} at offset {off:#x}: {e}"))
}

async fn read_exact(
    img: &Image,
    file: &str,
    what: &str,
    buf: &mut [u8],
    off: u64,
) -> Result<(), Fail> {
    img.storage()
        .read_at(buf, off)
        .await
        .map_err(|e| io_fail(file, what, off, e))
}

async fn collect(img: &Image, file: &str) -> Result<Dump, Fail> {
    let h = img.header();
    let lay = img.layout();
    let cs = lay.cluster_size;
    let file_size = img
        .storage()
        .len()
        .map_err(|e| Fail::new(format!("{file}: {}", qcow2_core::Error::from(e))))?;
    // The file rounded up to whole clusters: the last cluster may be partly written.
    let file_end = file_size.div_ceil(cs).saturating_mul(cs);

    // Header extensions, in on-disk order.
    let mut first = vec![0u8; cs.min(file_size) as usize];
    read_exact(img, file, "the header", &mut first, 0).await?;
    let (extensions, ext_note) = parse_extensions(&h, &first);
    drop(first);

    // Refcount structure.
    let reftable = img.refcount_table();
    let mut rb_set: HashSet<u64> = HashSet::new();
    let mut rb_range = None;
    let mut rt_used = 0;
    for &e in &reftable {
        let off = e & !511;
        if off != 0 {
            rt_used += 1;
            if rb_set.insert(off) {
                min_max(&mut rb_range, off);
            }
        }
    }

    // Active L1/L2 walk, one L2 table at a time.
    let l1 = img.l1_table();
    let mut stats = Stats {
        virtual_clusters: h.size.div_ceil(cs),
        subclusters: lay.extended.then_some([0; 3]),
        ..Stats::default()
    };
    let mut l2_set: HashSet<u64> = HashSet::new();
    let mut l2_range = None;
    let mut l1_used = 0u64;
    let mut prev_host: Option<u64> = None;
    let mut table = vec![0u8; cs as usize];
    let mut loaded: Option<u64> = None;
    let refcounted = !h.has_data_file();
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = l2::l1_offset(e);
        let first_gc = (i as u64).saturating_mul(lay.l2_entries);
        let n_here = stats
            .virtual_clusters
            .saturating_sub(first_gc)
            .min(lay.l2_entries);
        if l2_off == 0 {
            stats.unallocated += n_here;
            continue;
        }
        l1_used += 1;
        if l2_set.insert(l2_off) {
            min_max(&mut l2_range, l2_off);
        }
        if n_here == 0 {
            continue;
        }
        if loaded != Some(l2_off) {
            read_exact(img, file, "an L2 table", &mut table, l2_off).await?;
            loaded = Some(l2_off);
        }
        for idx in 0..n_here {
            let b = (idx * lay.l2_entry_size) as usize;
            let entry = be_u64(&table, b);
            let bitmap = if lay.extended {
                be_u64(&table, b + 8)
            } else {
                0
            };
            let ce = l2::decode(entry, lay.cluster_bits, lay.extended);
            if let Some(sc) = stats.subclusters.as_mut() {
                let alloc = (bitmap & 0xffff_ffff).count_ones() as u64;
                let zero = (bitmap >> 32).count_ones() as u64;
                match ce {
                    ClusterEntry::Compressed(_) => {}
                    ClusterEntry::Normal { .. } => {
                        sc[0] += alloc;
                        sc[1] += zero;
                        sc[2] += 32u64.saturating_sub(alloc + zero);
                    }
                    _ => {
                        sc[1] += zero;
                        sc[2] += 32u64.saturating_sub(zero);
                    }
                }
            }
            let host = match ce {
                ClusterEntry::Unallocated => {
                    // With extended L2, an unallocated cluster whose subclusters all read as
                    // zeros is a zero cluster.
                    if lay.extended && bitmap >> 32 == 0xffff_ffff {
                        stats.zero_plain += 1;
                    } else {
                        stats.unallocated += 1;
                    }
                    None
                }
                ClusterEntry::Zero { host: None } => {
                    stats.zero_plain += 1;
                    None
                }
                ClusterEntry::Zero { host: Some(at) } => {
                    stats.zero_prealloc += 1;
                    Some(at)
                }
                ClusterEntry::Compressed(d) => {
                    stats.compressed += 1;
                    stats.compressed_bytes = stats.compressed_bytes.saturating_add(d.len);
                    None
                }
                ClusterEntry::Normal { host, .. } => {
                    stats.allocated += 1;
                    if let Some(p) = prev_host {
                        if p.checked_add(cs) != Some(host) {
                            stats.fragmented += 1;
                        }
                    }
                    prev_host = Some(host);
                    Some(host)
                }
            };
            if let Some(host) = host {
                if refcounted {
                    if host >= file_end {
                        stats.beyond_eof += 1;
                    } else if refcount_of(img, &reftable, &lay, host, file_end, &mut stats)
                        .await
                        .map_err(|e| Fail::new(format!("{file}: {}", e)))?
                        > 1
                    {
                        stats.shared += 1;
                    }
                }
            }
        }
    }
    drop(table);

    // Metadata clusters.
    let mut meta = Metadata {
        header: 1,
        l1: clusters_for(h.l1_size as u64 * 8, cs),
        l2: l2_set.len() as u64,
        refcount_table: h.refcount_table_clusters as u64,
        refcount_blocks: rb_set.len() as u64,
        ..Metadata::default()
    };
    let snapshots = img.snapshots();
    if !snapshots.is_empty() {
        meta.snapshot_table = clusters_for(snapshot::table_len(&snapshots), cs);
    }
    let mut snap_l2: HashSet<u64> = HashSet::new();
    for s in &snapshots {
        let bytes = s.l1_size as u64 * 8;
        meta.snapshot_l1 += clusters_for(bytes, cs);
        if s.l1_table_offset
            .checked_add(bytes)
            .is_none_or(|e| e > file_end)
        {
            continue;
        }
        scan_table(
            img,
            file,
            "a snapshot L1 table",
            s.l1_table_offset,
            bytes,
            |e| {
                let off = l2::l1_offset(e);
                if off != 0 && !l2_set.contains(&off) {
                    snap_l2.insert(off);
                }
            },
        )
        .await?;
    }
    meta.snapshot_l2 = snap_l2.len() as u64;
    if let Some(b) = &h.bitmaps {
        meta.bitmap_directory = clusters_for(b.directory_size, cs);
    }
    let bitmaps = img.bitmaps().to_vec();
    for b in &bitmaps {
        let bytes = b.table_size as u64 * 8;
        meta.bitmap_tables += clusters_for(bytes, cs);
        if b.table_offset % cs != 0
            || b.table_offset
                .checked_add(bytes)
                .is_none_or(|e| e > file_end)
        {
            continue;
        }
        let mut data = 0u64;
        scan_table(img, file, "a bitmap table", b.table_offset, bytes, |e| {
            if e & l2::OFFSET_MASK != 0 {
                data += 1;
            }
        })
        .await?;
        meta.bitmap_data += data;
    }

    Ok(Dump {
        filename: file.to_string(),
        file_size,
        lay,
        extensions,
        ext_note,
        l1_used,
        l2_tables: l2_set.len() as u64,
        l2_range,
        rt_entries: reftable.len() as u64,
        rt_used,
        refblocks: rb_set.len() as u64,
        rb_range,
        snapshots,
        bitmaps,
        stats,
        meta,
        h,
    })
}

/// The refcount of the host cluster at `host`, or 0 when its refcount block is unusable.
async fn refcount_of(
    img: &Image,
    reftable: &[u64],
    lay: &Layout,
    host: u64,
    file_end: u64,
    stats: &mut Stats,
) -> qcow2_core::Result<u64> {
    let ci = host >> lay.cluster_bits;
    let rb = match reftable.get((ci / lay.rb_entries) as usize) {
        Some(&e) => e & !511,
        None => return Ok(0),
    };
    if rb == 0 {
        return Ok(0);
    }
    if rb >= file_end || rb.checked_add(lay.cluster_size).is_none() {
        stats.bad_refblocks += 1;
        return Ok(0);
    }
    img.refcount(ci).await
}

/// Read a table of big-endian u64 entries in pieces of at most `SCAN_CHUNK` bytes.
async fn scan_table(
    img: &Image,
    file: &str,
    what: &str,
    offset: u64,
    bytes: u64,
    mut f: impl FnMut(u64),
) -> Result<(), Fail> {
    let mut buf = vec![0u8; bytes.min(SCAN_CHUNK) as usize];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(SCAN_CHUNK) as usize;
        read_exact(img, file, what, &mut buf[..n], offset + done).await?;
        for c in buf[..n].chunks_exact(8) {
            f(be_u64(c, 0));
        }
        done += n as u64;
    }
    Ok(())
}

fn feature_json(bits: &[FeatureBit]) -> Value {
    Value::Array(
        bits.iter()
            .map(|b| {
                json!({
                    "bit": b.bit,
                    "name": b.name,
                    "name-from-table": b.from_table,
                })
            })
            .collect(),
    )
}

fn range_json(r: Option<(u64, u64)>) -> (Value, Value) {
    match r {
        Some((a, b)) => (json!(a), json!(b)),
        None => (Value::Null, Value::Null),
    }
}

impl Dump {
    fn features(&self) -> [(FeatureKind, u64, Vec<FeatureBit>); 3] {
        let h = &self.h;
        [
            (FeatureKind::Incompatible, h.incompatible_features),
            (FeatureKind::Compatible, h.compatible_features),
            (FeatureKind::Autoclear, h.autoclear_features),
        ]
        .map(|(k, v)| (k, v, feature_bits(h, k, v)))
    }

    fn compression_ratio(&self) -> Option<f64> {
        let s = &self.stats;
        (s.compressed_bytes > 0).then(|| {
            let r =
                (s.compressed as f64 * self.lay.cluster_size as f64) / s.compressed_bytes as f64;
            (r * 100.0).round() / 100.0
        })
    }

    fn to_json(&self) -> Value {
        let h = &self.h;
        let cs = self.lay.cluster_size;
        let mut m = Map::new();
        m.insert("filename".into(), json!(self.filename));
        m.insert("file-size".into(), json!(self.file_size));
        m.insert(
            "header".into(),
            json!({
                "magic": hex(header::MAGIC as u64),
                "version": h.version,
                "backing-file-offset": h.backing_file_offset,
                "backing-file-size": h.backing_file_size,
                "cluster-bits": h.cluster_bits,
                "cluster-size": cs,
                "virtual-size": h.size,
                "crypt-method": h.crypt_method,
                "l1-size": h.l1_size,
                "l1-table-offset": h.l1_table_offset,
                "refcount-table-offset": h.refcount_table_offset,
                "refcount-table-clusters": h.refcount_table_clusters,
                "nb-snapshots": h.nb_snapshots,
                "snapshots-offset": h.snapshots_offset,
                "incompatible-features": h.incompatible_features,
                "compatible-features": h.compatible_features,
                "autoclear-features": h.autoclear_features,
                "refcount-order": h.refcount_order,
                "refcount-bits": h.refcount_bits(),
                "header-length": h.header_length,
                "compression-type": h.compression_type().name(),
            }),
        );
        let mut f = Map::new();
        for (k, _, bits) in self.features() {
            f.insert(kind_name(k).into(), feature_json(&bits));
        }
        m.insert("features".into(), Value::Object(f));
        let exts: Vec<Value> = self
            .extensions
            .iter()
            .map(|e| {
                let data = match &e.data {
                    ExtData::Text(s) => json!(s),
                    ExtData::FeatureTable(t) => Value::Array(
                        t.iter()
                            .map(|(ty, bit, name)| {
                                let kind = match ty {
                                    0 => json!("incompatible"),
                                    1 => json!("compatible"),
                                    2 => json!("autoclear"),
                                    other => json!(other),
                                };
                                json!({"type": kind, "bit": bit, "name": name})
                            })
                            .collect(),
                    ),
                    ExtData::Bitmaps {
                        nb_bitmaps,
                        reserved,
                        directory_size,
                        directory_offset,
                    } => json!({
                        "nb-bitmaps": nb_bitmaps,
                        "reserved": reserved,
                        "directory-size": directory_size,
                        "directory-offset": directory_offset,
                    }),
                    ExtData::Crypto { offset, length } => {
                        json!({"offset": offset, "length": length})
                    }
                    ExtData::Raw { hex, truncated } => json!({"hex": hex, "truncated": truncated}),
                };
                json!({
                    "type": format!("{:#010x}", e.ty),
                    "name": ext_name(e.ty),
                    "length": e.len,
                    "data": data,
                })
            })
            .collect();
        m.insert("extensions".into(), Value::Array(exts));
        if let Some(n) = &self.ext_note {
            m.insert("extensions-error".into(), json!(n));
        }
        m.insert(
            "backing-file".into(),
            match &h.backing_file {
                Some(b) => json!({"name": b, "format": h.backing_format}),
                None => Value::Null,
            },
        );
        m.insert("data-file".into(), json!(h.data_file));
        let (l2_first, l2_last) = range_json(self.l2_range);
        m.insert(
            "l1".into(),
            json!({
                "offset": h.l1_table_offset,
                "entries": h.l1_size,
                "entries-used": self.l1_used,
                "clusters": self.meta.l1,
            }),
        );
        m.insert(
            "l2".into(),
            json!({
                "tables": self.l2_tables,
                "first-offset": l2_first,
                "last-offset": l2_last,
                "entry-size": self.lay.l2_entry_size,
                "entries-per-table": self.lay.l2_entries,
                "extended": self.lay.extended,
            }),
        );
        let (rb_first, rb_last) = range_json(self.rb_range);
        m.insert(
            "refcounts".into(),
            json!({
                "table-offset": h.refcount_table_offset,
                "table-clusters": h.refcount_table_clusters,
                "table-entries": self.rt_entries,
                "table-entries-used": self.rt_used,
                "blocks": self.refblocks,
                "first-block-offset": rb_first,
                "last-block-offset": rb_last,
                "refcount-bits": h.refcount_bits(),
                "entries-per-block": self.lay.rb_entries,
            }),
        );
        m.insert(
            "snapshots".into(),
            Value::Array(
                self.snapshots
                    .iter()
                    .map(|s| {
                        json!({
                            "id": s.id,
                            "name": s.name,
                            "l1-table-offset": s.l1_table_offset,
                            "l1-size": s.l1_size,
                            "vm-state-size": s.vm_state_size,
                            "date-sec": s.date_sec,
                            "disk-size": s.disk_size,
                        })
                    })
                    .collect(),
            ),
        );
        m.insert(
            "bitmaps".into(),
            Value::Array(
                self.bitmaps
                    .iter()
                    .map(|b| {
                        json!({
                            "name": b.name,
                            "granularity": b.granularity,
                            "flags": b.flags,
                            "table-offset": b.table_offset,
                            "table-size": b.table_size,
                        })
                    })
                    .collect(),
            ),
        );
        let s = &self.stats;
        let mut st = Map::new();
        st.insert("virtual-clusters".into(), json!(s.virtual_clusters));
        st.insert("allocated-clusters".into(), json!(s.allocated));
        st.insert(
            "zero-clusters".into(),
            json!(s.zero_plain + s.zero_prealloc),
        );
        st.insert("zero-clusters-plain".into(), json!(s.zero_plain));
        st.insert("zero-clusters-preallocated".into(), json!(s.zero_prealloc));
        st.insert("compressed-clusters".into(), json!(s.compressed));
        st.insert("compressed-bytes".into(), json!(s.compressed_bytes));
        st.insert("compression-ratio".into(), json!(self.compression_ratio()));
        st.insert("unallocated-clusters".into(), json!(s.unallocated));
        st.insert("shared-clusters".into(), json!(s.shared));
        st.insert("fragmented-clusters".into(), json!(s.fragmented));
        st.insert(
            "fragmentation-percent".into(),
            json!(pct(s.fragmented, s.allocated)),
        );
        if s.beyond_eof > 0 {
            st.insert("clusters-beyond-eof".into(), json!(s.beyond_eof));
        }
        if s.bad_refblocks > 0 {
            st.insert("invalid-refcount-blocks".into(), json!(s.bad_refblocks));
        }
        if let Some([a, z, u]) = s.subclusters {
            st.insert(
                "subclusters".into(),
                json!({"allocated": a, "zero": z, "unallocated": u}),
            );
        }
        m.insert("statistics".into(), Value::Object(st));
        let mut md = Map::new();
        let total = self.meta.total();
        md.insert("clusters".into(), json!(total));
        md.insert("bytes".into(), json!(total.saturating_mul(cs)));
        md.insert("file-size".into(), json!(self.file_size));
        md.insert(
            "overhead-percent".into(),
            json!(pct(total.saturating_mul(cs), self.file_size)),
        );
        let mut parts = Map::new();
        for (k, v) in self.meta.parts() {
            parts.insert(k.into(), json!(v));
        }
        md.insert("by-kind".into(), Value::Object(parts));
        m.insert("metadata".into(), Value::Object(md));
        Value::Object(m)
    }

    fn to_human(&self) -> String {
        let h = &self.h;
        let cs = self.lay.cluster_size;
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(w, "image: {}", self.filename);
        let _ = writeln!(
            w,
            "file size: {} ({} bytes)",
            size_to_str(self.file_size),
            self.file_size
        );
        let _ = writeln!(w, "Header:");
        let _ = writeln!(w, "    version: {}", h.version);
        let _ = writeln!(
            w,
            "    cluster size: {cs} (cluster bits {})",
            h.cluster_bits
        );
        let _ = writeln!(
            w,
            "    virtual size: {} ({} bytes)",
            size_to_str(h.size),
            h.size
        );
        let _ = writeln!(w, "    encryption method: {}", h.crypt_method);
        let _ = writeln!(
            w,
            "    L1 table: {} entries at offset {}",
            h.l1_size,
            hex(h.l1_table_offset)
        );
        let _ = writeln!(
            w,
            "    refcount table: offset {}, {} cluster(s)",
            hex(h.refcount_table_offset),
            h.refcount_table_clusters
        );
        let _ = writeln!(
            w,
            "    refcount bits: {} (order {})",
            h.refcount_bits(),
            h.refcount_order
        );
        let _ = writeln!(
            w,
            "    snapshots: {} (table at offset {})",
            h.nb_snapshots,
            hex(h.snapshots_offset)
        );
        let _ = writeln!(w, "    header length: {}", h.header_length);
        let _ = writeln!(w, "    compression type: {}", h.compression_type().name());
        match &h.backing_file {
            Some(b) => {
                let _ = writeln!(
                    w,
                    "    backing file: {b} (offset {}, {} bytes){}",
                    hex(h.backing_file_offset),
                    h.backing_file_size,
                    match &h.backing_format {
                        Some(f) => format!(", format {f}"),
                        None => String::new(),
                    }
                );
            }
            None => {
                let _ = writeln!(w, "    backing file: none");
            }
        }
        if let Some(d) = &h.data_file {
            let _ = writeln!(w, "    data file: {d}");
        }
        let _ = writeln!(w, "Features:");
        for (k, v, bits) in self.features() {
            let names: Vec<String> = bits
                .iter()
                .map(|b| match &b.name {
                    Some(n) => format!("{n} (bit {})", b.bit),
                    None => format!("unknown bit {}", b.bit),
                })
                .collect();
            let _ = writeln!(
                w,
                "    {:<13} {:#018x}{}",
                format!("{}:", kind_name(k)),
                v,
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", names.join(", "))
                }
            );
        }
        let _ = writeln!(w, "Header extensions: {}", self.extensions.len());
        for e in &self.extensions {
            let _ = write!(w, "    {:#010x} {} ({} bytes)", e.ty, ext_name(e.ty), e.len);
            match &e.data {
                ExtData::Text(s) => {
                    let _ = writeln!(w, ": {s}");
                }
                ExtData::FeatureTable(t) => {
                    let _ = writeln!(w, ":");
                    for (ty, bit, name) in t {
                        let kind = match ty {
                            0 => "incompatible".to_string(),
                            1 => "compatible".to_string(),
                            2 => "autoclear".to_string(),
                            other => format!("type {other}"),
                        };
                        let _ = writeln!(w, "        {kind} bit {bit}: {name}");
                    }
                }
                ExtData::Bitmaps {
                    nb_bitmaps,
                    reserved,
                    directory_size,
                    directory_offset,
                } => {
                    let _ = writeln!(
                        w,
                        ": {nb_bitmaps} bitmap(s), directory at {} ({directory_size} bytes){}",
                        hex(*directory_offset),
                        if *reserved != 0 {
                            format!(", reserved field {reserved:#x}")
                        } else {
                            String::new()
                        }
                    );
                }
                ExtData::Crypto { offset, length } => {
                    let _ = writeln!(w, ": header at {} ({length} bytes)", hex(*offset));
                }
                ExtData::Raw { hex, truncated } => {
                    let _ = writeln!(w, ": {hex}{}", if *truncated { "..." } else { "" });
                }
            }
        }
        if let Some(n) = &self.ext_note {
            let _ = writeln!(w, "    (list ends early: {n})");
        }
        let range = |r: Option<(u64, u64)>| match r {
            Some((a, b)) => format!(" at {} .. {}", hex(a), hex(b)),
            None => String::new(),
        };
        let _ = writeln!(w, "L1/L2:");
        let _ = writeln!(
            w,
            "    L1 entries used: {} of {} ({} cluster(s))",
            self.l1_used, h.l1_size, self.meta.l1
        );
        let _ = writeln!(
            w,
            "    L2 tables: {}{} ({} entries of {} bytes each{})",
            self.l2_tables,
            range(self.l2_range),
            self.lay.l2_entries,
            self.lay.l2_entry_size,
            if self.lay.extended { ", extended" } else { "" }
        );
        let _ = writeln!(w, "Refcounts:");
        let _ = writeln!(
            w,
            "    refcount table entries used: {} of {}",
            self.rt_used, self.rt_entries
        );
        let _ = writeln!(
            w,
            "    refcount blocks: {}{} ({} entries each)",
            self.refblocks,
            range(self.rb_range),
            self.lay.rb_entries
        );
        if self.snapshots.is_empty() {
            let _ = writeln!(w, "Snapshots: none");
        } else {
            let _ = writeln!(w, "Snapshots: {}", self.snapshots.len());
            let _ = writeln!(
                w,
                "    {:<8} {:<20} {:>18} {:>10}",
                "ID", "NAME", "L1 OFFSET", "L1 SIZE"
            );
            for s in &self.snapshots {
                let _ = writeln!(
                    w,
                    "    {:<8} {:<20} {:>18} {:>10}",
                    s.id,
                    s.name,
                    hex(s.l1_table_offset),
                    s.l1_size
                );
            }
        }
        if !self.bitmaps.is_empty() {
            let _ = writeln!(w, "Bitmaps: {}", self.bitmaps.len());
            for b in &self.bitmaps {
                let _ = writeln!(
                    w,
                    "    {}: granularity {}, flags {:#x}, table at {} ({} entries)",
                    b.name,
                    b.granularity,
                    b.flags,
                    hex(b.table_offset),
                    b.table_size
                );
            }
        }
        let s = &self.stats;
        let _ = writeln!(
            w,
            "Statistics (active L1/L2, {} guest clusters):",
            s.virtual_clusters
        );
        let _ = writeln!(w, "    allocated: {}", s.allocated);
        let _ = writeln!(
            w,
            "    zero: {} ({} plain, {} preallocated)",
            s.zero_plain + s.zero_prealloc,
            s.zero_plain,
            s.zero_prealloc
        );
        let _ = writeln!(
            w,
            "    compressed: {}{}",
            s.compressed,
            match self.compression_ratio() {
                Some(r) => format!(" ({} bytes stored, ratio {r:.2}:1)", s.compressed_bytes),
                None => String::new(),
            }
        );
        let _ = writeln!(w, "    unallocated: {}", s.unallocated);
        if let Some([a, z, u]) = s.subclusters {
            let _ = writeln!(
                w,
                "    subclusters: {a} allocated, {z} zero, {u} unallocated"
            );
        }
        let _ = writeln!(w, "    shared (refcount > 1): {}", s.shared);
        let _ = writeln!(
            w,
            "    fragmentation: {:.2}% ({} of {} allocated clusters do not follow the previous one)",
            pct(s.fragmented, s.allocated),
            s.fragmented,
            s.allocated
        );
        if s.beyond_eof > 0 {
            let _ = writeln!(w, "    clusters past the end of the file: {}", s.beyond_eof);
        }
        if s.bad_refblocks > 0 {
            let _ = writeln!(
                w,
                "    refcount lookups skipped (invalid refcount block): {}",
                s.bad_refblocks
            );
        }
        let total = self.meta.total();
        let _ = writeln!(
            w,
            "Metadata: {} cluster(s), {} bytes, {:.2}% of the file size",
            total,
            total.saturating_mul(cs),
            pct(total.saturating_mul(cs), self.file_size)
        );
        let parts: Vec<String> = self
            .meta
            .parts()
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(w, "    {}", parts.join(", "));
        o
    }
}
