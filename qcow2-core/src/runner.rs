//! A request runner for the language bindings: runs request futures without a tokio task each.
//!
//! The C library and the Python package submit one future per request and must run it to its
//! end (the engines may still be using the caller's buffer), then deliver its outcome.
//! Spawning a tokio task per request costs a task allocation, the runtime's owned-task lock on
//! spawn and on completion, and often the wake-up of another worker thread; when the I/O
//! itself costs a few microseconds (page-cache reads complete on their first poll) that is a
//! large part of a request.
//!
//! [`Runner::run`] polls the future once right on the submitting thread (inside the runtime's
//! context). A request that completes there (a page-cache hit) costs no other thread at all;
//! its `done` is told so ([`Inline::Yes`]) and must not deliver a user callback inline if the
//! binding's contract forbids it (it can use [`Runner::defer`]). A request that is still
//! pending is re-polled, when its waker fires, by one of a few long-lived *worker tasks* on
//! the runtime, fed by a queue; its `done` then runs on that worker ([`Inline::No`]).
//!
//! A request costs at most one allocation: the task holds its state, its future (built in
//! place and pinned there, not boxed) and its `done`; and a finished task that nothing else
//! holds (no waker clone left anywhere) is kept by its thread and used again for that
//! thread's next [`Runner::run`] request of the same type, so a thread that submits request
//! after request (a C callback that submits the next one) allocates none. A future is polled by one thread at a time and
//! never dropped before it has finished. The worker tasks run unconstrained by tokio's
//! cooperative budget (a request future that ran out of budget would wake itself at once and
//! spin) and yield to the runtime every [`JOBS_PER_YIELD`] jobs instead. A panic while polling a request's future is caught: the
//! future is dropped and `done` gets the panic's payload (the bindings turn it into an error),
//! so a panicking request still completes.

use futures::task::{waker_ref, ArcWake};
use parking_lot::Mutex;
use std::any::TypeId;
use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::runtime::Handle;
use tokio::sync::Notify;

/// A worker task gives the runtime a turn after this many jobs in a row.
pub const JOBS_PER_YIELD: usize = 64;

/// Re-polls in a row of a future woken while it was being polled, before it goes back to
/// the queue (behind the other jobs).
const REPOLLS: usize = 4;

/// Where a request's `done` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inline {
    /// On the submitting thread, inside [`Runner::run`]: the request completed on its first
    /// poll.
    Yes,
    /// On one of the runner's worker tasks (a runtime thread).
    No,
}

/// Something a worker runs.
trait Job: Send + Sync {
    fn run(self: Arc<Self>);
}

/// A closure queued with [`Runner::defer`] (one allocation: the closure lives in the job).
struct Call<F>(Mutex<Option<F>>);

impl<F: FnOnce() + Send + 'static> Job for Call<F> {
    fn run(self: Arc<Self>) {
        let f = self.0.lock().take();
        if let Some(f) = f {
            f();
        }
    }
}

struct Inner {
    queue: Mutex<VecDeque<Arc<dyn Job>>>,
    notify: Notify,
    handle: Handle,
    /// Set by [`Runner::shutdown`]: workers exit once the queue is empty.
    stop: AtomicBool,
    /// Called by each worker after each job (`false`) and before it waits for one (`true`);
    /// see [`Runner::with_threads_after_job`].
    after_job: Option<fn(bool)>,
}

impl Inner {
    fn push(&self, j: Arc<dyn Job>) {
        // On a worker thread of this runner (started by `with_threads`), waiting in its
        // ring or running a job: the job stays on this thread. Waking another worker would
        // cost a thread switch per request (the one that reaped the completion would hand
        // it over), and this thread polls its local queue before it waits again.
        let j = LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            match l.as_mut() {
                Some((inner, q, waker)) if std::ptr::eq(*inner, self) => {
                    q.push_back(j);
                    waker.wake_by_ref();
                    None
                }
                _ => Some(j),
            }
        });
        if let Some(j) = j {
            self.queue.lock().push_back(j);
            self.notify.notify_one();
        }
    }

    fn pop(&self) -> Option<Arc<dyn Job>> {
        self.queue.lock().pop_front()
    }
}

/// The runner: a queue and the worker tasks that drain it. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
    /// The worker threads of [`Runner::with_threads`] (empty for worker tasks).
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

impl Runner {
    /// Start a runner with `workers` worker tasks (at least 1) on the runtime of `handle`.
    /// The worker tasks live as long as the runtime: dropping the runtime drops them (the
    /// caller waits for its requests to finish first).
    pub fn new(handle: &Handle, workers: usize) -> Runner {
        let inner = Self::inner(handle, None);
        for _ in 0..workers.max(1) {
            handle.spawn(tokio::task::unconstrained(worker(inner.clone())));
        }
        Runner {
            inner,
            threads: Default::default(),
        }
    }

    /// Start a runner whose `workers` workers (at least 1) are threads of their own, named
    /// `{name}-N`, each running `on_start` first and then its worker loop in
    /// [`crate::io::block_on`] (inside the runtime's context): an idle worker waits in its
    /// own io_uring ring, so a request it submitted (a callback that submits the next
    /// request) completes with one wake-up of that thread, reaped by it, instead of the
    /// ring's completion thread waking a runtime worker. [`Runner::shutdown`] stops and
    /// joins them.
    pub fn with_threads(
        handle: &Handle,
        workers: usize,
        name: &str,
        on_start: fn(),
    ) -> std::io::Result<Runner> {
        Self::start_threads(handle, workers, name, on_start, None)
    }

    /// As [`Runner::with_threads`], and each worker thread calls `after_job(false)` after
    /// each job it ran and `after_job(true)` before it waits for the next one (its queues
    /// are empty): a binding can leave there what a request's `done` put off (the Python
    /// package arms its event loop's completion queue there, after the worker's next job,
    /// so that completions arriving meanwhile share one wake-up of the loop).
    pub fn with_threads_after_job(
        handle: &Handle,
        workers: usize,
        name: &str,
        on_start: fn(),
        after_job: fn(bool),
    ) -> std::io::Result<Runner> {
        Self::start_threads(handle, workers, name, on_start, Some(after_job))
    }

    fn start_threads(
        handle: &Handle,
        workers: usize,
        name: &str,
        on_start: fn(),
        after_job: Option<fn(bool)>,
    ) -> std::io::Result<Runner> {
        let inner = Self::inner(handle, after_job);
        let r = Runner {
            inner,
            threads: Default::default(),
        };
        for i in 0..workers.max(1) {
            let inner = r.inner.clone();
            let t = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    on_start();
                    let _ctx = inner.handle.enter();
                    crate::io::block_on(tokio::task::unconstrained(thread_worker(inner.clone())));
                });
            match t {
                Ok(t) => r.threads.lock().push(t),
                Err(e) => {
                    r.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(r)
    }

    fn inner(handle: &Handle, after_job: Option<fn(bool)>) -> Arc<Inner> {
        Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            handle: handle.clone(),
            stop: AtomicBool::new(false),
            after_job,
        })
    }

    /// Stop and join the worker threads of [`Runner::with_threads`] once the queue is empty
    /// (the caller has waited for its requests). Not from a worker thread (it would wait
    /// for itself). Worker tasks of [`Runner::new`] stop with their runtime instead.
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Release);
        // One permit; each worker that sees `stop` passes it on to the next.
        self.inner.notify.notify_one();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }

    /// How many jobs wait for a worker: those in the shared queue, plus, on a worker thread
    /// of this runner, those in its own queue. A hook of [`Runner::with_threads_after_job`]
    /// can use it to tell whether the workers are about to run out of work.
    pub fn waiting_jobs(&self) -> usize {
        let local = LOCAL.with(|l| match l.borrow().as_ref() {
            Some((inner, q, _)) if std::ptr::eq(*inner, Arc::as_ptr(&self.inner)) => q.len(),
            _ => 0,
        });
        local + self.inner.queue.lock().len()
    }

    /// The runtime this runner's workers run on.
    pub fn handle(&self) -> &Handle {
        &self.inner.handle
    }

    /// Run `fut` to its end, then `done(output, where)`; the output is `Err` with the panic's
    /// payload if a poll of `fut` panicked (the future is then dropped). The first poll
    /// happens here, on the calling thread, in the runtime's context; if the future completes
    /// there, `done` runs before this returns with [`Inline::Yes`]. Otherwise the worker tasks
    /// poll it as its waker fires, and `done` runs on one of them with [`Inline::No`].
    #[inline]
    pub fn run<F, D>(&self, fut: F, done: D)
    where
        F: Future + Send + 'static,
        D: FnOnce(std::thread::Result<F::Output>, Inline) + Send + 'static,
    {
        self.run_with(|| fut, done)
    }

    /// As [`Runner::run`] with the future `make()`, which is built right in the request's
    /// allocation (when inlined, no copy of the future on the way there).
    #[inline]
    pub fn run_with<F, D>(&self, make: impl FnOnce() -> F, done: D)
    where
        F: Future + Send + 'static,
        D: FnOnce(std::thread::Result<F::Output>, Inline) + Send + 'static,
    {
        let mut args = Some((make, done));
        let here = THREAD.try_with(|t| {
            let (make, done) = args.take().expect("taken once");
            let task = Task::reuse_or_new(t, make, done, &self.inner);
            if t.in_worker.get() {
                // Already in the runtime's context (a callback run by a worker job).
                task.poll_loop(Inline::Yes);
            } else {
                let _ctx = self.inner.handle.enter();
                task.poll_loop(Inline::Yes);
            }
            task.recycle(t);
        });
        if here.is_err() {
            // This thread's locals are being destroyed: no spare task, no worker.
            let (make, done) = args.take().expect("not taken");
            let task = Task::new(RUNNING, make, done, &self.inner);
            let _ctx = self.inner.handle.enter();
            task.poll_loop(Inline::Yes);
        }
    }

    /// As [`Runner::run`], but without the first poll on the calling thread: the future is
    /// queued for the worker tasks at once and `done` always runs on one of them. For
    /// requests whose first poll may be long (a large read of unallocated clusters fills the
    /// buffer with zeros right there), which should not hold up the submitter.
    #[inline]
    pub fn spawn<F, D>(&self, fut: F, done: D)
    where
        F: Future + Send + 'static,
        D: FnOnce(std::thread::Result<F::Output>, Inline) + Send + 'static,
    {
        self.spawn_with(|| fut, done)
    }

    /// As [`Runner::spawn`] with the future `make()` (see [`Runner::run_with`]).
    #[inline]
    pub fn spawn_with<F, D>(&self, make: impl FnOnce() -> F, done: D)
    where
        F: Future + Send + 'static,
        D: FnOnce(std::thread::Result<F::Output>, Inline) + Send + 'static,
    {
        let task = Task::new(SCHEDULED, make, done, &self.inner);
        self.inner.push(task);
    }

    /// Run `f` soon on one of the worker tasks (a runtime thread), never on the caller's stack.
    pub fn defer(&self, f: impl FnOnce() + Send + 'static) {
        self.inner.push(Arc::new(Call(Mutex::new(Some(f)))));
    }
}

/// A worker thread's own queue (see [`Inner::push`]): its runner, the jobs woken on this
/// thread, and the waker of the thread's worker loop.
type LocalQueue = (*const Inner, VecDeque<Arc<dyn Job>>, std::task::Waker);

/// A finished task kept by a thread for its next request of the same type (see
/// [`Task::recycle`]): its allocation is used again instead of a `free` and a `malloc`.
#[derive(Clone, Copy)]
struct SpareTask {
    /// The `TypeId` of the `Task<F, D>`.
    ty: TypeId,
    /// From `Arc::into_raw`; the only reference to the task.
    ptr: *const (),
    /// Drops the `Arc` of `ptr`.
    drop: unsafe fn(*const ()),
}

/// The runner's state of a thread (one thread-local: each access to one costs a call in a
/// shared library).
struct ThreadState {
    /// Set while a worker task runs a job on this thread.
    in_worker: Cell<bool>,
    spare: Cell<Option<SpareTask>>,
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        if let Some(s) = self.spare.take() {
            // SAFETY: `ptr` came from `Arc::into_raw` of the type `drop` was made for, and
            // this was its only reference.
            unsafe { (s.drop)(s.ptr) };
        }
    }
}

thread_local! {
    static THREAD: ThreadState = const {
        ThreadState {
            in_worker: Cell::new(false),
            spare: Cell::new(None),
        }
    };
    /// Set on the worker threads of [`Runner::with_threads`].
    static LOCAL: std::cell::RefCell<Option<LocalQueue>> = const { std::cell::RefCell::new(None) };
}

/// The worker loop of a thread of [`Runner::with_threads`]: [`worker`], with the thread's
/// local queue set up (with the loop's waker) on its first poll.
async fn thread_worker(inner: Arc<Inner>) {
    let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    LOCAL.with(|l| *l.borrow_mut() = Some((Arc::as_ptr(&inner), VecDeque::new(), waker)));
    worker(inner).await;
    // Jobs left locally at shutdown (none: requests have finished) are dropped here.
    LOCAL.with(|l| l.borrow_mut().take());
}

/// The next job of this worker: its thread's local queue first, then the shared one.
fn next_job(inner: &Inner) -> Option<Arc<dyn Job>> {
    LOCAL
        .with(|l| l.borrow_mut().as_mut().and_then(|(_, q, _)| q.pop_front()))
        .or_else(|| inner.pop())
}

async fn worker(inner: Arc<Inner>) {
    loop {
        let mut n = 0;
        while let Some(job) = next_job(&inner) {
            // A panicking job (which request futures avoid by catching their own panics)
            // must not take the worker down with it.
            let _ = THREAD.try_with(|t| t.in_worker.set(true));
            let _ = catch_unwind(AssertUnwindSafe(|| job.run()));
            let _ = THREAD.try_with(|t| t.in_worker.set(false));
            if let Some(f) = inner.after_job {
                let _ = catch_unwind(|| f(false));
            }
            n += 1;
            if n == JOBS_PER_YIELD {
                n = 0;
                tokio::task::yield_now().await;
            }
        }
        if let Some(f) = inner.after_job {
            let _ = catch_unwind(|| f(true));
        }
        if inner.stop.load(Ordering::Acquire) {
            // Wake the next worker, which then sees `stop` too.
            inner.notify.notify_one();
            return;
        }
        // A push (or a shutdown) between the empty pop above and this wait leaves a permit
        // in `notify`, so the wait ends at once. A job pushed to this thread's local queue
        // (see `Inner::push`) wakes this loop through its waker and ends the wait too; the
        // dropped `Notified` then passes on any permit it was given.
        let notified = inner.notify.notified();
        let mut notified = std::pin::pin!(notified);
        std::future::poll_fn(|cx| {
            let local = LOCAL.with(|l| l.borrow().as_ref().is_some_and(|(_, q, _)| !q.is_empty()));
            if local {
                return Poll::Ready(());
            }
            notified.as_mut().poll(cx)
        })
        .await;
    }
}

/// Not queued, not being polled: waiting for its waker.
const IDLE: u8 = 0;
/// In the queue.
const SCHEDULED: u8 = 1;
/// Being polled.
const RUNNING: u8 = 2;
/// Being polled, and woken meanwhile: poll again.
const NOTIFIED: u8 = 3;
/// Finished (its future is dropped).
const DONE: u8 = 4;

/// A request's future and what to do with its output, both stored inside the task's one
/// allocation (no box of their own). The future is pinned there: it is polled in place and
/// dropped in place (`fut = None`), never moved once the task exists.
struct Slot<F, D> {
    fut: Option<F>,
    done: Option<D>,
}

/// A request: its future and what to do with the output.
struct Task<F, D> {
    state: AtomicU8,
    /// Touched only by the thread that moved `state` to RUNNING (`Task::new` for
    /// [`Runner::run_with`], `Job::run` otherwise), until it moves it away from RUNNING or
    /// NOTIFIED: the state machine makes the access exclusive, and its release/acquire
    /// transitions order one poller's accesses before the next one's. No lock: a lock and
    /// an unlock per poll were two more atomic operations per request.
    slot: UnsafeCell<Slot<F, D>>,
    runner: Arc<Inner>,
}

// SAFETY: `slot` is only accessed by the one thread that owns the RUNNING state (see above),
// and `F` and `D` are `Send`, so sharing a `Task` between threads only ever moves them from
// one thread to another; the other fields are `Sync`.
unsafe impl<F: Send, D: Send> Sync for Task<F, D> {}

impl<F, D> Task<F, D>
where
    F: Future + Send + 'static,
    D: FnOnce(std::thread::Result<F::Output>, Inline) + Send + 'static,
{
    /// One allocation for the whole request: state, future and `done`. The task is built
    /// in place in its allocation and the future written straight into its slot (the
    /// future of a request is large, and each move of it is a `memcpy`).
    #[inline(always)]
    fn new(state: u8, make: impl FnOnce() -> F, done: D, runner: &Arc<Inner>) -> Arc<Self> {
        let mut task = Arc::<Self>::new_uninit();
        let p = Arc::get_mut(&mut task)
            .expect("a new Arc is not shared")
            .as_mut_ptr();
        // SAFETY: `p` points to the new allocation, uninitialized and ours alone: each field
        // is written exactly once, through raw pointers (no reference to uninitialized
        // memory), and `fut` is written over the `None` just stored (nothing to drop), before
        // `assume_init`.
        unsafe {
            std::ptr::addr_of_mut!((*p).state).write(AtomicU8::new(state));
            std::ptr::addr_of_mut!((*p).runner).write(runner.clone());
            std::ptr::addr_of_mut!((*p).slot).write(UnsafeCell::new(Slot {
                fut: None,
                done: Some(done),
            }));
            let slot = (*p).slot.get();
            std::ptr::addr_of_mut!((*slot).fut).write(Some(make()));
            task.assume_init()
        }
    }

    /// A task in the state RUNNING for `make()` and `done`: this thread's spare task if it
    /// is of this type (its allocation used again), else a new one.
    #[inline(always)]
    fn reuse_or_new(
        t: &ThreadState,
        make: impl FnOnce() -> F,
        done: D,
        runner: &Arc<Inner>,
    ) -> Arc<Self> {
        match t.spare.get() {
            Some(s) if s.ty == TypeId::of::<Self>() => {
                t.spare.set(None);
                let p = s.ptr as *mut Self;
                // SAFETY: `p` is the only reference to a finished task of this type (see
                // `recycle`): its slot holds no future and no `done`, so writing them drops
                // nothing, and nobody else reads it meanwhile. If `make` panics, nothing is
                // written and the task is dropped as it is.
                unsafe {
                    let task = Arc::from_raw(p);
                    if !Arc::ptr_eq(&(*p).runner, runner) {
                        *std::ptr::addr_of_mut!((*p).runner) = runner.clone();
                    }
                    let slot = (*p).slot.get();
                    std::ptr::addr_of_mut!((*slot).fut).write(Some(make()));
                    std::ptr::addr_of_mut!((*slot).done).write(Some(done));
                    (*p).state.store(RUNNING, Ordering::Relaxed);
                    task
                }
            }
            _ => Self::new(RUNNING, make, done, runner),
        }
    }

    /// Keep this task as the thread's spare if it is finished and nothing else holds it
    /// (no waker clone anywhere); else drop this reference.
    #[inline(always)]
    fn recycle(self: Arc<Self>, t: &ThreadState) {
        // The only reference (tasks never have `Weak` ones): nobody else can clone it any
        // more, so a plain load decides (`Arc::get_mut` would cost an atomic
        // compare-and-swap); the fence orders the other holders' last uses (a waker clone
        // dropped on another thread) before what follows.
        if Arc::strong_count(&self) != 1 {
            return;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: the only reference, held by this thread.
        let slot = unsafe { &*self.slot.get() };
        if slot.fut.is_some() || slot.done.is_some() {
            return;
        }
        let old = t.spare.replace(Some(SpareTask {
            ty: TypeId::of::<Self>(),
            ptr: Arc::into_raw(self) as *const (),
            drop: drop_spare::<F, D>,
        }));
        if let Some(o) = old {
            // SAFETY: as in `ThreadState::drop`.
            unsafe { (o.drop)(o.ptr) };
        }
    }

    /// Poll with the state RUNNING until the future is pending and not woken, or done.
    /// Inlined into its two callers (the submitting call's first poll, a worker's job): one
    /// call less per request.
    #[inline(always)]
    fn poll_loop(self: &Arc<Self>, inline: Inline) {
        let mut repolls = 0;
        loop {
            // SAFETY: this thread owns the RUNNING state (the caller moved the task to it),
            // so nothing else touches the slot until the state changes below; the
            // reference is not used after that.
            let slot = unsafe { &mut *self.slot.get() };
            let Some(fut) = slot.fut.as_mut() else {
                self.state.store(DONE, Ordering::Release);
                return;
            };
            // SAFETY: the future lives inside this task's `Arc` allocation, which never
            // moves; it is never moved out of `slot.fut`, only dropped in place there
            // (`slot.fut = None`), so it stays pinned from its first poll to its drop.
            let fut = unsafe { Pin::new_unchecked(fut) };
            let waker = waker_ref(self);
            let mut cx = Context::from_waker(&waker);
            let out = match catch_unwind(AssertUnwindSafe(|| fut.poll(&mut cx))) {
                Ok(Poll::Ready(v)) => Some(Ok(v)),
                Err(p) => Some(Err(p)),
                Ok(Poll::Pending) => None,
            };
            match out {
                Some(out) => {
                    self.state.store(DONE, Ordering::Release);
                    // The future (and what it holds) goes before `done` runs: dropped in
                    // place, as a pinned value must be.
                    slot.fut = None;
                    let done = slot.done.take().expect("set until the future finishes");
                    done(out, inline);
                    return;
                }
                None => {
                    match self.state.compare_exchange(
                        RUNNING,
                        IDLE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return,
                        Err(_) => {
                            // NOTIFIED: woken while polled.
                            repolls += 1;
                            if inline == Inline::Yes || repolls >= REPOLLS {
                                self.state.store(SCHEDULED, Ordering::Release);
                                self.runner.push(self.clone());
                                return;
                            }
                            self.state.store(RUNNING, Ordering::Release);
                        }
                    }
                }
            }
        }
    }
}

/// Drop a spare task of this type.
///
/// # Safety
/// `p` comes from `Arc::into_raw` of an `Arc<Task<F, D>>`, whose reference it owns.
unsafe fn drop_spare<F, D>(p: *const ()) {
    // SAFETY: guaranteed by the caller.
    drop(unsafe { Arc::from_raw(p as *const Task<F, D>) });
}

impl<F, D> ArcWake for Task<F, D>
where
    F: Future + Send + 'static,
    D: FnOnce(std::thread::Result<F::Output>, Inline) + Send + 'static,
{
    fn wake_by_ref(arc_self: &Arc<Self>) {
        let mut s = arc_self.state.load(Ordering::Acquire);
        loop {
            let next = match s {
                IDLE => SCHEDULED,
                RUNNING => NOTIFIED,
                _ => return,
            };
            match arc_self
                .state
                .compare_exchange(s, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if next == SCHEDULED {
                        arc_self.runner.push(arc_self.clone());
                    }
                    return;
                }
                Err(now) => s = now,
            }
        }
    }
}

impl<F, D> Job for Task<F, D>
where
    F: Future + Send + 'static,
    D: FnOnce(std::thread::Result<F::Output>, Inline) + Send + 'static,
{
    fn run(self: Arc<Self>) {
        if self
            .state
            .compare_exchange(SCHEDULED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.poll_loop(Inline::No);
            let _ = THREAD.try_with(|t| self.recycle(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::Duration;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn ready_future_completes_inline() {
        let rt = rt();
        let r = Runner::new(rt.handle(), 2);
        let (tx, rx) = mpsc::channel();
        r.run(async { 7 }, move |v, w| tx.send((v.unwrap(), w)).unwrap());
        assert_eq!(rx.try_recv().unwrap(), (7, Inline::Yes));
    }

    #[test]
    fn pending_future_completes_on_a_worker() {
        let rt = rt();
        let r = Runner::new(rt.handle(), 2);
        let (tx, rx) = mpsc::channel();
        let (otx, orx) = tokio::sync::oneshot::channel::<u32>();
        let me = std::thread::current().id();
        r.run(async move { orx.await.unwrap() }, move |v, w| {
            tx.send((v.unwrap(), w, std::thread::current().id() != me))
                .unwrap()
        });
        assert!(rx.try_recv().is_err());
        std::thread::spawn(move || otx.send(5).unwrap());
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, (5, Inline::No, true));
    }

    #[test]
    fn many_requests_each_complete_once() {
        let rt = rt();
        let r = Runner::new(rt.handle(), 2);
        let count = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        const N: usize = 2000;
        for i in 0..N {
            let count = count.clone();
            let tx = tx.clone();
            r.run(
                async move {
                    // Some finish at once, some after yields, some after a timer.
                    for _ in 0..i % 3 {
                        tokio::task::yield_now().await;
                    }
                    if i % 7 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    i
                },
                move |v, _| {
                    assert_eq!(v.unwrap(), i);
                    count.fetch_add(1, Ordering::SeqCst);
                    tx.send(()).unwrap();
                },
            );
        }
        for _ in 0..N {
            rx.recv_timeout(Duration::from_secs(30)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(count.load(Ordering::SeqCst), N);
    }

    #[test]
    fn panicking_future_still_completes() {
        let rt = rt();
        let r = Runner::new(rt.handle(), 1);
        let (tx, rx) = mpsc::channel();
        let (otx, orx) = tokio::sync::oneshot::channel::<()>();
        r.run(
            async move {
                orx.await.unwrap();
                panic!("injected");
            },
            move |v: std::thread::Result<()>, w| tx.send((v.is_err(), w)).unwrap(),
        );
        otx.send(()).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            (true, Inline::No)
        );
    }

    #[test]
    fn spawned_future_never_completes_inline() {
        let rt = rt();
        let r = Runner::new(rt.handle(), 1);
        let (tx, rx) = mpsc::channel();
        let me = std::thread::current().id();
        r.spawn(async { 3 }, move |v, w| {
            tx.send((v.unwrap(), w, std::thread::current().id() != me))
                .unwrap()
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            (3, Inline::No, true)
        );
    }

    #[test]
    fn threads_run_requests_and_shutdown_joins_them() {
        // Worker threads (with_threads): requests woken from other threads, from the worker
        // threads themselves (local queues) and spawned ones each complete once; shutdown
        // returns (every worker passes the stop on) and leaves no thread behind.
        let rt = rt();
        let r = Runner::with_threads(rt.handle(), 3, "runner-test", || {}).unwrap();
        let n = 2000;
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<()>();
        for i in 0..n {
            let done = done.clone();
            let tx = tx.clone();
            let fut = async move {
                if i % 3 == 0 {
                    let (otx, orx) = tokio::sync::oneshot::channel::<usize>();
                    std::thread::spawn(move || otx.send(i).unwrap());
                    orx.await.unwrap()
                } else {
                    tokio::task::yield_now().await;
                    i
                }
            };
            let cb = move |v: std::thread::Result<usize>, _| {
                assert_eq!(v.unwrap(), i);
                if done.fetch_add(1, Ordering::SeqCst) + 1 == n {
                    tx.send(()).unwrap();
                }
            };
            if i % 2 == 0 {
                r.spawn(fut, cb);
            } else {
                r.run(fut, cb);
            }
        }
        rx.recv_timeout(Duration::from_secs(60))
            .expect("all requests complete");
        assert_eq!(done.load(Ordering::SeqCst), n);
        r.shutdown();
        assert!(r.threads.lock().is_empty());
        // Joined: gone from /proc (a joined thread can linger there for a moment).
        let alive = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.starts_with("runner-test"))
                .count()
        };
        let t = std::time::Instant::now();
        while alive() > 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(alive(), 0);
    }

    #[test]
    fn after_job_hook_runs_after_each_job_and_before_each_wait() {
        // One worker thread: the hook says `true` when the worker finds no job, `false`
        // after each job it ran; of three jobs, the two queued while the first runs are run
        // right after it, each job followed by the hook, then the worker runs out of jobs.
        static CALLS: Mutex<Vec<bool>> = Mutex::new(Vec::new());
        fn hook(idle: bool) {
            CALLS.lock().push(idle);
        }
        let calls = || {
            let mut c = CALLS.lock().clone();
            c.dedup_by(|a, b| *a && *b); // waits may end without a job (a spare permit)
            c
        };
        let wait_for = |want: &[bool]| {
            let t = std::time::Instant::now();
            while calls() != want && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(calls(), want);
        };
        let rt = rt();
        let r = Runner::with_threads_after_job(rt.handle(), 1, "runner-hook", || {}, hook).unwrap();
        wait_for(&[true]);
        let (gtx, grx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel::<usize>();
        let t = tx.clone();
        r.spawn(
            async move {
                grx.recv().unwrap(); // holds the worker until the others are queued
                0
            },
            move |v, _| t.send(v.unwrap()).unwrap(),
        );
        for i in 1..3 {
            let t = tx.clone();
            r.spawn(async move { i }, move |v, _| t.send(v.unwrap()).unwrap());
        }
        gtx.send(()).unwrap();
        for i in 0..3 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), i);
        }
        wait_for(&[true, false, false, false, true]);
        r.shutdown();
    }

    #[test]
    fn waiting_jobs_counts_the_jobs_no_worker_has_taken() {
        let rt = rt();
        let r = Runner::with_threads(rt.handle(), 1, "runner-waiting", || {}).unwrap();
        assert_eq!(r.waiting_jobs(), 0);
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (gtx, grx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel::<usize>();
        let t = tx.clone();
        r.spawn(
            async move {
                started_tx.send(()).unwrap();
                grx.recv().unwrap(); // holds the only worker
                0
            },
            move |v, _| t.send(v.unwrap()).unwrap(),
        );
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        for i in 1..4 {
            let t = tx.clone();
            r.spawn(async move { i }, move |v, _| t.send(v.unwrap()).unwrap());
            assert_eq!(r.waiting_jobs(), i);
        }
        gtx.send(()).unwrap();
        for i in 0..4 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), i);
        }
        assert_eq!(r.waiting_jobs(), 0);
        r.shutdown();
    }

    #[test]
    fn spare_tasks_are_reused_safely_and_freed_at_thread_exit() {
        // Request after request on one thread: every future and every `done` is dropped
        // exactly once and gives its own value (a spare task carries nothing over), a task
        // whose waker was cloned is not reused (waking that clone later is harmless), and
        // the spare goes with its thread (its reference to the runner is dropped).
        let rt = rt();
        let r = Runner::new(rt.handle(), 1);
        let before = Arc::strong_count(&r.inner);
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Counted(Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let kept: Arc<Mutex<Option<std::task::Waker>>> = Default::default();
        let t = {
            let (r, dropped, kept) = (r.clone(), dropped.clone(), kept.clone());
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for i in 0..100usize {
                    let (tx, rx) = mpsc::channel();
                    let c = Counted(dropped.clone());
                    let d = Counted(dropped.clone());
                    let kept = kept.clone();
                    r.run(
                        async move {
                            let _c = c;
                            if i == 50 {
                                std::future::poll_fn(|cx| {
                                    *kept.lock() = Some(cx.waker().clone());
                                    Poll::Ready(())
                                })
                                .await;
                            }
                            i
                        },
                        move |v, w| {
                            let _d = d;
                            tx.send((v.unwrap(), w)).unwrap();
                        },
                    );
                    got.push(rx.try_recv().unwrap());
                }
                got
            })
        };
        let got = t.join().unwrap();
        assert_eq!(got, (0..100).map(|i| (i, Inline::Yes)).collect::<Vec<_>>());
        assert_eq!(dropped.load(Ordering::SeqCst), 200);
        kept.lock().take().unwrap().wake();
        assert_eq!(Arc::strong_count(&r.inner), before);
    }

    #[test]
    fn defer_runs_on_a_worker() {
        let rt = rt();
        let r = Runner::new(rt.handle(), 1);
        let (tx, rx) = mpsc::channel();
        let me = std::thread::current().id();
        r.defer(move || tx.send(std::thread::current().id() != me).unwrap());
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
}
