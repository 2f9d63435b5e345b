//! Requests of the asyncio API and the delivery of their completions.
//!
//! A request is a task on the runtime; it runs to its end even when the Python task awaiting
//! it is cancelled (its result is then dropped), so buffers it borrowed stay held until the
//! engine is done with them. Completed requests go to one delivery thread
//! (`qcow2rs-py-aio`), which takes the GIL once per batch, builds the results, releases the
//! buffers and hands each event loop its share with one `loop.call_soon_threadsafe` call
//! (the callback, `qcow2rs.aio._deliver`, skips futures that were cancelled).

use crate::buffers::HeldBuffer;
use crate::errors::to_pyerr;
use crate::image::{map_to_py, Image};
use crate::json;
use crate::runtime;
use futures::FutureExt;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyList, PyTuple};
use pyo3::IntoPyObjectExt;
use qcow2_core::{self as core, Error, ErrorKind};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, OnceLock};

/// What a request produced, turned into a Python object on the delivery thread.
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

struct Completion {
    lp: Py<PyAny>,
    fut: Py<PyAny>,
    outcome: Outcome,
    hold: Option<Arc<HeldBuffer>>,
}

/// `qcow2rs.aio._deliver`, registered when `qcow2rs.aio` is imported.
static DELIVER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static QUEUE: OnceLock<Sender<Completion>> = OnceLock::new();

/// Register the Python callback that resolves futures (`_deliver(items)`, items being
/// `(future, ok, value)` tuples).
#[pyfunction]
pub fn _set_deliver(py: Python<'_>, f: Py<PyAny>) {
    let _ = DELIVER.set(py, f);
}

fn queue() -> &'static Sender<Completion> {
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("qcow2rs-py-aio".into())
            .spawn(move || deliver_loop(rx))
            // Like the runtime: without threads nothing can work.
            .expect("qcow2rs: cannot start the completion thread");
        tx
    })
}

/// Run `req` on the runtime and deliver its outcome to `fut` on `lp`. `hold` (a borrowed
/// buffer) is released only after the request has completed.
pub fn submit(
    lp: Py<PyAny>,
    fut: Py<PyAny>,
    hold: Option<Arc<HeldBuffer>>,
    req: impl Future<Output = Outcome> + Send + 'static,
) {
    let tx = queue().clone();
    runtime::spawn(async move {
        let outcome = match AssertUnwindSafe(req).catch_unwind().await {
            Ok(o) => o,
            Err(_) => Outcome::Failed(
                Error::new(ErrorKind::Io, "internal error: the request panicked"),
                None,
            ),
        };
        let _ = tx.send(Completion {
            lp,
            fut,
            outcome,
            hold,
        });
    });
}

fn deliver_loop(rx: Receiver<Completion>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        // At interpreter shutdown nothing can be delivered any more: leak the batch (its
        // objects cannot be released without the interpreter).
        let mut batch = Some(batch);
        if Python::try_attach(|py| deliver(py, batch.take().unwrap_or_default())).is_none() {
            std::mem::forget(batch);
        }
    }
}

fn deliver(py: Python<'_>, batch: Vec<Completion>) {
    let Some(cb) = DELIVER.get(py) else {
        return;
    };
    // One list of (future, ok, value) per event loop, in completion order.
    let mut groups: Vec<(Py<PyAny>, Bound<'_, PyList>)> = Vec::new();
    for c in batch {
        let (ok, value) = match c.outcome.into_py(py) {
            Ok(v) => (true, v),
            Err(e) => (false, e.into_value(py).into_any()),
        };
        if let Some(h) = c.hold {
            if let Ok(h) = Arc::try_unwrap(h) {
                h.release(py);
            }
        }
        let Ok(item) = PyTuple::new(py, [c.fut, ok.into_py_any(py).unwrap_or(py.None()), value])
        else {
            continue;
        };
        let list = match groups.iter().position(|(l, _)| l.is(&c.lp)) {
            Some(i) => &groups[i].1,
            None => {
                groups.push((c.lp, PyList::empty(py)));
                &groups[groups.len() - 1].1
            }
        };
        let _ = list.append(item);
    }
    for (lp, items) in groups {
        // Fails only when the loop is closed: nobody is waiting any more.
        let _ = lp.call_method1(py, "call_soon_threadsafe", (cb, items));
    }
}

/// `qcow2rs.aio.open`: open an image on the runtime.
pub fn submit_open(lp: Py<PyAny>, fut: Py<PyAny>, args: crate::image::OpenArgs) {
    submit(lp, fut, None, async move {
        let name = args.name();
        match args.open().await {
            Ok(img) => Outcome::Opened(img, name),
            Err(e) => Outcome::Failed(e, Some(name)),
        }
    });
}
