//! The one tokio runtime of the extension module, and blocking on it from Python threads.
//!
//! The runtime (worker threads named `qcow2rs-py-*`) starts with the first call that needs it
//! and lives as long as the process: a request that was submitted always runs to its end (no
//! runtime shutdown ever drops a request halfway while it may still be using a caller's
//! buffer). The asyncio API's request workers (`qcow2rs-py-io-N`, see [`runner`]) are threads
//! of their own, started with the first asyncio request and living as long; sync calls run
//! their request on the calling thread ([`block_on`]).

use qcow2_core::runner::Runner;
use qcow2_core::{Error, ErrorKind};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use tokio::runtime::{Handle, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static RUNNER: OnceLock<Runner> = OnceLock::new();

/// The number of the runtime's worker threads, and of the request workers (computed once:
/// asking the system reads cgroup files).
pub fn workers() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 16)
    })
}

fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let workers = workers();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name_fn(|| format!("qcow2rs-py-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
            .enable_all()
            .build()
            // Without a runtime nothing can work; this only fails when threads cannot start.
            .expect("qcow2rs: cannot start the I/O runtime")
    })
}

/// The runtime's handle (starting it on first use).
pub fn handle() -> &'static Handle {
    runtime().handle()
}

/// The request runner of the asyncio API (see `qcow2_core::runner`): worker threads of its
/// own (`qcow2rs-py-io-N`) that wait in their io_uring ring, so a request that waits for I/O
/// is reaped by the worker that polls it (as the C library's request workers).
pub fn runner() -> &'static Runner {
    RUNNER.get_or_init(|| {
        Runner::with_threads_after_job(
            handle(),
            workers(),
            "qcow2rs-py-io",
            crate::aio::on_worker_start,
            crate::aio::after_job,
        )
        // As for the runtime: without threads nothing can work.
        .expect("qcow2rs: cannot start the request workers")
    })
}

/// The request runner, if it has started (for its own workers, which run only once it has).
pub fn running_runner() -> Option<&'static Runner> {
    RUNNER.get()
}

/// Run `fut` to completion on the calling thread. Call with the GIL released. Called from
/// inside the runtime (for example from a progress callback that itself blocks), it fails
/// with `EDEADLK` instead of panicking.
///
/// The future runs right here, inside the runtime's context, in `qcow2_core::io::block_on`:
/// a request that completes in its first poll (a page-cache read) costs nothing more, and
/// one that waits for I/O waits in this thread's own io_uring ring and reaps its own
/// completions (one wake-up of this thread per completion, not a wake-up of the ring's
/// completion thread that then wakes this one). The runtime's workers only run what the
/// request spawns and its timers.
pub fn block_on<T>(fut: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    if Handle::try_current().is_ok() {
        return Err(deadlock());
    }
    qcow2_core::io::block_on_in_runtime(handle(), fut)
}

/// Read `buf.len()` bytes of guest data at `off` of `img`, as [`block_on`] of `img.read_at`.
///
/// A read of at most one cluster runs without entering the runtime's context (tokio's
/// `Handle::enter` clones and drops the runtime's handle, an `Arc` every thread shares, and
/// sets a thread-local twice). Such a read needs nothing from the runtime: the only thing a
/// read ever hands to it is decompression (`spawn_blocking`, to decompress many clusters on
/// all cores at once), which without a runtime runs on the calling thread, and a read this
/// small touches one or two clusters. Longer reads enter the context as before.
pub fn block_on_read(img: &qcow2_core::Image, buf: &mut [u8], off: u64) -> Result<(), Error> {
    if buf.len() as u64 > img.layout().cluster_size {
        return block_on(img.read_at(buf, off));
    }
    if Handle::try_current().is_ok() {
        return Err(deadlock());
    }
    // The read's futures take their waker at every poll: a read the page cache serves
    // completes in the first poll, without the parker `block_on` would set up.
    qcow2_core::io::block_on_request(std::pin::pin!(img.read_at(buf, off)))
}

fn deadlock() -> Error {
    Error::new(
        ErrorKind::Deadlock,
        "a blocking qcow2rs call cannot be made from inside a qcow2rs callback",
    )
}

/// Spawn `fut` on the runtime; it runs to its end whatever happens to the caller.
pub fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
    handle().spawn(fut);
}
