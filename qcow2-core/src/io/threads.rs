//! Portable engine: a pool of worker threads doing blocking system calls.
//!
//! [`ThreadsFile`] hands every request to a pool of worker threads named
//! `qcow2rs-io-N` that run `pread`/`pwrite`/`fdatasync`/`fallocate`; the
//! request's future completes through a oneshot channel, so it works on any
//! executor (no Tokio runtime context is needed). The pool is shared by all open
//! [`ThreadsFile`]s: it starts with the first one and stops (joining its
//! workers) when the last one is dropped. It keeps 2 workers per CPU (4 to 32)
//! and starts more while queued requests outnumber its idle workers, up to 64 as
//! qemu's pool, so a queue of blocking requests reaches the device at its depth;
//! the extra workers exit after 10 s without work.
//!
//! This file also holds what both file engines share (module-private, used by
//! [`super::uring`] as well):
//! - `AlignedBuf`, owned and aligned bounce buffers, for what cannot go to the
//!   kernel as it is (misaligned `O_DIRECT` reads and writes, read-modify-write);
//!   aligned requests lend the caller's memory instead (`RawBuf`, under the rule
//!   that a request runs to its end: `RunToEnd`);
//! - `FileCore`, the open file with its `O_DIRECT` alignment and the lock that
//!   serializes read-modify-write cycles, plus the synchronous calls (`len`,
//!   `set_len`, `data_run`, ...);
//! - the `Backend` trait (four primitive operations on owned buffers) and the
//!   request logic built on it in `ops`: splitting, alignment bouncing,
//!   read-modify-write, zero-fill past the end of the file and the `fallocate`
//!   fallbacks.

use super::{FileOptions, IoFuture, Storage};
use futures::channel::oneshot;
use parking_lot::{Condvar, Mutex};
use std::alloc::{self, Layout};
use std::any::Any;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::thread;

/// Largest piece a request is split into, bounding the bounce memory of one request.
pub(super) const MAX_CHUNK: usize = 4 << 20;
/// Chunk size of the zero-writing fallback of `write_zeroes`.
const ZERO_CHUNK: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Owned, aligned buffers
// ---------------------------------------------------------------------------

/// A zero-initialized heap buffer with a chosen alignment, owned by one request.
///
/// Moving an `AlignedBuf` does not move its bytes, so a raw pointer into it
/// stays valid while the buffer is kept alive (by a queued job or an in-flight
/// io_uring operation).
pub(super) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: an `AlignedBuf` uniquely owns its allocation, like `Box<[u8]>`; nothing
// else refers to it, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only gives read access to the bytes (like `&[u8]`).
unsafe impl Sync for AlignedBuf {}

/// Size classes of the buffer pool: 4 KiB to 4 MiB, powers of two, 4 KiB aligned.
const POOL_MIN_BITS: u32 = 12;
const POOL_MAX_BITS: u32 = 22;
const POOL_ALIGN: usize = 4096;
/// Buffers kept per size class: at most 64, and at most `POOL_CLASS_BYTES` bytes (at least
/// two buffers), so the pool never holds more than about 44 MiB in all.
const POOL_KEEP: usize = 64;
const POOL_CLASS_BYTES: usize = 4 << 20;
/// How often a size class gives back the buffers that stayed idle in it (see [`ClassPool`]).
const POOL_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A freed pool buffer (its allocation, of the class's layout).
struct PoolSlot(NonNull<u8>);
// SAFETY: a slot is an allocation that nobody references while it sits in the pool;
// moving the pointer between threads is like moving a `Box<[u8]>`.
unsafe impl Send for PoolSlot {}

/// The free buffers of one size class. It shrinks after a burst: every
/// `POOL_TRIM_INTERVAL` (checked when buffers come and go) the buffers that stayed in the
/// pool through the whole interval (its low-water mark) are freed.
struct ClassPool {
    free: Vec<PoolSlot>,
    /// The fewest free buffers seen since the last trim.
    low: usize,
    last_trim: Option<std::time::Instant>,
}

impl ClassPool {
    const fn new() -> Self {
        ClassPool {
            free: Vec::new(),
            low: 0,
            last_trim: None,
        }
    }
    fn take(&mut self) -> Option<PoolSlot> {
        let s = self.free.pop();
        self.low = self.low.min(self.free.len());
        s
    }
    /// Keep `slot` if there is room (else hand it back, to be freed), and trim at `now`.
    /// Returns the slots to free.
    fn give(&mut self, slot: PoolSlot, keep: usize, now: std::time::Instant) -> Vec<PoolSlot> {
        let mut out = self.trim(now);
        if self.free.len() < keep {
            self.free.push(slot);
        } else {
            out.push(slot);
        }
        out
    }
    /// The slots idle since the last trim, when the interval has passed.
    fn trim(&mut self, now: std::time::Instant) -> Vec<PoolSlot> {
        let due = match self.last_trim {
            Some(t) => now.saturating_duration_since(t) >= POOL_TRIM_INTERVAL,
            None => true,
        };
        if !due {
            return Vec::new();
        }
        self.last_trim = Some(now);
        let idle = self.low.min(self.free.len());
        let out = self.free.split_off(self.free.len() - idle);
        self.low = self.free.len();
        out
    }
}

/// Buffers kept in size class `class`.
fn pool_keep(class: usize) -> usize {
    (POOL_CLASS_BYTES >> (class as u32 + POOL_MIN_BITS)).clamp(2, POOL_KEEP)
}

static BUF_POOL: [parking_lot::Mutex<ClassPool>; (POOL_MAX_BITS - POOL_MIN_BITS + 1) as usize] =
    [const { parking_lot::Mutex::new(ClassPool::new()) };
        (POOL_MAX_BITS - POOL_MIN_BITS + 1) as usize];

/// Bytes held by the buffer pool (free buffers waiting for reuse).
pub fn pool_bytes() -> usize {
    BUF_POOL
        .iter()
        .enumerate()
        .map(|(c, p)| p.lock().free.len() << (c as u32 + POOL_MIN_BITS))
        .sum()
}

fn pool_class(len: usize, align: usize) -> Option<usize> {
    if align > POOL_ALIGN || len > 1 << POOL_MAX_BITS {
        return None;
    }
    let bits = len
        .max(1 << POOL_MIN_BITS)
        .next_power_of_two()
        .trailing_zeros();
    Some((bits - POOL_MIN_BITS) as usize)
}

impl AlignedBuf {
    /// A buffer of `len` bytes aligned to `align` (a power of two). Its bytes are
    /// initialized but not necessarily zero: buffers are recycled through a pool, so
    /// callers overwrite or zero-fill what they expose (every caller here does).
    pub(super) fn zeroed(len: usize, align: usize) -> io::Result<Self> {
        let class = pool_class(len, align);
        let layout = match class {
            Some(c) => Layout::from_size_align(1usize << (c as u32 + POOL_MIN_BITS), POOL_ALIGN)
                .expect("valid pool layout"),
            None => Layout::from_size_align(len.max(1), align.max(1)).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad I/O buffer size {len} or alignment {align}"),
                )
            })?,
        };
        if let Some(PoolSlot(ptr)) = class.and_then(|c| BUF_POOL[c].lock().take()) {
            return Ok(AlignedBuf { ptr, len, layout });
        }
        // SAFETY: `layout` has a non-zero size (at least 1 byte).
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate a {len}-byte I/O buffer"),
            )
        })?;
        Ok(AlignedBuf { ptr, len, layout })
    }

    /// A raw pointer to the first byte, for the kernel. Valid while `self` lives.
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` initialized
        // (zeroed at allocation, later only overwritten) bytes owned by `self`, and the shared borrow of
        // `self` prevents mutation through it for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes this the
        // only live reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.layout.align() == POOL_ALIGN && self.layout.size().is_power_of_two() {
            if let Some(class) = pool_class(self.layout.size(), POOL_ALIGN) {
                if 1usize << (class as u32 + POOL_MIN_BITS) == self.layout.size() {
                    let now = std::time::Instant::now();
                    let slot = PoolSlot(self.ptr);
                    let gone = BUF_POOL[class].lock().give(slot, pool_keep(class), now);
                    for PoolSlot(p) in gone {
                        // SAFETY: every pooled slot of this class was allocated with this
                        // layout (`alloc_zeroed`) and is owned by the pool alone; it leaves
                        // the pool here and is freed once.
                        unsafe { alloc::dealloc(p.as_ptr(), self.layout) }
                    }
                    return;
                }
            }
        }
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is freed once
        // (a pooled buffer is freed by whoever takes it from the pool last).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// ---------------------------------------------------------------------------
// The open file and its synchronous calls
// ---------------------------------------------------------------------------

/// An open file plus what the request logic needs to know about it.
pub(super) struct FileCore {
    /// The file. Kept open until every operation that refers to it has finished.
    pub(super) file: File,
    /// Required alignment of offsets, lengths and memory: 1 without `O_DIRECT`.
    pub(super) align: usize,
    /// Whether the file was opened with `O_DIRECT`.
    pub(super) direct: bool,
    /// Flushes are ignored ([`FileOptions::no_flush`]).
    no_flush: bool,
    /// `fdatasync` calls handed to the engine, for tests.
    #[cfg(test)]
    pub(super) syncs: std::sync::atomic::AtomicUsize,
    /// With `O_DIRECT`: shared by aligned writes and `allocate`, exclusive for
    /// read-modify-write cycles, `discard` and `write_zeroes`. Guards are moved
    /// into the operations so that a write whose future was dropped keeps the
    /// lock until the write really finished.
    lock: Arc<tokio::sync::RwLock<()>>,
    /// What may run on the calling thread (see [`FileCore::read_inline`]): one of
    /// `INLINE_NO`, `INLINE_NOWAIT`, `INLINE_ALWAYS`.
    inline: AtomicU8,
    /// Set while a thread writes to the file in [`FileCore::write_inline`].
    inline_writer: AtomicBool,
    /// A file in memory: whether a thread is writing to it, and the writes that thread
    /// does next (see [`FileCore::write_in_memory`]).
    in_memory_writes: Mutex<InMemoryWrites>,
}

/// The writer of a file in memory and the writes queued for it.
#[derive(Default)]
struct InMemoryWrites {
    writing: bool,
    queue: VecDeque<QueuedWrite>,
}

/// A write handed to the thread writing to a file in memory: the caller's memory (lent,
/// the caller awaits `done` through [`RunToEnd::lent`]), its offset, and where the result
/// goes.
struct QueuedWrite {
    buf: RawBuf,
    off: u64,
    done: oneshot::Sender<io::Result<()>>,
}

/// Nothing runs on the calling thread (`O_DIRECT`, or `RWF_NOWAIT` is refused).
const INLINE_NO: u8 = 0;
/// Reads are tried with `preadv2(RWF_NOWAIT)` on the calling thread first: a page-cache
/// hit completes there, a miss goes to the engine.
const INLINE_NOWAIT: u8 = 1;
/// The file lives in memory (tmpfs, ramfs): reads and writes never wait for a device,
/// so they run on the calling thread with plain `pread`/`pwrite`.
const INLINE_ALWAYS: u8 = 2;

/// Results of queued writes to a file in memory sent at once by the writing thread
/// ([`FileCore::write_in_memory`]): at most this many writes wait for their result after
/// they are done.
const IN_MEMORY_SEND_BATCH: usize = 16;

/// Largest buffered write done on the calling thread ([`FileCore::write_inline`]): a
/// larger one would hold that thread (an async runtime's worker, a C caller submitting a
/// request) for a millisecond or more, so it goes to the engine.
const INLINE_WRITE_MAX: usize = 1 << 20;

/// Whether buffered writes up to [`INLINE_WRITE_MAX`] run on the calling thread: yes,
/// unless the environment variable `QCOW2RS_INLINE_WRITES` is `0` (files in memory
/// always do). Read once.
fn inline_writes() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| std::env::var("QCOW2RS_INLINE_WRITES").as_deref() != Ok("0"))
}

/// `statfs.f_type` of tmpfs and ramfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The inline mode of a newly opened file.
fn inline_mode(file: &File, direct: bool) -> u8 {
    if direct {
        return INLINE_NO;
    }
    let mut sfs = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `fstatfs` writes one `statfs` into the memory we pass, which is ours and
    // of that type; the fd is valid (owned by `file`).
    if unsafe { libc::fstatfs(file.as_raw_fd(), sfs.as_mut_ptr()) } == 0 {
        // SAFETY: zero-initialized, then filled by the successful `fstatfs`.
        #[allow(clippy::unnecessary_cast)]
        let t = unsafe { sfs.assume_init() }.f_type as i64;
        if t == TMPFS_MAGIC || t == RAMFS_MAGIC {
            return INLINE_ALWAYS;
        }
    }
    INLINE_NOWAIT
}

impl FileCore {
    /// Open `path` as `opts` says and detect the `O_DIRECT` alignment.
    pub(super) fn open(path: &Path, opts: &FileOptions) -> io::Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(opts.writable)
            .create(opts.create)
            .truncate(opts.truncate);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "cannot open {} with O_DIRECT: the file system does not support \
                         direct I/O (EINVAL); open it without direct I/O",
                        path.display()
                    ),
                )
            } else {
                e
            }
        })?;
        let align = if opts.direct {
            direct_alignment(&file)
        } else {
            1
        };
        let inline = AtomicU8::new(inline_mode(&file, opts.direct));
        Ok(FileCore {
            file,
            align,
            direct: opts.direct,
            no_flush: opts.no_flush,
            #[cfg(test)]
            syncs: std::sync::atomic::AtomicUsize::new(0),
            lock: Arc::new(tokio::sync::RwLock::new(())),
            inline,
            inline_writer: AtomicBool::new(false),
            in_memory_writes: Mutex::new(InMemoryWrites::default()),
        })
    }

    /// Read on the calling thread, straight into the caller's `buf` (no bounce buffer,
    /// no hand-off to another thread), as much as can be read without waiting for a
    /// device: everything on tmpfs, page-cache hits elsewhere (`preadv2(RWF_NOWAIT)`).
    /// Returns the bytes read and whether the read is complete (`buf` full, or the end of
    /// the file reached, the rest zero-filled); the caller reads the rest through the
    /// engine. The call is synchronous, so `buf` is only touched while it is borrowed:
    /// this needs no ownership rule. Without `O_DIRECT` only.
    pub(super) fn read_inline(&self, buf: &mut [u8], off: u64) -> io::Result<(usize, bool)> {
        let mode = self.inline.load(Ordering::Relaxed);
        if mode == INLINE_NO {
            return Ok((0, false));
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let Ok(pos) = libc::off_t::try_from(off + done as u64) else {
                return Ok((done, false)); // the engine reports it
            };
            let r = if mode == INLINE_ALWAYS {
                // SAFETY: `rest` is writable memory we borrow for this synchronous call.
                unsafe { libc::pread(self.fd(), rest.as_mut_ptr().cast(), rest.len(), pos) }
            } else {
                let iov = libc::iovec {
                    iov_base: rest.as_mut_ptr().cast(),
                    iov_len: rest.len(),
                };
                // SAFETY: `iov` describes `rest`, writable memory we borrow for this
                // synchronous call; one iovec is passed.
                unsafe { libc::preadv2(self.fd(), &iov, 1, pos, libc::RWF_NOWAIT) }
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Not in the page cache (or the rest of it is not): the engine reads it.
                    Some(libc::EAGAIN) => return Ok((done, false)),
                    // The file system does not do RWF_NOWAIT reads: stop trying.
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                        self.inline.store(INLINE_NO, Ordering::Relaxed);
                        return Ok((done, false));
                    }
                    _ => return Err(e),
                }
            }
            if r == 0 {
                // End of file: the rest reads as zeros.
                buf[done..].fill(0);
                return Ok((buf.len(), true));
            }
            done += r as usize;
        }
        Ok((done, true))
    }

    /// Whether the file lives in memory (tmpfs, ramfs): nothing done to it waits for a
    /// device, so the engines run its `fallocate` and `fdatasync` on the calling thread
    /// too (an io_uring `fallocate` would otherwise go to an io-wq worker).
    pub(super) fn in_memory(&self) -> bool {
        self.inline.load(Ordering::Relaxed) == INLINE_ALWAYS
    }

    /// Write all of `data` at `off` to a file in memory (tmpfs), one thread at a time: a
    /// thread that finds no other writing writes `data` with `pwrite`, then every write
    /// queued meanwhile, until the queue is empty; a thread that finds another writing
    /// queues `data` for it and gets the write's [`Pending`] (`Err`), to be awaited through
    /// [`RunToEnd::lent`] (the writer reads the caller's memory until it sends the result).
    ///
    /// Why: tmpfs holds the inode's lock for the whole copy, and a second writer spins on
    /// it (`rwsem_spin_on_owner`): two threads writing 64 KiB pieces cost twice the CPU of
    /// one for the same time (docs/PERFORMANCE.md, tenth session). A mutex instead of the
    /// queue puts the waiter to sleep and costs a wake-up per handover, slower still. The
    /// writer never waits for anything but its `pwrite`s, so a queued write always ends.
    pub(super) fn write_in_memory(
        &self,
        data: &[u8],
        off: u64,
    ) -> Result<io::Result<()>, Pending<()>> {
        {
            let mut w = self.in_memory_writes.lock();
            if w.writing {
                let (done, pending) = Pending::channel();
                w.queue.push_back(QueuedWrite {
                    buf: RawBuf::lend_shared(data),
                    off,
                    done,
                });
                return Err(pending);
            }
            w.writing = true;
        }
        let r = self.file.write_all_at(data, off);
        // Results are sent in batches: a thread whose writes all wait here sleeps, and
        // waking it once per write would cost the writing thread a wake-up per write.
        let mut done = Vec::new();
        loop {
            let q = {
                let mut w = self.in_memory_writes.lock();
                match w.queue.pop_front() {
                    Some(q) => q,
                    None => {
                        w.writing = false;
                        break;
                    }
                }
            };
            // SAFETY: the queued write's caller awaits `done` through `RunToEnd::lent` over
            // this memory, which neither ends nor returns from its drop before `done` is
            // sent (below), so the memory is borrowed for as long as it is read here.
            let data = unsafe { q.buf.as_shared_slice() };
            done.push((q.done, self.file.write_all_at(data, q.off)));
            if done.len() == IN_MEMORY_SEND_BATCH {
                for (tx, r) in done.drain(..) {
                    let _ = tx.send(r);
                }
            }
        }
        for (tx, r) in done {
            let _ = tx.send(r);
        }
        Ok(r)
    }

    /// Write all of `data` at `off` on the calling thread, without `O_DIRECT`, when `data`
    /// is at most [`INLINE_WRITE_MAX`] bytes (unless `QCOW2RS_INLINE_WRITES=0`, see
    /// [`inline_writes`]) and no other thread is writing this way. Returns false (nothing
    /// written) for other writes, which go through the engine. (Files in memory:
    /// [`FileCore::write_in_memory`].)
    ///
    /// A buffered write copies into the page cache and returns; it waits for the device
    /// only when the kernel throttles a writer that dirties pages faster than they are
    /// written back, or on a file system lock, and then the request waits just as long
    /// on an engine thread. Handing it to the engine instead costs two thread hops per
    /// write (io_uring runs buffered ext4 writes on its io-wq worker, which file
    /// systems without `RWF_NOWAIT` buffered writes make unavoidable, and the completion
    /// thread then wakes the waiting task) and a copy into an owned buffer: on ext4,
    /// `qcow2rs serve` used about twice the CPU per 64 KiB write that way (docs/PERFORMANCE.md,
    /// "eighth session").
    pub(super) fn write_inline(&self, data: &[u8], off: u64) -> io::Result<bool> {
        if self.direct || data.len() > INLINE_WRITE_MAX || !inline_writes() {
            return Ok(false);
        }
        // One thread at a time: the kernel serializes buffered writes to a file (ext4 takes
        // the inode lock), and a second writer here would sleep on that lock, holding a
        // runtime worker that could read requests and send replies meanwhile.
        if self.inline_writer.swap(true, Ordering::Acquire) {
            return Ok(false);
        }
        let r = self.file.write_all_at(data, off);
        self.inline_writer.store(false, Ordering::Release);
        r.map(|()| true)
    }

    fn fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    /// Current length (the size of the device for block devices).
    pub(super) fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_block_device() {
            // SAFETY: `lseek` on a valid fd owned by `self.file`; no memory is
            // passed. Moving the file position is harmless: all I/O is positioned.
            let end = unsafe { libc::lseek(self.fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(end as u64);
        }
        Ok(meta.len())
    }

    /// See [`Storage::start_writeback`]: `sync_file_range(SYNC_FILE_RANGE_WRITE)`, for a
    /// buffered file on a disk (with `O_DIRECT` or in memory there is nothing to write back).
    /// Not when flushes are ignored: the write-back started here only shortens a flush.
    pub(super) fn start_writeback(&self, off: u64, len: u64) -> io::Result<()> {
        if self.align > 1 || self.in_memory() || self.no_flush || len == 0 {
            return Ok(());
        }
        // SAFETY: `sync_file_range` on a valid fd owned by `self.file`; no memory is passed.
        // It only starts the write-back of dirty pages: the file's content does not change.
        let r = unsafe {
            libc::sync_file_range(
                self.fd(),
                off as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `ftruncate`.
    pub(super) fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// `st_blocks * 512`.
    pub(super) fn allocated_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// See [`Storage::data_run`]: `SEEK_DATA`/`SEEK_HOLE`, everything is data if
    /// they are unsupported, and past the end of the file is a hole.
    pub(super) fn data_run(&self, off: u64, len: u64) -> io::Result<(u64, bool)> {
        if len == 0 {
            return Ok((0, true));
        }
        let size = self.len()?;
        if off >= size {
            return Ok((len, false));
        }
        let Ok(pos) = libc::off_t::try_from(off) else {
            return Ok((len, true));
        };
        let data = match lseek(self.fd(), pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `off`: a hole up to the end of the file, and past it.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok((len, false)),
            Err(e) if seek_unsupported(&e) => return Ok((len, true)),
            Err(e) => return Err(e),
        };
        if data > off {
            return Ok(((data - off).min(len), false));
        }
        let hole = match lseek(self.fd(), pos, libc::SEEK_HOLE) {
            Ok(h) => h,
            Err(e) if seek_unsupported(&e) || e.raw_os_error() == Some(libc::ENXIO) => {
                return Ok((len, true))
            }
            Err(e) => return Err(e),
        };
        if hole > off {
            Ok(((hole - off).min(len), true))
        } else {
            // The file changed under us; call it data, which is always safe.
            Ok((len, true))
        }
    }
}

fn seek_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn lseek(fd: libc::c_int, off: libc::off_t, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: `lseek` takes no pointers; an invalid fd or offset is reported as an error.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The alignment `O_DIRECT` needs for `file`: `statx(STATX_DIOALIGN)` where the
/// kernel reports it, else the logical block size of a block device, else 4096.
fn direct_alignment(file: &File) -> usize {
    let sane = |a: usize| a.is_power_of_two() && (1..=(1 << 20)).contains(&a);
    if let Some(a) = statx_dio_align(file).filter(|&a| sane(a)) {
        return a;
    }
    if file
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
    {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one `int` through the pointer, which points to
        // `size`, a live and writable `c_int`.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
        if r == 0 && size > 0 && sane(size as usize) {
            return size as usize;
        }
    }
    4096
}

fn statx_dio_align(file: &File) -> Option<usize> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a NUL-terminated empty string, which with AT_EMPTY_PATH
    // makes statx describe the open fd; `stx` is writable memory of the type the
    // kernel fills.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: `stx` was zero-initialized (a valid value for this plain C struct
    // of integers) and possibly filled in by the kernel.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align) as usize)
}

/// `fallocate(2)`, retried on `EINTR`.
pub(super) fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    loop {
        // SAFETY: `fallocate` takes no pointers; bad arguments come back as errors.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Read into `buf` at `off` until it is full or the end of the file. With
/// `O_DIRECT` (`align > 1`), a read that stops at an unaligned position has hit
/// the end of the file (a direct read cannot continue from there).
fn pread_full(file: &File, buf: &mut [u8], off: u64, align: usize) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if (off + done as u64) & (align as u64 - 1) != 0 {
                    break;
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------
// Engine-independent request logic
// ---------------------------------------------------------------------------

/// Something an operation keeps alive until it has really finished (a lock guard).
pub(super) type Hold = Option<Arc<dyn Any + Send + Sync>>;

/// The result of an operation handed to an engine: a future that works on any
/// executor. Dropping it abandons the result, not the operation.
pub(super) struct Pending<T>(oneshot::Receiver<io::Result<T>>);

impl<T> Pending<T> {
    /// A sender for the engine and the future for the caller.
    pub(super) fn channel() -> (oneshot::Sender<io::Result<T>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Pending(rx))
    }

    /// An operation already done (on the calling thread).
    pub(super) fn ready(r: io::Result<T>) -> Self {
        let (tx, p) = Self::channel();
        let _ = tx.send(r);
        p
    }
}

impl FileCore {
    /// `fdatasync` on the calling thread, for a file in memory (else `None`). Every engine's
    /// `fdatasync` starts here.
    pub(super) fn fdatasync_inline(&self) -> Option<Pending<()>> {
        #[cfg(test)]
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.in_memory()
            .then(|| Pending::ready(self.file.sync_data()))
    }

    /// `fallocate` on the calling thread (else `None`): for a file in memory, and a plain
    /// reservation (mode 0) of a buffered file when no other thread writes it on its calling
    /// thread ([`FileCore::write_inline`]). A reservation does no data I/O (it lays out
    /// unwritten blocks), so it costs less than the hop to the engine and back: a conversion
    /// to a new raw file on ext4 reserves every data run before writing it (`convert.rs`,
    /// `RESERVE_MIN`), and through io_uring each reservation cost an io-wq wake-up and a
    /// completion (two context switches and more per 2 MiB).
    pub(super) fn fallocate_inline(&self, mode: i32, off: u64, len: u64) -> Option<Pending<()>> {
        if self.in_memory() {
            return Some(Pending::ready(fallocate(&self.file, mode, off, len)));
        }
        if mode != 0 || self.direct || !inline_writes() {
            return None;
        }
        // As `write_inline`: never two threads of ours on the inode lock.
        if self.inline_writer.swap(true, Ordering::Acquire) {
            return None;
        }
        let r = fallocate(&self.file, mode, off, len);
        self.inline_writer.store(false, Ordering::Release);
        Some(Pending::ready(r))
    }
}

impl<T> Future for Pending<T> {
    type Output = io::Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match Pin::new(&mut self.0).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(oneshot::Canceled)) => {
                Poll::Ready(Err(io::Error::other("the I/O engine dropped the request")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The caller's memory, lent to a worker or to the kernel for one read
/// ([`Backend::read_into`]).
///
/// **The rule that makes lending sound: a request always runs to its end.** The
/// only reader of a `RawBuf` is an operation whose [`Pending`] is wrapped in
/// [`RunToEnd`], and `RunToEnd` does not let its borrow of the memory end before
/// the engine has answered: dropping it (a cancelled request, a runtime shutting
/// down) blocks until the operation has finished. Leaking the request's future
/// instead (`mem::forget`) would end the borrow early; nothing in this crate, in
/// the C library or in the Python package does that (their requests run on the
/// runtime to their end even when the caller stops waiting), and code that cannot
/// promise it must use owned buffers. See docs/RELIABILITY.md, "Zero-copy reads".
pub(super) struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `RawBuf` stands for an exclusive borrow of `len` bytes (`&mut [u8]`,
// which is `Send`), kept alive by the `RunToEnd` rule above.
unsafe impl Send for RawBuf {}

impl RawBuf {
    fn new(buf: &mut [u8]) -> Self {
        RawBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The caller's memory lent to one write ([`Backend::write_from`]): the operation
    /// only reads it (through [`RawBuf::as_shared_slice`] or the kernel), never writes.
    fn lend_shared(buf: &[u8]) -> Self {
        RawBuf {
            ptr: buf.as_ptr().cast_mut(),
            len: buf.len(),
        }
    }

    /// The memory as a shared slice, for a worker's `pwrite`.
    ///
    /// # Safety
    /// As [`RawBuf::as_slice`]: only while the operation that owns this `RawBuf` runs.
    unsafe fn as_shared_slice(&self) -> &[u8] {
        // SAFETY: the caller's contract above; `ptr`/`len` come from a slice borrowed
        // until the operation has ended.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The memory as a slice, for a worker's `pread`.
    ///
    /// # Safety
    /// Only while the operation that owns this `RawBuf` runs: the `RunToEnd` rule
    /// keeps the caller's exclusive borrow alive until then.
    unsafe fn as_slice(&mut self) -> &mut [u8] {
        // SAFETY: the caller's contract above; `ptr`/`len` come from a `&mut [u8]`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// A [`Pending`] of an operation that uses the caller's memory, or that changes
/// the file: it cannot end before the operation does. Dropped early, it waits
/// (blocking the thread) for the engine's answer, which comes from the engine's
/// own threads, never from the runtime, so this cannot deadlock.
///
/// Writes, write-zeroes, discards and reservations own their buffers but are
/// awaited through it too ([`RunToEnd::owned`]): a dropped request then cannot
/// let the file change after its future is gone, when the request's ordering
/// guards (its ticket, in-flight mark, locks) are released and later requests
/// (an overlapping write, a flush, a reuse of the cluster) no longer wait for it.
/// See the [`Storage`](super::Storage) contract and `engine/inflight.rs`. Only
/// the submitted operation is waited for, never a lock or anything else a
/// request waits for on the runtime.
struct RunToEnd<'a, T> {
    pending: Pending<T>,
    finished: bool,
    _borrow: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a, T> RunToEnd<'a, T> {
    fn new(_buf: &'a mut [u8], pending: Pending<T>) -> Self {
        RunToEnd {
            pending,
            finished: false,
            _borrow: std::marker::PhantomData,
        }
    }
}

impl<'a, T> RunToEnd<'a, T> {
    /// For an operation that reads the caller's memory (a write from `_buf`).
    fn lent(_buf: &'a [u8], pending: Pending<T>) -> Self {
        RunToEnd {
            pending,
            finished: false,
            _borrow: std::marker::PhantomData,
        }
    }
}

impl<T> RunToEnd<'static, T> {
    /// For an operation that owns its buffer (or has none) and changes the file.
    fn owned(pending: Pending<T>) -> Self {
        RunToEnd {
            pending,
            finished: false,
            _borrow: std::marker::PhantomData,
        }
    }
}

impl<T> Future for RunToEnd<'_, T> {
    type Output = io::Result<T>;
    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let r = Pin::new(&mut self.pending).poll(cx);
        if r.is_ready() {
            self.finished = true;
        }
        r
    }
}

impl<T> RunToEnd<'_, T> {
    /// The drop of an unfinished operation (rare: kept out of the finished path).
    #[cold]
    #[inline(never)]
    fn wait_for_the_end(&mut self) {
        // This thread may hold the request's SQE back (io_uring in `block_on`).
        crate::io::uring::flush_deferred();
        let _ = futures::executor::block_on(&mut self.pending);
    }
}

impl<T> Drop for RunToEnd<'_, T> {
    #[inline]
    fn drop(&mut self) {
        if !self.finished {
            self.wait_for_the_end();
        }
    }
}

/// The primitive operations of an engine. They own their buffers and start at
/// once; the request logic in [`ops`] is written once on top of them.
pub(super) trait Backend: Send + Sync {
    /// The file.
    fn core(&self) -> &FileCore;
    /// Read into `buf` at `off` until it is full or the end of the file; gives the
    /// buffer back with the number of bytes read.
    fn read_owned(&self, buf: AlignedBuf, off: u64) -> Pending<(AlignedBuf, usize)>;
    /// Read into the caller's memory at `off` until it is full or the end of the
    /// file; gives the number of bytes read. Only through [`RunToEnd`] (see [`RawBuf`]).
    fn read_into(&self, buf: RawBuf, off: u64) -> Pending<usize>;
    /// Write all of `buf` at `off`, then truncate the file to `truncate_to` if
    /// given. `hold` is dropped once that is done.
    fn write_owned(
        &self,
        buf: AlignedBuf,
        off: u64,
        truncate_to: Option<u64>,
        hold: Hold,
    ) -> Pending<()>;
    /// Write all of the caller's memory `buf` at `off` (no copy); `hold` is dropped once
    /// done. Only through [`RunToEnd`] (see [`RawBuf`]: the borrow of the memory lasts
    /// until the operation has ended).
    fn write_from(&self, buf: RawBuf, off: u64, hold: Hold) -> Pending<()>;
    /// `fdatasync`.
    fn fdatasync(&self) -> Pending<()>;
    /// `fallocate(mode, off, len)`; `hold` is dropped once done.
    fn fallocate(&self, mode: i32, off: u64, len: u64, hold: Hold) -> Pending<()>;
}

/// Request logic shared by the file engines (see the module documentation).
pub(super) mod ops {
    use super::{AlignedBuf, Backend, Hold, RawBuf, RunToEnd, MAX_CHUNK, ZERO_CHUNK};
    use std::any::Any;
    use std::io;
    use std::sync::Arc;

    fn align_down(x: u64, a: u64) -> u64 {
        x & !(a - 1)
    }

    fn align_up(x: u64, a: u64) -> io::Result<u64> {
        x.checked_add(a - 1)
            .map(|y| align_down(y, a))
            .ok_or_else(too_far)
    }

    fn too_far() -> io::Error {
        io::Error::from_raw_os_error(libc::EFBIG)
    }

    fn end_of(off: u64, len: usize) -> io::Result<u64> {
        off.checked_add(len as u64).ok_or_else(too_far)
    }

    /// Errors of `fallocate` after which zeros are written instead.
    fn zero_range_unsupported(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
        )
    }

    fn fallocate_unsupported(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
        )
    }

    /// Largest piece size that keeps pieces aligned.
    fn max_piece(a: u64) -> u64 {
        align_down(MAX_CHUNK as u64, a).max(a)
    }

    /// [`Storage::read_at`](super::Storage::read_at).
    pub(in crate::io) async fn read_at<B: Backend + ?Sized>(
        b: &B,
        buf: &mut [u8],
        off: u64,
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        end_of(off, buf.len())?;
        // Page-cache hits (everything on tmpfs) are read on this thread into `buf` itself.
        let (done, complete) = b.core().read_inline(buf, off)?;
        if complete {
            return Ok(());
        }
        let buf = &mut buf[done..];
        let off = off + done as u64;
        let end = end_of(off, buf.len())?;
        let a = b.core().align as u64;
        if (buf.as_ptr() as u64 | off | buf.len() as u64) & (a - 1) == 0 {
            // Zero copy: the caller's memory goes to the engine (aligned for O_DIRECT,
            // or no O_DIRECT at all). The request runs to its end (`RunToEnd`).
            let mut pos = 0;
            while pos < buf.len() {
                let n = (buf.len() - pos).min(max_piece(a) as usize);
                let piece = &mut buf[pos..pos + n];
                let pending = b.read_into(RawBuf::new(piece), off + pos as u64);
                let got = RunToEnd::new(piece, pending).await?.min(n);
                if got < n {
                    // End of file: the rest reads as zeros.
                    buf[pos + got..].fill(0);
                    break;
                }
                pos += n;
            }
            return Ok(());
        }
        // Misaligned O_DIRECT: bounce through aligned buffers owned by the operation.
        let mut pos = align_down(off, a);
        let aend = align_up(end, a)?;
        while pos < aend {
            let n = (aend - pos).min(max_piece(a)) as usize;
            let piece = AlignedBuf::zeroed(n, a as usize)?;
            let (mut piece, got) = b.read_owned(piece, pos).await?;
            let got = got.min(n);
            piece[got..].fill(0);
            let lo = pos.max(off);
            let hi = (pos + n as u64).min(end);
            buf[(lo - off) as usize..(hi - off) as usize]
                .copy_from_slice(&piece[(lo - pos) as usize..(hi - pos) as usize]);
            if got < n {
                // End of file: the rest reads as zeros.
                buf[(hi - off) as usize..].fill(0);
                break;
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// [`Storage::write_at`](super::Storage::write_at).
    pub(in crate::io) async fn write_at<B: Backend + ?Sized>(
        b: &B,
        data: &[u8],
        off: u64,
    ) -> io::Result<()> {
        write_inner(b, data, off, None).await
    }

    /// Write `data` at `off`. With `O_DIRECT`, `excl` is an exclusive guard of the
    /// file's lock that the caller already holds; without it the lock is taken
    /// here (shared for aligned writes, exclusive for read-modify-write).
    async fn write_inner<B: Backend + ?Sized>(
        b: &B,
        data: &[u8],
        off: u64,
        excl: Option<Arc<dyn Any + Send + Sync>>,
    ) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = end_of(off, data.len())?;
        let core = b.core();
        if !core.direct {
            if core.in_memory() {
                return match core.write_in_memory(data, off) {
                    Ok(r) => r,
                    Err(pending) => RunToEnd::lent(data, pending).await,
                };
            }
            if core.write_inline(data, off)? {
                return Ok(());
            }
            return write_lent(b, data, off, MAX_CHUNK, None).await;
        }
        let a = core.align as u64;
        let rmw = (off | end) & (a - 1) != 0;
        let hold: Arc<dyn Any + Send + Sync> = match excl {
            Some(h) => h,
            None if rmw => Arc::new(core.lock.clone().write_owned().await),
            None => Arc::new(core.lock.clone().read_owned().await),
        };
        if !rmw && (data.as_ptr() as u64) & (a - 1) == 0 {
            // Zero copy: aligned memory goes to the engine as it is.
            return write_lent(b, data, off, max_piece(a) as usize, Some(hold)).await;
        }
        // A read-modify-write of the last block may extend the file to a block
        // boundary; the operation then truncates it back to this length (we hold
        // the lock exclusively, so nobody else changes the length meanwhile).
        let target_len = if rmw {
            Some(core.len()?.max(end))
        } else {
            None
        };
        let mut pos = align_down(off, a);
        let aend = align_up(end, a)?;
        while pos < aend {
            let partial = pos < off || pos + a > end;
            let n = if partial {
                a
            } else {
                (align_down(end, a) - pos).min(max_piece(a))
            } as usize;
            let mut piece = AlignedBuf::zeroed(n, a as usize)?;
            if partial {
                let (p, got) = b.read_owned(piece, pos).await?;
                piece = p;
                let got = got.min(n);
                piece[got..].fill(0);
            }
            let lo = pos.max(off);
            let hi = (pos + n as u64).min(end);
            piece[(lo - pos) as usize..(hi - pos) as usize]
                .copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
            let truncate_to = target_len.filter(|&t| pos + n as u64 > t);
            RunToEnd::owned(b.write_owned(piece, pos, truncate_to, Some(hold.clone()))).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Write `data` at `off` from the caller's memory, in pieces of at most `piece` bytes
    /// (aligned for `O_DIRECT`: the caller checked the memory, `off` and the length).
    /// Each piece runs to its end (`RunToEnd`), so the borrow of `data` outlives it.
    async fn write_lent<B: Backend + ?Sized>(
        b: &B,
        data: &[u8],
        off: u64,
        piece: usize,
        hold: Hold,
    ) -> io::Result<()> {
        let mut pos = 0;
        while pos < data.len() {
            let n = (data.len() - pos).min(piece);
            let p = &data[pos..pos + n];
            let pending = b.write_from(RawBuf::lend_shared(p), off + pos as u64, hold.clone());
            RunToEnd::lent(p, pending).await?;
            pos += n;
        }
        Ok(())
    }

    /// With `O_DIRECT`, an exclusive guard of the file's lock.
    async fn exclusive<B: Backend + ?Sized>(b: &B) -> Option<Arc<dyn Any + Send + Sync>> {
        let core = b.core();
        if core.direct {
            Some(Arc::new(core.lock.clone().write_owned().await))
        } else {
            None
        }
    }

    /// [`Storage::flush`](super::Storage::flush); nothing when flushes are ignored.
    pub(in crate::io) async fn flush<B: Backend + ?Sized>(b: &B) -> io::Result<()> {
        if b.core().no_flush {
            return Ok(());
        }
        b.fdatasync().await
    }

    /// [`Storage::discard`](super::Storage::discard).
    pub(in crate::io) async fn discard<B: Backend + ?Sized>(
        b: &B,
        off: u64,
        len: u64,
    ) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        off.checked_add(len).ok_or_else(too_far)?;
        // Exclusive: a concurrent read-modify-write could write back stale data
        // into the punched range.
        let hold: Hold = exclusive(b).await;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match RunToEnd::owned(b.fallocate(mode, off, len, hold)).await {
            Ok(()) => Ok(true),
            Err(e) if fallocate_unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`Storage::write_zeroes`](super::Storage::write_zeroes).
    pub(in crate::io) async fn write_zeroes<B: Backend + ?Sized>(
        b: &B,
        off: u64,
        len: u64,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        off.checked_add(len).ok_or_else(too_far)?;
        let excl = exclusive(b).await;
        let mode = libc::FALLOC_FL_ZERO_RANGE;
        match RunToEnd::owned(b.fallocate(mode, off, len, excl.clone())).await {
            Ok(()) => return Ok(()),
            Err(e) if zero_range_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
        let zeros = vec![0u8; len.min(ZERO_CHUNK as u64) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            write_inner(b, &zeros[..n], off + done, excl.clone()).await?;
            done += n as u64;
        }
        Ok(())
    }

    /// [`Storage::allocate`](super::Storage::allocate).
    pub(in crate::io) async fn allocate<B: Backend + ?Sized>(
        b: &B,
        off: u64,
        len: u64,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off.checked_add(len).ok_or_else(too_far)?;
        let core = b.core();
        // Shared: it changes no content, but must not run while a
        // read-modify-write is about to fix the file length up.
        let hold: Hold = if core.direct {
            Some(Arc::new(core.lock.clone().read_owned().await))
        } else {
            None
        };
        match RunToEnd::owned(b.fallocate(0, off, len, hold.clone())).await {
            Ok(()) => Ok(()),
            Err(e) if fallocate_unsupported(&e) => {
                if core.len()? < end {
                    core.set_len(end)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

// ---------------------------------------------------------------------------
// The worker pool
// ---------------------------------------------------------------------------

type Job = Box<dyn FnOnce() + Send>;

/// Most worker threads of the pool, as qemu's thread pool (`max_threads`): a queue of up
/// to this many blocking requests reaches the device at once. With a fixed handful of
/// workers (2 per CPU, 4 on two CPUs) a depth-32 O_DIRECT workload had 4 requests at the
/// device at a time and took 1.6x qemu-img's time (docs/PERFORMANCE.md, "The threads
/// engine's pool").
const POOL_MAX_WORKERS: usize = 64;
/// How long a worker above the minimum waits for a job before it exits (qemu: 10 s).
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct Queue {
    jobs: VecDeque<Job>,
    shutdown: bool,
    /// Workers waiting for a job (counted until they have taken the mutex back).
    idle: usize,
    /// Workers running (started and not exited).
    threads: usize,
    /// Workers kept however long they are idle.
    min: usize,
    /// Workers at most.
    max: usize,
    /// How long a worker above `min` waits for a job before it exits.
    idle_timeout: std::time::Duration,
    /// Join handles of the workers started (finished ones are pruned as new ones start).
    handles: Vec<thread::JoinHandle<()>>,
    /// Numbers the next worker's name.
    next_id: usize,
}

struct PoolShared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The worker threads shared by every open [`ThreadsFile`]: `min` of them always, more
/// started while queued jobs outnumber the idle workers (up to `max`), and those above
/// `min` exit after [`POOL_IDLE_TIMEOUT`] without work.
struct Pool {
    shared: Arc<PoolShared>,
    /// The process that started the workers: after `fork()` the child has none of them.
    pid: u32,
}

/// The current pool, if any file holds it.
static POOL: Mutex<Weak<Pool>> = parking_lot::const_mutex(Weak::new());

impl Pool {
    /// The shared pool, started if no open file holds it.
    fn get() -> io::Result<Arc<Pool>> {
        let mut cur = POOL.lock();
        if let Some(p) = cur.upgrade() {
            if p.pid == std::process::id() {
                return Ok(p);
            }
            // A pool of the parent process (files opened before fork() keep it alive): its
            // threads do not exist here, so start a new one. Never drop the parent's: its
            // Drop would join threads that are not there.
            std::mem::forget(p);
        }
        let n = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .saturating_mul(2)
            .clamp(4, 32);
        let p = Arc::new(Pool::start(n, POOL_MAX_WORKERS, POOL_IDLE_TIMEOUT)?);
        *cur = Arc::downgrade(&p);
        Ok(p)
    }

    /// A pool of `min` workers that grows to `max`; a worker above `min` exits after
    /// `idle_timeout` without a job.
    fn start(min: usize, max: usize, idle_timeout: std::time::Duration) -> io::Result<Pool> {
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                shutdown: false,
                idle: 0,
                threads: 0,
                min,
                max: max.max(min).max(1),
                idle_timeout,
                handles: Vec::with_capacity(min),
                next_id: 0,
            }),
            ready: Condvar::new(),
        });
        // On a spawn error `pool` is dropped, which stops the workers already started.
        let pool = Pool {
            shared,
            pid: std::process::id(),
        };
        {
            let mut q = pool.shared.queue.lock();
            for _ in 0..min {
                spawn_worker(&pool.shared, &mut q)?;
            }
        }
        Ok(pool)
    }

    /// Run `f` on a worker; its result completes the returned future.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Pending<T> {
        let (tx, pending) = Pending::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let mut q = self.shared.queue.lock();
        q.jobs.push_back(job);
        // Each idle worker woken takes one job: start another worker when the queued jobs
        // outnumber them. If that fails, the job waits for a running worker.
        if q.jobs.len() > q.idle && q.threads < q.max {
            let _ = spawn_worker(&self.shared, &mut q);
        }
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
        pending
    }

    /// Workers running now (tests).
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.shared.queue.lock().threads
    }
}

/// Start a worker (the queue's mutex held by the caller, as `q`).
fn spawn_worker(s: &Arc<PoolShared>, q: &mut Queue) -> io::Result<()> {
    q.handles.retain(|h| !h.is_finished());
    let shared = s.clone();
    let h = thread::Builder::new()
        .name(format!("qcow2rs-io-{}", q.next_id))
        .spawn(move || worker(&shared))?;
    q.next_id += 1;
    q.threads += 1;
    q.handles.push(h);
    Ok(())
}

impl Drop for Pool {
    fn drop(&mut self) {
        let handles = {
            let mut q = self.shared.queue.lock();
            q.shutdown = true;
            std::mem::take(&mut q.handles)
        };
        self.shared.ready.notify_all();
        let me = super::engine_thread_id();
        for h in handles {
            // Workers finish the queued jobs (those of dropped futures) first.
            // Never join ourselves, should the last file be dropped on a worker.
            if Some(h.thread().id()) != me {
                let _ = h.join();
            }
        }
    }
}

fn worker(s: &PoolShared) {
    super::mark_engine_thread();
    loop {
        let job = {
            let mut q = s.queue.lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.shutdown {
                    q.threads -= 1;
                    return;
                }
                q.idle += 1;
                let timeout = q.idle_timeout;
                let timed_out = s.ready.wait_for(&mut q, timeout).timed_out();
                q.idle -= 1;
                if timed_out && q.jobs.is_empty() && !q.shutdown && q.threads > q.min {
                    q.threads -= 1;
                    return;
                }
            }
        };
        // A panicking job drops its sender: its future gets an error, the worker lives on.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
    }
}

/// Test hook: a write whose bytes a test chose waits in the worker, after its request
/// was handed to the engine and before it reaches the file (a disk slow to do it).
#[cfg(test)]
pub(crate) mod worker_hold {
    use parking_lot::{Condvar, Mutex};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// One held write: the first one whose bytes equal `bytes`.
    pub(crate) struct Hold {
        bytes: Vec<u8>,
        /// Arrived in a worker, released by the test, written to the file.
        st: Mutex<(bool, bool, bool)>,
        cv: Condvar,
    }

    static HOLDS: Mutex<Vec<Arc<Hold>>> = parking_lot::const_mutex(Vec::new());

    /// Hold the next write (of any file of this engine) of exactly `bytes`.
    pub(crate) fn hold(bytes: Vec<u8>) -> Arc<Hold> {
        let h = Arc::new(Hold {
            bytes,
            st: Mutex::new((false, false, false)),
            cv: Condvar::new(),
        });
        HOLDS.lock().push(h.clone());
        h
    }

    impl Hold {
        /// Whether the write waits in a worker (or waited).
        pub(crate) fn arrived(&self) -> bool {
            self.st.lock().0
        }
        /// Wait until the write waits in a worker; false after `timeout`.
        pub(crate) fn wait_arrived(&self, timeout: Duration) -> bool {
            let end = Instant::now() + timeout;
            let mut st = self.st.lock();
            while !st.0 {
                if self.cv.wait_until(&mut st, end).timed_out() {
                    return st.0;
                }
            }
            true
        }
        /// Let the write go on (or not be held at all).
        pub(crate) fn release(self: &Arc<Self>) {
            HOLDS.lock().retain(|h| !Arc::ptr_eq(h, self));
            self.st.lock().1 = true;
            self.cv.notify_all();
        }
        /// Whether the write reached the file.
        pub(crate) fn landed(&self) -> bool {
            self.st.lock().2
        }
    }

    /// In a worker, before it writes `buf`: wait there if a hold wants this write.
    pub(super) fn before_write(buf: &[u8]) -> Option<Arc<Hold>> {
        let h = {
            let mut holds = HOLDS.lock();
            let i = holds.iter().position(|h| h.bytes == buf)?;
            holds.remove(i)
        };
        let mut st = h.st.lock();
        st.0 = true;
        h.cv.notify_all();
        while !st.1 {
            h.cv.wait(&mut st);
        }
        drop(st);
        Some(h)
    }

    /// In a worker, after the write of `before_write` reached the file.
    pub(super) fn after_write(h: Option<Arc<Hold>>) {
        if let Some(h) = h {
            h.st.lock().2 = true;
            h.cv.notify_all();
        }
    }
}

// ---------------------------------------------------------------------------
// ThreadsFile
// ---------------------------------------------------------------------------

/// A file accessed with blocking system calls on the shared worker pool.
pub struct ThreadsFile {
    core: Arc<FileCore>,
    pool: Arc<Pool>,
}

impl ThreadsFile {
    /// Open a file. With `opts.direct`, fails (`InvalidInput`, errno `EINVAL`) when
    /// the file system refuses `O_DIRECT`.
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<Self> {
        let core = Arc::new(FileCore::open(path, opts)?);
        Ok(ThreadsFile {
            core,
            pool: Pool::get()?,
        })
    }
}

impl Backend for ThreadsFile {
    fn core(&self) -> &FileCore {
        &self.core
    }

    fn read_owned(&self, mut buf: AlignedBuf, off: u64) -> Pending<(AlignedBuf, usize)> {
        let core = self.core.clone();
        self.pool.run(move || {
            let n = pread_full(&core.file, &mut buf, off, core.align)?;
            Ok((buf, n))
        })
    }

    fn read_into(&self, mut buf: RawBuf, off: u64) -> Pending<usize> {
        let core = self.core.clone();
        self.pool.run(move || {
            // SAFETY: this job is the operation that owns `buf`; the caller's
            // `RunToEnd` keeps the memory borrowed until the job has returned.
            let s = unsafe { buf.as_slice() };
            pread_full(&core.file, s, off, core.align)
        })
    }

    fn write_owned(
        &self,
        buf: AlignedBuf,
        off: u64,
        truncate_to: Option<u64>,
        hold: Hold,
    ) -> Pending<()> {
        let core = self.core.clone();
        self.pool.run(move || {
            #[cfg(test)]
            let held = worker_hold::before_write(&buf);
            core.file.write_all_at(&buf, off)?;
            if let Some(len) = truncate_to {
                core.file.set_len(len)?;
            }
            drop(hold);
            #[cfg(test)]
            worker_hold::after_write(held);
            Ok(())
        })
    }

    fn write_from(&self, buf: RawBuf, off: u64, hold: Hold) -> Pending<()> {
        let core = self.core.clone();
        self.pool.run(move || {
            // SAFETY: this job is the operation that owns `buf`; the caller's
            // `RunToEnd` keeps the memory borrowed until the job has returned.
            let s = unsafe { buf.as_shared_slice() };
            #[cfg(test)]
            let held = worker_hold::before_write(s);
            core.file.write_all_at(s, off)?;
            drop(hold);
            #[cfg(test)]
            worker_hold::after_write(held);
            Ok(())
        })
    }

    fn fdatasync(&self) -> Pending<()> {
        if let Some(p) = self.core.fdatasync_inline() {
            return p;
        }
        let core = self.core.clone();
        self.pool.run(move || core.file.sync_data())
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64, hold: Hold) -> Pending<()> {
        if let Some(p) = self.core.fallocate_inline(mode, off, len) {
            return p;
        }
        let core = self.core.clone();
        self.pool.run(move || {
            let r = fallocate(&core.file, mode, off, len);
            drop(hold);
            r
        })
    }
}

impl Storage for ThreadsFile {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(ops::read_at(self, buf, off))
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(ops::write_at(self, buf, off))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(ops::flush(self))
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        Box::pin(ops::discard(self, off, len))
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(ops::write_zeroes(self, off, len))
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(ops::allocate(self, off, len))
    }
    fn len(&self) -> io::Result<u64> {
        self.core.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.core.set_len(len)
    }
    fn in_memory(&self) -> bool {
        self.core.in_memory()
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.core.allocated_size()
    }
    fn start_writeback(&self, off: u64, len: u64) -> io::Result<()> {
        self.core.start_writeback(off, len)
    }
    fn data_run(&self, off: u64, len: u64) -> io::Result<(u64, bool)> {
        self.core.data_run(off, len)
    }
    fn alignment(&self) -> usize {
        self.core.align
    }
    fn engine_name(&self) -> &'static str {
        "threads"
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.core.fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn slots(n: usize) -> Vec<PoolSlot> {
        (0..n).map(|_| PoolSlot(NonNull::dangling())).collect()
    }

    /// Jobs that wait at a gate until the test opens it, counting their arrivals.
    struct Gate {
        st: Mutex<(usize, bool)>,
        cv: Condvar,
    }

    impl Gate {
        fn new() -> Arc<Gate> {
            Arc::new(Gate {
                st: Mutex::new((0, false)),
                cv: Condvar::new(),
            })
        }
        fn pass(&self) {
            let mut st = self.st.lock();
            st.0 += 1;
            self.cv.notify_all();
            while !st.1 {
                self.cv.wait(&mut st);
            }
        }
        /// Wait until `n` jobs wait at the gate; false after 10 s.
        fn wait_arrived(&self, n: usize) -> bool {
            let end = Instant::now() + Duration::from_secs(10);
            let mut st = self.st.lock();
            while st.0 < n {
                if self.cv.wait_until(&mut st, end).timed_out() {
                    return st.0 >= n;
                }
            }
            true
        }
        fn open(&self) {
            self.st.lock().1 = true;
            self.cv.notify_all();
        }
    }

    /// Requests held in workers (a slow disk) do not hold up the others: the pool starts
    /// workers while queued jobs outnumber its idle ones, up to its maximum, and the extra
    /// workers exit once idle. Fails with a pool of fixed size (`max` = `min`): the third
    /// held job never reaches a worker.
    #[test]
    fn pool_grows_past_held_jobs_and_shrinks_back() {
        let pool = Pool::start(2, 8, Duration::from_millis(100)).unwrap();
        assert_eq!(pool.threads(), 2);
        let gate = Gate::new();
        // Opened however the test ends: the pool's drop waits for the held jobs.
        struct OpenOnDrop(Arc<Gate>);
        impl Drop for OpenOnDrop {
            fn drop(&mut self) {
                self.0.open();
            }
        }
        let _open = OpenOnDrop(gate.clone());
        // A job that waits at the gate until it opens.
        let hold = |i: usize| {
            let g = gate.clone();
            pool.run(move || {
                g.pass();
                Ok(i)
            })
        };
        let held: Vec<_> = (0..6).map(hold).collect();
        assert!(gate.wait_arrived(6), "6 held jobs need 6 workers");
        // Others run while those are held.
        for i in 0..20 {
            assert_eq!(
                futures::executor::block_on(pool.run(move || Ok(i))).unwrap(),
                i
            );
        }
        // The pool stops at its maximum: 8 held, the 9th waits for one of them.
        let more: Vec<_> = (6..9).map(hold).collect();
        assert!(gate.wait_arrived(8));
        thread::sleep(Duration::from_millis(50));
        assert_eq!(gate.st.lock().0, 8, "more workers than the maximum");
        assert_eq!(pool.threads(), 8);
        gate.open();
        for (i, p) in held.into_iter().chain(more).enumerate() {
            assert_eq!(futures::executor::block_on(p).unwrap(), i);
        }
        // Idle, the pool goes back to its minimum.
        let end = Instant::now() + Duration::from_secs(10);
        while pool.threads() > 2 && Instant::now() < end {
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pool.threads(), 2);
        // And grows again.
        assert_eq!(futures::executor::block_on(pool.run(|| Ok(7))).unwrap(), 7);
    }

    /// A file of `len` bytes of 0x5a named `name` in a new directory under `target/tmp`,
    /// opened writable: with `O_DIRECT` (on disk: tmpfs refuses it), or buffered and
    /// treated as a file in memory (tmpfs), wherever `target/` is.
    fn test_file(
        name: &str,
        len: usize,
        direct: bool,
    ) -> (tempfile::TempDir, std::path::PathBuf, Arc<ThreadsFile>) {
        let tmp = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let dir = tempfile::tempdir_in(&tmp).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, vec![0x5au8; len]).unwrap();
        let fo = FileOptions {
            writable: true,
            direct,
            ..Default::default()
        };
        let file = Arc::new(ThreadsFile::open(&path, &fo).unwrap());
        if direct {
            assert!(!file.in_memory(), "needs a file on disk");
        } else {
            file.core.inline.store(INLINE_ALWAYS, Ordering::Relaxed);
        }
        (dir, path, file)
    }

    /// A plain reservation (`fallocate` mode 0) of a buffered file on a disk runs on the
    /// calling thread, as a buffered write does (a conversion to a new raw file reserves
    /// every data run before writing it; each hop to the engine cost context switches);
    /// other modes, and a reservation while another thread writes inline, go to the engine.
    #[test]
    fn reservation_of_a_buffered_file_runs_inline() {
        let tmp = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let dir = tempfile::tempdir_in(&tmp).unwrap();
        let path = dir.path().join("reserve");
        std::fs::write(&path, b"").unwrap();
        let fo = FileOptions {
            writable: true,
            ..Default::default()
        };
        let core = FileCore::open(&path, &fo).unwrap();
        if core.in_memory() {
            // target/ on tmpfs: files in memory always reserve inline; nothing to test.
            return;
        }
        let p = core
            .fallocate_inline(0, 0, 1 << 20)
            .expect("a reservation runs on the calling thread");
        futures::executor::block_on(p).unwrap();
        assert_eq!(core.len().unwrap(), 1 << 20);
        assert!(core
            .fallocate_inline(libc::FALLOC_FL_ZERO_RANGE, 0, 4096)
            .is_none());
        core.inline_writer.store(true, Ordering::Relaxed);
        assert!(core.fallocate_inline(0, 0, 2 << 20).is_none());
        core.inline_writer.store(false, Ordering::Relaxed);
    }

    /// Releases its holds however the test ends, so that no worker stays held (the holds are
    /// shared by every test of the process).
    struct Release(Vec<Arc<worker_hold::Hold>>);

    impl Drop for Release {
        fn drop(&mut self) {
            for h in &self.0 {
                h.release();
            }
        }
    }

    /// With `O_DIRECT` (every read and write goes to a worker), writes held in workers, one
    /// more than the pool keeps running, do not stop a read issued meanwhile, and land once
    /// released. Fails with a pool that does not grow.
    #[test]
    fn a_read_completes_while_writes_are_held_in_workers() {
        let n = Pool::get().unwrap().shared.queue.lock().min + 1;
        let (_dir, path, file) = test_file("held.raw", (n + 1) * 4096, true);
        // Bytes unique to this test (the holds are shared by every test of the process).
        let data = |i: usize| -> Vec<u8> {
            (0..4096usize)
                .map(|j| (j * 13 + i * 101 + 71) as u8)
                .collect()
        };
        let holds = Release((0..n).map(|i| worker_hold::hold(data(i))).collect());
        let writers: Vec<_> = (0..n)
            .map(|i| {
                let f = file.clone();
                thread::spawn(move || {
                    futures::executor::block_on(f.write_at(&data(i), (i * 4096) as u64))
                })
            })
            .collect();
        for (i, h) in holds.0.iter().enumerate() {
            assert!(
                h.wait_arrived(Duration::from_secs(10)),
                "write {i} not in a worker"
            );
        }
        let mut buf = vec![0u8; 4096];
        futures::executor::block_on(file.read_at(&mut buf, (n * 4096) as u64)).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        assert!(holds.0.iter().all(|h| !h.landed()));
        drop(holds);
        for w in writers {
            w.join().unwrap().unwrap();
        }
        let back = std::fs::read(&path).unwrap();
        for i in 0..n {
            assert_eq!(back[i * 4096..(i + 1) * 4096], data(i)[..], "write {i}");
        }
    }

    /// Writes to a file in memory that find another thread writing are queued for it and
    /// done by it, in order, when it has written its own: one awaited, one whose future is
    /// dropped while queued (the drop returns only once the write is done, the memory
    /// being lent). Fails with every thread writing for itself (both would finish at once).
    #[test]
    fn writes_to_a_file_in_memory_queue_for_the_writing_thread() {
        let (_dir, path, file) = test_file("mem.raw", 3 * 4096, false);
        // Another thread is writing (it does not really: this test plays it below).
        file.core.in_memory_writes.lock().writing = true;
        let f1 = file.clone();
        let awaited =
            thread::spawn(move || futures::executor::block_on(f1.write_at(&[0x11u8; 4096], 4096)));
        let f2 = file.clone();
        let dropper = thread::spawn(move || {
            let data = vec![0x22u8; 4096];
            let mut fut = f2.write_at(&data, 2 * 4096);
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                panic!("the write did not wait for the writing thread: {r:?}");
            }
            drop(fut);
            drop(data);
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while file.core.in_memory_writes.lock().queue.len() < 2 {
            assert!(
                Instant::now() < deadline && !awaited.is_finished(),
                "the writes were not queued"
            );
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(50));
        assert!(!awaited.is_finished() && !dropper.is_finished());
        assert!(std::fs::read(&path).unwrap()[4096..]
            .iter()
            .all(|&b| b == 0x5a));
        // The writer ends: the next write becomes the writer and does the queued ones too.
        file.core.in_memory_writes.lock().writing = false;
        futures::executor::block_on(file.write_at(&[0x33u8; 4096], 0)).unwrap();
        while !(awaited.is_finished() && dropper.is_finished()) {
            assert!(Instant::now() < deadline, "a queued write never ended");
            thread::sleep(Duration::from_millis(1));
        }
        awaited.join().unwrap().unwrap();
        dropper.join().unwrap();
        let w = file.core.in_memory_writes.lock();
        assert!(!w.writing && w.queue.is_empty());
        let back = std::fs::read(&path).unwrap();
        for (i, b) in [0x33u8, 0x11, 0x22].into_iter().enumerate() {
            assert!(
                back[i * 4096..(i + 1) * 4096].iter().all(|&x| x == b),
                "block {i}"
            );
        }
    }

    /// Four threads writing distinct blocks of a file in memory at once (so that writes
    /// queue for one another): every block lands, and the file's writer is free after.
    #[test]
    fn concurrent_writes_to_a_file_in_memory_all_land() {
        const BLOCKS: usize = 4 * 256;
        let (_dir, path, file) = test_file("mem4.raw", BLOCKS * 4096, false);
        let block = |i: usize| vec![(i % 89 + 1) as u8; 4096]; // never the fill, 0x5a
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let f = file.clone();
                thread::spawn(move || {
                    for i in (t..BLOCKS).step_by(4) {
                        futures::executor::block_on(f.write_at(&block(i), (i * 4096) as u64))
                            .unwrap();
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !writers.iter().all(|w| w.is_finished()) {
            assert!(Instant::now() < deadline, "a write never ended");
            thread::sleep(Duration::from_millis(5));
        }
        for w in writers {
            w.join().unwrap();
        }
        let w = file.core.in_memory_writes.lock();
        assert!(!w.writing && w.queue.is_empty());
        let back = std::fs::read(&path).unwrap();
        for i in 0..BLOCKS {
            assert_eq!(back[i * 4096..(i + 1) * 4096], block(i)[..], "block {i}");
        }
    }

    /// An aligned `O_DIRECT` write lends the caller's memory to the engine (no copy): its
    /// future, dropped while the write is held in a worker, does not return from the drop
    /// before the write has ended (the memory stays borrowed until then), other requests
    /// run meanwhile, and the file gets the caller's bytes. Fails if a lent write's
    /// future can end before its operation (the drop returns while the write is held).
    #[test]
    fn a_dropped_lent_write_ends_before_its_drop_returns() {
        let (_dir, path, file) = test_file("lent.raw", 3 * 65536, true);
        // 64 KiB of aligned memory with bytes unique to this test.
        let mut data = AlignedBuf::zeroed(65536, 4096).unwrap();
        for (j, b) in data.iter_mut().enumerate() {
            *b = (j * 29 + 11) as u8;
        }
        let hold = worker_hold::hold(data.to_vec());
        let release = Release(vec![hold.clone()]);
        let (f2, h2) = (file.clone(), hold.clone());
        let dropper = thread::spawn(move || {
            let mut fut = f2.write_at(&data, 65536);
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            while !h2.arrived() {
                if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                    panic!("the held write completed: {r:?}");
                }
                thread::sleep(Duration::from_millis(1));
            }
            drop(fut);
            let landed = h2.landed();
            drop(data);
            landed
        });
        assert!(
            hold.wait_arrived(Duration::from_secs(10)),
            "the write never reached a worker"
        );
        // Other requests go on while it is held; the drop has not returned.
        let mut buf = vec![0u8; 4096];
        futures::executor::block_on(file.read_at(&mut buf, 0)).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        futures::executor::block_on(file.write_at(&vec![0x77u8; 8192], 2 * 65536)).unwrap();
        thread::sleep(Duration::from_millis(50));
        assert!(
            !dropper.is_finished(),
            "the drop returned while the write was held"
        );
        drop(release);
        assert!(
            dropper.join().unwrap(),
            "the drop returned before the write landed"
        );
        let back = std::fs::read(&path).unwrap();
        let want: Vec<u8> = (0..65536usize).map(|j| (j * 29 + 11) as u8).collect();
        assert_eq!(back[65536..2 * 65536], want[..]);
        assert!(back[2 * 65536..2 * 65536 + 8192].iter().all(|&b| b == 0x77));
    }

    #[test]
    fn pool_keeps_a_bounded_number_per_class() {
        assert_eq!(pool_keep(0), 64); // 4 KiB buffers: 256 KiB
        assert_eq!(pool_keep(6), 16); // 256 KiB buffers: 4 MiB
        assert_eq!(pool_keep(10), 2); // 4 MiB buffers: 8 MiB
        let total: usize = (0..=(POOL_MAX_BITS - POOL_MIN_BITS) as usize)
            .map(|c| pool_keep(c) << (c as u32 + POOL_MIN_BITS))
            .sum();
        assert!(total <= 48 << 20, "{total}");
        let mut p = ClassPool::new();
        let t = Instant::now();
        let mut freed = 0;
        for s in slots(100) {
            freed += p.give(s, 16, t).len();
        }
        assert_eq!(p.free.len(), 16);
        assert_eq!(freed, 84);
    }

    #[test]
    fn pool_gives_memory_back_after_a_burst() {
        let mut p = ClassPool::new();
        let t0 = Instant::now();
        // A burst: 16 buffers in use at once, then all returned.
        let mut freed = 0;
        for s in slots(16) {
            freed += p.give(s, 64, t0).len();
        }
        assert_eq!((p.free.len(), freed), (16, 0));
        // Steady use of 2 buffers at a time for a while.
        let mut t = t0;
        for _ in 0..10 {
            t += Duration::from_millis(300);
            let a = p.take().unwrap();
            let b = p.take().unwrap();
            freed += p.give(a, 64, t).len();
            freed += p.give(b, 64, t).len();
        }
        // The 14 buffers idle through a whole interval were freed; the 2 in use stay.
        assert_eq!(freed, 14);
        assert_eq!(p.free.len(), 2);
        // No use at all: within a few intervals everything is given back.
        for _ in 0..3 {
            t += Duration::from_secs(2);
            freed += p.trim(t).len();
        }
        assert_eq!(p.free.len(), 0);
        assert_eq!(freed, 16);
    }

    /// With `no_flush` (cache mode `unsafe`) a flush succeeds without an `fdatasync` and the
    /// data stays readable; without it, each flush is one. Fails when `ops::flush` ignores
    /// the option (two `fdatasync`s counted where none were expected).
    #[test]
    fn no_flush_skips_fdatasync() {
        crate::io::check_no_flush(ThreadsFile::open, |f| f.core.syncs.load(Ordering::Relaxed));
    }
}
