//! Requests of the asyncio API and the delivery of their completions.
//!
//! A request runs on the request runner (`qcow2_core::runner`): a read or write of up to
//! [`INLINE_MAX`] is polled first inside the submitting call, on the loop's thread (without
//! the GIL: a first poll never waits for I/O; page-cache reads complete there), then, if not
//! finished, by the runner's worker threads (`qcow2rs-py-io-N`, each waiting in its own
//! io_uring ring) as its I/O completes; other requests go to the workers at once. A request runs to its end even when the Python task awaiting it
//! is cancelled (its result is then dropped), so buffers it borrowed stay held until the
//! engine is done with them.
//!
//! A request that completed inside its submitting call returns its result (or raises) right
//! there: no future, no loop lookup, no round trip through the loop. Every [`INLINE_YIELD`]-th
//! such request gets a future resolved through the loop's queue instead, so that the awaiting
//! task yields now and then. Only requests that need a future ask for the running loop
//! (`AsyncImage._queue()`, which calls `asyncio.get_running_loop()`: a system call per call
//! on Python 3.11, for its fork check) and create one with `loop.create_future()`.
//!
//! Completions go to the `_Completions` queue of the event loop that submitted them (one per
//! `AsyncImage` and loop). The queue is drained on the loop's own thread by `_drain`, which
//! releases the buffers, skips futures that are already done (cancelled) and resolves the
//! others: one drain resolves every completion queued so far. A queue is *armed* while a
//! drain is scheduled: a request delivered from the loop's thread arms it with
//! `loop.call_soon`; a request that completed on a request worker and finds the queue unarmed
//! asks the delivery thread (`qcow2rs-py-aio`) to schedule a drain with
//! `loop.call_soon_threadsafe` (one per batch, not per request), not at once but after one
//! more job at least, once the workers are about to run out of work (no more jobs waiting
//! than there are workers), after at most [`HOLD_JOBS`] jobs, or as soon as the worker has no
//! job left ([`after_job`]): the completions that arrive meanwhile join the batch, for one
//! wake-up of the loop. A drain that found work
//! schedules the next one with `loop.call_soon`, so while the loop is busy, completions are
//! picked up by the loop itself and no other thread has to wait for the GIL; a drain that
//! finds the queue empty disarms it.

use crate::buffers::HeldBuffer;
use crate::errors::to_pyerr;
use crate::image::{map_to_py, Image};
use crate::json;
use crate::runtime;
use futures::FutureExt;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use qcow2_core::runner::Inline;
use qcow2_core::{self as core, Error, ErrorKind};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// What a request produced, turned into a Python object on the loop's thread.
pub enum Outcome {
    /// None.
    Unit,
    /// An int.
    Count(u64),
    /// A ready object (e.g. the bytes of a read).
    Object(Py<PyAny>),
    /// A JSON value (info), as dicts and lists.
    Json(serde_json::Value),
    /// Map entries.
    Map(Vec<core::MapEntry>),
    /// `(start, length)` ranges, as a list of tuples.
    Extents(Vec<(u64, u64)>),
    /// An opened image (for `qcow2rs.aio.open`).
    Opened(core::Image, String),
    /// An error, naming a file.
    Failed(Error, Option<Arc<str>>),
}

impl Outcome {
    pub fn unit(r: core::Result<()>, name: Arc<str>) -> Outcome {
        match r {
            Ok(()) => Outcome::Unit,
            Err(e) => Outcome::Failed(e, Some(name)),
        }
    }

    fn into_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Outcome::Unit => Ok(py.None()),
            Outcome::Count(n) => n.into_py_any(py),
            Outcome::Object(o) => Ok(o),
            Outcome::Json(v) => json::to_py(py, &v),
            Outcome::Map(m) => map_to_py(py, &m),
            Outcome::Extents(v) => v.into_py_any(py),
            Outcome::Opened(img, name) => Ok(Py::new(py, Image::new(img, name))?.into_any()),
            Outcome::Failed(e, name) => Err(to_pyerr(&e, name.as_deref())),
        }
    }
}

/// A finished request: the future to resolve, the outcome, and the buffer it borrowed.
struct Completion {
    fut: Py<PyAny>,
    outcome: Outcome,
    hold: Option<HeldBuffer>,
}

impl Completion {
    /// Release the buffer, then resolve the future unless it is already done (cancelled).
    fn resolve(self, py: Python<'_>) {
        release(py, self.hold);
        let fut = self.fut.bind(py);
        // No `done()` check first (one Python call less per request): setting the result of
        // a cancelled future fails with InvalidStateError, which is then ignored.
        let r = match self.outcome.into_py(py) {
            Ok(v) => fut.call_method1(intern!(py, "set_result"), (v,)),
            Err(e) => fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),)),
        };
        if let Err(e) = r {
            let done = fut
                .call_method0(intern!(py, "done"))
                .and_then(|d| d.is_truthy())
                .unwrap_or(false);
            if !done {
                e.write_unraisable(py, Some(fut));
            }
        }
    }
}

#[derive(Default)]
struct QueueState {
    items: Vec<Completion>,
    /// A drain is scheduled (or running).
    armed: bool,
    /// The loop is closed: completions are dropped.
    dead: bool,
}

/// The completion queue of one event loop (shared by the requests in flight).
pub struct Queue {
    lp: Py<PyAny>,
    st: Mutex<QueueState>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a completion (any thread, without the GIL); arm the queue if needed: through the
    /// delivery thread, or, for a request that completed inside its submitting call (on the
    /// loop's thread, GIL held), by telling [`submit`] to do it ([`ARM_HERE`]).
    fn push(self: &Arc<Self>, c: Completion, inline: Inline) {
        let arm = {
            let mut st = self.lock();
            if st.dead {
                drop(st);
                if inline == Inline::Yes {
                    // The GIL is held (inside the submitting call): drop it right here.
                    drop(c);
                } else {
                    send(Msg::Drop(Box::new(c)));
                }
                return;
            }
            st.items.push(c);
            !std::mem::replace(&mut st.armed, true)
        };
        if arm {
            if inline == Inline::Yes {
                ARM_HERE.with(|a| a.set(true));
            } else if !defer_arm(self) {
                send(Msg::Arm(self.clone()));
            }
        }
    }
}

thread_local! {
    /// Set on the runner's worker threads (`qcow2rs-py-io-N`), whose runner calls
    /// [`after_job`].
    static ON_WORKER: Cell<bool> = const { Cell::new(false) };
    /// Queues a request worker armed and whose drain it has not asked for yet (see
    /// [`after_job`]).
    static DEFERRED: RefCell<Deferred<Arc<Queue>>> = const { RefCell::new(Deferred::new()) };
}

/// What a request worker armed without asking for the drain yet (queues; anything in tests).
struct Deferred<T> {
    /// Armed during an earlier job: asked for once the workers are about to run out of work
    /// (see [`Deferred::after_job`]).
    held: Vec<T>,
    /// Jobs the worker ran since the first of `held` was armed (not counting that job).
    held_jobs: u32,
    /// Armed during the current job.
    current: Vec<T>,
}

/// A request worker asks for the drains it put off after at most this many more jobs, even
/// while the workers still have plenty of work queued.
const HOLD_JOBS: u32 = 4;

impl<T> Deferred<T> {
    const fn new() -> Self {
        Deferred {
            held: Vec::new(),
            held_jobs: 0,
            current: Vec::new(),
        }
    }

    /// After a job (`idle` false) or before the worker waits for one (`idle` true): what is
    /// due now. Something armed during an earlier job is due when the workers are about to
    /// run out of work (`running_low()`, asked only then), or after [`HOLD_JOBS`] jobs;
    /// everything is due when the worker has no job left.
    fn after_job(&mut self, idle: bool, running_low: impl FnOnce() -> bool) -> Vec<T> {
        if idle {
            let mut due = std::mem::take(&mut self.held);
            due.append(&mut self.current);
            self.held_jobs = 0;
            return due;
        }
        let mut due = Vec::new();
        if !self.held.is_empty() {
            self.held_jobs += 1;
            if self.held_jobs >= HOLD_JOBS || running_low() {
                due = std::mem::take(&mut self.held);
            }
        }
        if self.held.is_empty() {
            self.held_jobs = 0;
        }
        self.held.append(&mut self.current);
        due
    }
}

/// Run by each request worker when it starts.
pub fn on_worker_start() {
    ON_WORKER.with(|w| w.set(true));
}

/// On a request worker: put off asking for `q`'s drain until after the worker's next job
/// at least (see [`after_job`]), and say so. The queue stays armed meanwhile, so the
/// completions of the other workers (and of the next jobs) join it: the loop is woken once
/// for all of them instead of once per completion. Nothing waits on this: the loop still has
/// its other requests queued for the workers, and a worker that has no job left asks at
/// once (`after_job(true)`).
fn defer_arm(q: &Arc<Queue>) -> bool {
    if !ON_WORKER.with(|w| w.get()) {
        return false;
    }
    DEFERRED.with(|d| d.borrow_mut().current.push(q.clone()));
    true
}

/// Called by the runner on a request worker after each job (`idle` false) and before it
/// waits for one (`idle` true): ask for the drains that are due ([`Deferred::after_job`]).
/// A drain put off is asked for when no more jobs wait than there are workers, so that the
/// loop's turnaround (the delivery, the drain, the new submissions of the tasks it woke)
/// overlaps the jobs still running, and the batch is as large as that allows: the fewer
/// batches, the fewer wake-ups of the delivery thread and of the loop per request. The
/// workers never wait for it: a worker that runs dry asks for every drain it holds.
pub fn after_job(idle: bool) {
    let due = DEFERRED.with(|d| d.borrow_mut().after_job(idle, running_low));
    for q in due {
        send(Msg::Arm(q));
    }
}

/// The request workers are about to run out of work: no more jobs wait than there are
/// workers.
fn running_low() -> bool {
    runtime::running_runner().is_none_or(|r| r.waiting_jobs() <= runtime::workers())
}

thread_local! {
    /// Set when a request completed inside its submitting call and its queue needs a drain
    /// scheduled: [`submit`] then schedules it with `loop.call_soon`.
    static ARM_HERE: Cell<bool> = const { Cell::new(false) };
}

/// The completion queue of an event loop, as a Python object (`qcow2rs.aio` keeps one per
/// AsyncImage and loop).
#[pyclass(frozen, module = "qcow2rs._qcow2rs", name = "_Completions")]
pub struct Completions {
    q: Arc<Queue>,
}

#[pymethods]
impl Completions {
    #[new]
    fn new(lp: Py<PyAny>) -> Self {
        Completions {
            q: Arc::new(Queue {
                lp,
                st: Mutex::new(QueueState::default()),
            }),
        }
    }

    /// Resolve the futures of the requests completed so far (on the loop's thread).
    fn _drain(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let q = &slf.get().q;
        let items = {
            let mut st = q.lock();
            if st.items.is_empty() {
                st.armed = false;
                return Ok(());
            }
            std::mem::take(&mut st.items)
        };
        for c in items {
            c.resolve(py);
        }
        // The tasks just woken will submit more; look again after they ran.
        let again = q.lp.call_method1(
            py,
            intern!(py, "call_soon"),
            (slf.getattr(intern!(py, "_drain"))?,),
        );
        if again.is_err() {
            q.lock().armed = false;
        }
        again.map(drop)
    }
}

enum Msg {
    /// Schedule a drain of this queue on its loop.
    Arm(Arc<Queue>),
    /// Drop what a request left that nobody waits for (its loop is closed), with the GIL.
    Drop(Box<dyn Send>),
    /// The interpreter is about to finalize: set the flag, wake its waiter and never call
    /// into Python again (see [`_stop_delivery`]).
    Stop(Arc<(Mutex<bool>, std::sync::Condvar)>),
}

static CHANNEL: OnceLock<Sender<Msg>> = OnceLock::new();

fn send(m: Msg) {
    let tx = CHANNEL.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("qcow2rs-py-aio".into())
            .spawn(move || delivery_thread(rx))
            // As for the runtime: without threads nothing can work.
            .expect("qcow2rs: cannot start the completion thread");
        tx
    });
    let _ = tx.send(m);
}

/// Registered with `atexit` when the module is imported: stop the delivery thread calling
/// into Python before the interpreter finalizes. Without this, a `call_soon_threadsafe` that
/// the delivery thread makes while the interpreter finalizes (a completion that arrived as
/// the program ended) wants the GIL back after its socket write, and CPython 3.11 ends such a
/// thread with `pthread_exit`, whose unwinding through the thread's Rust frames aborts the
/// process. The thread handles the messages sent before this one, then parks for good; this
/// waits for that (GIL released, at most a few seconds). `atexit` runs its handlers last
/// registered first, so the ones registered after `import qcow2rs` still get their asyncio
/// completions; one registered before the import that awaits a request which completes on a
/// worker would wait for ever (none of the package's own code does).
#[pyfunction]
pub fn _stop_delivery(py: Python<'_>) {
    let Some(tx) = CHANNEL.get() else {
        return; // never started
    };
    let ack = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    if tx.send(Msg::Stop(ack.clone())).is_err() {
        return;
    }
    py.detach(|| {
        let (m, cv) = &*ack;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cv.wait_timeout_while(g, std::time::Duration::from_secs(5), |stopped| !*stopped);
    });
}

/// The delivery thread: attached to the interpreter for its whole life, with the GIL
/// released while it waits for messages. (Attaching per wake-up would create and destroy a
/// Python thread state each time, and with it the mapping of its frame stack: an `mmap`
/// and a `munmap`, which shoots down the TLBs of the other CPUs, per batch of completions.)
fn delivery_thread(rx: Receiver<Msg>) {
    let mut rx = Some(rx);
    // A Stop found while batching: handled by the next wait, after the messages before it.
    let mut carry: Option<Msg> = None;
    let _ = Python::try_attach(|py| loop {
        let r = rx.take().expect("the receiver is put back after each wait");
        let c = carry.take();
        let (r, first) = py.detach(move || {
            let m = match c {
                Some(m) => Ok(m),
                None => r.recv(),
            };
            if let Ok(Msg::Stop(ack)) = &m {
                // The interpreter is finalizing: never take the GIL again (see
                // `_stop_delivery`); nothing more can be delivered or released.
                let (lock, cv) = &**ack;
                *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
                cv.notify_all();
                std::mem::forget(r);
                loop {
                    std::thread::park();
                }
            }
            (r, m)
        });
        let Ok(first) = first else {
            return; // every sender is gone
        };
        let mut msgs = vec![first];
        while let Ok(m) = r.try_recv() {
            if let Msg::Stop(_) = m {
                carry = Some(m);
                break;
            }
            msgs.push(m);
        }
        for m in msgs {
            match m {
                Msg::Arm(q) => arm(py, q),
                Msg::Drop(c) => drop(c),
                Msg::Stop(_) => unreachable!("a Stop is carried to the next wait"),
            }
        }
        rx = Some(r);
    });
}

/// Schedule `q`'s drain with `loop.call_soon_threadsafe`; a closed loop kills the queue.
fn arm(py: Python<'_>, q: Arc<Queue>) {
    arm_with(py, q, intern!(py, "call_soon_threadsafe"));
}

/// Schedule `q`'s drain with `loop.<how>` (`call_soon` on the loop's thread,
/// `call_soon_threadsafe` elsewhere); a closed loop kills the queue.
fn arm_with(py: Python<'_>, q: Arc<Queue>, how: &Bound<'_, pyo3::types::PyString>) {
    let scheduled = Bound::new(py, Completions { q: q.clone() })
        .and_then(|c| c.getattr(intern!(py, "_drain")))
        .and_then(|drain| q.lp.call_method1(py, how, (drain,)));
    if scheduled.is_err() {
        let items = {
            let mut st = q.lock();
            st.dead = true;
            std::mem::take(&mut st.items)
        };
        drop(items);
    }
}

/// What a request's `done` found when it ran on a request worker ([`Inline::No`]): the
/// future to resolve, if [`submit`] had already made it, else the outcome, which [`submit`]
/// then delivers itself. Made per request that may complete inside its submitting call.
#[derive(Default)]
struct Handoff {
    /// The future and its queue, set by [`submit`] once the first poll returned pending.
    fut: Option<(Py<PyAny>, Arc<Queue>)>,
    /// The completion, when the request finished on a worker before `fut` was set.
    done: Option<(Outcome, Option<HeldBuffer>)>,
    /// [`submit`] could not make a future (no running loop): drop what comes.
    abandoned: bool,
}

/// The queue of the running loop and a new future of that loop: `owner._queue()` (the
/// `AsyncImage`, which keeps one `_Completions` per loop), then `loop.create_future()`.
fn new_future(py: Python<'_>, owner: &Bound<'_, PyAny>) -> PyResult<(Arc<Queue>, Py<PyAny>)> {
    let q = owner.call_method0(intern!(py, "_queue"))?;
    let q = q.cast::<Completions>()?.get().q.clone();
    let fut = q.lp.call_method0(py, intern!(py, "create_future"))?;
    Ok((q, fut))
}

/// The outcome of a finished future, a panic turned into an error.
fn outcome_of(res: std::thread::Result<Outcome>) -> Outcome {
    res.unwrap_or_else(|_| {
        Outcome::Failed(
            Error::new(ErrorKind::Io, "internal error: the request panicked"),
            None,
        )
    })
}

/// Run the future `req()` on the request runner (built right in the runner's task: the
/// closure is small, the future is not, and each move of it would be a `memcpy`) and return what the awaiting coroutine gets: the result
/// itself when the request completed inside this call (first polled right here when `inline`,
/// see [`INLINE_MAX`]; an error is raised at once), else a future of the running loop that
/// its completion resolves (through the loop's queue, see the module comment). `owner` is
/// the `AsyncImage`; its `_queue()` (which asks asyncio for the running loop) is called only
/// when a future is needed. `hold` (a borrowed buffer) is released only after the request has
/// completed: it goes with the request's `done`, which the runner keeps until the future has
/// finished (or been dropped after a panic), so the future itself may use the buffer through
/// a [`crate::buffers::BufPtr`] without owning it. Called on the loop's thread with the GIL held (the `_aio_*` methods); the first
/// poll runs without it.
pub fn submit<F>(
    py: Python<'_>,
    owner: &Bound<'_, PyAny>,
    hold: Option<HeldBuffer>,
    inline: bool,
    req: impl FnOnce() -> F + Send,
) -> PyResult<Py<PyAny>>
where
    F: Future<Output = Outcome> + Send + 'static,
{
    if !inline {
        let (queue, fut) = new_future(py, owner)?;
        let f = fut.clone_ref(py);
        runtime::runner().spawn_with(req, move |res, _| {
            let c = Completion {
                fut: f,
                outcome: outcome_of(res),
                hold,
            };
            queue.push(c, Inline::No);
        });
        return Ok(fut);
    }
    let handoff = Arc::new(Mutex::new(Handoff::default()));
    let h = handoff.clone();
    let done = move |res: std::thread::Result<Outcome>, inline| {
        let outcome = outcome_of(res);
        if inline == Inline::Yes {
            INLINE_DONE.with(|d| *d.borrow_mut() = Some((outcome, hold)));
            return;
        }
        let mut st = h.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((fut, queue)) = st.fut.take() {
            drop(st);
            queue.push(Completion { fut, outcome, hold }, Inline::No);
        } else if st.abandoned {
            drop(st);
            send(Msg::Drop(Box::new((outcome, hold))));
        } else {
            st.done = Some((outcome, hold));
        }
    };
    // The first poll may do the I/O itself (a page-cache hit): without the GIL, as every call
    // that does I/O. The outcome, if any, comes back through INLINE_DONE (this thread's).
    py.detach(|| runtime::runner().run_with(req, done));
    let Some((outcome, hold)) = INLINE_DONE.with(|d| d.borrow_mut().take()) else {
        // Still running: it completes on a worker, through the loop's queue.
        let (queue, fut) = match new_future(py, owner) {
            Ok(v) => v,
            Err(e) => {
                let mut st = handoff.lock().unwrap_or_else(|e| e.into_inner());
                st.abandoned = true;
                let late = st.done.take();
                drop(st);
                drop(late);
                return Err(e);
            }
        };
        let mut st = handoff.lock().unwrap_or_else(|e| e.into_inner());
        match st.done.take() {
            Some((outcome, hold)) => {
                // It finished meanwhile: resolve the future now (the await returns at once).
                drop(st);
                Completion {
                    fut: fut.clone_ref(py),
                    outcome,
                    hold,
                }
                .resolve(py);
            }
            None => st.fut = Some((fut.clone_ref(py), queue)),
        }
        return Ok(fut);
    };
    // Completed inside this call, on the loop's thread: hand the result straight back (no
    // future, no round trip through the loop), except every INLINE_YIELD-th time, when it
    // goes through the queue so that the task yields and a stream of page-cache hits cannot
    // keep the loop to itself.
    let turn = INLINE_STREAK.with(|s| {
        let n = s.get().wrapping_add(1);
        s.set(n);
        n.is_multiple_of(INLINE_YIELD)
    });
    if !turn {
        release(py, hold);
        return outcome.into_py(py);
    }
    let (queue, fut) = new_future(py, owner)?;
    ARM_HERE.with(|a| a.set(false));
    queue.push(
        Completion {
            fut: fut.clone_ref(py),
            outcome,
            hold,
        },
        Inline::Yes,
    );
    if ARM_HERE.with(|a| a.replace(false)) {
        arm_with(py, queue, intern!(py, "call_soon"));
    }
    Ok(fut)
}

/// Release a request's buffer (the GIL is held), once the request no longer uses it.
fn release(py: Python<'_>, hold: Option<HeldBuffer>) {
    if let Some(h) = hold {
        h.release(py);
    }
}

/// Reads and writes up to this size get their first poll inside the submitting call; larger
/// ones, and the other requests, go to the runner's workers at once (a first poll can be
/// long: a large read of unallocated clusters is a `memset` right there, with the GIL held).
pub const INLINE_MAX: usize = 256 << 10;

/// Of the requests that complete inside their submitting call, every this-many-th is
/// delivered through the loop (the awaiting task yields once) rather than at once.
const INLINE_YIELD: u32 = 32;

thread_local! {
    /// A request that completed inside its submitting call, handed from the runner's `done`
    /// back to [`submit`].
    static INLINE_DONE: RefCell<Option<(Outcome, Option<HeldBuffer>)>> =
        const { RefCell::new(None) };
    /// Requests that completed inside their submitting call on this thread (see
    /// [`INLINE_YIELD`]).
    static INLINE_STREAK: Cell<u32> = const { Cell::new(0) };
}

/// `qcow2rs.aio.open`: open an image on the runtime. Opening does blocking file system
/// calls (open(2), reading the headers of a backing chain), so it is a task of its own
/// rather than a first poll on the loop's thread.
pub fn submit_open(q: &Completions, fut: Py<PyAny>, args: crate::image::OpenArgs) {
    let queue = q.q.clone();
    let req = async move {
        let name = args.name();
        match args.open().await {
            Ok(img) => Outcome::Opened(img, name),
            Err(e) => Outcome::Failed(e, Some(name.into())),
        }
    };
    runtime::spawn(async move {
        let outcome = match AssertUnwindSafe(req).catch_unwind().await {
            Ok(o) => o,
            Err(_) => Outcome::Failed(
                Error::new(ErrorKind::Io, "internal error: opening panicked"),
                None,
            ),
        };
        queue.push(
            Completion {
                fut,
                outcome,
                hold: None,
            },
            Inline::No,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::{Deferred, HOLD_JOBS};

    #[test]
    fn a_deferred_drain_waits_while_the_workers_have_work() {
        let mut d = Deferred::new();
        d.current.push(1);
        // The job that armed it ends: never due right then.
        assert_eq!(d.after_job(false, || true), Vec::<i32>::new());
        // Plenty of jobs queued: held for up to HOLD_JOBS more jobs; what is armed meanwhile
        // joins it.
        for j in 1..HOLD_JOBS {
            assert_eq!(d.after_job(false, || false), Vec::<i32>::new(), "job {j}");
            d.current.push(10 + j as i32);
        }
        let want: Vec<i32> = std::iter::once(1)
            .chain((1..HOLD_JOBS).map(|j| 10 + j as i32))
            .collect();
        let due = d.after_job(false, || false);
        // All but the one armed during the last job, which waits for the next.
        assert_eq!(due, want[..want.len() - 1].to_vec());
        assert_eq!(d.after_job(false, || true), vec![*want.last().unwrap()]);
    }

    #[test]
    fn a_deferred_drain_is_due_when_the_workers_run_low_or_dry() {
        let mut d = Deferred::new();
        d.current.push(1);
        assert_eq!(d.after_job(false, || false), Vec::<i32>::new());
        assert_eq!(d.after_job(false, || true), vec![1]);
        // A worker with no job left asks for everything, even what its last job armed.
        d.current.push(2);
        assert_eq!(d.after_job(false, || false), Vec::<i32>::new());
        d.current.push(3);
        assert_eq!(d.after_job(true, || false), vec![2, 3]);
        assert_eq!(d.after_job(false, || true), Vec::<i32>::new());
    }
}
