//! The library's runtime and where the caller is.
//!
//! - One tokio multi-thread runtime per process, shared by every open image: it starts when
//!   the first image opens (or a job starts) and is shut down, its threads joined, when the
//!   last user goes away ([`acquire`] / [`RtRef`]). Its threads are named `qcow2rs-rt-N`;
//!   the request workers (`qcow2rs-rt-io-N`, `qcow2_core::runner::Runner::with_threads`) are
//!   threads of their own that wait in their io_uring ring, started and joined with it.
//! - "Library context": a thread of the runtime, or any thread while it runs a completion or
//!   progress callback. Blocking calls made there would wait for the threads that are
//!   running them: they return `-EDEADLK` instead ([`in_library_context`]).
//! - fork(): a `pthread_atfork` child handler bumps a generation counter. An image (or a
//!   runtime) from an older generation belongs to the parent: its threads do not exist in
//!   the child, so it is never touched there ([`RtRef::forked`]); a new open in the child
//!   starts a new runtime.

use qcow2_core::runner::Runner;
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use tokio::runtime::{Handle, Runtime};

struct State {
    rt: Option<Runtime>,
    /// The request runner on `rt` (see `qcow2_core::runner`).
    runner: Option<Runner>,
    users: usize,
    /// The fork generation the runtime was started in.
    gen: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    rt: None,
    runner: None,
    users: 0,
    gen: 0,
});

/// Incremented in every child process right after fork().
static FORK_GEN: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

thread_local! {
    static LIBRARY_THREAD: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The state lock held across fork() by the forking thread (see [`install_atfork`]).
    static FORK_GUARD: RefCell<Option<MutexGuard<'static, State>>> = const { RefCell::new(None) };
}

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn atfork_prepare() {
    // Hold the state lock across fork() so that the child never inherits it locked by a
    // thread that does not exist there.
    let g = lock();
    FORK_GUARD.with(|f| *f.borrow_mut() = Some(g));
}

extern "C" fn atfork_parent() {
    FORK_GUARD.with(|f| f.borrow_mut().take());
}

extern "C" fn atfork_child() {
    FORK_GEN.fetch_add(1, Ordering::AcqRel);
    FORK_GUARD.with(|f| f.borrow_mut().take());
}

fn install_atfork() {
    ATFORK.call_once(|| {
        // SAFETY: the handlers are plain functions of this library, which is linked with
        // `-z nodelete` so they stay mapped for the life of the process.
        unsafe {
            libc::pthread_atfork(
                Some(atfork_prepare),
                Some(atfork_parent),
                Some(atfork_child),
            );
        }
    });
}

/// The current fork generation.
pub(crate) fn fork_gen() -> u64 {
    FORK_GEN.load(Ordering::Acquire)
}

/// Number of runtime worker threads: one per CPU, at least 2, at most 8.
fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

fn build() -> std::io::Result<Runtime> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .thread_name_fn(|| format!("qcow2rs-rt-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
        .on_thread_start(|| LIBRARY_THREAD.with(|c| c.set(true)))
        .build()
}

/// A reference to the runtime; the runtime stops when the last one is dropped.
pub(crate) struct RtRef {
    handle: Handle,
    runner: Runner,
    gen: u64,
}

/// Take a reference to the runtime, starting it if needed.
pub(crate) fn acquire() -> std::io::Result<RtRef> {
    install_atfork();
    let mut st = lock();
    let gen = fork_gen();
    if st.gen != gen {
        // Inherited from the parent process: its threads are gone; never drop it (its
        // Drop would wait for them).
        if let Some(rt) = st.rt.take() {
            std::mem::forget(rt);
        }
        if let Some(r) = st.runner.take() {
            std::mem::forget(r);
        }
        st.users = 0;
        st.gen = gen;
    }
    if st.rt.is_none() {
        let rt = build()?;
        // The request workers are threads that wait in their own io_uring ring (see
        // `Runner::with_threads`), marked as library threads like the runtime's.
        let runner = Runner::with_threads(rt.handle(), worker_threads(), "qcow2rs-rt-io", || {
            LIBRARY_THREAD.with(|c| c.set(true))
        })?;
        st.runner = Some(runner);
        st.rt = Some(rt);
    }
    st.users += 1;
    let handle = st
        .rt
        .as_ref()
        .expect("runtime just started")
        .handle()
        .clone();
    let runner = st.runner.clone().expect("runner started with the runtime");
    Ok(RtRef {
        handle,
        runner,
        gen,
    })
}

impl RtRef {
    /// The runtime's handle.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
    /// The runner of asynchronous requests.
    pub(crate) fn runner(&self) -> &Runner {
        &self.runner
    }
    /// Whether this reference was taken in a parent process before fork().
    pub(crate) fn forked(&self) -> bool {
        self.gen != fork_gen()
    }
}

impl Drop for RtRef {
    fn drop(&mut self) {
        if self.forked() {
            return;
        }
        let (runner, rt) = {
            let mut st = lock();
            if st.gen != self.gen {
                return;
            }
            st.users -= 1;
            if st.users == 0 {
                (st.runner.take(), st.rt.take())
            } else {
                (None, None)
            }
        };
        // Outside the lock: waits for the request workers, then the runtime's threads, to
        // exit. Never called on a library thread (blocking calls there return -EDEADLK
        // before getting here).
        if let Some(r) = runner {
            r.shutdown();
        }
        drop(rt);
    }
}

/// Run `fut` to its end on the calling thread (a caller's, never a library thread), inside
/// the runtime's context (for what the core spawns), in `qcow2_core::io::block_on`: a request
/// that waits for I/O waits in this thread's own io_uring ring, and this thread reaps its
/// completion. With tokio's `Handle::block_on` (before) the thread slept on a futex, and the
/// completion cost two more wake-ups: the kernel wakes the submitting thread anyway to post
/// the completion, then whoever reaped it (the ring's completion thread, or a request worker
/// waiting in that ring) woke it again (docs/PERFORMANCE.md, ninth session).
pub(crate) fn block_on<F: std::future::Future>(handle: &Handle, fut: F) -> F::Output {
    qcow2_core::io::block_on_in_runtime(handle, fut)
}

/// Whether the calling thread is a library thread or is running a callback.
pub(crate) fn in_library_context() -> bool {
    LIBRARY_THREAD.with(|c| c.get()) || CALLBACK_DEPTH.with(|c| c.get()) > 0
}

/// Marks the calling thread as running a user callback while alive.
pub(crate) struct CallbackScope(());

impl CallbackScope {
    pub(crate) fn enter() -> CallbackScope {
        CALLBACK_DEPTH.with(|c| c.set(c.get() + 1));
        CallbackScope(())
    }
}

impl Drop for CallbackScope {
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|c| c.set(c.get() - 1));
    }
}

/// Whether a runtime is running in this process (for tests).
#[cfg(test)]
pub(crate) fn is_running() -> bool {
    let st = lock();
    st.rt.is_some() && st.gen == fork_gen()
}
