//! L1 and L2 table entries.

/// L1/L2 "copied" flag: refcount is exactly 1, may be written in place.
pub const COPIED: u64 = 1 << 63;
/// L2 compressed flag.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 reads-as-zero flag (standard entries, v3 without extended L2).
pub const ZERO: u64 = 1;
/// Host offset mask (bits 9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (1..=8 and 56..=62).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1..=8, 56..=61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Decoded L1 entry: the L2 table offset (0 if unallocated).
pub fn l1_offset(e: u64) -> u64 {
    e & OFFSET_MASK
}

/// The state of one cluster as given by its L2 entry, before subclusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterEntry {
    /// No host cluster and no zero flag: read the backing file (or zeros).
    Unallocated,
    /// Zero flag set, possibly with a preallocated host cluster.
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<u64>,
    },
    /// Normal data cluster at `host`.
    Normal {
        /// Host offset.
        host: u64,
        /// Copied flag (refcount == 1).
        copied: bool,
    },
    /// Compressed cluster.
    Compressed(CompressedDesc),
}

/// Where a compressed cluster's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDesc {
    /// Host byte offset of the compressed data.
    pub offset: u64,
    /// Readable bytes starting at `offset` (from the sector count).
    pub len: u64,
}

impl CompressedDesc {
    /// Decode from a compressed L2 entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (62 - x)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        CompressedDesc { offset, len }
    }
    /// Encode into an L2 entry; `len` is the compressed byte count.
    pub fn encode(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let x = 62 - (cluster_bits - 8);
        let end = offset + len;
        let nb_sectors = (end.div_ceil(512)) - offset / 512;
        COMPRESSED | ((nb_sectors - 1) << x) | offset
    }
    /// The host clusters touched (first, last), cluster-aligned offsets.
    pub fn host_clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let first = self.offset >> cluster_bits << cluster_bits;
        let last = (self.offset + self.len - 1) >> cluster_bits << cluster_bits;
        (first, last)
    }
}

/// Decode the first word of an L2 entry. `extended` disables the zero flag (it lives in the
/// bitmap then).
pub fn decode(entry: u64, cluster_bits: u32, extended: bool) -> ClusterEntry {
    if entry & COMPRESSED != 0 {
        return ClusterEntry::Compressed(CompressedDesc::decode(entry, cluster_bits));
    }
    let host = entry & OFFSET_MASK;
    if !extended && entry & ZERO != 0 {
        return ClusterEntry::Zero {
            host: if host != 0 { Some(host) } else { None },
        };
    }
    if host == 0 && entry & COPIED == 0 {
        return ClusterEntry::Unallocated;
    }
    ClusterEntry::Normal {
        host,
        copied: entry & COPIED != 0,
    }
}

/// The state of one subcluster (or of a whole cluster without extended L2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
    /// Read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data at this host offset (of the subcluster start).
    Data(u64),
    /// Part of a compressed cluster.
    Compressed(CompressedDesc),
}

/// Error from extended L2 decoding: both bits set, or bits on a compressed cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapError;

/// State of subcluster `sc` (0..32) given the entry and its bitmap (extended L2 only).
pub fn substate(
    entry: ClusterEntry,
    bitmap: u64,
    sc: u32,
    sc_size: u64,
) -> Result<SubState, BitmapError> {
    let alloc = bitmap & (1u64 << sc) != 0;
    let zero = bitmap & (1u64 << (32 + sc)) != 0;
    if alloc && zero {
        return Err(BitmapError);
    }
    Ok(match entry {
        ClusterEntry::Compressed(d) => {
            if bitmap != 0 {
                return Err(BitmapError);
            }
            SubState::Compressed(d)
        }
        ClusterEntry::Unallocated => {
            if alloc {
                return Err(BitmapError);
            }
            if zero {
                SubState::Zero
            } else {
                SubState::Unallocated
            }
        }
        ClusterEntry::Zero { .. } => SubState::Zero,
        ClusterEntry::Normal { host, .. } => {
            if alloc {
                SubState::Data(host + sc as u64 * sc_size)
            } else if zero {
                SubState::Zero
            } else {
                SubState::Unallocated
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_roundtrip() {
        for bits in 9..=21u32 {
            // A compressed cluster is always smaller than a cluster.
            let len = (1u64 << bits) - 100;
            let d = CompressedDesc::encode(0x12345, len, bits);
            let c = CompressedDesc::decode(d, bits);
            assert_eq!(c.offset, 0x12345);
            assert!(
                c.len >= len && c.len < len + 512,
                "bits {bits}: {} for {len}",
                c.len
            );
        }
    }

    #[test]
    fn zero_flag() {
        assert_eq!(decode(1, 16, false), ClusterEntry::Zero { host: None });
        assert_eq!(
            decode(0x10000 | 1, 16, false),
            ClusterEntry::Zero {
                host: Some(0x10000)
            }
        );
        assert_eq!(decode(0, 16, false), ClusterEntry::Unallocated);
        assert_eq!(
            decode(COPIED | 0x20000, 16, false),
            ClusterEntry::Normal {
                host: 0x20000,
                copied: true
            }
        );
    }
}
