//! The exported disk: one shared handle (qcow2 through the engine, or raw) used by every
//! connection, so a flush on any connection covers the writes of all of them.

use crate::proto::{self, Extent};
use qcow2_core::{Disk, Error, ErrorKind, ZeroMode};

/// An exported disk.
pub struct Export {
    disk: Disk,
    size: u64,
    writable: bool,
    /// Flush after every write (`--cache=writethrough`/`directsync`). A qcow2 image
    /// opened with `OpenOptions::write_through` flushes itself: the export adds none.
    pub writethrough: bool,
    /// Dirty bitmaps exported as `qemu:dirty-bitmap:NAME` (`-B`), in context order.
    pub bitmaps: Vec<DirtyBitmap>,
}

/// A persistent dirty bitmap exported as the metadata context `qemu:dirty-bitmap:NAME`
/// (`-B NAME`). A bitmap of a layer the export does not write to (a backing file, a
/// read-only export, a disabled bitmap) does not change while it serves: its bits are
/// read at start. An enabled bitmap of the image the export writes to is live, as
/// qemu-nbd's: every write, zeroing and trim through the export is recorded in it (by the
/// engine, see `qcow2_core::engine::dirty`) and block status reports it at once.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    /// The bitmap's name.
    pub name: String,
    /// Bit `i` (bit `i % 8` of byte `i / 8`) covers the bytes from `i * granularity`.
    /// For a live bitmap: the bits read at start, used while the image does not track it
    /// (then they are current: nothing has changed it).
    bits: Vec<u8>,
    granularity: u64,
    /// Bytes the bitmap covers: the size of the layer holding it (a backing file may be
    /// shorter than the export; past its end nothing is dirty).
    covered: u64,
    /// Read from the exported image's in-memory tracking at each query.
    live: bool,
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
            live: false,
        }
    }

    /// Make it live: an enabled bitmap of the image the export writes to.
    pub fn live(mut self) -> DirtyBitmap {
        self.live = true;
        self
    }

    /// Whether block status reads the image's in-memory tracking.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Runs `(length, dirty)` covering `[off, end)`, at most `max` of them; a dirty run
    /// spans whole granules, clipped to the range (as QEMU reports them).
    pub fn runs(&self, off: u64, end: u64, max: usize) -> Vec<(u64, bool)> {
        bit_runs(&self.bits, self.granularity, self.covered, off, end, max)
    }
}

fn bit(bits: &[u8], i: u64) -> bool {
    bits[(i / 8) as usize] & (1 << (i % 8)) != 0
}

/// The first bit of `bits` from `i` on that is not `v` (`n` when there is none below `n`).
fn next_change(bits: &[u8], n: u64, mut i: u64, v: bool) -> u64 {
    let same = if v { u64::MAX } else { 0 };
    while i < n {
        if i.is_multiple_of(64) && i + 64 <= n {
            let b = (i / 8) as usize;
            let word = u64::from_le_bytes(bits[b..b + 8].try_into().unwrap());
            if word == same {
                i += 64;
                continue;
            }
        }
        if i.is_multiple_of(8) && i + 8 <= n && bits[(i / 8) as usize] == same as u8 {
            i += 8;
            continue;
        }
        if bit(bits, i) != v {
            return i;
        }
        i += 1;
    }
    n
}

/// Runs `(length, dirty)` of a bitmap (`bits` at `granularity`, covering `covered` bytes)
/// over `[off, end)`, at most `max` of them; a dirty run spans whole granules, clipped to
/// the range (as QEMU reports them). Past `covered` (or the bits) nothing is dirty.
pub fn bit_runs(
    bits: &[u8],
    granularity: u64,
    covered: u64,
    off: u64,
    end: u64,
    max: usize,
) -> Vec<(u64, bool)> {
    let g = granularity.max(1);
    let n = covered.div_ceil(g).min(bits.len() as u64 * 8);
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end && out.len() < max {
        let i = pos / g;
        if i >= n || pos >= covered {
            out.push((end - pos, false));
            break;
        }
        let v = bit(bits, i);
        let j = next_change(bits, n, i, v);
        let stop = if j >= n && !v {
            end
        } else {
            j.saturating_mul(g).min(covered).min(end)
        };
        out.push((stop - pos, v));
        pos = stop;
    }
    out
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
        // A write-through image has flushed (data and metadata) before its request
        // completed: that is what FUA and writethrough ask.
        let flushed = matches!(&self.disk, Disk::Qcow2(i) if i.options().write_through);
        if (fua || self.writethrough) && !flushed {
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

    /// Runs `(length, dirty)` of exported bitmap `b` over `[off, end)`, at most `max`:
    /// a live bitmap as the image records it now, including the writes made so far.
    pub async fn bitmap_runs(
        &self,
        b: &DirtyBitmap,
        off: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<(u64, bool)>, OpError> {
        if b.live {
            if let Disk::Qcow2(img) = &self.disk {
                let now = img
                    .with_live_bitmap(&b.name, |bits, g| {
                        bit_runs(bits, g, b.covered, off, end, max)
                    })
                    .await?;
                if let Some(r) = now {
                    return Ok(r);
                }
            }
        }
        Ok(b.runs(off, end, max))
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

    /// Status runs from `off` covering `len` bytes (clipped to the export), adjacent runs
    /// of equal status merged, until each context has `max` extents: `base:allocation`
    /// (hole, zero) and `qemu:allocation-depth` change at different places, and a client
    /// asking for both with `NBD_CMD_FLAG_REQ_ONE` gets the first whole extent of each.
    /// `alloc`, `depth`: which of the two contexts are wanted (at most `2 * max` runs).
    pub async fn status(
        &self,
        off: u64,
        len: u64,
        max: usize,
        alloc: bool,
        depth: bool,
    ) -> Result<Vec<Status>, OpError> {
        let end = off.saturating_add(len).min(self.size);
        let mut out: Vec<Status> = Vec::new();
        // Extents begun per context, and whether a context has all it may take.
        let (mut n_alloc, mut n_depth) = (0usize, 0usize);
        let (mut alloc_done, mut depth_done) = (!alloc, !depth);
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
            let (new_alloc, new_depth) = match out.last() {
                Some(l) => (l.hole != st.hole || l.zero != st.zero, l.depth != st.depth),
                None => (true, true),
            };
            if new_alloc {
                alloc_done |= n_alloc == max;
                n_alloc += 1;
            }
            if new_depth {
                depth_done |= n_depth == max;
                n_depth += 1;
            }
            if alloc_done && depth_done {
                break;
            }
            match out.last_mut() {
                Some(l) if !new_alloc && !new_depth => l.len += st.len,
                _ => out.push(st),
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

/// Extents of a dirty bitmap from its runs (as [`Export::bitmap_runs`] gives them), flag
/// `NBD_STATE_DIRTY` where dirty; as [`extents`] for `max_len` and `max`.
pub fn bitmap_extents(runs: &[(u64, bool)], max_len: u64, max: usize) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    // Each run needs at most len/max_len + 1 extents; `max` runs are always enough.
    for &(len, dirty) in runs {
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

    /// A qcow2 image opened with `write_through` (serve --cache=writethrough/directsync)
    /// flushes after each request itself: the export's writethrough and the clients' FUA
    /// add no second flush of the file.
    #[test]
    fn a_write_through_image_is_flushed_once_per_request() {
        use qcow2_core::io::powercut::{Entry, PowerCut};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("e.qcow2");
            let co = qcow2_core::create::CreateOptions {
                size: Some(1 << 20),
                ..Default::default()
            };
            qcow2_core::create::create_qcow2(&path, &co).await.unwrap();
            let pc = PowerCut::new();
            let file = pc.add_file(std::fs::read(&path).unwrap());
            let mut oo = qcow2_core::OpenOptions::default();
            oo.writable = true;
            oo.write_through = true;
            let img = qcow2_core::Image::open_storage(file, &path, &oo)
                .await
                .unwrap();
            // Allocate the cluster: the writes below are in place.
            img.write_at(&[1; 4096], 0).await.unwrap();
            let flushes = || {
                pc.log()
                    .iter()
                    .filter(|e| matches!(e, Entry::Flush { .. }))
                    .count()
            };
            let n = flushes();
            img.write_at(&[2; 4096], 0).await.unwrap();
            let own = flushes() - n;
            assert!(own >= 1, "the write-through image did not flush");
            let mut export = Export::new(Disk::Qcow2(img), true);
            export.writethrough = true;
            for fua in [false, true] {
                let n = flushes();
                export.write(&[3; 4096], 0, fua).await.unwrap();
                assert_eq!(flushes() - n, own, "write, FUA {fua}");
                let n = flushes();
                export.write_zeroes(512, 512, true, fua).await.unwrap();
                assert_eq!(flushes() - n, own, "write zeroes, FUA {fua}");
            }
        });
    }

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
        // Whole clean and dirty 64-bit words are skipped at once.
        let mut bits = vec![0u8; 40];
        bits[8..24].fill(0xff);
        bits[24] = 0x01;
        bits[33] = 0x80;
        assert_eq!(
            bit_runs(&bits, 512, 320 * 512, 0, 320 * 512, 100),
            vec![
                (64 * 512, false),
                (129 * 512, true),
                (78 * 512, false),
                (512, true),
                (48 * 512, false)
            ]
        );
        let e = bitmap_extents(&b.runs(0, 10 * g, 3), g, 3);
        assert_eq!(e.len(), 3);
        assert!(e
            .iter()
            .all(|x| x.len == g && x.flags == proto::STATE_DIRTY));
    }
}
