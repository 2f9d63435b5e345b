//! I/O engines: the storage under an image.
//!
//! Every file the engine touches (the image, its external data file, raw
//! backing files) is accessed through the [`Storage`] trait. Engines:
//! - [`threads`]: a portable pool of worker threads doing `pread`/`pwrite`;
//! - [`uring`]: Linux io_uring, rings shared by all files with a completion thread each as the
//!   backstop, [`block_on`], which waits in (and reaps) the calling thread's ring, and
//!   [`reap_in_runtime`], which lets a tokio runtime's idle worker reap the rings;
//! - [`mem`]: an in-memory store with fault injection, for tests;
//! - [`powercut`]: in-memory files that log every change and materialize what a disk could
//!   hold after a power cut at any point, for crash tests;
//! - [`fault`]: a wrapper around any storage that holds (delays) or fails chosen requests
//!   and records their order, for deterministic race and fault tests.
//!
//! Contract shared by all engines:
//! - Reads and writes take any offset, length and buffer address. An engine
//!   opened with `O_DIRECT` bounces unaligned requests through aligned memory
//!   (and read-modify-writes unaligned writes, serialized against each other).
//! - Reads past the end of the file fill the remainder with zeros.
//! - Futures are cancellation-safe: dropping one never lets the kernel touch a
//!   buffer the caller got back (engines use owned bounce buffers where needed).
//! - A change to the storage ends with its future: once the drop of a `write_at`,
//!   `write_zeroes`, `discard` or `allocate` future returns, that request changes
//!   nothing any more. A part already handed to the kernel or a worker is waited
//!   for (the file engines block in the drop, as for reads into the caller's
//!   memory); a part not started yet is never started. The image engine relies on
//!   this: a dropped request's ticket, in-flight mark and locks are released when
//!   its future is dropped, and later requests (an overlapping write, a flush, an
//!   allocation reusing a freed cluster) no longer wait for it (see
//!   docs/RELIABILITY.md, "In-flight requests on close and on drop").

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

pub mod fault;
pub mod lock;
pub mod mem;
pub mod powercut;
pub mod threads;
pub mod uring;

pub use uring::{
    block_on, block_on_in_runtime, block_on_request, hold_rings, reap_in_runtime, RingsHold,
};

/// A boxed, `Send` future returning an `io::Result`.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Positioned, asynchronous storage (a file, or memory in tests).
///
/// The futures of the requests that change the storage must not let the change outlive
/// them (see the module documentation): when the drop of one returns, the storage will not
/// change on its account any more.
pub trait Storage: Send + Sync + 'static {
    /// Read `buf.len()` bytes at `off`. Bytes past the end of the storage read as zeros.
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()>;
    /// Write all of `buf` at `off`, extending the storage if needed.
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()>;
    /// Make every completed write durable (`fdatasync`).
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Release the space of a byte range (hole punch); the range reads as zeros afterwards.
    /// Returns `Ok(false)` when the file system cannot punch holes (nothing was changed).
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool>;
    /// Make a byte range read as zeros, cheaply where possible (`FALLOC_FL_ZERO_RANGE`,
    /// else writing zeros). Extends the storage if the range ends past its end.
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()>;
    /// Reserve space for a byte range without changing its content (`fallocate`), extending
    /// the storage if needed.
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()>;
    /// Whether the storage lives in memory (a file on tmpfs or ramfs): reserving space
    /// ([`Storage::allocate`]) ahead of writes buys nothing there (no blocks to lay out,
    /// and a write allocates its pages anyway), it only touches every page twice.
    fn in_memory(&self) -> bool {
        false
    }
    /// Start writing the dirty cached pages of a byte range to the disk, without waiting for
    /// it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a hint, durable only after
    /// [`Storage::flush`]. Long sequential writes call it behind themselves so that the disk
    /// works while they go on, instead of during the final flush (the kernel starts on its
    /// own only when a tenth of the memory is dirty). Nothing to do without a page cache.
    fn start_writeback(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Ok(())
    }
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Bytes actually allocated on the host (`st_blocks * 512`), for `actual-size`.
    fn allocated_size(&self) -> io::Result<u64>;
    /// Whether the byte range `[off, off+len)` may contain data: returns the length of the
    /// leading run that has the same state, and `true` if that run is data (not a hole).
    /// Engines without `SEEK_DATA` support report everything as data.
    fn data_run(&self, off: u64, len: u64) -> io::Result<(u64, bool)> {
        let _ = off;
        Ok((len, true))
    }
    /// The alignment (bytes) that offsets, lengths and buffer addresses should have for the
    /// fast path; 1 for buffered I/O, typically 512 or 4096 with `O_DIRECT`.
    fn alignment(&self) -> usize;
    /// A short name of the engine, for diagnostics ("io_uring", "threads", "mem").
    fn engine_name(&self) -> &'static str;
    /// The file descriptor the I/O goes through, if this storage is a file: image locks
    /// ([`lock`]) are taken on it. Storage without one (memory, test storage) is never locked.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// Which engine to use for files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring where the kernel allows it, else threads. The environment can change that
    /// choice (see [`auto_uses_threads`]).
    #[default]
    Auto,
    /// Linux io_uring.
    IoUring,
    /// A pool of worker threads doing blocking system calls.
    Threads,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "io_uring" | "uring" => Ok(EngineKind::IoUring),
            "threads" => Ok(EngineKind::Threads),
            _ => Err(format!(
                "unknown I/O engine '{s}' (expected io_uring, threads or auto)"
            )),
        }
    }
}

/// How to open a file. Fields may be added: outside this crate, start from
/// `FileOptions::default()` and set fields.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct FileOptions {
    /// Open for writing too.
    pub writable: bool,
    /// Create the file if it does not exist (truncating it if `truncate`).
    pub create: bool,
    /// Truncate to zero length on open.
    pub truncate: bool,
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
    /// Which engine.
    pub engine: EngineKind,
    /// Ignore flushes (QEMU's cache mode `unsafe`): [`Storage::flush`] succeeds at once
    /// without `fdatasync`, and no write-back is started ahead of one
    /// ([`Storage::start_writeback`]). What was written reaches the disk when the kernel
    /// writes it back; a crash or power cut before that loses it.
    pub no_flush: bool,
}

thread_local! {
    static ENGINE_THREAD: std::cell::Cell<Option<std::thread::ThreadId>> =
        const { std::cell::Cell::new(None) };
}

/// Mark the calling thread as one of an engine's own threads.
pub(crate) fn mark_engine_thread() {
    ENGINE_THREAD.with(|c| c.set(Some(std::thread::current().id())));
}

/// The calling thread's id if it is an engine thread, else `None`: for the "never join
/// yourself" checks of the engines' `Drop`. It does not call `thread::current()` on other
/// threads, which on a thread Rust did not start (the main thread of a C program using the
/// C library) allocates a handle that is never freed.
pub(crate) fn engine_thread_id() -> Option<std::thread::ThreadId> {
    ENGINE_THREAD.with(|c| c.get())
}

/// Whether [`EngineKind::Auto`] picks the thread pool without trying io_uring: when the
/// environment variable `QCOW2RS_ENGINE` is `threads`, or when the process runs under
/// valgrind (whose `io_uring_enter` wrapper holds valgrind's global lock while the call
/// waits, so the process deadlocks), unless `QCOW2RS_ENGINE` is `io_uring`. Read once.
pub fn auto_uses_threads() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        match std::env::var("QCOW2RS_ENGINE").as_deref() {
            Ok("threads") => return true,
            Ok("io_uring") | Ok("uring") => return false,
            _ => {}
        }
        // Valgrind preloads its vgpreload_*.so into the programs it runs.
        std::env::var_os("LD_PRELOAD").is_some_and(|p| p.to_string_lossy().contains("vgpreload"))
    })
}

/// Open `path` with the engine chosen by `opts`.
pub fn open_file(path: &Path, opts: &FileOptions) -> io::Result<Arc<dyn Storage>> {
    match opts.engine {
        EngineKind::Threads => Ok(Arc::new(threads::ThreadsFile::open(path, opts)?)),
        EngineKind::IoUring => Ok(Arc::new(uring::UringFile::open(path, opts)?)),
        EngineKind::Auto if auto_uses_threads() => {
            Ok(Arc::new(threads::ThreadsFile::open(path, opts)?))
        }
        EngineKind::Auto => match uring::UringFile::open(path, opts) {
            Ok(f) => Ok(Arc::new(f)),
            Err(e) if uring::is_unavailable(&e) => {
                Ok(Arc::new(threads::ThreadsFile::open(path, opts)?))
            }
            Err(e) => Err(e),
        },
    }
}

/// A file's identity: its device and inode. Different names of one file (`./x`, a symbolic
/// link, a hard link) have the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file `path` names (following symbolic links), or `None` when
    /// there is no such file.
    pub fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Whether `a` and `b` name the same file: the same device and inode when both exist; when
/// either does not exist yet, the same name in the same folder (folders compared by
/// identity), so a file about to be created is caught too.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (FileId::of(a), FileId::of(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => {
            let dir = |p: &Path| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => FileId::of(d),
                _ => FileId::of(Path::new(".")),
            };
            a.file_name().is_some()
                && a.file_name() == b.file_name()
                && dir(a).is_some()
                && dir(a) == dir(b)
        }
        _ => false,
    }
}

/// Both engines' test of `no_flush` (cache mode `unsafe`): a file opened by `open` with
/// `no_flush` answers two flushes without an `fdatasync` (`syncs` counts them) and keeps
/// the data readable; without it, each flush is one.
#[cfg(test)]
pub(crate) fn check_no_flush<F: Storage>(
    open: impl Fn(&Path, &FileOptions) -> io::Result<F>,
    syncs: impl Fn(&F) -> usize,
) {
    for no_flush in [true, false] {
        let tmp = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let dir = tempfile::tempdir_in(&tmp).unwrap();
        let fo = FileOptions {
            writable: true,
            create: true,
            no_flush,
            ..Default::default()
        };
        let f = open(&dir.path().join("f"), &fo).unwrap();
        futures::executor::block_on(async {
            f.write_at(b"data", 0).await.unwrap();
            f.flush().await.unwrap();
            f.flush().await.unwrap();
            let mut buf = [0u8; 4];
            f.read_at(&mut buf, 0).await.unwrap();
            assert_eq!(&buf, b"data");
        });
        let want = if no_flush { 0 } else { 2 };
        assert_eq!(syncs(&f), want, "{}: no_flush {no_flush}", f.engine_name());
    }
}
