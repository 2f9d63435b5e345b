//! `convert` and `compare`: whole-disk copies and comparisons.

use crate::engine::disk::{Disk, Format};
use crate::io::{FileOptions, Storage};
use crate::{Error, Result, ResultExt};
use futures::stream::{self, StreamExt, TryStreamExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Bytes per unit of work.
pub const CHUNK: u64 = 2 << 20;
/// Largest write of a conversion to a target without `O_DIRECT`: buffered writes up to
/// this size run on the calling thread (`FileCore::write_inline`), larger ones go through
/// the engine (on ext4 an io_uring io-wq worker, and a second thread hop to complete).
const WRITE_SLICE: usize = 1 << 20;
/// Shortest data run of a conversion to a new raw file whose space is reserved
/// (`fallocate`) before it is written, without `O_DIRECT` on a disk file system. A buffered
/// write into reserved (unwritten) blocks skips ext4's delayed allocation (a reservation and
/// a delayed extent per block), and the flush at the end has no blocks left to allocate:
/// `convert -O raw` of 1 GiB on ext4 took about a fifth less CPU with it. Shorter runs are
/// not worth the call (through io_uring, a hop to an io-wq worker).
const RESERVE_MIN: usize = 256 << 10;
/// Granularity of zero detection in data (qemu-img's default `-S 4k`).
pub const ZERO_GRANULE: usize = 4096;

/// Options of [`convert_to_raw`].
#[derive(Clone)]
pub struct ConvertOptions {
    /// Requests in flight (qemu-img `-m`).
    pub parallel: usize,
    /// Called with the fraction done (0.0 to 1.0).
    pub progress: Option<Arc<dyn Fn(f64) + Send + Sync>>,
    /// Options for files we open and create.
    pub file: FileOptions,
    /// Shortest run of zeros in the data that is left unallocated in the target (qemu-img
    /// `-S`, default 4 KiB; a multiple of 512). 0: nothing is left unallocated, every byte
    /// of the target is written (fully allocated), zeros included.
    pub sparse_size: u64,
    /// Write into the existing target (qemu-img `-n`): it is opened, not created, must be at
    /// least as large as the source, and keeps its size; what reads as zeros in the source
    /// is written as zeros.
    pub existing: bool,
    /// With `existing`: the target is known to read as zeros, so zeros are not written
    /// (qemu-img `--target-is-zero`).
    pub target_is_zero: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            parallel: 8,
            progress: None,
            file: FileOptions::default(),
            sparse_size: ZERO_GRANULE as u64,
            existing: false,
            target_is_zero: false,
        }
    }
}

/// How `-S`, `-n` and `--target-is-zero` treat zeros.
#[derive(Clone, Copy)]
struct Zeros {
    /// Shortest zero run left unallocated; 0: none.
    sparse: u64,
    /// Zeros must be written (an existing target not known to be zero).
    fill: bool,
}

impl Zeros {
    fn of(opts: &ConvertOptions) -> Zeros {
        Zeros {
            sparse: opts.sparse_size,
            fill: opts.existing && !opts.target_is_zero,
        }
    }
}

/// Split `buf` (guest offset `off`) into runs `(start, len, hole)` covering it, as qemu-img
/// decides for `-S min` what to write and what to leave unallocated. `data` are the runs
/// of `buf` the source stores as data (ascending, relative to `buf`); the rest reads as
/// zeros in the source and is a hole. In each data run a leading run of zeros is a hole;
/// then data continues over zero runs shorter than `min` up to one at least `min` long (a
/// hole), where zero runs are counted in 512-byte sectors and the end of a data run is
/// rounded up (of a zero run, down) to a multiple of `align` in the guest, unless the run
/// ends the data run. A zero run within the `align` unit where the data before it ends
/// counts as data. (That is qemu-img's `is_allocated_sectors_min`, applied to each data
/// run as it applies it to each block-status run.) `min` 0: all data.
fn sparse_runs(
    buf: &[u8],
    off: u64,
    align: u64,
    min: u64,
    data: &[(usize, usize)],
) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let push = |out: &mut Vec<(usize, usize, bool)>, a: usize, b: usize, hole: bool| {
        if a == b {
            return;
        }
        match out.last_mut() {
            Some(l) if l.2 == hole && l.0 + l.1 == a => l.1 += b - a,
            _ => out.push((a, b - a, hole)),
        }
    };
    if min == 0 {
        push(&mut out, 0, buf.len(), false);
        return out;
    }
    let mut pos = 0;
    for &(a, b) in data {
        push(&mut out, pos, a, true);
        let mut i = a;
        while i < b {
            let (n, is_data) = allocated_min(&buf[i..b], off + i as u64, align, min);
            push(&mut out, i, i + n, !is_data);
            i += n;
        }
        pos = b;
    }
    push(&mut out, pos, buf.len(), true);
    out
}

/// The length of the run of like sectors (all zero, or none) at the start of `buf` (guest
/// offset `off`), its end aligned as qemu-img's `is_allocated_sectors` aligns it, and
/// whether it is data. Never 0 for a non-empty `buf`.
fn allocated_run(buf: &[u8], off: u64, align: u64) -> (usize, bool) {
    let mut sectors = buf.chunks(512);
    let zero = sectors.next().is_some_and(sector_is_zero);
    let i = 1 + sectors.take_while(|s| sector_is_zero(s) == zero).count();
    let mut len = i * 512;
    if len >= buf.len() {
        return (buf.len(), !zero);
    }
    let tail = ((off + len as u64) % align) as usize;
    let mut data = !zero;
    if tail != 0 {
        if !data && len <= tail {
            // A zero run inside the unit where the data before it ends.
            data = true;
        }
        if data {
            len = (len + (align as usize - tail)).min(buf.len());
        } else {
            len -= tail;
        }
    }
    (len, data)
}

/// qemu-img's `is_allocated_sectors_min`: the length of the run at the start of `buf` and
/// whether it is data; a data run goes on over zero runs shorter than `min`.
fn allocated_min(buf: &[u8], off: u64, align: u64, min: u64) -> (usize, bool) {
    let min = (min as usize).min(buf.len());
    let (first, data) = allocated_run(buf, off, align);
    if !data {
        return (first, false);
    }
    let (mut used, mut checked) = (first, first);
    while checked < buf.len() {
        let (k, data) = allocated_run(&buf[checked..], off + checked as u64, align);
        checked += k;
        if data {
            used = checked;
        } else if k >= min {
            break;
        }
    }
    (used, true)
}

/// Write `len` zeros at `off` of a raw target as data (fully allocated).
async fn write_zero_data(out: &dyn Storage, off: u64, len: u64) -> std::io::Result<()> {
    let z = vec![0u8; CHUNK.min(len) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK);
        out.write_at(&z[..n as usize], off + pos).await?;
        pos += n;
    }
    Ok(())
}

impl ConvertOptions {
    /// Requests in flight for a conversion asked to run `parallel` at once: compressing
    /// conversions get at least four per core, so that compression keeps every core busy.
    pub fn requests_in_flight(parallel: usize, compress: bool) -> usize {
        if compress {
            parallel.max(
                4 * std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            )
        } else {
            parallel
        }
    }
}

/// [`is_zero`] for a sector, which in data is seldom all zeros: its first 16 bytes are
/// looked at on their own first, so that a data sector costs one load and no loop set-up
/// (zero detection over every 512-byte sector of the data was 2% of the CPU of a
/// conversion from raw to qcow2 on tmpfs).
fn sector_is_zero(b: &[u8]) -> bool {
    match b.first_chunk::<16>() {
        Some(h) if u128::from_ne_bytes(*h) != 0 => false,
        _ => is_zero(b),
    }
}

/// Whether `b` is all zeros.
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(32);
    let whole = chunks.by_ref().all(|c| {
        let (x, y) = c.split_at(16);
        (u128::from_ne_bytes(x.try_into().unwrap()) | u128::from_ne_bytes(y.try_into().unwrap()))
            == 0
    });
    whole && chunks.remainder().iter().all(|&x| x == 0)
}

/// Piece buffers reused from piece to piece: a conversion has at most `parallel` pieces in
/// flight, so it keeps at most that many (2 MiB each) and pays no allocation, zero-fill or
/// page faults per piece. A buffer's old bytes are never seen: every piece is read over the
/// whole buffer before it is looked at.
#[derive(Default)]
struct PieceBufs(parking_lot::Mutex<Vec<PieceBuf>>);

impl PieceBufs {
    fn take(&self, len: usize) -> PieceBuf {
        let mut b = self.0.lock().pop().unwrap_or_default();
        b.resize(len);
        b
    }

    fn give(&self, b: PieceBuf) {
        self.0.lock().push(b);
    }
}

/// Alignment of a piece buffer's memory: an `O_DIRECT` target is written from the buffer
/// as it is only when its memory is aligned to the device's block (512 bytes or 4 KiB);
/// a misaligned buffer is copied into new aligned memory for every write. `Vec<u8>` memory
/// is aligned to 16 bytes only.
const PIECE_ALIGN: usize = 4096;

/// A piece buffer: `len` bytes at a `PIECE_ALIGN`-aligned address inside `mem`.
#[derive(Default)]
struct PieceBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl PieceBuf {
    /// Make the buffer `len` bytes long; its memory is replaced (zeroed) only when too
    /// small, else it keeps its old bytes.
    fn resize(&mut self, len: usize) {
        if self.mem.len() < len + PIECE_ALIGN {
            self.mem = vec![0u8; len + PIECE_ALIGN];
            self.start = self.mem.as_ptr().align_offset(PIECE_ALIGN).min(PIECE_ALIGN);
        }
        self.len = len;
    }
}

impl std::ops::Deref for PieceBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for PieceBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// Run `work` on every piece, `parallel` pieces at once, calling `progress` with the bytes
/// done so far (the sum of what the pieces' futures return) as they complete. On a
/// multi-threaded Tokio runtime every piece in flight runs in a task of its own ("lanes",
/// `parallel` of them, each with one piece at a time), so that the CPU work of a conversion
/// (reads from the page cache, zero detection, copies, decompression) runs on every core;
/// elsewhere they run concurrently in the calling task. The plan is produced in the calling
/// task, which hands each piece to a free lane: a lane is only ever woken from the calling
/// task, never from another lane (a task woken from a runtime worker waits in that worker's
/// LIFO slot, where no other worker can take it, until the waking task yields: with lanes
/// that do synchronous I/O this serialized the conversion on one core). With `ordered`, a
/// piece is handed out only once [`Ordered::admit`] lets it (at most `parallel` pieces past
/// the next one to write hold a buffer). `progress` always runs in the calling task (the C
/// library promises its callers the calling thread), never concurrently. The first error
/// stops the lanes from taking new pieces and is returned; dropping the returned future
/// aborts the lanes (their I/O still runs to its end).
async fn run_pieces<S, F, Fut>(
    pieces: S,
    parallel: usize,
    ordered: Option<Arc<Ordered>>,
    work: F,
    mut progress: impl FnMut(u64),
) -> Result<()>
where
    S: futures::Stream<Item = Result<Piece>>,
    F: Fn(Piece) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64>> + Send + 'static,
{
    let parallel = parallel.max(1);
    let multi = matches!(
        tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
        Ok(tokio::runtime::RuntimeFlavor::MultiThread)
    );
    let mut done = 0u64;
    if !multi || parallel == 1 {
        let progress = parking_lot::Mutex::new((&mut done, &mut progress));
        return pieces
            .try_for_each_concurrent(parallel, |p| {
                let ordered = ordered.clone();
                let work = work.clone();
                let progress = &progress;
                async move {
                    if let Some(o) = &ordered {
                        o.admit(p.seq).await;
                    }
                    let n = work(p).await?;
                    let mut g = progress.lock();
                    *g.0 += n;
                    let d = *g.0;
                    (g.1)(d);
                    Ok(())
                }
            })
            .await;
    }
    let lanes = parallel;
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    struct AbortOnDrop(Vec<tokio::task::JoinHandle<Result<()>>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            for h in &self.0 {
                h.abort();
            }
        }
    }
    // Lanes report (lane, bytes done) when they finish a piece.
    let (done_tx, mut done_rx) = futures::channel::mpsc::unbounded::<(usize, u64)>();
    let mut to_lane = Vec::with_capacity(lanes);
    let mut lanes_h = AbortOnDrop(Vec::with_capacity(lanes));
    for id in 0..lanes {
        let (tx, mut rx) = futures::channel::mpsc::channel::<Piece>(1);
        to_lane.push(tx);
        let (failed, work, done_tx) = (failed.clone(), work.clone(), done_tx.clone());
        let ordered = ordered.clone();
        lanes_h.0.push(tokio::spawn(async move {
            while let Some(p) = rx.next().await {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                match work(p).await {
                    Ok(n) => {
                        let _ = done_tx.unbounded_send((id, n));
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        if let Some(o) = &ordered {
                            o.fail();
                        }
                        return Err(e);
                    }
                }
            }
            Ok(())
        }));
    }
    drop(done_tx);
    // Free lanes, fed back by `drain` (both run in this task).
    let (free_tx, mut free_rx) = futures::channel::mpsc::unbounded::<usize>();
    for id in 0..lanes {
        let _ = free_tx.unbounded_send(id);
    }
    let feed_failed = failed.clone();
    let feed = async move {
        let mut pieces = std::pin::pin!(pieces);
        while let Some(p) = pieces.next().await {
            let p = match p {
                Ok(p) => p,
                Err(e) => {
                    feed_failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            if let Some(o) = &ordered {
                o.admit(p.seq).await;
            }
            // No free lane: every lane ended (one failed; its error is returned below).
            let Some(id) = free_rx.next().await else {
                break;
            };
            if feed_failed.load(Ordering::Relaxed) || to_lane[id].try_send(p).is_err() {
                break;
            }
        }
        // Closing the lanes' channels ends them once their pieces are done.
        drop(to_lane);
        Ok(())
    };
    // The lanes' senders are dropped when they end: then the report channel ends.
    let drain = async {
        while let Some((id, n)) = done_rx.next().await {
            let _ = free_tx.unbounded_send(id);
            done += n;
            progress(done);
        }
        drop(free_tx);
    };
    let (fed, ()) = futures::future::join(feed, drain).await;
    let mut first = fed;
    for h in lanes_h.0.iter_mut() {
        let r = match h.await {
            Ok(r) => r,
            Err(e) => Err(Error::from(std::io::Error::other(format!(
                "a conversion task failed: {e}"
            )))),
        };
        if let Err(e) = r {
            failed.store(true, Ordering::Relaxed);
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    lanes_h.0.clear();
    first
}

/// The writes of a piece, run in plan order by [`Ordered`].
type WriteJob = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// Runs the pieces' writes in plan order (as qemu-img convert writes without `-W`), one at
/// a time, without a thread waiting for its turn: a piece that has read its data hands its
/// writes over ([`Ordered::submit`]); whoever hands over the next piece to write, while no
/// one is writing, writes it and then every following piece already handed over. So a
/// qcow2 target gets its host clusters in guest order, laid out as qemu-img lays them out,
/// whatever order the reads complete in, and the writes to one file never wait for each
/// other in the kernel (buffered writes to a file are serialized by its inode lock, where a
/// second writer spins while the first copies): while one thread writes, the others read.
struct Ordered {
    state: parking_lot::Mutex<OrderedState>,
    /// Pieces past the next one to write that may be handed out.
    window: u64,
    /// Signalled when the next piece to write moves on.
    advanced: tokio::sync::Notify,
}

#[derive(Default)]
struct OrderedState {
    /// The next piece to write.
    next: u64,
    /// Pieces handed over and not written yet: their length and writes.
    ready: std::collections::BTreeMap<u64, (u64, WriteJob)>,
    /// A piece's future is writing (or a write failed: nothing more is written).
    writing: bool,
    /// The conversion failed: every piece is admitted (to end), nothing more is written.
    failed: bool,
}

impl Ordered {
    fn new(window: usize) -> Self {
        Ordered {
            state: parking_lot::Mutex::new(OrderedState::default()),
            window: window.max(1) as u64,
            advanced: tokio::sync::Notify::new(),
        }
    }

    /// Wait until piece `seq` may start (read its data): it is less than `window` pieces
    /// past the next one to write. The next piece to write is always admitted, so pieces
    /// admitted in plan order never wait for each other in a circle.
    async fn admit(&self, seq: u64) {
        loop {
            let notified = self.advanced.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let go = {
                let g = self.state.lock();
                g.failed || seq < g.next + self.window
            };
            if go {
                return;
            }
            notified.await;
        }
    }

    /// The conversion failed (a piece that will never be handed over, or a write): let
    /// every waiting piece go on to its end, and write nothing more.
    fn fail(&self) {
        let mut g = self.state.lock();
        g.failed = true;
        g.writing = true;
        drop(g);
        self.advanced.notify_waiters();
    }

    /// Hand over the writes of piece `seq` (`len` bytes of the plan). If it is the next
    /// to write and no one is writing, write it and the pieces after it that are ready.
    /// Returns the bytes of the plan written by this call (for progress).
    async fn submit(&self, seq: u64, len: u64, job: WriteJob) -> Result<u64> {
        {
            let mut g = self.state.lock();
            g.ready.insert(seq, (len, job));
            if g.writing || g.ready.first_key_value().map(|(k, _)| *k) != Some(g.next) {
                return Ok(0);
            }
            g.writing = true;
        }
        let mut written = 0;
        loop {
            let (len, job) = {
                let mut g = self.state.lock();
                let next = g.next;
                match g.ready.first_entry() {
                    Some(e) if *e.key() == next => e.remove(),
                    _ => {
                        g.writing = false;
                        return Ok(written);
                    }
                }
            };
            if let Err(e) = job.await {
                self.fail();
                return Err(e);
            }
            self.state.lock().next += 1;
            self.advanced.notify_waiters();
            written += len;
        }
    }
}

/// One unit of copy work: the guest range and whether it is known to read as zeros.
#[derive(Clone, Debug)]
struct Piece {
    off: u64,
    len: u64,
    zero: bool,
    /// Position in the plan (0, 1, 2, ...).
    seq: u64,
    /// The runs the source stores as data (not reading as zeros), relative to `off`.
    data: Vec<(usize, usize)>,
}

/// The copy plan, produced lazily (memory is constant whatever the disk size): `[0, size)`
/// cut into windows aligned to `CHUNK` (a multiple of every cluster size), so that no cluster
/// of a target is split between two windows (compression needs whole clusters, and windows
/// copied concurrently never share a cluster). A window is zero when the chain says all of it
/// reads as zeros; neighbouring zero windows are merged into one piece (which can be huge: it
/// is never read into memory).
struct Planner<'a> {
    src: ZeroRuns<'a>,
    size: u64,
    pos: u64,
    /// Pieces handed out so far.
    seq: u64,
}

/// Block status of a disk as runs that read as zeros or not, remembering the last run looked
/// up. A status lookup returns the whole run (up to the end of the disk), and for a raw file
/// on some file systems (tmpfs) `SEEK_HOLE` costs time in proportion to the run's length, so
/// asking again for every `CHUNK` window would make a walk over the disk quadratic in its size
/// (qemu-img keeps its last block status the same way).
struct ZeroRuns<'a> {
    disk: &'a Disk,
    /// The last run: `[start, end)` and whether it reads as zeros.
    known: Option<(u64, u64, bool)>,
}

impl<'a> ZeroRuns<'a> {
    fn new(disk: &'a Disk) -> Self {
        ZeroRuns { disk, known: None }
    }

    /// End of the run of like status at `q` (at most `end`, `q < end <= size`) and whether
    /// it reads as zeros.
    async fn at(&mut self, q: u64, end: u64) -> Result<(u64, bool)> {
        if let Some((a, b, zero)) = self.known {
            if a <= q && q < b {
                return Ok((b.min(end), zero));
            }
        }
        let e = self.disk.map_entry(q, end - q).await?;
        let e_end = q + e.length.max(1);
        self.known = Some((q, e_end, e.zero));
        Ok((e_end.min(end), e.zero))
    }
}

impl<'a> Planner<'a> {
    fn new(src: &'a Disk) -> Self {
        Planner {
            src: ZeroRuns::new(src),
            size: src.size(),
            pos: 0,
            seq: 0,
        }
    }

    /// The next piece, or `None` at the end of the disk.
    async fn next_piece(&mut self) -> Result<Option<Piece>> {
        let Some((off, len, zero)) = self.next_range().await? else {
            return Ok(None);
        };
        // The data runs of a window (from the runs looked up already: no new lookup).
        let mut data: Vec<(usize, usize)> = Vec::new();
        let mut q = off;
        while !zero && q < off + len {
            let (end, z) = self.src.at(q, self.size).await?;
            let end = end.min(off + len);
            if !z {
                let (a, b) = ((q - off) as usize, (end - off) as usize);
                match data.last_mut() {
                    Some(l) if l.1 == a => l.1 = b,
                    _ => data.push((a, b)),
                }
            }
            q = end;
        }
        self.seq += 1;
        Ok(Some(Piece {
            off,
            len,
            zero,
            seq: self.seq - 1,
            data,
        }))
    }

    /// The next range `(off, len, zero)`, or `None` at the end of the disk.
    async fn next_range(&mut self) -> Result<Option<(u64, u64, bool)>> {
        let size = self.size;
        let start = self.pos;
        let mut pos = start;
        while pos < size {
            let wend = ((pos / CHUNK + 1) * CHUNK).min(size);
            let mut q = pos;
            let mut zero = true;
            while q < wend {
                let (end, z) = self.src.at(q, size).await?;
                if !z {
                    zero = false;
                    break;
                }
                q = end;
            }
            if !zero {
                if pos > start {
                    // The zero run before this window first.
                    self.pos = pos;
                    return Ok(Some((start, pos - start, true)));
                }
                self.pos = wend;
                return Ok(Some((pos, wend - pos, false)));
            }
            // Zeros up to `q`: skip to the last window boundary inside the run.
            pos = if q >= size {
                size
            } else {
                (q / CHUNK * CHUNK).max(wend)
            };
        }
        self.pos = pos;
        Ok((pos > start).then_some((start, pos - start, true)))
    }

    /// The plan as a stream of pieces.
    fn stream(self) -> impl futures::Stream<Item = Result<Piece>> + 'a {
        stream::try_unfold(self, |mut p| async move {
            Ok(p.next_piece().await?.map(|piece| (piece, p)))
        })
    }
}

/// Copy the guest content of `src` into a new raw file at `dst` (created or truncated),
/// leaving holes where the content is zero.
pub async fn convert_to_raw(src: &Disk, dst: &Path, opts: &ConvertOptions) -> Result<()> {
    refuse_source_as_target(src, dst)?;
    let size = src.size();
    let z = Zeros::of(opts);
    // Keeps the target's lock for the conversion.
    let (out, _keep_new, _keep_raw) = if opts.existing {
        let oo = crate::engine::image::OpenOptions::writable_target(&opts.file);
        let r = crate::engine::disk::RawDisk::open(dst, &oo)
            .map_err(|e| e.context(format!("Could not open '{}'", dst.display())))?;
        if r.storage().len().ctx(dst.display())? < size {
            return Err(Error::invalid("output file is smaller than input file"));
        }
        (r.storage().clone(), None, Some(r))
    } else {
        let new = crate::jobs::create::create_file(dst, &opts.file)?;
        let out = new.file.clone();
        out.set_len(size).ctx(dst.display())?;
        (out, Some(new), None)
    };
    let unit = if z.sparse == 0 {
        512
    } else {
        1u64 << (63 - z.sparse.leading_zeros())
    };
    let pieces = Planner::new(src).stream();
    let total = size.max(1);
    let bufs = Arc::new(PieceBufs::default());
    // Buffered writes to one file wait for each other in the kernel: they are written one
    // at a time, in plan order. With O_DIRECT they overlap (the device takes several).
    let ordered = (!opts.file.direct).then(|| Arc::new(Ordered::new(opts.parallel)));
    let slice = if opts.file.direct {
        CHUNK as usize
    } else {
        WRITE_SLICE
    };
    // A new target on a disk file system gets the space of each data run reserved
    // (`fallocate`) before the run is written: see `RESERVE_MIN`.
    let reserve = !opts.existing && !opts.file.direct && !out.in_memory();
    let (src2, out2, dst2, ordered2) =
        (src.clone(), out.clone(), dst.to_path_buf(), ordered.clone());
    let work = move |p: Piece| {
        let (src, out, dst, bufs) = (src2.clone(), out2.clone(), dst2.clone(), bufs.clone());
        let ordered = ordered2.clone();
        async move {
            let (seq, len) = (p.seq, p.len);
            let job: WriteJob = if p.zero {
                Box::pin(async move {
                    if z.sparse == 0 {
                        write_zero_data(&*out, p.off, p.len)
                            .await
                            .ctx(dst.display())?;
                    } else if z.fill {
                        out.write_zeroes(p.off, p.len).await.ctx(dst.display())?;
                    }
                    Ok(())
                })
            } else {
                let mut buf = bufs.take(p.len as usize);
                src.read_at(&mut buf, p.off).await?;
                let runs = sparse_runs(&buf, p.off, unit, z.sparse, &p.data);
                Box::pin(async move {
                    for (a, n, hole) in runs {
                        let at = p.off + a as u64;
                        if !hole {
                            if reserve && n >= RESERVE_MIN {
                                // Errors are left to the writes (no space: those fail too).
                                let _ = out.allocate(at, n as u64).await;
                            }
                            for (k, part) in buf[a..a + n].chunks(slice).enumerate() {
                                out.write_at(part, at + (k * slice) as u64)
                                    .await
                                    .ctx(dst.display())?;
                            }
                        } else if z.fill {
                            out.write_zeroes(at, n as u64).await.ctx(dst.display())?;
                        }
                    }
                    bufs.give(buf);
                    Ok(())
                })
            };
            match &ordered {
                Some(o) => o.submit(seq, len, job).await,
                None => job.await.map(|()| len),
            }
        }
    };
    run_pieces(pieces, opts.parallel, ordered, work, |d| {
        if let Some(cb) = &opts.progress {
            cb(d as f64 / total as f64);
        }
    })
    .await?;
    out.flush().await.ctx(dst.display())?;
    Ok(())
}

/// Refuse a destination that is a file the source reads (the source image, a file of its
/// backing chain, an external data file), whatever its name (`./x`, a link): creating the
/// destination would empty it before anything is read. Compares devices and inodes.
pub fn refuse_source_as_target(src: &Disk, dst: &Path) -> Result<()> {
    let Some(f) = src.same_file_in_chain(dst) else {
        return Ok(());
    };
    let what = if f == src.path() {
        "the source image".to_string()
    } else if matches!(src, Disk::Qcow2(i) if i.data_file_path() == Some(f)) {
        format!("the source's data file '{}'", f.display())
    } else {
        format!("'{}' of the source's backing chain", f.display())
    };
    Err(Error::invalid(format!(
        "the destination is the same file as {what}; refusing to overwrite it"
    )))
}

/// Write the non-zero `ZERO_GRANULE` runs of `buf` at `off`.
pub async fn write_nonzero(out: &dyn Storage, buf: &[u8], off: u64) -> std::io::Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let g = ZERO_GRANULE.min(buf.len() - i);
        if is_zero(&buf[i..i + g]) {
            i += g;
            continue;
        }
        let start = i;
        while i < buf.len() {
            let g = ZERO_GRANULE.min(buf.len() - i);
            if is_zero(&buf[i..i + g]) {
                break;
            }
            i += g;
        }
        out.write_at(&buf[start..i], off + start as u64).await?;
    }
    Ok(())
}

/// Result of [`compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareResult {
    /// Same content.
    Identical,
    /// The first differing byte offset.
    Mismatch(u64),
    /// Strict mode: sizes differ.
    SizeMismatch,
}

/// Compare the guest content of `a` and `b` like `qemu-img compare` (`strict`: sizes must be
/// equal). With different sizes in non-strict mode the tail of the larger must read as zeros.
pub async fn compare(a: &Disk, b: &Disk, strict: bool) -> Result<CompareResult> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(CompareResult::SizeMismatch);
    }
    let common = sa.min(sb);
    if let Some(off) = first_difference(a, Some(b), 0, common).await? {
        return Ok(CompareResult::Mismatch(off));
    }
    let longer = if sa > sb { a } else { b };
    if let Some(off) = first_difference(longer, None, common, sa.max(sb)).await? {
        return Ok(CompareResult::Mismatch(off));
    }
    Ok(CompareResult::Identical)
}

/// First offset in `[start, end)` where `a` differs from `b` (or from zeros when `b` is None).
///
/// Streams: the block status of both sides is walked lazily; runs where both read as zeros
/// are skipped without reading (an empty disk of any size costs one status lookup per L2
/// table's range), the rest is read and compared a `CHUNK` window at a time, 8 windows in
/// flight. Memory is constant whatever the disk size, and the walk stops at the first
/// difference.
async fn first_difference(a: &Disk, b: Option<&Disk>, start: u64, end: u64) -> Result<Option<u64>> {
    let runs = (ZeroRuns::new(a), b.map(ZeroRuns::new));
    let windows = stream::try_unfold((start, runs), move |(mut pos, mut runs)| async move {
        while pos < end {
            let (ea, za) = runs.0.at(pos, end).await?;
            let (eb, zb) = match &mut runs.1 {
                Some(rb) => rb.at(pos, end).await?,
                None => (end, true),
            };
            if za && zb {
                pos = ea.min(eb);
                continue;
            }
            // Read the whole CHUNK window around the run (as data runs are often short).
            let wend = ((pos / CHUNK + 1) * CHUNK).min(end);
            return Ok::<_, Error>(Some(((pos, wend - pos), (wend, runs))));
        }
        Ok(None)
    });
    let diffs = windows
        .map_ok(|(off, len)| async move {
            let mut ba = vec![0u8; len as usize];
            a.read_at(&mut ba, off).await?;
            let pos = match b {
                Some(b) => {
                    let mut bb = vec![0u8; len as usize];
                    b.read_at(&mut bb, off).await?;
                    ba.iter().zip(bb.iter()).position(|(x, y)| x != y)
                }
                None => ba.iter().position(|&x| x != 0),
            };
            Ok::<Option<u64>, Error>(pos.map(|p| off + p as u64))
        })
        .try_buffered(8);
    let mut diffs = std::pin::pin!(diffs);
    while let Some(d) = diffs.try_next().await? {
        if d.is_some() {
            return Ok(d);
        }
    }
    Ok(None)
}

/// Open a disk for reading by name and optional format name.
pub async fn open_disk(
    path: &Path,
    format: Option<&str>,
    opts: &crate::engine::image::OpenOptions,
) -> Result<Disk> {
    let fmt = match format {
        Some(f) => Some(Format::parse(f)?),
        None => None,
    };
    Disk::open(path, fmt, opts).await
}

/// What `convert` writes.
#[derive(Debug, Clone)]
pub struct Target {
    /// Output format.
    pub format: Format,
    /// qcow2 creation options (size is taken from the source; backing from here).
    pub create: crate::jobs::create::CreateOptions,
    /// Write compressed clusters (qcow2 only).
    pub compress: bool,
}

/// Copy `src` into a new image at `dst` in the target format. With a backing file in
/// `target.create`, only what differs from it is written.
pub async fn convert(src: &Disk, dst: &Path, target: &Target, opts: &ConvertOptions) -> Result<()> {
    if target.format == Format::Raw {
        if target.compress {
            return Err(Error::invalid(
                "compression is only supported with the qcow2 output format",
            ));
        }
        return convert_to_raw(src, dst, opts).await;
    }
    refuse_source_as_target(src, dst)?;
    if let Some(df) = &target.create.data_file {
        let dp = crate::engine::image::resolve_name(dst, df);
        if let Some(f) = src.same_file_in_chain(&dp) {
            return Err(Error::invalid(format!(
                "the destination's data file '{df}' is the same file as '{}', which the source reads; refusing to overwrite it",
                f.display()
            )));
        }
    }
    if !opts.existing {
        let mut co = target.create.clone();
        co.size = Some(src.size());
        if co.backing_file.is_some() {
            co.unsafe_backing = false;
        }
        crate::jobs::create::create_qcow2(dst, &co).await?;
    }
    let oo = crate::engine::image::OpenOptions::writable_target(&opts.file);
    let img = crate::engine::image::Image::open(dst, &oo)
        .await
        .map_err(|e| {
            if opts.existing {
                e.context(format!("Could not open '{}'", dst.display()))
            } else {
                e
            }
        })?;
    if opts.existing && img.size() < src.size() {
        return Err(Error::invalid("output file is smaller than input file"));
    }
    let res = copy_into(src, &img, target.compress, opts).await;
    let closed = img.close().await;
    res?;
    closed
}

/// Copy the guest content of `src` into `img`, a qcow2 image opened writable and at least as
/// large as `src`, as [`convert`] copies into the target it opened (`opts.existing`: as into
/// an existing target, `-n`). The caller flushes or closes `img`. For callers that open the
/// target themselves (on storage of their own, for instance).
pub async fn convert_into(
    src: &Disk,
    img: &crate::engine::image::Image,
    compress: bool,
    opts: &ConvertOptions,
) -> Result<()> {
    if img.size() < src.size() {
        return Err(Error::invalid("output file is smaller than input file"));
    }
    copy_into(src, img, compress, opts).await
}

/// Zero window `p` of a target with a backing file: write zeros where the backing file
/// does not read as zeros.
async fn zero_over_backing(
    img: &crate::engine::image::Image,
    backing: &Disk,
    p: &Piece,
) -> Result<()> {
    let cs = img.layout().cluster_size;
    let end = (p.off + p.len).min(backing.size());
    let mut pos = p.off;
    while pos < end {
        let e = backing.map_entry(pos, end - pos).await?;
        if e.zero || !e.data {
            // Zeros, or unallocated down the whole chain.
            pos += e.length;
            continue;
        }
        // Whole clusters around the data, at most CHUNK at a time.
        let a = pos / cs * cs;
        let b = (pos + e.length.min(CHUNK)).div_ceil(cs) * cs;
        let b = b.min(p.off + p.len).min(img.size());
        let a = a.max(p.off);
        let mut bb = vec![0u8; (b - a) as usize];
        backing.read_padded(&mut bb, a).await?;
        let mut i = 0u64;
        while i < b - a {
            let n = (cs - (a + i) % cs).min(b - a - i);
            if !is_zero(&bb[i as usize..(i + n) as usize]) {
                img.write_zeroes(a + i, n, crate::ZeroMode::Unmap).await?;
            }
            i += n;
        }
        pos = b;
    }
    Ok(())
}

async fn copy_into(
    src: &Disk,
    img: &crate::engine::image::Image,
    compress: bool,
    opts: &ConvertOptions,
) -> Result<()> {
    let size = src.size();
    let cs = img.layout().cluster_size;
    let z = Zeros::of(opts);
    // An existing target's own content is what zeros are written over: its backing file
    // is not compared against.
    let backing = if opts.existing {
        None
    } else {
        img.backing().cloned()
    };
    let zeros = Arc::new(vec![0u8; if z.sparse == 0 { CHUNK as usize } else { 0 }]);
    let pieces = Planner::new(src).stream();
    let total = size.max(1);
    let bufs = Arc::new(PieceBufs::default());
    let (src2, img2) = (src.clone(), img.clone());
    // Compressed pieces compress inside their writes: those must overlap. Other writes go
    // one at a time in plan order (the layout of qemu-img's output).
    let ordered = (!compress).then(|| Arc::new(Ordered::new(opts.parallel)));
    let ordered2 = ordered.clone();
    let direct = opts.file.direct;
    let work = move |p: Piece| {
        let (src, img, backing, bufs) = (src2.clone(), img2.clone(), backing.clone(), bufs.clone());
        let zeros = zeros.clone();
        let ordered = ordered2.clone();
        async move {
            let (seq, len) = (p.seq, p.len);
            let job = piece_job(
                p, src, img, backing, bufs, zeros, z, cs, compress, size, direct,
            )
            .await?;
            match &ordered {
                Some(o) => o.submit(seq, len, job).await,
                None => job.await.map(|()| len),
            }
        }
    };
    run_pieces(pieces, opts.parallel, ordered, work, |d| {
        if let Some(cb) = &opts.progress {
            cb(d as f64 / total as f64);
        }
    })
    .await
}

/// A write of [`piece_job`], in the order the piece's clusters come.
enum Op {
    /// Explicit zeros over `len` bytes at guest offset `off`.
    Zeroes(u64, u64),
    /// `buf[a..b]` as plain data.
    Write(usize, usize),
    /// `buf[a..b]`, one cluster, compressed.
    Compressed(usize, usize),
}

/// Read piece `p` of [`copy_into`] and decide what to write; the writes themselves are
/// returned, to run in plan order.
#[allow(clippy::too_many_arguments)]
async fn piece_job(
    p: Piece,
    src: Disk,
    img: crate::engine::image::Image,
    backing: Option<Disk>,
    bufs: Arc<PieceBufs>,
    zeros: Arc<Vec<u8>>,
    z: Zeros,
    cs: u64,
    compress: bool,
    size: u64,
    direct: bool,
) -> Result<WriteJob> {
    if p.zero && z.sparse == 0 {
        // Fully allocated: zeros as data.
        return Ok(Box::pin(async move {
            let mut pos = 0;
            while pos < p.len {
                let n = (p.len - pos).min(CHUNK);
                img.write_at(&zeros[..n as usize], p.off + pos).await?;
                pos += n;
            }
            Ok(())
        }));
    }
    if p.zero && z.fill {
        return Ok(Box::pin(async move {
            img.write_zeroes(p.off, p.len, crate::ZeroMode::Unmap).await
        }));
    }
    if p.zero {
        // The new image reads as zeros already; over a backing file, zeros are written
        // where the backing file has data.
        return Ok(Box::pin(async move {
            if let Some(b) = &backing {
                zero_over_backing(&img, b, &p).await?;
            }
            Ok(())
        }));
    }
    let mut buf = bufs.take(p.len as usize);
    src.read_at(&mut buf, p.off).await?;
    let base = match &backing {
        Some(b) => {
            let mut bb = bufs.take(p.len as usize);
            b.read_padded(&mut bb, p.off).await?;
            Some(bb)
        }
        None => None,
    };
    // Zero clusters that qemu-img writes as data (all with -S 0; with -S, those
    // that its rule for `-S` puts in a data run: see `sparse_runs`).
    let short_zero: Vec<(u64, u64)> = if backing.is_none() {
        // Runs aligned to the larger of -S (rounded down to a power of two) and
        // the cluster size, as qemu-img aligns them.
        let unit = if z.sparse == 0 {
            cs
        } else {
            cs.max(1u64 << (63 - z.sparse.leading_zeros()))
        };
        sparse_runs(&buf, p.off, unit, z.sparse, &p.data)
            .into_iter()
            .filter(|r| !r.2)
            .map(|r| (r.0 as u64, (r.0 + r.1) as u64))
            .collect()
    } else {
        Vec::new()
    };
    // Whether the cluster at `i` holds part of a data run.
    let forced = |i: u64| {
        let ce = i + (cs - (p.off + i) % cs);
        short_zero.iter().any(|&(a, b)| a < ce && i < b)
    };
    // Plain writes in slices of whole clusters that run on the calling thread (see
    // `WRITE_SLICE`), without O_DIRECT.
    let slice = if direct {
        CHUNK as usize
    } else {
        (WRITE_SLICE as u64 / cs * cs).max(cs) as usize
    };
    // Walk cluster by cluster, grouping runs that need the same treatment.
    let mut ops = Vec::new();
    let mut i = 0u64;
    while i < p.len {
        let g = p.off + i;
        let n = (cs - g % cs).min(p.len - i);
        let piece = &buf[i as usize..(i + n) as usize];
        let same_as_base = match &base {
            Some(bb) => &bb[i as usize..(i + n) as usize] == piece,
            None => is_zero(piece) && !forced(i) && !z.fill,
        };
        if same_as_base {
            i += n;
            continue;
        }
        if is_zero(piece) && !forced(i) {
            // Differs from the backing file: explicit zeros.
            ops.push(Op::Zeroes(g, n));
            i += n;
            continue;
        }
        if compress && g & (cs - 1) == 0 && (n == cs || g + n == size) {
            ops.push(Op::Compressed(i as usize, (i + n) as usize));
            i += n;
            continue;
        }
        // Merge following clusters that also need a plain write.
        let mut j = i + n;
        while j < p.len && !compress {
            let m = cs.min(p.len - j);
            let next = &buf[j as usize..(j + m) as usize];
            let skip = match &base {
                Some(bb) => &bb[j as usize..(j + m) as usize] == next,
                None => is_zero(next) && !forced(j),
            };
            if skip || (is_zero(next) && !forced(j)) {
                break;
            }
            j += m;
        }
        ops.push(Op::Write(i as usize, j as usize));
        i = j;
    }
    if let Some(bb) = base {
        bufs.give(bb);
    }
    Ok(Box::pin(async move {
        for op in ops {
            match op {
                Op::Zeroes(g, n) => img.write_zeroes(g, n, crate::ZeroMode::Unmap).await?,
                Op::Write(a, b) => {
                    for (k, part) in buf[a..b].chunks(slice).enumerate() {
                        img.write_at(part, p.off + (a + k * slice) as u64).await?;
                    }
                }
                Op::Compressed(a, b) => img.write_compressed(p.off + a as u64, &buf[a..b]).await?,
            }
        }
        bufs.give(buf);
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::{sparse_runs, PieceBufs, PIECE_ALIGN};

    /// Piece buffers are aligned for `O_DIRECT` (a misaligned one is copied for every
    /// write), whatever length they are taken with, new or reused.
    #[test]
    fn piece_buffers_are_aligned() {
        let bufs = PieceBufs::default();
        let mut held = Vec::new();
        for len in [2 << 20, 4096, 3 << 20, 512, 2 << 20] {
            let mut b = bufs.take(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % PIECE_ALIGN, 0);
            b.fill(7);
            held.push(b);
        }
        for b in held.drain(..) {
            bufs.give(b);
        }
        for len in [1 << 20, 2 << 20, 3 << 20] {
            let b = bufs.take(len);
            assert_eq!((b.len(), b.as_ptr() as usize % PIECE_ALIGN), (len, 0));
            held.push(b);
        }
    }

    const K: usize = 1024;
    const M: usize = 1024 * K;

    /// A sector whose first 16 bytes are zeros is data when any later byte is not: the
    /// quick look at a sector's head (`sector_is_zero`) only ever decides "data".
    #[test]
    fn sparse_runs_see_data_past_a_zero_head() {
        for at in [4 * K + 16, 4 * K + 511, 4 * K + 3] {
            let mut buf = vec![0u8; 64 * K];
            buf[at] = 1;
            assert_eq!(
                sparse_runs(&buf, 0, 4096, 4096, &[(0, 64 * K)]),
                vec![
                    (0, 4 * K, true),
                    (4 * K, 4 * K, false),
                    (8 * K, 56 * K, true)
                ],
                "data byte at {at}"
            );
        }
        // A partial last sector.
        let mut buf = vec![0u8; 4 * K + 100];
        buf[4 * K + 99] = 1;
        assert_eq!(
            sparse_runs(&buf, 0, 4096, 4096, &[(0, 4 * K + 100)]),
            vec![(0, 4 * K, true), (4 * K, 100, false)]
        );
    }

    /// What qemu-img 10 wrote for `-S 1M` (alignment 1M) in `qemu-img map` of its output.
    #[test]
    fn sparse_runs_as_qemu_img() {
        // Source data at 10M: 64k data, 128k zeros, 64k data; the rest of the window
        // unallocated. qemu-img writes the 256k, not the 1M around it.
        let mut buf = vec![0u8; 2 * M];
        buf[..64 * K].fill(7);
        buf[192 * K..256 * K].fill(7);
        assert_eq!(
            sparse_runs(&buf, 10 * M as u64, M as u64, M as u64, &[(0, 256 * K)]),
            vec![(0, 256 * K, false), (256 * K, 2 * M - 256 * K, true)]
        );
        // Source data at 12M: 1M of zeros, then 4k data and 60k zeros: the zeros are a
        // hole (leading), the 64k written.
        let mut buf = vec![0u8; 2 * M];
        buf[M..M + 4 * K].fill(3);
        assert_eq!(
            sparse_runs(&buf, 12 * M as u64, M as u64, M as u64, &[(0, M + 64 * K)]),
            vec![
                (0, M, true),
                (M, 64 * K, false),
                (M + 64 * K, M - 64 * K, true)
            ]
        );
        // Source data 5M..7M: 512 bytes at 5M and at 6M+24k, zeros between (over 1M, but
        // not 1M aligned): all written, in our windows 4M..6M and 6M..8M.
        let mut buf = vec![0u8; 2 * M];
        buf[M..M + 512].fill(9);
        assert_eq!(
            sparse_runs(&buf, 4 * M as u64, M as u64, M as u64, &[(M, 2 * M)]),
            vec![(0, M, true), (M, M, false)]
        );
        let mut buf = vec![0u8; 2 * M];
        buf[24 * K..24 * K + 512].fill(9);
        assert_eq!(
            sparse_runs(&buf, 6 * M as u64, M as u64, M as u64, &[(0, M)]),
            vec![(0, M, false), (M, M, true)]
        );
        // -S 4k at 64k alignment: a zero cluster between data clusters is a hole, zeros
        // inside a data cluster are not.
        let mut buf = vec![0u8; 256 * K];
        buf[..4 * K].fill(1);
        buf[130 * K..131 * K].fill(1);
        assert_eq!(
            sparse_runs(&buf, 0, 64 * K as u64, 4096, &[(0, 256 * K)]),
            vec![
                (0, 64 * K, false),
                (64 * K, 64 * K, true),
                (128 * K, 64 * K, false),
                (192 * K, 64 * K, true)
            ]
        );
        // -S 0: everything.
        assert_eq!(sparse_runs(&buf, 0, 512, 0, &[]), vec![(0, 256 * K, false)]);
    }
}
