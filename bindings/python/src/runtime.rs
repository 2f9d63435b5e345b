//! The one tokio runtime of the extension module, and blocking on it from Python threads.
//!
//! The runtime (worker threads named `qcow2rs-py-*`) starts with the first call that needs it
//! and lives as long as the process: a request that was submitted always runs to its end (no
//! runtime shutdown ever drops a request halfway while it may still be using a caller's
//! buffer).

use qcow2_core::runner::Runner;
use qcow2_core::{Error, ErrorKind};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use tokio::runtime::{Handle, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static RUNNER: OnceLock<Runner> = OnceLock::new();

fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 16)
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

/// The request runner of the asyncio API (see `qcow2_core::runner`), on the runtime.
pub fn runner() -> &'static Runner {
    RUNNER.get_or_init(|| Runner::new(handle(), workers()))
}

/// Run `fut` to completion on the calling thread (the runtime's workers drive I/O and timers).
/// Call with the GIL released. Called from inside the runtime (for example from a progress
/// callback that itself blocks), it fails with `EDEADLK` instead of panicking.
///
/// The future is first polled once right here, inside the runtime's context: a request that
/// completes in its first poll (a page-cache read) then costs no more. Only a pending one goes
/// through `Handle::block_on`, which polls it again with its own waker (futures keep the
/// waker of their latest poll) and parks the thread; entering it costs, among other things, a
/// lock of a mutex shared by every thread of the runtime (its RNG seed generator), which
/// threads reading from the page cache at once contend for.
pub fn block_on<T>(fut: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    if Handle::try_current().is_ok() {
        return Err(Error::new(
            ErrorKind::Deadlock,
            "a blocking qcow2rs call cannot be made from inside a qcow2rs callback",
        ));
    }
    let h = handle();
    let mut fut = std::pin::pin!(fut);
    {
        let _ctx = h.enter();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            return r;
        }
    }
    h.block_on(fut)
}

/// Spawn `fut` on the runtime; it runs to its end whatever happens to the caller.
pub fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
    handle().spawn(fut);
}
