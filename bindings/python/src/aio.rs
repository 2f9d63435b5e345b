//! Requests of the asyncio API and the delivery of their completions.
//!
//! A request runs on the request runner (`qcow2_core::runner`): its future is polled first
//! inside the submitting call, on the loop's thread (with the GIL held: a first poll never
//! waits for I/O; page-cache reads complete there), then, if not finished, by the runner's
//! worker tasks on the runtime as its I/O completes. It runs to its end even when the Python
//! task awaiting it is cancelled (its result is then dropped), so buffers it borrowed stay
//! held until the engine is done with them.
//!
//! Completions go to the `_Completions` queue of the event loop that submitted them (one per
//! `AsyncImage` and loop). The queue is drained on the loop's own thread by `_drain`, which
//! releases the buffers, skips futures that are already done (cancelled) and resolves the
//! others. A request that completed inside its submitting call (on the loop's thread) has its
//! future resolved right there, before the coroutine awaits it (no round trip through the
//! loop); one in [`INLINE_YIELD`] goes through the queue instead, so that the awaiting task
//! yields now and then. A queue is *armed* while a drain is scheduled: such a request arms it
//! with `loop.call_soon` (no other thread is involved). A request that
//! completed on a runtime worker and finds the queue unarmed asks the delivery thread
//! (`qcow2rs-py-aio`) to schedule a drain with `loop.call_soon_threadsafe`. A drain that found
//! work schedules the next one with `loop.call_soon`, so while the loop is busy, completions
//! are picked up by the loop itself and no other thread has to wait for the GIL; a drain that
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
use std::sync::atomic::{AtomicU32, Ordering};
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
    /// An opened image (for `qcow2rs.aio.open`).
    Opened(core::Image, String),
    /// An error, naming a file.
    Failed(Error, Option<String>),
}

impl Outcome {
    pub fn unit(r: core::Result<()>, name: String) -> Outcome {
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
            Outcome::Opened(img, name) => Ok(Py::new(py, Image::new(img, name))?.into_any()),
            Outcome::Failed(e, name) => Err(to_pyerr(&e, name.as_deref())),
        }
    }
}

/// A finished request: the future to resolve, the outcome, and the buffer it borrowed.
struct Completion {
    fut: Py<PyAny>,
    outcome: Outcome,
    hold: Option<Arc<HeldBuffer>>,
}

impl Completion {
    /// Release the buffer, then resolve the future unless it is already done (cancelled).
    fn resolve(self, py: Python<'_>) {
        if let Some(h) = self.hold {
            if let Ok(h) = Arc::try_unwrap(h) {
                h.release(py);
            }
        }
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
    /// Requests of this queue that completed inside their submitting call (see [`submit`]).
    inline_streak: AtomicU32,
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
                    send(Msg::Drop(c));
                }
                return;
            }
            st.items.push(c);
            !std::mem::replace(&mut st.armed, true)
        };
        if arm {
            if inline == Inline::Yes {
                ARM_HERE.with(|a| a.set(true));
            } else {
                send(Msg::Arm(self.clone()));
            }
        }
    }
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
                inline_streak: AtomicU32::new(0),
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
    /// Drop a completion nobody waits for (its loop is closed), with the GIL.
    Drop(Completion),
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

fn delivery_thread(rx: Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut pending = Some(first);
        let attached = Python::try_attach(|py| {
            let mut msgs = vec![pending.take().expect("first message")];
            while let Ok(m) = rx.try_recv() {
                msgs.push(m);
            }
            for m in msgs {
                match m {
                    Msg::Arm(q) => arm(py, q),
                    Msg::Drop(c) => drop(c),
                }
            }
        });
        if attached.is_none() {
            // The interpreter is shutting down: nothing can be delivered or released.
            std::mem::forget(pending);
            std::mem::forget(rx);
            return;
        }
    }
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

/// Run `req` on the request runner (first polled right here with `inline`, see
/// [`INLINE_MAX`]) and deliver its outcome to `fut` through the queue `q`.
/// `hold` (a borrowed buffer) is released only after the request has completed. Called on the
/// loop's thread with the GIL held (the `_aio_*` methods); the first poll runs without it.
pub fn submit(
    py: Python<'_>,
    q: &Completions,
    fut: Py<PyAny>,
    hold: Option<Arc<HeldBuffer>>,
    inline: bool,
    req: impl Future<Output = Outcome> + Send + 'static,
) {
    let queue = q.q.clone();
    let done = move |res: std::thread::Result<Outcome>, inline| {
        let outcome = res.unwrap_or_else(|_| {
            Outcome::Failed(
                Error::new(ErrorKind::Io, "internal error: the request panicked"),
                None,
            )
        });
        let c = Completion { fut, outcome, hold };
        if inline == Inline::Yes {
            INLINE_DONE.with(|d| *d.borrow_mut() = Some(c));
        } else {
            queue.push(c, Inline::No);
        }
    };
    if !inline {
        runtime::runner().spawn(req, done);
        return;
    }
    // The first poll may do the I/O itself (a page-cache hit): without the GIL, as every call
    // that does I/O. The outcome, if any, comes back through INLINE_DONE (this thread's).
    py.detach(|| runtime::runner().run(req, done));
    let Some(c) = INLINE_DONE.with(|d| d.borrow_mut().take()) else {
        return;
    };
    // Completed inside this call, on the loop's thread: resolve the future right away (the
    // awaiting coroutine then gets its result without a round trip through the loop), except
    // every INLINE_YIELD-th time, when it goes through the queue so that the task yields and
    // a stream of page-cache hits cannot keep the loop to itself.
    if q.q.inline_streak.fetch_add(1, Ordering::Relaxed) % INLINE_YIELD != INLINE_YIELD - 1 {
        c.resolve(py);
        return;
    }
    ARM_HERE.with(|a| a.set(false));
    q.q.push(c, Inline::Yes);
    if ARM_HERE.with(|a| a.replace(false)) {
        arm_with(py, q.q.clone(), intern!(py, "call_soon"));
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
    static INLINE_DONE: RefCell<Option<Completion>> = const { RefCell::new(None) };
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
            Err(e) => Outcome::Failed(e, Some(name)),
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
