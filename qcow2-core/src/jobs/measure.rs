//! `measure`: how many bytes a new image needs, for a given virtual size or to hold a copy of
//! an existing disk, with the figures and rules of `qemu-img measure`.
//!
//! Two figures: `fully_allocated` is the file size when every guest cluster is allocated
//! (header, L1 and L2 tables, refcount table and blocks, data), and `required` is that size
//! minus the data clusters a copy would not write (those that read as zeros in the source).
//! For a qcow2 source whose output format keeps persistent bitmaps, `bitmaps` is the space
//! the source's bitmaps would take in the new image.

use crate::create::{parse_size, Preallocation};
use crate::engine::disk::{Disk, Format};
use crate::format::header::MAX_L1_BYTES;
use crate::{Error, Result};
use serde_json::{json, Map, Value};

/// Target image parameters for [`measure`] (qemu-img's `-O` and `-o` options).
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// Output format.
    pub format: Format,
    /// Virtual size when no source is given (`--size`, or `-o size=`).
    pub size: Option<u64>,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Preallocation of the new image (falloc and full count every data cluster).
    pub preallocation: Preallocation,
    /// The new image would have a backing file: every cluster of the source is counted,
    /// since the new backing file may share nothing with it.
    pub backing_file: bool,
    /// The raw `-o` values, kept to report a bad one in qemu-img's order of checks.
    raw: RawOpts,
}

#[derive(Debug, Clone, Default)]
struct RawOpts {
    cluster_size: Option<String>,
    compat: Option<String>,
    refcount_bits: Option<String>,
    preallocation: Option<String>,
    luks: bool,
}

impl MeasureOptions {
    /// Defaults for `format` (qemu-img's: 64 KiB clusters, compat=1.1, 16-bit refcounts).
    pub fn new(format: Format) -> MeasureOptions {
        MeasureOptions {
            format,
            size: None,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            extended_l2: false,
            preallocation: Preallocation::Off,
            backing_file: false,
            raw: RawOpts::default(),
        }
    }

    /// Apply one `-o key=value` of the output format, with qemu-img's messages for unknown
    /// keys and malformed values. Values are checked against each other by [`measure`].
    pub fn set(&mut self, key: &str, v: &str) -> Result<()> {
        let size_value = |v: &str| {
            parse_size(v).map_err(|_| {
                Error::invalid(format!(
                    "Parameter '{key}' expects a non-negative number below 2^64"
                ))
            })
        };
        let bool_value = |v: &str| match v {
            "on" | "yes" | "true" | "y" => Ok(true),
            "off" | "no" | "false" | "n" => Ok(false),
            _ => Err(Error::invalid(format!(
                "Parameter '{key}' expects 'on' or 'off'"
            ))),
        };
        let invalid = || Error::invalid(format!("Invalid parameter '{key}'"));
        match (self.format, key) {
            (_, "size") => self.size = Some(size_value(v)?),
            (Format::Raw, "preallocation") => {}
            (Format::Raw, "nocow") => {
                bool_value(v)?;
            }
            (Format::Raw, "extent_size_hint") => {
                size_value(v)?;
            }
            (Format::Raw, _) => return Err(invalid()),
            (Format::Qcow2, "cluster_size") => {
                self.cluster_size = size_value(v)?;
                self.raw.cluster_size = Some(v.to_string());
            }
            (Format::Qcow2, "compat") => self.raw.compat = Some(v.to_string()),
            (Format::Qcow2, "refcount_bits") => {
                self.refcount_bits = v
                    .trim()
                    .parse()
                    .map_err(|_| Error::invalid(format!("Parameter '{key}' expects a number")))?;
                self.raw.refcount_bits = Some(v.to_string());
            }
            (Format::Qcow2, "extended_l2") => self.extended_l2 = bool_value(v)?,
            (Format::Qcow2, "preallocation") => self.raw.preallocation = Some(v.to_string()),
            (Format::Qcow2, "backing_file") => self.backing_file = true,
            (Format::Qcow2, "lazy_refcounts" | "data_file_raw" | "encryption") => {
                bool_value(v)?;
            }
            (Format::Qcow2, "backing_fmt" | "data_file" | "compression_type") => {}
            (Format::Qcow2, "encrypt.format") => self.raw.luks = v == "luks",
            (Format::Qcow2, k) if k.starts_with("encrypt.") => {}
            (Format::Qcow2, _) => return Err(invalid()),
        }
        Ok(())
    }

    /// Check the values against each other, in qemu's order, and settle the derived ones.
    fn validate(&mut self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        self.version = match self.raw.compat.as_deref() {
            None | Some("1.1") => 3,
            Some("0.10") => 2,
            Some(o) => {
                return Err(Error::invalid(format!(
                    "Invalid compatibility level: '{o}'"
                )))
            }
        };
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version < 3 && rb != 16 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        if let Some(p) = &self.raw.preallocation {
            self.preallocation = Preallocation::parse(p)
                .map_err(|_| Error::invalid(format!("invalid parameter value: {p}")))?;
        }
        if self.raw.luks {
            return Err(Error::unsupported(
                "measuring LUKS-encrypted images is not supported",
            ));
        }
        Ok(())
    }
}

/// What [`measure`] found, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// File size needed for the image as it would be written.
    pub required: u64,
    /// File size when every guest cluster is allocated.
    pub fully_allocated: u64,
    /// Space for the source's persistent bitmaps (present only for a qcow2 v3 source and a
    /// qcow2 v3 output, as with qemu-img).
    pub bitmaps: Option<u64>,
}

impl Measurement {
    /// qemu-img's JSON object (keys in its order).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(b) = self.bitmaps {
            m.insert("bitmaps".into(), json!(b));
        }
        m.insert("required".into(), json!(self.required));
        m.insert("fully-allocated".into(), json!(self.fully_allocated));
        Value::Object(m)
    }

    /// qemu-img's human output.
    pub fn human(&self) -> String {
        let mut s = format!(
            "required size: {}\nfully allocated size: {}\n",
            self.required, self.fully_allocated
        );
        if let Some(b) = self.bitmaps {
            s += &format!("bitmaps size: {b}\n");
        }
        s
    }
}

/// Measure a new image of `opts.format` holding `src` (or, without one, of virtual size
/// `opts.size`, 0 if none).
pub async fn measure(src: Option<&Disk>, opts: &MeasureOptions) -> Result<Measurement> {
    let mut opts = opts.clone();
    match opts.format {
        Format::Raw => {
            let size = match src {
                Some(d) => d.size().div_ceil(512) * 512,
                None => opts.size.unwrap_or(0).div_ceil(512) * 512,
            };
            Ok(Measurement {
                required: size,
                fully_allocated: size,
                bitmaps: None,
            })
        }
        Format::Qcow2 => {
            opts.validate()?;
            measure_qcow2(src, &opts).await
        }
    }
}

fn too_large() -> Error {
    Error::invalid("The image size is too large (try using a larger cluster size)")
}

async fn measure_qcow2(src: Option<&Disk>, opts: &MeasureOptions) -> Result<Measurement> {
    let cs = opts.cluster_size;
    let l2e: u64 = if opts.extended_l2 { 16 } else { 8 };
    // The size given in the options is checked even when a source decides the size.
    let given = opts
        .size
        .unwrap_or(0)
        .checked_next_multiple_of(cs)
        .ok_or_else(too_large)?;
    let l2_tables = (given / cs).div_ceil(cs / l2e);
    if l2_tables.saturating_mul(8) > MAX_L1_BYTES {
        return Err(too_large());
    }
    let mut virtual_size = given;
    let mut data = 0u64;
    if let Some(d) = src {
        let ssize = d.size().div_ceil(512) * 512;
        virtual_size = ssize.checked_next_multiple_of(cs).ok_or_else(too_large)?;
        if opts.backing_file {
            // The new backing file may share nothing with the source.
            data = virtual_size;
        } else {
            data = data_clusters(d, cs).await? * cs;
        }
    }
    if matches!(
        opts.preallocation,
        Preallocation::Falloc | Preallocation::Full
    ) {
        data = virtual_size;
    }
    let fully = prealloc_size(virtual_size, cs, opts.refcount_bits, l2e).ok_or_else(too_large)?;
    let bitmaps = match src {
        Some(Disk::Qcow2(img)) if opts.version >= 3 && img.header().version >= 3 => {
            Some(bitmaps_size(img, cs))
        }
        _ => None,
    };
    Ok(Measurement {
        required: fully - virtual_size + data,
        fully_allocated: fully,
        bitmaps,
    })
}

/// Clusters (of `cs` bytes, in the guest) holding at least one byte that the source does not
/// know to read as zeros: allocated data anywhere in its chain, as qemu's block status says.
async fn data_clusters(d: &Disk, cs: u64) -> Result<u64> {
    let mut count = 0u64;
    // First cluster not yet counted.
    let mut next = 0u64;
    d.map_each(|e| {
        if e.data && !e.zero && e.length > 0 {
            let first = (e.start / cs).max(next);
            let last = (e.start + e.length - 1) / cs;
            if last >= first {
                count += last - first + 1;
                next = last + 1;
            }
        }
        Ok(())
    })
    .await?;
    Ok(count)
}

/// File size of a fully allocated image of `size` bytes (a multiple of `cs`): header, L2
/// tables, L1 table, refcount structures and data. `None` if it does not fit in 64 bits.
fn prealloc_size(size: u64, cs: u64, refcount_bits: u64, l2e: u64) -> Option<u64> {
    let clusters = size / cs;
    let l2_entries = clusters.checked_next_multiple_of(cs / l2e)?;
    let l2_bytes = l2_entries.checked_mul(l2e)?;
    let l1_entries = (l2_bytes / cs).checked_next_multiple_of(cs / 8)?;
    let meta = cs.checked_add(l2_bytes)?.checked_add(l1_entries * 8)?;
    let refcount = refcount_metadata_clusters(meta.checked_add(size)? / cs, cs, refcount_bits)?;
    meta.checked_add(refcount.checked_mul(cs)?)?
        .checked_add(size)
}

/// Refcount blocks plus refcount table clusters needed to count `clusters` clusters and
/// themselves: the smallest fixed point.
fn refcount_metadata_clusters(clusters: u64, cs: u64, refcount_bits: u64) -> Option<u64> {
    let per_block = cs * 8 / refcount_bits;
    let per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = clusters.checked_add(blocks)?.checked_add(table)?;
        let b = total.div_ceil(per_block);
        let t = b.div_ceil(per_table_cluster);
        if b == blocks && t == table {
            return Some(blocks + table);
        }
        blocks = b;
        table = t;
    }
}

/// Space for the persistent bitmaps of `img` copied into an image with clusters of `cs`
/// bytes: each bitmap's data clusters (all assumed allocated) and its table, plus the
/// directory.
fn bitmaps_size(img: &crate::Image, cs: u64) -> u64 {
    let size = img.size();
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in img.bitmaps() {
        let gran = b.granularity.max(1);
        let bytes = size.div_ceil(gran).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
        dir += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    total + dir.div_ceil(cs) * cs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> MeasureOptions {
        MeasureOptions::new(Format::Qcow2)
    }

    /// `-o` options, virtual size, required, fully allocated.
    type Case = (&'static [(&'static str, &'static str)], u64, u64, u64);

    /// Figures printed by qemu-img 10.0 `measure -O qcow2 --size ...`.
    #[tokio::test]
    async fn sizes_as_qemu_img() {
        let cases: &[Case] = &[
            (&[], 1 << 30, 393216, 1074135040),
            (&[], 0, 196608, 196608),
            (&[], 1, 327680, 393216),
            (&[], 1 << 50, 171825102848, 1126071731945472),
            (
                &[("cluster_size", "2M")],
                1 << 50,
                5377097728,
                1125905283940352,
            ),
            (
                &[("cluster_size", "2M"), ("refcount_bits", "1")],
                1 << 30,
                10485760,
                1084227584,
            ),
            (
                &[("cluster_size", "4096"), ("compat", "0.10")],
                1 << 30,
                2637824,
                1076379648,
            ),
            (
                &[("preallocation", "full")],
                1 << 30,
                1074135040,
                1074135040,
            ),
        ];
        for (o, size, req, full) in cases {
            let mut m = opts();
            for (k, v) in o.iter() {
                m.set(k, v).unwrap();
            }
            m.size = Some(*size);
            let r = measure(None, &m).await.unwrap();
            assert_eq!(
                (r.required, r.fully_allocated),
                (*req, *full),
                "{o:?} {size}"
            );
            assert_eq!(r.bitmaps, None);
        }
    }

    #[tokio::test]
    async fn refusals() {
        let bad: &[(&str, &str, &str)] = &[
            ("cluster_size", "1000", "Cluster size must be"),
            ("compat", "2", "Invalid compatibility level: '2'"),
            ("refcount_bits", "3", "Refcount width must be"),
            ("refcount_bits", "0", "Refcount width must be"),
            ("preallocation", "bogus", "invalid parameter value: bogus"),
        ];
        for (k, v, msg) in bad {
            let mut m = opts();
            m.set(k, v).unwrap();
            m.size = Some(1 << 30);
            let e = measure(None, &m).await.unwrap_err();
            assert!(e.message().contains(msg), "{k}={v}: {e}");
        }
        assert!(opts().set("foo", "bar").is_err());
        assert!(opts().set("extended_l2", "maybe").is_err());
        assert!(MeasureOptions::new(Format::Raw)
            .set("cluster_size", "4k")
            .is_err());
        let mut m = opts();
        m.set("cluster_size", "512").unwrap();
        m.size = Some(64 << 50);
        let e = measure(None, &m).await.unwrap_err();
        assert!(e.message().contains("too large"), "{e}");
    }
}
