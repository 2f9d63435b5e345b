//! Module functions: open, create, info, check, convert, compare, rebase, commit, amend,
//! measure, and the CLI entry point.

use crate::errors::to_pyerr;
use crate::image::{Image, OpenArgs};
use crate::json;
use crate::runtime;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt, PyMapping, PyString};
use qcow2_core::check::{CheckOptions, Repair};
use qcow2_core::convert::{CompareResult, ConvertOptions, Target};
use qcow2_core::create::CreateOptions;
use qcow2_core::{self as core, Disk, Error, ErrorKind, Format, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn name_of(p: &Path) -> String {
    p.display().to_string()
}

/// A core error naming `path`.
fn err(e: &Error, path: &Path) -> PyErr {
    to_pyerr(e, Some(&name_of(path)))
}

/// Open a qcow2 image. `mode` is "r" (read-only) or "r+" (read-write).
#[pyfunction]
#[pyo3(signature = (path, mode = "r", *, direct = false, backing = true, untrusted = false, cache_size = None, cache = None))]
#[allow(clippy::too_many_arguments)]
pub fn open(
    py: Python<'_>,
    path: PathBuf,
    mode: &str,
    direct: bool,
    backing: bool,
    untrusted: bool,
    cache_size: Option<i64>,
    cache: Option<&str>,
) -> PyResult<Image> {
    let args = OpenArgs::parse(path, mode, direct, backing, untrusted, cache_size, cache)?;
    let img = py
        .detach(|| runtime::block_on(args.open()))
        .map_err(|e| err(&e, &args.path))?;
    Ok(Image::new(img, args.name()))
}

/// Submit an asynchronous open (`qcow2rs.aio.open`).
#[pyfunction]
#[pyo3(signature = (q, fut, path, mode, direct, backing, untrusted, cache_size, cache))]
#[allow(clippy::too_many_arguments)]
pub fn _aio_open(
    q: PyRef<'_, crate::aio::Completions>,
    fut: Py<PyAny>,
    path: PathBuf,
    mode: &str,
    direct: bool,
    backing: bool,
    untrusted: bool,
    cache_size: Option<i64>,
    cache: Option<&str>,
) -> PyResult<()> {
    let args = OpenArgs::parse(path, mode, direct, backing, untrusted, cache_size, cache)?;
    crate::aio::submit_open(&q, fut, args);
    Ok(())
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Invalid creation options are `ValueError`s.
fn create_err(e: Error, path: &Path) -> PyErr {
    if e.kind() == ErrorKind::InvalidArgument {
        PyValueError::new_err(e.message().to_string())
    } else {
        err(&e, path)
    }
}

/// Create a qcow2 image (replacing an existing file), with qemu-img's options.
#[pyfunction]
#[pyo3(signature = (path, size, *, cluster_size = 65536, compat = "1.1", refcount_bits = 16,
    lazy_refcounts = false, extended_l2 = false, compression_type = "zlib", backing_file = None,
    backing_format = None, data_file = None, data_file_raw = false, preallocation = "off"))]
#[allow(clippy::too_many_arguments)]
pub fn create(
    py: Python<'_>,
    path: PathBuf,
    size: Option<i64>,
    cluster_size: i64,
    compat: &str,
    refcount_bits: i64,
    lazy_refcounts: bool,
    extended_l2: bool,
    compression_type: &str,
    backing_file: Option<String>,
    backing_format: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
    preallocation: &str,
) -> PyResult<()> {
    let mut co = CreateOptions::default();
    let bad = |e: Error| create_err(e, &path);
    if let Some(s) = size {
        co.size =
            Some(u64::try_from(s).map_err(|_| PyValueError::new_err("size must not be negative"))?);
    }
    co.cluster_size = u64::try_from(cluster_size)
        .map_err(|_| PyValueError::new_err("cluster_size must not be negative"))?;
    co.set("compat", compat).map_err(bad)?;
    co.set("refcount_bits", &refcount_bits.to_string())
        .map_err(bad)?;
    co.set("lazy_refcounts", onoff(lazy_refcounts))
        .map_err(bad)?;
    co.set("extended_l2", onoff(extended_l2)).map_err(bad)?;
    co.set("compression_type", compression_type).map_err(bad)?;
    co.set("preallocation", preallocation).map_err(bad)?;
    co.set("data_file_raw", onoff(data_file_raw)).map_err(bad)?;
    co.data_file = data_file;
    co.backing_file = backing_file;
    co.backing_format = backing_format;
    py.detach(|| runtime::block_on(core::create::create_qcow2(&path, &co)))
        .map_err(bad)?;
    Ok(())
}

fn open_disk(path: &Path, format: Option<&str>, opts: &OpenOptions) -> core::Result<Disk> {
    runtime::block_on(core::convert::open_disk(path, format, opts))
}

/// What `qcow2rs info --output=json` prints for the image at `path` (qcow2 or raw).
#[pyfunction]
#[pyo3(signature = (path, *, format = None))]
pub fn info(py: Python<'_>, path: PathBuf, format: Option<&str>) -> PyResult<Py<PyAny>> {
    let v = py
        .detach(|| {
            let d = open_disk(&path, format, &OpenOptions::default())?;
            core::info::info_json(&d)
        })
        .map_err(|e| err(&e, &path))?;
    json::to_py(py, &v)
}

/// Check the qcow2 image at `path` (and repair "leaks" or "all"); returns what
/// `qcow2rs check --output=json` prints, as a dict.
#[pyfunction]
#[pyo3(signature = (path, repair = None))]
pub fn check(py: Python<'_>, path: PathBuf, repair: Option<&str>) -> PyResult<Py<PyAny>> {
    let repair = match repair {
        None => None,
        Some("leaks") => Some(Repair::Leaks),
        Some("all") => Some(Repair::All),
        Some(o) => {
            return Err(PyValueError::new_err(format!(
                "invalid repair mode '{o}' (expected None, 'leaks' or 'all')"
            )))
        }
    };
    let report = py
        .detach(|| {
            let mut opts = OpenOptions::default();
            opts.writable = repair.is_some();
            opts.for_repair = repair.is_some();
            let disk = open_disk(&path, None, &opts)?;
            let Disk::Qcow2(img) = &disk else {
                return Err(Error::unsupported(
                    "this image format (raw) does not support checks",
                ));
            };
            runtime::block_on(async {
                let r = core::check::check(img, &CheckOptions { repair }).await?;
                img.clone().close().await?;
                Ok(r)
            })
        })
        .map_err(|e| err(&e, &path))?;
    json::to_py(py, &report.to_json())
}

/// Calls the Python progress callback with the fraction done, at most once per 0.1 %.
struct Progress {
    cb: Py<PyAny>,
    last: Mutex<f64>,
    error: Mutex<Option<PyErr>>,
}

impl Progress {
    fn report(&self, f: f64) {
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if f < 1.0 && f - *last < 0.001 {
                return;
            }
            *last = f;
        }
        Python::attach(|py| {
            if let Err(e) = self.cb.call1(py, (f,)) {
                let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(e);
                }
            }
        });
    }
}

/// Copy the image `src` into a new image `dst` (qcow2 or raw). `progress(fraction)` is
/// called as the copy advances; an exception it raises is re-raised when the copy is done.
/// `sparse_size` (qemu-img `-S`, default 4096): the shortest run of zeros left unallocated in
/// the target, a multiple of 512 up to 16 MiB; 0 writes every byte. `existing=True` (`-n`):
/// write into `dst`, which exists (format `out_format`) and is at least as large as `src`;
/// `target_is_zero=True` (`--target-is-zero`, needs `existing`): `dst` reads as zeros, so
/// zeros are not written.
#[pyfunction]
#[pyo3(signature = (src, dst, *, out_format = "qcow2", compress = false, compression_type = None,
    cluster_size = None, backing_file = None, backing_format = None, src_format = None,
    progress = None, sparse_size = None, existing = false, target_is_zero = false))]
#[allow(clippy::too_many_arguments)]
pub fn convert(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    out_format: &str,
    compress: bool,
    compression_type: Option<&str>,
    cluster_size: Option<i64>,
    backing_file: Option<String>,
    backing_format: Option<String>,
    src_format: Option<&str>,
    progress: Option<Py<PyAny>>,
    sparse_size: Option<i64>,
    existing: bool,
    target_is_zero: bool,
) -> PyResult<()> {
    if target_is_zero && !existing {
        return Err(PyValueError::new_err(
            "--target-is-zero requires use of -n flag (target_is_zero needs existing=True)",
        ));
    }
    let sparse_size = match sparse_size {
        None => qcow2_core::convert::ZERO_GRANULE as u64,
        Some(n) => match u64::try_from(n) {
            Ok(n) if n.is_multiple_of(512) && n <= 16 << 20 => n,
            _ => {
                return Err(PyValueError::new_err(
                    "Invalid buffer size for sparse output specified. Valid sizes are \
                     multiples of 512 up to 16777216. Select 0 to disable sparse detection \
                     (fully allocates output).",
                ))
            }
        },
    };
    let format = Format::parse(out_format).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let mut co = CreateOptions::default();
    let bad = |e: Error| create_err(e, &dst);
    if let Some(c) = compression_type {
        co.set("compression_type", c).map_err(bad)?;
    }
    if let Some(c) = cluster_size {
        co.cluster_size = u64::try_from(c)
            .map_err(|_| PyValueError::new_err("cluster_size must not be negative"))?;
    }
    if format == Format::Raw
        && (compression_type.is_some() || cluster_size.is_some() || backing_file.is_some())
    {
        return Err(PyValueError::new_err(
            "compression_type, cluster_size and backing_file need out_format='qcow2'",
        ));
    }
    co.backing_file = backing_file;
    co.backing_format = backing_format;
    let target = Target {
        format,
        create: co,
        compress,
    };
    let prog = progress.map(|cb| {
        Arc::new(Progress {
            cb,
            last: Mutex::new(-1.0),
            error: Mutex::new(None),
        })
    });
    let mut opts = ConvertOptions {
        parallel: ConvertOptions::requests_in_flight(8, compress),
        sparse_size,
        existing,
        target_is_zero,
        ..Default::default()
    };
    if let Some(p) = &prog {
        let p = p.clone();
        opts.progress = Some(Arc::new(move |f| p.report(f)));
    }
    let res = py.detach(|| {
        let disk =
            open_disk(&src, src_format, &OpenOptions::default()).map_err(|e| (e, src.clone()))?;
        runtime::block_on(core::convert::convert(&disk, &dst, &target, &opts))
            .map_err(|e| (e, dst.clone()))
    });
    drop(opts);
    res.map_err(|(e, p)| create_err(e, &p))?;
    if let Some(p) = prog {
        if let Some(e) = p.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
    }
    Ok(())
}

/// Copy part of the image `src` into a new image `dst`, as `qemu-img dd`: from byte
/// `skip * bs` of `src` up to byte `count * bs` (default its end), in blocks of `bs` bytes
/// (1 to 2^31 - 1, default 512). `out_format` is "raw" (default, as qemu-img) or "qcow2";
/// the output is fully allocated and its size rounded up to 512 bytes. A `skip` past the end
/// creates an empty output, as qemu-img does. `src_format` skips probing.
#[pyfunction]
#[pyo3(signature = (src, dst, *, bs = 512, count = None, skip = 0, out_format = "raw", src_format = None))]
#[allow(clippy::too_many_arguments)]
pub fn dd(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    bs: i64,
    count: Option<i64>,
    skip: i64,
    out_format: &str,
    src_format: Option<&str>,
) -> PyResult<()> {
    let bs = match u64::try_from(bs) {
        Ok(n) if (1..=i32::MAX as u64).contains(&n) => n,
        _ => {
            return Err(PyValueError::new_err(
                "Invalid bs specified. Must be between 1 and 2147483647.",
            ))
        }
    };
    let blocks = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| {
            PyValueError::new_err(format!(
                "Invalid {what} specified. Must be between 0 and 9223372036854775807."
            ))
        })
    };
    let opts = core::dd::DdOptions {
        bs,
        count: count.map(|c| blocks(c, "count")).transpose()?,
        skip: blocks(skip, "skip")?,
        format: Format::parse(out_format).map_err(|e| PyValueError::new_err(e.to_string()))?,
        ..Default::default()
    };
    py.detach(|| {
        let disk =
            open_disk(&src, src_format, &OpenOptions::default()).map_err(|e| (e, src.clone()))?;
        runtime::block_on(core::dd::dd(&disk, &dst, &opts)).map_err(|e| (e, dst.clone()))
    })
    .map_err(|(e, p)| create_err(e, &p))?;
    Ok(())
}

/// Change the backing file of the qcow2 image at `path` (as `qemu-img rebase`): `backing` is
/// the new name as stored ("" for none; relative to the image's directory), `backing_format`
/// its format (required unless `backing` is ""). Safe mode copies into the image what differs
/// between the old and the new chain, so the guest content stays the same; `unsafe=True`
/// only changes the header.
#[pyfunction]
#[pyo3(signature = (path, backing, *, backing_format = None, r#unsafe = false, progress = None))]
pub fn rebase(
    py: Python<'_>,
    path: PathBuf,
    backing: String,
    backing_format: Option<&str>,
    r#unsafe: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let unsafe_mode = r#unsafe;
    let backing_format = backing_format
        .map(Format::parse)
        .transpose()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let prog = progress_of(progress);
    let mut ro = core::rebase::RebaseOptions {
        backing,
        backing_format,
        unsafe_mode,
        ..Default::default()
    };
    if let Some(p) = &prog {
        let p = p.clone();
        ro.progress = Some(Arc::new(move |f| p.report(f)));
    }
    let res = py.detach(|| runtime::block_on(core::rebase::rebase(&path, &ro)));
    drop(ro);
    res.map_err(|e| err(&e, &path))?;
    progress_error(prog)
}

/// Write the qcow2 image at `path` into its backing file (as `qemu-img commit`), or into
/// `base` further down the chain (named as the layer above stores it, or a path to the same
/// file). Without `drop` and `base`, the image is emptied afterwards.
#[pyfunction]
#[pyo3(signature = (path, *, base = None, drop = false, progress = None))]
pub fn commit(
    py: Python<'_>,
    path: PathBuf,
    base: Option<String>,
    drop: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let prog = progress_of(progress);
    let mut co = core::commit::CommitOptions {
        base,
        drop,
        ..Default::default()
    };
    if let Some(p) = &prog {
        let p = p.clone();
        co.progress = Some(Arc::new(move |f| p.report(f)));
    }
    let res = py.detach(|| runtime::block_on(core::commit::commit(&path, &co)));
    std::mem::drop(co);
    res.map_err(|e| err(&e, &path))?;
    progress_error(prog)
}

fn progress_of(cb: Option<Py<PyAny>>) -> Option<Arc<Progress>> {
    cb.map(|cb| {
        Arc::new(Progress {
            cb,
            last: Mutex::new(-1.0),
            error: Mutex::new(None),
        })
    })
}

/// The exception the progress callback raised, if any.
fn progress_error(prog: Option<Arc<Progress>>) -> PyResult<()> {
    if let Some(p) = prog {
        if let Some(e) = p.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
    }
    Ok(())
}

/// Whether the images `a` and `b` have the same guest content (as `qemu-img compare`;
/// `strict`: their sizes must be equal too).
#[pyfunction]
#[pyo3(signature = (a, b, *, strict = false, a_format = None, b_format = None))]
pub fn compare(
    py: Python<'_>,
    a: PathBuf,
    b: PathBuf,
    strict: bool,
    a_format: Option<&str>,
    b_format: Option<&str>,
) -> PyResult<bool> {
    let r = py.detach(|| {
        let da = open_disk(&a, a_format, &OpenOptions::default()).map_err(|e| (e, a.clone()))?;
        let db = open_disk(&b, b_format, &OpenOptions::default()).map_err(|e| (e, b.clone()))?;
        runtime::block_on(core::convert::compare(&da, &db, strict)).map_err(|e| (e, a.clone()))
    });
    match r {
        Ok(CompareResult::Identical) => Ok(true),
        Ok(_) => Ok(false),
        Err((e, p)) => Err(err(&e, &p)),
    }
}

/// Run the `qcow2rs` command line (argv with the program name first); returns the exit
/// status. The console script `qcow2rs` of the wheel calls this.
#[pyfunction]
pub fn cli_main(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.detach(|| qcow2_cli::run(&argv))
}

/// qemu-img's `-o` options as `(key, value)` strings: the `options` mapping first, then the
/// keyword arguments (a later value for the same key wins, as with repeated `-o`). Values:
/// `str` as is, `bool` as "on"/"off", `int` in decimal.
fn option_pairs(
    options: Option<&Bound<'_, PyMapping>>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<(String, String)>> {
    let mut items = Vec::new();
    if let Some(m) = options {
        for kv in m.items()?.iter() {
            items.push(kv.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>()?);
        }
    }
    if let Some(d) = kwargs {
        items.extend(d.iter());
    }
    let mut out = Vec::new();
    for (k, v) in items {
        let key: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("option names must be strings"))?;
        let value = if let Ok(b) = v.cast::<PyBool>() {
            onoff(b.is_true()).to_string()
        } else if let Ok(i) = v.cast::<PyInt>() {
            i.to_string()
        } else if let Ok(s) = v.cast::<PyString>() {
            s.to_str()?.to_string()
        } else {
            return Err(PyTypeError::new_err(format!(
                "option '{key}' must be a str, int or bool, not {}",
                v.get_type().name()?
            )));
        };
        out.push((key, value));
    }
    Ok(out)
}

/// Change options of the existing qcow2 image at `path`, as `qemu-img amend -o key=value,...`:
/// `compat` ("0.10" or "1.1"), `lazy_refcounts`, `refcount_bits`, `size`, `data_file`,
/// `data_file_raw` (off only); `backing_file`/`backing_fmt` only with their current values.
/// Options come as a mapping, as keyword arguments, or both.
#[pyfunction]
#[pyo3(signature = (path, options = None, /, **kwargs))]
pub fn amend(
    py: Python<'_>,
    path: PathBuf,
    options: Option<&Bound<'_, PyMapping>>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<()> {
    use core::jobs::amend::AmendOptions;
    let pairs = option_pairs(options, kwargs)?;
    if pairs.is_empty() {
        return Err(PyValueError::new_err("Must specify options"));
    }
    let mut ao = AmendOptions::default();
    for (k, v) in &pairs {
        ao.set(k, v).map_err(|e| create_err(e, &path))?;
    }
    py.detach(|| {
        let mut opts = OpenOptions::default();
        opts.writable = true;
        opts.no_backing = true;
        let Disk::Qcow2(img) = open_disk(&path, None, &opts)? else {
            return Err(Error::unsupported(
                "Format driver 'raw' does not support option amendment",
            ));
        };
        runtime::block_on(core::jobs::amend::amend(img, &ao))
    })
    .map_err(|e| create_err(e, &path))
}

/// How many bytes a new image of `out_format` ("qcow2" or "raw") needs, as `qemu-img
/// measure --output=json`: to hold a copy of the image at `path` (of format `format`,
/// probed if `None`), or, without a path, an empty image of `size` bytes. The target's
/// creation options (`cluster_size`, `compat`, `refcount_bits`, `extended_l2`,
/// `preallocation`, ...) come as a mapping, keyword arguments, or both. Returns qemu-img's
/// keys: `required`, `fully-allocated`, and `bitmaps` for a qcow2 source with a qcow2 target.
#[pyfunction]
#[pyo3(signature = (path = None, options = None, /, *, size = None, out_format = "qcow2",
    format = None, **kwargs))]
pub fn measure(
    py: Python<'_>,
    path: Option<PathBuf>,
    options: Option<&Bound<'_, PyMapping>>,
    size: Option<i64>,
    out_format: &str,
    format: Option<&str>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    use core::jobs::measure::MeasureOptions;
    let fmt = Format::parse(out_format).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let size = size
        .map(|s| u64::try_from(s).map_err(|_| PyValueError::new_err("size must not be negative")))
        .transpose()?;
    match (&path, size) {
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "size cannot be used together with a path",
            ))
        }
        (None, None) => return Err(PyValueError::new_err("either size or a path must be given")),
        (None, Some(_)) if format.is_some() => {
            return Err(PyValueError::new_err("format requires a path"))
        }
        _ => {}
    }
    let named = |e: Error| match &path {
        Some(p) => create_err(e, p),
        None if e.kind() == ErrorKind::InvalidArgument => {
            PyValueError::new_err(e.message().to_string())
        }
        None => to_pyerr(&e, None),
    };
    let mut mo = MeasureOptions::new(fmt);
    for (k, v) in option_pairs(options, kwargs)? {
        mo.set(&k, &v).map_err(named)?;
    }
    if size.is_some() {
        mo.size = size;
    }
    let m = py
        .detach(|| {
            let disk = match &path {
                Some(p) => Some(open_disk(p, format, &OpenOptions::default())?),
                None => None,
            };
            runtime::block_on(core::jobs::measure::measure(disk.as_ref(), &mo))
        })
        .map_err(named)?;
    json::to_py(py, &m.to_json())
}
