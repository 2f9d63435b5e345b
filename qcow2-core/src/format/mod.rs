//! The on-disk format: header, extensions, table entries, snapshots.

pub mod bitmaps;
pub mod header;
pub mod l2;
pub mod refcount;
pub mod snapshot;

/// Read a big-endian u16 at `off`.
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(b[off..off + 2].try_into().unwrap())
}
/// Read a big-endian u32 at `off`.
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
/// Read a big-endian u64 at `off`.
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
/// Write a big-endian u32 at `off`.
pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
/// Write a big-endian u64 at `off`.
pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
/// Write a big-endian u16 at `off`.
pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
