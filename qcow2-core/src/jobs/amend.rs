//! `amend`: change options of an existing qcow2 image, as `qemu-img amend -o ...` does.
//!
//! Supported: `compat` (0.10 <-> 1.1), `lazy_refcounts`, `data_file_raw` (off only; on only
//! where it already is, as qemu-img), `data_file` (images with an external data file),
//! `backing_file`/`backing_fmt` (accepted only when unchanged: qemu-img refuses to change
//! them and points at `rebase`), and `size`. Every option is checked before the image is
//! touched, so a refused amend leaves the file as it was. Each change ends with one header
//! write (cluster 0), after the data and tables it relies on are durable.
//!
//! `refcount_bits` rewrites the refcount structure with the new width, last, on the closed
//! file (crash-safe: new structure first, then the header switch).

use crate::engine::image::Image;
use crate::format::header;
use crate::format::l2;
use crate::{Error, Result};

/// Options given to `amend` (each `None` when not given).
#[derive(Debug, Clone, Default)]
pub struct AmendOptions {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    /// Lazy refcounts on or off.
    pub lazy_refcounts: Option<bool>,
    /// New refcount width.
    pub refcount_bits: Option<u64>,
    /// Backing file name (must equal the current one).
    pub backing_file: Option<String>,
    /// Backing format (must equal the current one).
    pub backing_fmt: Option<String>,
    /// External data file name (only for images that have one; empty removes the name).
    pub data_file: Option<String>,
    /// Raw external data file flag.
    pub data_file_raw: Option<bool>,
    /// New virtual size.
    pub size: Option<u64>,
}

fn bool_value(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::invalid(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

impl AmendOptions {
    /// Apply one `-o key=value`, with qemu-img's messages for creation-only and unknown keys.
    pub fn set(&mut self, key: &str, v: &str) -> Result<()> {
        match key {
            "compat" => {
                self.version = Some(match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(Error::invalid(format!("Unknown compatibility level {v}"))),
                })
            }
            "lazy_refcounts" => self.lazy_refcounts = Some(bool_value(key, v)?),
            "refcount_bits" => {
                let n: u64 = v
                    .trim()
                    .parse()
                    .map_err(|_| Error::invalid(format!("Parameter '{key}' expects a number")))?;
                if n == 0 || n > 64 || !n.is_power_of_two() {
                    return Err(Error::invalid(
                        "Refcount width must be a power of two and may not exceed 64 bits",
                    ));
                }
                self.refcount_bits = Some(n);
            }
            "backing_file" => self.backing_file = Some(v.to_string()),
            "backing_fmt" => self.backing_fmt = Some(v.to_string()),
            "data_file" => self.data_file = Some(v.to_string()),
            "data_file_raw" => self.data_file_raw = Some(bool_value(key, v)?),
            "size" => {
                self.size = Some(crate::create::parse_size(v).map_err(|_| {
                    Error::invalid(format!(
                        "Parameter '{key}' expects a non-negative number below 2^64"
                    ))
                })?)
            }
            "cluster_size" | "extended_l2" | "encryption" | "compression_type"
            | "preallocation" | "encrypt.format" => {
                return Err(Error::unsupported(format!(
                    "Invalid parameter '{key}': this option is only supported for image creation"
                )))
            }
            k if k.starts_with("encrypt.") => {
                return Err(Error::unsupported(
                    "Can't amend encryption options - encryption not present",
                ))
            }
            _ => return Err(Error::invalid(format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }
}

/// Amend `img` (opened writable) as `opts` says, then close it. Everything is checked first:
/// an error before any change leaves the image untouched. A new refcount width is written
/// last, on the closed file (see [`change_refcount_width`]): the handle must be the only one.
pub async fn amend(img: Image, opts: &AmendOptions) -> Result<()> {
    let new_order = amend_open(&img, opts).await?;
    let path = img.path().to_path_buf();
    img.close().await?;
    if let Some(order) = new_order {
        change_refcount_width(&path, order).await?;
    }
    Ok(())
}

/// The changes made through the open handle; returns the refcount order still to apply.
async fn amend_open(img: &Image, opts: &AmendOptions) -> Result<Option<u32>> {
    img.ws()?;
    let h = img.header();
    let old_version = h.version;
    let new_version = opts.version.unwrap_or(old_version);
    let snaps = img.snapshots();

    // ---- checks (qemu-img's order and messages) ----
    if opts.data_file.is_some() && !h.has_data_file() {
        return Err(Error::invalid(
            "data-file can only be set for images that use an external data file",
        ));
    }
    if opts.data_file_raw == Some(true) && !h.data_file_raw() {
        return Err(Error::invalid(
            "data-file-raw cannot be set on existing images",
        ));
    }
    if let Some(rb) = opts.refcount_bits {
        if rb != h.refcount_bits() as u64 {
            if new_version < 3 && rb != 16 {
                return Err(Error::invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            if new_version != old_version {
                return Err(Error::unsupported(
                    "changing refcount_bits and compat in one amend is not supported",
                ));
            }
        }
    }
    let new_order = opts
        .refcount_bits
        .filter(|&rb| rb != h.refcount_bits() as u64)
        .map(|rb| rb.trailing_zeros());
    if (opts.backing_file.is_some() || opts.backing_fmt.is_some())
        && (opts.backing_file != h.backing_file || opts.backing_fmt != h.backing_format)
    {
        return Err(Error::invalid(
            "Cannot amend the backing file (you can use 'rebase' instead)",
        ));
    }
    let lazy_now = h.lazy_refcounts();
    let lazy = opts.lazy_refcounts.unwrap_or(lazy_now);
    if lazy && !lazy_now && new_version < 3 {
        return Err(Error::invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
        ));
    }
    if let Some(s) = opts.size {
        if s != img.size() && !snaps.is_empty() {
            return Err(Error::unsupported(
                "Can't resize an image which has snapshots",
            ));
        }
        if !s.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
    }
    if new_version > old_version && snaps.iter().any(|s| s.disk_size.is_none()) {
        return Err(Error::unsupported(
            "upgrading an image whose snapshots lack the v3 extra data is not supported",
        ));
    }
    if new_version < old_version {
        check_downgrade(img, &h).await?;
    }

    // ---- changes ----
    if new_version > old_version {
        let mut nh = img.header();
        nh.version = 3;
        nh.header_length = 112;
        nh.refcount_order = 4;
        nh.compression_type_raw = 0;
        nh.extra_fields = vec![0u8; 7];
        nh.feature_names = super::create::feature_table();
        write_header(img, nh).await?;
    }
    {
        let mut nh = img.header();
        if opts.data_file_raw == Some(false) {
            nh.autoclear_features &= !header::AUTOCLEAR_DATA_FILE_RAW;
        }
        if let Some(df) = &opts.data_file {
            nh.data_file = if df.is_empty() {
                None
            } else {
                Some(df.clone())
            };
        }
        if lazy != lazy_now {
            if lazy {
                nh.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
            } else {
                nh.compatible_features &= !header::COMPAT_LAZY_REFCOUNTS;
            }
        }
        if nh.autoclear_features != h.autoclear_features
            || nh.data_file != h.data_file
            || nh.compatible_features != h.compatible_features
        {
            write_header(img, nh).await?;
        }
    }
    if let Some(s) = opts.size {
        if s != img.size() {
            img.resize(s, true).await?;
            img.flush().await?;
        }
    }
    if new_version < old_version {
        // v2 cannot flag bitmaps as consistent: drop them (and free their clusters) first.
        img.bitmaps_remove_all().await?;
        img.before_first_write().await?;
        downgrade(img).await?;
    }
    img.flush().await?;
    Ok(new_order)
}

/// Rewrite the refcount structure of the (closed) qcow2 image at `path` with entries of
/// `1 << order` bits. Crash-safe: the new refcount blocks and table go to new clusters at the
/// end of the file and are made durable, then one header write switches to them; the old
/// structure, no longer referenced and counted as free by the new one, is left as free
/// space. A refcount that does not fit the new width refuses the change before any write.
pub async fn change_refcount_width(path: &std::path::Path, order: u32) -> Result<()> {
    use crate::format::refcount;
    use crate::io::{lock, FileOptions};
    let named = |e: std::io::Error| Error::io(e, path.display().to_string());
    let fo = FileOptions {
        writable: true,
        ..Default::default()
    };
    let file = crate::io::open_file(path, &fo).map_err(named)?;
    let _lock = lock::FileLock::acquire(&file, lock::Perms::qcow2(true, false), path)?;
    let file_len = file.len().map_err(named)?;
    let mut first = vec![0u8; (2u64 << 20).min(file_len) as usize];
    file.read_at(&mut first, 0).await.map_err(named)?;
    let mut h = header::Header::parse(&first, file_len)?;
    let cs = h.cluster_size();
    let old_order = h.refcount_order;
    if order == old_order {
        return Ok(());
    }
    if h.version < 3 && order != 4 {
        return Err(Error::invalid(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    if h.dirty() || h.corrupt() {
        return Err(Error::invalid(
            "the image is dirty or corrupt; repair it first",
        ));
    }
    let rt_len = h.refcount_table_clusters as u64 * cs;
    if rt_len > header::MAX_REFTABLE_BYTES {
        return Err(Error::corrupt("refcount table too large"));
    }
    let mut rt = vec![0u8; rt_len as usize];
    file.read_at(&mut rt, h.refcount_table_offset)
        .await
        .map_err(named)?;
    let rt: Vec<u64> = rt
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()) & l2::OFFSET_MASK)
        .collect();
    let old_rpb = (cs * 8) >> old_order;
    let new_rpb = (cs * 8) >> order;
    let max = refcount::max(order);
    // Clusters of the old structure: free once the new one is in use.
    let mut old_meta: Vec<u64> = (0..h.refcount_table_clusters as u64)
        .map(|i| h.refcount_table_offset / cs + i)
        .collect();
    // Every non-zero refcount, in cluster order.
    let mut counts: Vec<(u64, u64)> = Vec::new();
    let mut blk = vec![0u8; cs as usize];
    for (i, &off) in rt.iter().enumerate() {
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) || off.saturating_add(cs) > file_len.div_ceil(cs) * cs {
            return Err(Error::corrupt(format!(
                "refcount block {i} at 0x{off:x} lies outside the file"
            )));
        }
        old_meta.push(off / cs);
        file.read_at(&mut blk, off).await.map_err(named)?;
        for j in 0..old_rpb {
            let v = refcount::get(&blk, old_order, j as usize);
            if v != 0 {
                counts.push((i as u64 * old_rpb + j, v));
            }
        }
    }
    old_meta.sort_unstable();
    for &(ci, v) in &counts {
        if v > max && old_meta.binary_search(&ci).is_err() {
            return Err(Error::invalid(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset 0x{:x} has a refcount of {v}",
                1u64 << order,
                ci * cs
            )));
        }
    }
    // New structure after everything in use: blocks, then the table (fixed point).
    let start = counts
        .last()
        .map_or(0, |&(ci, _)| ci + 1)
        .max(file_len.div_ceil(cs));
    let (mut nb, mut nt) = (0u64, 0u64);
    loop {
        let total = start + nb + nt;
        let b = total.div_ceil(new_rpb);
        let t = (b * 8).div_ceil(cs);
        if b == nb && t == nt {
            break;
        }
        nb = b;
        nt = t;
    }
    if nt * cs > header::MAX_REFTABLE_BYTES || nb > (64 << 30) / cs {
        return Err(Error::unsupported(
            "the new refcount structure would be too large",
        ));
    }
    let mut blocks = vec![0u8; (nb * cs) as usize];
    let mut put = |ci: u64, v: u64| {
        let b = (ci / new_rpb) as usize;
        let blk = &mut blocks[b * cs as usize..(b + 1) * cs as usize];
        refcount::set(blk, order, (ci % new_rpb) as usize, v);
    };
    for &(ci, v) in &counts {
        if old_meta.binary_search(&ci).is_err() {
            put(ci, v);
        }
    }
    for ci in start..start + nb + nt {
        put(ci, 1);
    }
    let mut table = vec![0u8; (nt * cs) as usize];
    for i in 0..nb {
        let off = (start + i) * cs;
        table[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    file.set_len((start + nb + nt) * cs).map_err(named)?;
    file.write_at(&blocks, start * cs).await.map_err(named)?;
    file.write_at(&table, (start + nb) * cs)
        .await
        .map_err(named)?;
    file.flush().await.map_err(named)?;
    // The switch: one header write.
    h.refcount_order = order;
    h.refcount_table_offset = (start + nb) * cs;
    h.refcount_table_clusters = nt as u32;
    let bytes = h.to_bytes()?;
    file.write_at(&bytes, 0).await.map_err(named)?;
    file.flush().await.map_err(named)?;
    Ok(())
}

/// Write `nh` as the new header (one write of cluster 0, flushed) once everything written
/// before is durable, then adopt it in memory.
async fn write_header(img: &Image, nh: header::Header) -> Result<()> {
    img.flush().await?;
    let bytes = nh.to_bytes()?;
    img.write_header_bytes(&bytes, 0).await?;
    *img.inner.header.write() = nh;
    Ok(())
}

/// The refusals of a downgrade to compat=0.10, before anything changes.
async fn check_downgrade(img: &Image, h: &header::Header) -> Result<()> {
    if h.refcount_order != 4 {
        return Err(Error::unsupported("compat=0.10 requires refcount_bits=16"));
    }
    if h.has_data_file() {
        return Err(Error::unsupported(
            "Cannot downgrade an image with a data file",
        ));
    }
    for s in img.snapshots() {
        if s.vm_state_size > u32::MAX as u64 || s.disk_size.is_some_and(|d| d != img.size()) {
            return Err(Error::unsupported(
                "Internal snapshots prevent downgrade of image",
            ));
        }
    }
    let incompat =
        h.incompatible_features & !header::INCOMPAT_COMPRESSION & !header::INCOMPAT_DIRTY;
    if incompat != 0 {
        return Err(Error::unsupported(format!(
            "Cannot downgrade an image with incompatible features 0x{incompat:x} set"
        )));
    }
    if h.compression_type_raw != 0 && has_compressed(img).await? {
        return Err(Error::unsupported(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        ));
    }
    Ok(())
}

async fn has_compressed(img: &Image) -> Result<bool> {
    let size = img.size();
    let mut off = 0;
    while off < size {
        let st = img.layer_status(off, size - off).await?;
        if st.compressed {
            return Ok(true);
        }
        off += st.len;
    }
    Ok(false)
}

/// compat=0.10: turn zero clusters into what v2 can express (unallocated without a backing
/// file, else data clusters of zeros), those of the active state through the engine, those
/// of internal snapshots with one atomic snapshot-state switch (new L2 and L1 tables); make
/// that durable, then write the v2 header.
async fn downgrade(img: &Image) -> Result<()> {
    let lay = img.inner.layout;
    let cs = lay.cluster_size;
    let size = img.size();
    let backing = img.header().backing_file.is_some();
    let mut off = 0;
    let zeros = vec![0u8; cs as usize];
    while off < size {
        let st = img.layer_status(off, size - off).await?;
        let len = st.len;
        if st.allocated && st.zero {
            // Whole clusters: without extended L2 a status run is cluster aligned.
            let mut g = off & !(cs - 1);
            while g < off + len {
                let gc = g / cs;
                if !backing && st.offset.is_none() {
                    let w = img.ws()?;
                    let mut m = w.meta.lock().await;
                    img.ensure_l2_writable(&mut m, gc).await?;
                    img.set_l2_entry(&mut m, gc, 0, 0).await?;
                } else {
                    let n = cs.min(size - g) as usize;
                    img.write_at(&zeros[..n], g).await?;
                }
                g += cs;
            }
        }
        off += len;
    }
    img.flush().await?;
    // The snapshots' zero clusters, as QEMU expands them too (atomic: new tables, then one
    // header write, still v3; the content of every snapshot stays the same).
    if img.snapshots_have_zero_clusters().await? {
        img.expand_snapshot_zero_clusters().await?;
    }
    let mut nh = img.header();
    nh.version = 2;
    nh.header_length = header::V2_HEADER_LEN;
    nh.incompatible_features = 0;
    nh.compatible_features = 0;
    nh.autoclear_features = 0;
    nh.compression_type_raw = 0;
    nh.extra_fields = Vec::new();
    nh.feature_names = Vec::new();
    nh.bitmaps = None;
    write_header(img, nh).await
}
