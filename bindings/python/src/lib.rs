//! `qcow2rs._qcow2rs`: the extension module of the Python package `qcow2rs`.
//!
//! A thin layer over qcow2-core: argument checking, buffer handling, GIL release and error
//! translation. The Python modules of the package (`qcow2rs`, `qcow2rs.aio`, the file-like
//! view and the console script) are in `python/qcow2rs/`.

mod aio;
mod buffers;
mod errors;
mod gil;
mod image;
mod jobs;
mod json;
mod runtime;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_qcow2rs")]
fn qcow2rs_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<image::Image>()?;
    m.add("Error", py.get_type::<errors::Error>())?;
    m.add(
        "CorruptImageError",
        py.get_type::<errors::CorruptImageError>(),
    )?;
    m.add(
        "UnsupportedFeatureError",
        py.get_type::<errors::UnsupportedFeatureError>(),
    )?;
    m.add_function(wrap_pyfunction!(jobs::open, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::create, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::info, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::check, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::convert, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::dd, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::compare, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::rebase, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::commit, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::amend, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::measure, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::_aio_open, m)?)?;
    m.add_class::<aio::Completions>()?;
    // Not a name of the module: only `atexit` holds it.
    let stop = wrap_pyfunction!(aio::_stop_delivery, m)?;
    py.import("atexit")?.call_method1("register", (stop,))?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
