//! The exported disk: one shared handle (qcow2 through the engine, or raw) used by every
//! connection, so a flush on any connection covers the writes of all of them.

use crate::proto::{self, Extent};
use qcow2_core::{Disk, Error, ErrorKind, ZeroMode};

/// An exported disk.
pub struct Export {
    disk: Disk,
    size: u64,
    writable: bool,
    /// Flush after every write (`--cache=writethrough`/`directsync`).
    pub writethrough: bool,
    /// Dirty bitmaps exported as `qemu:dirty-bitmap:NAME` (`-B`), in context order.
    pub bitmaps: Vec<DirtyBitmap>,
}

/// A persistent dirty bitmap exported as the metadata context `qemu:dirty-bitmap:NAME`
/// (`-B NAME`): its bits as read when the server started. The export never writes to the
/// layer holding it (the server refuses that), so they do not change while it serves.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    /// The bitmap's name.
    pub name: String,
    /// Bit `i` (bit `i % 8` of byte `i / 8`) covers the bytes from `i * granularity`.
    bits: Vec<u8>,
    granularity: u64,
    /// Bytes the bitmap covers: the size of the layer holding it (a backing file may be
    /// shorter than the export; past its end nothing is dirty).
    covered: u64,
}

impl DirtyBitmap {
    /// A bitmap from its bits (as `Image::bitmap_content` gives them), its granularity (a
    /// power of two) and the size of the disk it belongs to.
    pub fn new(name: String, bits: Vec<u8>, granularity: u64, covered: u64) -> DirtyBitmap {
        DirtyBitmap {
            name,
            bits,
            granularity: granularity.max(1),
            covered,
        }
    }

    fn nbits(&self) -> u64 {
        self.covered
            .div_ceil(self.granularity)
            .min(self.bits.len() as u64 * 8)
    }

    fn bit(&self, i: u64) -> bool {
        self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// The first bit from `i` on that is not `v` (`nbits()` when there is none).
    fn next_change(&self, mut i: u64, v: bool) -> u64 {
        let n = self.nbits();
        let same = if v { 0xff } else { 0 };
        while i < n {
            if i.is_multiple_of(8) && i + 8 <= n && self.bits[(i / 8) as usize] == same {
                i += 8;
                continue;
            }
            if self.bit(i) != v {
                return i;
            }
            i += 1;
        }
        n
    }

    /// Runs `(length, dirty)` covering `[off, end)`, at most `max` of them; a dirty run
    /// spans whole granules, clipped to the range (as QEMU reports them).
    pub fn runs(&self, off: u64, end: u64, max: usize) -> Vec<(u64, bool)> {
        let g = self.granularity;
        let n = self.nbits();
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end && out.len() < max {
            let i = pos / g;
            if i >= n || pos >= self.covered {
                out.push((end - pos, false));
                break;
            }
            let v = self.bit(i);
            let j = self.next_change(i, v);
            let stop = if j >= n && !v {
                end
            } else {
                j.saturating_mul(g).min(self.covered).min(end)
            };
            out.push((stop - pos, v));
            pos = stop;
        }
        out
    }
}

/// A failed operation: an NBD error value and a message.
#[derive(Debug, Clone)]
pub struct OpError {
    /// NBD error value.
    pub errno: u32,
    /// Message for the client (and the server's log).
    pub msg: String,
}

impl From<Error> for OpError {
    fn from(e: Error) -> OpError {
        let errno = match e.kind() {
            ErrorKind::NoSpace | ErrorKind::TooLarge => proto::ENOSPC,
            ErrorKind::ReadOnly | ErrorKind::PermissionDenied => proto::EPERM,
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => proto::EINVAL,
            ErrorKind::Unsupported => proto::ENOTSUP,
            _ => match e.errno() {
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => proto::ENOSPC,
                libc::EPERM | libc::EROFS | libc::EACCES => proto::EPERM,
                libc::ENOMEM => proto::ENOMEM,
                _ => proto::EIO,
            },
        };
        OpError {
            errno,
            msg: e.to_string(),
        }
    }
}

fn io_err(e: std::io::Error, what: &str) -> OpError {
    OpError::from(Error::io(e, what.to_string()))
}

/// One run of `map`, as block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Length.
    pub len: u64,
    /// No data stored (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
    /// `qemu:allocation-depth`: 0 unallocated, 1 this image, 2 its backing file, ...
    pub depth: u32,
}

impl Export {
    /// Export `disk`; `writable`: it was opened for writing.
    pub fn new(disk: Disk, writable: bool) -> Export {
        let size = disk.size();
        let writable = writable
            && match &disk {
                Disk::Qcow2(i) => i.is_writable(),
                Disk::Raw(_) => true,
            };
        Export {
            disk,
            size,
            writable,
            writethrough: false,
            bitmaps: Vec::new(),
        }
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Give back the disk.
    pub fn into_disk(self) -> Disk {
        self.disk
    }

    /// Read `buf.len()` bytes at `off`.
    pub async fn read(&self, buf: &mut [u8], off: u64) -> Result<(), OpError> {
        Ok(self.disk.read_at(buf, off).await?)
    }

    /// Write `buf` at `off`.
    pub async fn write(&self, buf: &[u8], off: u64, fua: bool) -> Result<(), OpError> {
        match &self.disk {
            Disk::Qcow2(i) => i.write_at(buf, off).await?,
            Disk::Raw(_) => {
                let s = self.raw()?;
                s.write_at(buf, off).await.map_err(|e| io_err(e, "write"))?
            }
        }
        self.after_write(fua).await
    }

    fn raw(&self) -> Result<&std::sync::Arc<dyn qcow2_core::io::Storage>, OpError> {
        self.disk.raw_storage().ok_or_else(|| OpError {
            errno: proto::EIO,
            msg: "not a raw disk".into(),
        })
    }

    async fn after_write(&self, fua: bool) -> Result<(), OpError> {
        if fua || self.writethrough {
            self.flush().await?;
        }
        Ok(())
    }

    /// Whether zeroing `[off, off+len)` is fast (metadata only, no data written).
    pub fn fast_zero_possible(&self, off: u64, len: u64) -> bool {
        match &self.disk {
            Disk::Qcow2(i) => {
                let h = i.header();
                let cs = i.layout().cluster_size;
                let end = off + len;
                h.version >= 3
                    && !h.data_file_raw()
                    && off.is_multiple_of(cs)
                    && (end.is_multiple_of(cs) || end == self.size)
            }
            Disk::Raw(_) => true,
        }
    }

    /// Make `[off, off+len)` read as zeros. `no_hole`: keep it allocated.
    pub async fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), OpError> {
        match &self.disk {
            Disk::Qcow2(i) => {
                let mode = if no_hole {
                    ZeroMode::Keep
                } else {
                    ZeroMode::Unmap
                };
                i.write_zeroes(off, len, mode).await?
            }
            Disk::Raw(_) => {
                let s = self.raw()?;
                s.write_zeroes(off, len)
                    .await
                    .map_err(|e| io_err(e, "write zeroes"))?
            }
        }
        self.after_write(fua).await
    }

    /// Discard `[off, off+len)`.
    pub async fn trim(&self, off: u64, len: u64, fua: bool) -> Result<(), OpError> {
        match &self.disk {
            Disk::Qcow2(i) => i.discard(off, len).await?,
            Disk::Raw(_) => {
                let s = self.raw()?;
                s.discard(off, len).await.map_err(|e| io_err(e, "trim"))?;
            }
        }
        self.after_write(fua).await
    }

    /// Make every completed write durable (for every connection: one shared handle).
    pub async fn flush(&self) -> Result<(), OpError> {
        Ok(self.disk.flush().await?)
    }

    /// `qemu:allocation-depth` of a map entry at `pos`, as QEMU counts it: the 1-based
    /// depth of the layer that decides, 0 when no layer does. A backing file shorter than
    /// the layer above it decides the range past its end (it reads as zeros there).
    fn allocation_depth(&self, e: &qcow2_core::MapEntry, pos: u64) -> u32 {
        if e.present {
            return e.depth + 1;
        }
        let mut layer = Some(&self.disk);
        for _ in 0..=e.depth {
            layer = layer.and_then(|l| l.backing());
        }
        match layer {
            Some(below) if pos >= below.size() => e.depth + 2,
            _ => 0,
        }
    }

    /// Status runs from `off` covering `len` bytes (clipped to the export) or until
    /// `max` runs; adjacent runs of equal status are merged.
    pub async fn status(&self, off: u64, len: u64, max: usize) -> Result<Vec<Status>, OpError> {
        let end = off.saturating_add(len).min(self.size);
        let mut out: Vec<Status> = Vec::new();
        let mut pos = off;
        while pos < end {
            let e = self.disk.map_entry(pos, end - pos).await?;
            let len = e.length.max(1).min(self.size - pos);
            let st = Status {
                len,
                hole: !e.data,
                zero: e.zero,
                depth: self.allocation_depth(&e, pos),
            };
            pos += len;
            match out.last_mut() {
                Some(l) if l.hole == st.hole && l.zero == st.zero && l.depth == st.depth => {
                    l.len += st.len
                }
                _ => {
                    if out.len() == max {
                        break;
                    }
                    out.push(st)
                }
            }
        }
        Ok(out)
    }
}

/// Add a run of `len` bytes with `flags` to `out`, merged with the last extent when the
/// flags are equal, each extent at most `max_len` bytes; `false` once `out` holds `max`
/// extents and more would be needed.
pub fn push_extent(out: &mut Vec<Extent>, len: u64, flags: u32, max_len: u64, max: usize) -> bool {
    let mut left = len;
    while left > 0 {
        if let Some(l) = out.last_mut() {
            if l.flags == flags && l.len < max_len {
                let add = left.min(max_len - l.len);
                l.len += add;
                left -= add;
                continue;
            }
        }
        if out.len() == max {
            return false;
        }
        let n = left.min(max_len);
        out.push(Extent { len: n, flags });
        left -= n;
    }
    true
}

/// Extents of one context from status runs, each at most `max_len` bytes, merged where
/// the context's flags are equal; `max` extents at most.
pub fn extents(
    runs: &[Status],
    f: impl Fn(&Status) -> u32,
    max_len: u64,
    max: usize,
) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for r in runs {
        if !push_extent(&mut out, r.len, f(r), max_len, max) {
            break;
        }
    }
    out
}

/// Extents of a dirty bitmap over `[off, off+len)` (clipped to the export), flag
/// `NBD_STATE_DIRTY` where dirty; as [`extents`] for `max_len` and `max`.
pub fn bitmap_extents(
    b: &DirtyBitmap,
    off: u64,
    end: u64,
    max_len: u64,
    max: usize,
) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    // Each run needs at most len/max_len + 1 extents; `max` runs are always enough.
    for (len, dirty) in b.runs(off, end, max) {
        let flags = if dirty { proto::STATE_DIRTY } else { 0 };
        if !push_extent(&mut out, len, flags, max_len, max) {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs() {
        // Granularity 64 KiB over 20 granules: 1 and 2 dirty, 9..=17 dirty.
        let mut bits = vec![0u8; 3];
        for i in [1u64, 2, 9, 10, 11, 12, 13, 14, 15, 16, 17] {
            bits[(i / 8) as usize] |= 1 << (i % 8);
        }
        let g = 64 << 10;
        let b = DirtyBitmap::new("b".into(), bits, g, 20 * g - 100);
        assert_eq!(
            b.runs(0, 20 * g - 100, 100),
            vec![
                (g, false),
                (2 * g, true),
                (6 * g, false),
                (9 * g, true),
                (2 * g - 100, false)
            ]
        );
        // Clipped to the range, even inside a granule.
        assert_eq!(b.runs(g + 5, 2 * g, 100), vec![(g - 5, true)]);
        assert_eq!(b.runs(100, 2 * g, 1), vec![(g - 100, false)]);
        // A bitmap of a shorter backing file: clean past its end.
        let b = DirtyBitmap::new("b".into(), vec![0xff], g, 3 * g + 7);
        assert_eq!(
            b.runs(0, 10 * g, 100),
            vec![(3 * g + 7, true), (7 * g - 7, false)]
        );
        let e = bitmap_extents(&b, 0, 10 * g, g, 3);
        assert_eq!(e.len(), 3);
        assert!(e
            .iter()
            .all(|x| x.len == g && x.flags == proto::STATE_DIRTY));
    }
}
