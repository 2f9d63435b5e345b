//! Persistent dirty bitmaps on disk: the bitmap directory (pointed at by the bitmaps header
//! extension `0x23852875`), its entries, the bitmap tables and their entries.
//!
//! Everything read from disk is validated here before use, with the limits QEMU applies
//! (`qcow2-bitmap.c`): a directory of at most 64 MiB and 65535 entries, names of 1 to 1023
//! bytes, unique names, granularity 2^9..2^31, only the dirty-tracking type, no extra data,
//! known flags only, cluster-aligned table offsets, tables large enough for the virtual size
//! (unless the bitmap is in use) and at most 512 MiB of bitmap data each.
//!
//! Bitmap data: bit `i` (bit `i % 8` of byte `i / 8`, least significant first) covers the
//! guest bytes `[i << granularity_bits, (i + 1) << granularity_bits)`. Each bitmap table
//! entry maps one cluster of bitmap data.

use crate::format::{be16, be32, be64, put16, put32, put64};
use crate::{Error, Result};

/// Entry flag: the bitmap is being modified and its stored content is stale.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Entry flag: the bitmap is enabled (tracks writes).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Entry flag: the extra data may be ignored when it is not understood.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags no entry may have.
pub const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Smallest granularity (bits).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity (bits).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest name (bytes).
pub const MAX_NAME_SIZE: usize = 1023;
/// Most bitmaps in one image.
pub const MAX_BITMAPS: usize = 65535;
/// Largest directory (bytes).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Most entries of one bitmap table.
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Most bitmap data of one bitmap (table entries times cluster size).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Table entry bits that must be zero.
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Table entry: the data cluster's offset.
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Table entry without a cluster: all bits of this cluster are set.
pub const TABLE_ENTRY_ALL_ONES: u64 = 1;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Offset of the bitmap table (cluster aligned).
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// Flags ([`FLAG_IN_USE`], [`FLAG_AUTO`]).
    pub flags: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// The name (unique in the image).
    pub name: String,
}

impl DirEntry {
    /// Bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }
    /// Bytes this entry takes in the directory.
    pub fn len(&self) -> u64 {
        entry_len(self.name.len())
    }
    /// Whether the name is empty (never for a valid entry).
    pub fn is_empty(&self) -> bool {
        self.name.is_empty()
    }
}

/// Bytes a directory entry with a name of `name_len` bytes (no extra data) takes.
pub fn entry_len(name_len: usize) -> u64 {
    (24 + name_len as u64).div_ceil(8) * 8
}

/// Bits of a bitmap of `granularity_bits` over a disk of `size` bytes.
pub fn bit_count(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits)
}

/// Bitmap table entries needed for a bitmap of `granularity_bits` over `size` bytes with
/// clusters of `cs` bytes.
pub fn table_entries(size: u64, granularity_bits: u8, cs: u64) -> u64 {
    bit_count(size, granularity_bits).div_ceil(8).div_ceil(cs)
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("bitmap directory: {msg}"))
}

/// Parse and validate a bitmap directory of `nb_bitmaps` entries (the whole directory,
/// `buf`, as the header extension sizes it) for an image of `size` bytes with clusters of
/// `cs` bytes whose file is `file_len` bytes long.
pub fn parse_directory(
    buf: &[u8],
    nb_bitmaps: u32,
    size: u64,
    cs: u64,
    file_len: u64,
) -> Result<Vec<DirEntry>> {
    if nb_bitmaps == 0 || nb_bitmaps as usize > MAX_BITMAPS {
        return Err(bad(format!("invalid number of bitmaps {nb_bitmaps}")));
    }
    if buf.is_empty() || buf.len() as u64 > MAX_DIRECTORY_SIZE {
        return Err(bad(format!("invalid size {}", buf.len())));
    }
    let mut out: Vec<DirEntry> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let i = out.len();
        if i >= nb_bitmaps as usize {
            return Err(bad(format!(
                "more entries than the {nb_bitmaps} the header extension announces"
            )));
        }
        if buf.len() - pos < 24 {
            return Err(bad(format!("entry {i} is truncated")));
        }
        let e = &buf[pos..];
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let ty = e[16];
        let granularity_bits = e[17];
        let name_size = be16(e, 18) as usize;
        let extra = be32(e, 20) as u64;
        let len = (24 + name_size as u64 + extra).div_ceil(8) * 8;
        if len > (buf.len() - pos) as u64 {
            return Err(bad(format!("entry {i} is truncated")));
        }
        let name_bytes = &e[24 + extra as usize..24 + extra as usize + name_size];
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let what = |m: String| bad(format!("bitmap '{name}' (entry {i}): {m}"));
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(what(format!("invalid name length {name_size}")));
        }
        if extra != 0 {
            return Err(what(format!(
                "{extra} bytes of extra data are not supported"
            )));
        }
        if ty != TYPE_DIRTY_TRACKING {
            return Err(what(format!("unknown type {ty}")));
        }
        if flags & RESERVED_FLAGS != 0 {
            return Err(what(format!("unknown flags 0x{flags:x}")));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(what(format!("invalid granularity bits {granularity_bits}")));
        }
        if table_offset == 0 || !table_offset.is_multiple_of(cs) {
            return Err(what(format!(
                "table offset 0x{table_offset:x} is not a cluster-aligned offset"
            )));
        }
        if table_size == 0
            || table_size as u64 > MAX_TABLE_SIZE
            || table_size as u64 * cs > MAX_PHYS_SIZE
        {
            return Err(what(format!("invalid table size {table_size}")));
        }
        // A bitmap in use may have a table too small after a resize was interrupted: its
        // content is not used anyway (as QEMU allows).
        if flags & FLAG_IN_USE == 0
            && (table_size as u64) < table_entries(size, granularity_bits, cs)
        {
            return Err(what(format!(
                "table of {table_size} entries is too small for the virtual size"
            )));
        }
        if table_offset.saturating_add(table_size as u64 * 8) > file_len {
            return Err(what(format!(
                "table at 0x{table_offset:x} lies beyond the end of the file"
            )));
        }
        if out.iter().any(|o| o.name.as_bytes() == name_bytes) {
            return Err(what("duplicate name".to_string()));
        }
        out.push(DirEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
        });
        pos += len as usize;
    }
    if out.len() != nb_bitmaps as usize {
        return Err(bad(format!(
            "{} entries where the header extension announces {nb_bitmaps}",
            out.len()
        )));
    }
    Ok(out)
}

/// The directory bytes for `entries` (unpadded: the size the header extension records).
pub fn directory_bytes(entries: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        let start = b.len();
        b.resize(start + e.len() as usize, 0);
        let d = &mut b[start..];
        put64(d, 0, e.table_offset);
        put32(d, 8, e.table_size);
        put32(d, 12, e.flags);
        d[16] = TYPE_DIRTY_TRACKING;
        d[17] = e.granularity_bits;
        put16(d, 18, e.name.len() as u16);
        put32(d, 20, 0);
        d[24..24 + e.name.len()].copy_from_slice(e.name.as_bytes());
    }
    b
}

/// A decoded bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// No cluster: every bit of this part is clear.
    Zeros,
    /// No cluster: every bit of this part is set.
    Ones,
    /// The bits are stored in the cluster at this offset.
    Data(u64),
}

/// Decode and validate table entry `i` of bitmap `name`.
pub fn decode_table_entry(
    e: u64,
    cs: u64,
    file_len: u64,
    name: &str,
    i: usize,
) -> Result<TableEntry> {
    let off = e & TABLE_ENTRY_OFFSET_MASK;
    let problem = if e & TABLE_ENTRY_RESERVED_MASK != 0 {
        Some("reserved bits are set")
    } else if off == 0 {
        None
    } else if e & TABLE_ENTRY_ALL_ONES != 0 {
        Some("a data cluster with the all-ones flag")
    } else if !off.is_multiple_of(cs) {
        Some("the data cluster is not aligned")
    } else if off.saturating_add(cs) > file_len.div_ceil(cs) * cs {
        Some("the data cluster lies beyond the end of the file")
    } else {
        None
    };
    if let Some(p) = problem {
        return Err(Error::corrupt(format!(
            "bitmap '{name}': table entry {i} (0x{e:016x}) is invalid: {p}"
        )));
    }
    Ok(if off != 0 {
        TableEntry::Data(off)
    } else if e & TABLE_ENTRY_ALL_ONES != 0 {
        TableEntry::Ones
    } else {
        TableEntry::Zeros
    })
}

/// Set the bits of `dst` (a bitmap of `dst_gran` bits over `size` bytes) that cover the guest
/// ranges set in `src` (a bitmap of `src_gran` bits over the same size): a merge across
/// granularities, as QEMU's bitmap merge does.
pub fn merge_into(dst: &mut [u8], dst_gran: u8, src: &[u8], src_gran: u8, size: u64) {
    let src_bits = bit_count(size, src_gran);
    let dst_bits = bit_count(size, dst_gran);
    for (byte_i, &byte) in src.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for b in 0..8u64 {
            let i = byte_i as u64 * 8 + b;
            if i >= src_bits || byte & (1 << b) == 0 {
                continue;
            }
            let start = i << src_gran;
            let end = ((i + 1) << src_gran).min(size);
            let first = start >> dst_gran;
            let last = ((end.max(start + 1) - 1) >> dst_gran).min(dst_bits.saturating_sub(1));
            for j in first..=last {
                dst[(j / 8) as usize] |= 1 << (j % 8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: name.into(),
        }
    }

    #[test]
    fn round_trip() {
        let es = vec![entry("a"), entry("bitmap-two")];
        let b = directory_bytes(&es);
        assert_eq!(b.len(), 32 + 40);
        assert_eq!(
            parse_directory(&b, 2, 64 << 20, 65536, 1 << 20).unwrap(),
            es
        );
    }

    #[test]
    fn rejects_hostile_entries() {
        let ok = directory_bytes(&[entry("a")]);
        let p = |b: &[u8], n: u32| parse_directory(b, n, 64 << 20, 65536, 1 << 20);
        assert!(p(&ok, 1).is_ok());
        assert!(p(&ok, 2).is_err(), "count mismatch");
        assert!(p(&ok[..20], 1).is_err(), "truncated");
        let mut b = ok.clone();
        b[17] = 8;
        assert!(p(&b, 1).is_err(), "granularity");
        let mut b = ok.clone();
        b[16] = 2;
        assert!(p(&b, 1).is_err(), "type");
        let mut b = ok.clone();
        b[15] |= 8;
        assert!(p(&b, 1).is_err(), "flags");
        let mut b = ok.clone();
        b[7] = 1;
        assert!(p(&b, 1).is_err(), "alignment");
        let mut b = ok.clone();
        put32(&mut b, 8, 0);
        assert!(p(&b, 1).is_err(), "table size 0");
        let mut b = ok.clone();
        put64(&mut b, 0, 1 << 40);
        assert!(p(&b, 1).is_err(), "beyond the file");
        let mut b = ok.clone();
        put16(&mut b, 18, 0xffff);
        assert!(p(&b, 1).is_err(), "name past the directory");
        let mut b = ok.clone();
        put32(&mut b, 20, 8);
        b.resize(40, 0);
        assert!(p(&b, 1).is_err(), "extra data");
        let two = directory_bytes(&[entry("a"), entry("a")]);
        assert!(p(&two, 2).is_err(), "duplicate names");
        // A table too small for a large disk.
        assert!(parse_directory(&ok, 1, 1 << 40, 65536, 1 << 20).is_err());
    }

    #[test]
    fn table_entries_decode() {
        let cs = 65536;
        let d = |e| decode_table_entry(e, cs, 1 << 20, "x", 0);
        assert_eq!(d(0).unwrap(), TableEntry::Zeros);
        assert_eq!(d(1).unwrap(), TableEntry::Ones);
        assert_eq!(d(0x20000).unwrap(), TableEntry::Data(0x20000));
        assert!(d(0x20001).is_err());
        assert!(d(0x20200).is_err());
        assert!(d(2).is_err());
        assert!(d(1 << 62).is_err());
        assert!(d(0x200000).is_err());
    }

    #[test]
    fn merge_granularities() {
        // 1 MiB disk; src at 64 KiB (16 bits), dst at 128 KiB (8 bits).
        let size = 1 << 20;
        let mut src = vec![0u8; 2];
        src[0] = 0b0000_0110; // 64K..192K
        let mut dst = vec![0u8; 1];
        merge_into(&mut dst, 17, &src, 16, size);
        assert_eq!(dst[0], 0b0000_0011);
        // Finer destination: one source bit sets several.
        let mut fine = vec![0u8; 4];
        merge_into(&mut fine, 15, &dst, 17, size);
        assert_eq!(fine[0], 0xff);
        assert_eq!(fine[1], 0);
    }
}
