//! The qcow2 header, its feature bits and its extensions.

use super::{be32, be64, put32, put64};
use crate::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_HEADER_LEN: u32 = 104;
/// Smallest supported cluster_bits (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB), as QEMU.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size we accept (QEMU's limit: 2^63 / 512 rounded; we use 2^61).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature: refcounts may be stale (lazy refcounts after a crash).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt, only repair may write.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data is in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type field is in use (non-zlib).
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit we understand.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: persistent bitmaps are consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (zlib without header).
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img prints.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
    /// On-disk value.
    pub fn value(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }
}

/// Which bit set a feature name table entry refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// incompatible_features
    Incompatible,
    /// compatible_features
    Compatible,
    /// autoclear_features
    Autoclear,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Bit set.
    pub kind: FeatureKind,
    /// Bit number.
    pub bit: u8,
    /// Name (NUL-trimmed).
    pub name: String,
}

/// The bitmaps extension (the directory itself is read elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory offset.
    pub directory_offset: u64,
}

/// The parsed header with every extension.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Compression type byte (offset 104), 0 when absent.
    pub compression_type_raw: u8,
    /// Header bytes from 105 up to `header_length` (fields we do not know), preserved on rewrite.
    pub extra_fields: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format from its header extension.
    pub backing_format: Option<String>,
    /// External data file name from its header extension.
    pub data_file: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Full disk encryption header (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Extensions we do not know, preserved on rewrite: (type, data).
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn lossy(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Whether extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    /// Whether an external data file is in use.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }
    /// Whether the external data file is kept a valid raw image.
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }
    /// Whether lazy refcounts are on.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
    /// Whether the dirty bit is set.
    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }
    /// Whether the corrupt bit is set.
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
    /// The compression type.
    pub fn compression_type(&self) -> CompressionType {
        if self.compression_type_raw == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }
    /// L2 entry size in bytes (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Bytes of guest data one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size() * self.cluster_size()
    }
    /// Number of L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// The name of a feature bit, from the feature name table when present.
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.as_str())
    }

    /// Parse and validate a header from the first bytes of the image (at least the first
    /// cluster, or the whole file if shorter). `file_len` bounds offsets.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        Self::parse_with(buf, file_len, false)
    }

    /// Parse a header as `qemu-img check` opens an image: the L1, refcount and snapshot
    /// tables must be cluster aligned and addressable, but may lie past the end of the file
    /// or over the header (QEMU's `validate_table_offset`); the check reports what follows.
    pub fn parse_for_check(buf: &[u8], file_len: u64) -> Result<Header> {
        Self::parse_with(buf, file_len, true)
    }

    fn parse_with(buf: &[u8], file_len: u64, for_check: bool) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::corrupt(format!(
                "file too short for a qcow2 header ({} bytes)",
                buf.len()
            )));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "invalid cluster_bits {cluster_bits} (cluster size must be 512 B to 2 MiB)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type_raw: 0,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(Error::corrupt("file too short for a version 3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN {
                return Err(Error::corrupt(format!(
                    "header_length {} is too small",
                    h.header_length
                )));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(Error::corrupt(format!(
                    "header_length {} is not a multiple of 8",
                    h.header_length
                )));
            }
            if h.header_length as u64 > cluster_size || h.header_length as usize > buf.len() {
                return Err(Error::corrupt(format!(
                    "header_length {} exceeds the first cluster",
                    h.header_length
                )));
            }
            if h.header_length > V3_HEADER_LEN {
                h.compression_type_raw = buf[104];
                h.extra_fields = buf[105..h.header_length as usize].to_vec();
            }
        }
        // Extensions are needed to name unknown feature bits, so parse them first.
        h.parse_extensions(buf, cluster_size)?;
        h.validate(file_len, for_check)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], cluster_size: u64) -> Result<()> {
        let limit = (cluster_size as usize).min(buf.len());
        let end = if self.backing_file_offset != 0 && self.backing_file_offset < limit as u64 {
            self.backing_file_offset as usize
        } else {
            limit
        };
        let mut off = self.header_length as usize;
        let mut seen: Vec<u32> = Vec::new();
        loop {
            if off + 8 > end {
                // No end marker before the limit: QEMU accepts a list that runs to the limit.
                break;
            }
            let ty = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if ty == EXT_END {
                break;
            }
            if len > end - off {
                return Err(Error::corrupt(format!(
                    "header extension 0x{ty:08x} of {len} bytes runs past the first cluster"
                )));
            }
            let data = &buf[off..off + len];
            if ty != EXT_FEATURE_TABLE && seen.contains(&ty) && ty != 0 {
                return Err(Error::corrupt(format!(
                    "header extension 0x{ty:08x} appears twice"
                )));
            }
            seen.push(ty);
            match ty {
                EXT_BACKING_FORMAT => self.backing_format = Some(lossy(data)),
                EXT_DATA_FILE => self.data_file = Some(lossy(data)),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let kind = match e[0] {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            _ => continue,
                        };
                        self.feature_names.push(FeatureName {
                            kind,
                            bit: e[1],
                            name: lossy(&e[2..48]),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return Err(Error::corrupt("bitmaps header extension is too short"));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                EXT_CRYPTO => {
                    if len < 16 {
                        return Err(Error::corrupt("encryption header extension is too short"));
                    }
                    self.crypto_header = Some((be64(data, 0), be64(data, 8)));
                }
                _ => self.unknown_extensions.push((ty, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
        if self.backing_file_offset != 0 {
            let bo = self.backing_file_offset;
            let bl = self.backing_file_size as u64;
            if bl > 1023 {
                return Err(Error::corrupt(format!(
                    "backing file name length {bl} exceeds 1023"
                )));
            }
            if bo
                .checked_add(bl)
                .is_none_or(|e| e > cluster_size || e > buf.len() as u64)
                || bo < self.header_length as u64
            {
                return Err(Error::corrupt(format!(
                    "backing file name at offset {bo} (length {bl}) lies outside the first cluster"
                )));
            }
            if bl > 0 {
                let name = &buf[bo as usize..(bo + bl) as usize];
                self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
            }
        }
        Ok(())
    }

    fn validate(&self, file_len: u64, for_check: bool) -> Result<()> {
        let cs = self.cluster_size();
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match self.feature_name(FeatureKind::Incompatible, b) {
                    Some(n) => format!("'{n}' (bit {b})"),
                    None => format!("unknown incompatible feature bit {b}"),
                })
                .collect();
            return Err(Error::unsupported(format!(
                "unsupported incompatible feature: {}",
                names.join(", ")
            )));
        }
        match self.crypt_method {
            0 => {}
            1 => {
                return Err(Error::unsupported(
                    "encrypted image (legacy AES encryption) is not supported",
                ))
            }
            2 => {
                return Err(Error::unsupported(
                    "encrypted image (LUKS encryption) is not supported",
                ))
            }
            m => return Err(Error::unsupported(format!("unknown encryption method {m}"))),
        }
        if self.crypto_header.is_some() {
            return Err(Error::corrupt(
                "encryption header extension present in an unencrypted image",
            ));
        }
        if self.extended_l2() && cs < 16384 {
            // 32 subclusters per cluster: QEMU refuses subclusters under 512 bytes.
            return Err(Error::unsupported(format!(
                "unsupported subcluster size {} (extended L2 entries need clusters of at least 16 KiB, this image has {cs}-byte clusters)",
                cs / 32
            )));
        }
        if self.refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "invalid refcount_order {} (refcount width must be 1 to 64 bits)",
                self.refcount_order
            )));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(format!(
                "virtual size {} is too large",
                self.size
            )));
        }
        if self.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            match self.compression_type_raw {
                0 => {
                    return Err(Error::corrupt(
                        "compression type feature bit set but compression_type is zlib",
                    ))
                }
                1 => {}
                t => return Err(Error::unsupported(format!("unknown compression type {t}"))),
            }
        } else if self.compression_type_raw != 0 {
            return Err(Error::corrupt(format!(
                "compression_type {} set without the compression type feature bit",
                self.compression_type_raw
            )));
        }
        // L1 table.
        let need = self.l1_entries_for(self.size);
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "L1 table size {} entries is too large",
                self.l1_size
            )));
        }
        if (self.l1_size as u64) < need {
            return Err(Error::corrupt(format!(
                "L1 table has {} entries, {} needed for the virtual size",
                self.l1_size, need
            )));
        }
        check_table(
            "L1 table",
            self.l1_table_offset,
            self.l1_size as u64 * 8,
            cs,
            file_len,
            self.l1_size > 0,
            for_check,
        )?;
        // Refcount table.
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount table of {} clusters is too large",
                self.refcount_table_clusters
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::corrupt("refcount table has no clusters"));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
            true,
            for_check,
        )?;
        // Snapshot table.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!(
                "too many snapshots ({})",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            check_table(
                "snapshot table",
                self.snapshots_offset,
                40,
                cs,
                file_len,
                true,
                for_check,
            )?;
        }
        if let Some(b) = &self.bitmaps {
            if b.directory_offset % cs != 0 {
                return Err(Error::corrupt(
                    "bitmap directory offset is not cluster aligned",
                ));
            }
        }
        if self.has_data_file() && self.backing_file.is_some() && self.data_file_raw() {
            // QEMU refuses to open this combination too.
            return Err(Error::corrupt("data_file_raw with a backing file"));
        }
        Ok(())
    }

    /// Serialize the header and extensions into the first cluster (`cluster_size` bytes).
    /// Unknown fields and extensions are written back as read.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 16, 0);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut off = V2_HEADER_LEN as usize;
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            let hl = if self.header_length > V3_HEADER_LEN {
                self.header_length
            } else if self.compression_type_raw != 0 {
                112
            } else {
                V3_HEADER_LEN
            };
            put32(&mut b, 100, hl);
            if hl > V3_HEADER_LEN {
                b[104] = self.compression_type_raw;
                let n = self.extra_fields.len().min(hl as usize - 105);
                b[105..105 + n].copy_from_slice(&self.extra_fields[..n]);
            }
            off = hl as usize;
        }
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push((EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let Some(f) = &self.data_file {
            exts.push((EXT_DATA_FILE, f.as_bytes().to_vec()));
        }
        if !self.feature_names.is_empty() {
            let mut t = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = match f.kind {
                    FeatureKind::Incompatible => 0,
                    FeatureKind::Compatible => 1,
                    FeatureKind::Autoclear => 2,
                };
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                t.extend_from_slice(&e);
            }
            exts.push((EXT_FEATURE_TABLE, t));
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = vec![0u8; 24];
            put32(&mut d, 0, bm.nb_bitmaps);
            put64(&mut d, 8, bm.directory_size);
            put64(&mut d, 16, bm.directory_offset);
            exts.push((EXT_BITMAPS, d));
        }
        if let Some((o, l)) = self.crypto_header {
            let mut d = vec![0u8; 16];
            put64(&mut d, 0, o);
            put64(&mut d, 8, l);
            exts.push((EXT_CRYPTO, d));
        }
        exts.extend(self.unknown_extensions.iter().cloned());
        if self.version < 3 {
            // v2 images may carry extensions too.
        }
        let too_big = || {
            Error::invalid(
                "header, extensions and backing file name do not fit in the first cluster",
            )
        };
        // The feature name table only names bits for tools: when everything does not fit in
        // the first cluster (512-byte clusters with a bitmaps extension, say), it is left out,
        // as QEMU does, rather than refusing the header.
        let space = |exts: &[(u32, Vec<u8>)]| {
            let backing = self.backing_file.as_ref().map_or(0, |f| f.len());
            off + exts
                .iter()
                .map(|(_, d)| 8 + d.len().div_ceil(8) * 8)
                .sum::<usize>()
                + 8
                + backing
        };
        if space(&exts) > cs {
            exts.retain(|(ty, _)| *ty != EXT_FEATURE_TABLE);
        }
        for (ty, data) in &exts {
            let need = 8 + data.len().div_ceil(8) * 8;
            if off + need + 8 > cs {
                return Err(too_big());
            }
            put32(&mut b, off, *ty);
            put32(&mut b, off + 4, data.len() as u32);
            b[off + 8..off + 8 + data.len()].copy_from_slice(data);
            off += need;
        }
        // End marker (zeros) is already there.
        off += 8;
        if let Some(name) = &self.backing_file {
            let n = name.as_bytes();
            if n.len() > 1023 || off + n.len() > cs {
                return Err(too_big());
            }
            b[off..off + n.len()].copy_from_slice(n);
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, n.len() as u32);
        } else {
            put64(&mut b, 8, 0);
        }
        Ok(b)
    }
}

fn check_table(
    what: &str,
    off: u64,
    len: u64,
    cs: u64,
    file_len: u64,
    present: bool,
    for_check: bool,
) -> Result<()> {
    if !present {
        return Ok(());
    }
    if !off.is_multiple_of(cs) {
        return Err(Error::corrupt(format!(
            "{what} offset 0x{off:x} is not cluster aligned"
        )));
    }
    if for_check {
        return match off.checked_add(len) {
            Some(end) if end <= i64::MAX as u64 => Ok(()),
            _ => Err(Error::corrupt(format!(
                "{what} offset 0x{off:x} is too large"
            ))),
        };
    }
    if off == 0 {
        return Err(Error::corrupt(format!(
            "{what} overlaps the header (offset 0)"
        )));
    }
    match off.checked_add(len) {
        Some(end) if end <= file_len.div_ceil(cs) * cs => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{what} at offset 0x{off:x} ({len} bytes) lies beyond the end of the file"
        ))),
    }
}
