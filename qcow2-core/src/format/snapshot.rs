//! The internal snapshot table.

use super::{be16, be32, be64, put16, put32, put64};
use crate::{Error, Result};

/// QEMU's limit on a snapshot table (bytes).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's limit on extra data per entry.
pub const MAX_EXTRA: u32 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size at creation (from extra data), if recorded.
    pub disk_size: Option<u64>,
    /// Instruction counter, if recorded (not -1).
    pub icount: Option<u64>,
    /// Extra data bytes as read (preserved on rewrite).
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// Serialize one entry (8-byte aligned).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut extra = self.extra.clone();
        if extra.len() < 24 {
            extra.resize(24, 0);
        }
        put64(&mut extra, 0, self.vm_state_size);
        if let Some(ds) = self.disk_size {
            put64(&mut extra, 8, ds);
        }
        put64(&mut extra, 16, self.icount.unwrap_or(u64::MAX));
        let mut b = vec![0u8; 40];
        put64(&mut b, 0, self.l1_table_offset);
        put32(&mut b, 8, self.l1_size);
        put16(&mut b, 12, self.id.len() as u16);
        put16(&mut b, 14, self.name.len() as u16);
        put32(&mut b, 16, self.date_sec);
        put32(&mut b, 20, self.date_nsec);
        put64(&mut b, 24, self.vm_clock_nsec);
        put32(&mut b, 32, self.vm_state_size.min(u32::MAX as u64) as u32);
        put32(&mut b, 36, extra.len() as u32);
        b.extend_from_slice(&extra);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
        b
    }
}

/// Parse `count` entries from the table bytes `buf`. Validates every length against `buf`,
/// and every entry's L1 table (see [`validate`]).
pub fn parse_table(buf: &[u8], count: u32, cluster_size: u64) -> Result<Vec<Snapshot>> {
    let snaps = parse_table_unchecked(buf, count)?;
    validate(&snaps, cluster_size)?;
    Ok(snaps)
}

/// Check each entry's L1 table: cluster aligned, within QEMU's size limit.
pub fn validate(snaps: &[Snapshot], cluster_size: u64) -> Result<()> {
    for (i, s) in snaps.iter().enumerate() {
        if !s.l1_table_offset.is_multiple_of(cluster_size) {
            return Err(Error::corrupt(format!(
                "snapshot {i}: L1 table offset is not cluster aligned"
            )));
        }
        if s.l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "snapshot {i}: L1 table is too large"
            )));
        }
    }
    Ok(())
}

/// Parse `count` entries from the table bytes `buf` as stored: lengths are validated against
/// `buf` (and extra data against QEMU's limit), the entries' L1 tables are not.
pub fn parse_table_unchecked(buf: &[u8], count: u32) -> Result<Vec<Snapshot>> {
    let mut out = Vec::with_capacity(count.min(4096) as usize);
    let mut off = 0usize;
    let short = || Error::corrupt("snapshot table is truncated");
    for i in 0..count {
        if off + 40 > buf.len() {
            return Err(short());
        }
        let e = &buf[off..];
        let l1_table_offset = be64(e, 0);
        let l1_size = be32(e, 8);
        let id_len = be16(e, 12) as usize;
        let name_len = be16(e, 14) as usize;
        let date_sec = be32(e, 16);
        let date_nsec = be32(e, 20);
        let vm_clock_nsec = be64(e, 24);
        let vm_state_32 = be32(e, 32);
        let extra_len = be32(e, 36);
        if extra_len > MAX_EXTRA {
            return Err(Error::corrupt(format!(
                "snapshot {i}: extra data of {extra_len} bytes is too large"
            )));
        }
        let extra_len = extra_len as usize;
        let total = 40 + extra_len + id_len + name_len;
        if off + total > buf.len() {
            return Err(short());
        }
        let extra = e[40..40 + extra_len].to_vec();
        let id = String::from_utf8_lossy(&e[40 + extra_len..40 + extra_len + id_len]).into_owned();
        let name = String::from_utf8_lossy(&e[40 + extra_len + id_len..total]).into_owned();
        let vm_state_size = if extra_len >= 8 {
            be64(&extra, 0)
        } else {
            vm_state_32 as u64
        };
        let disk_size = if extra_len >= 16 {
            Some(be64(&extra, 8))
        } else {
            None
        };
        let icount = if extra_len >= 24 {
            let v = be64(&extra, 16);
            if v == u64::MAX {
                None
            } else {
                Some(v)
            }
        } else {
            None
        };
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            extra,
        });
        off += total.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Size in bytes of the whole table (for reading it): walks entry headers in `buf`.
pub fn table_len(snaps: &[Snapshot]) -> u64 {
    snaps.iter().map(|s| s.to_bytes().len() as u64).sum()
}
