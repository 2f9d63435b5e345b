//! `qcow2rs.Image`: an open qcow2 image, usable from many Python threads at once.
//!
//! Every call that does I/O or waits runs with the GIL released, blocking the calling thread
//! on the core's future (the runtime's workers drive the I/O). The asyncio API
//! (`qcow2rs.aio.AsyncImage`) uses the `_aio_*` methods, which submit a request and return at
//! once (see `aio.rs`).

use crate::aio::{self, Outcome};
use crate::buffers::{self, HeldBuffer};
use crate::errors::{closed, to_pyerr};
use crate::gil;
use crate::json;
use crate::runtime;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt};
use qcow2_core::{self as core, Disk, ZeroMode};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

/// The open image shared by the Python object and its in-flight requests.
pub struct Shared {
    pub img: core::Image,
    /// Requests hold a read permit while they run; close takes the write permit, so it
    /// flushes and closes only after every request already submitted has finished.
    gate: Arc<RwLock<()>>,
}

/// A request's permit: the image stays open while it is held.
pub type Permit = OwnedRwLockReadGuard<()>;

/// How an image is opened (the keyword arguments of `qcow2rs.open`).
pub struct OpenArgs {
    pub path: PathBuf,
    pub opts: core::OpenOptions,
}

impl OpenArgs {
    pub fn parse(
        path: PathBuf,
        mode: &str,
        direct: bool,
        backing: bool,
        untrusted: bool,
        cache_size: Option<i64>,
        cache: Option<&str>,
    ) -> PyResult<OpenArgs> {
        let writable = match mode {
            "r" | "rb" => false,
            "r+" | "r+b" | "rb+" => true,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "invalid mode '{mode}' (expected 'r' or 'r+')"
                )))
            }
        };
        let mut opts = core::OpenOptions::default();
        opts.writable = writable;
        opts.direct = direct;
        opts.no_backing = !backing;
        opts.no_external_files = untrusted;
        if let Some(name) = cache {
            let m = core::CacheMode::parse(name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "invalid cache mode '{name}' (expected 'writeback', 'writethrough', 'none', \
                     'directsync' or 'unsafe')"
                ))
            })?;
            if direct && !m.direct {
                return Err(PyValueError::new_err(format!(
                    "direct=True conflicts with cache='{name}' (use 'none' or 'directsync')"
                )));
            }
            m.apply(&mut opts);
        }
        if let Some(c) = cache_size {
            if c < 0 {
                return Err(PyValueError::new_err("cache_size must not be negative"));
            }
            opts.cache_size = c as usize;
        }
        Ok(OpenArgs { path, opts })
    }

    pub fn name(&self) -> String {
        self.path.display().to_string()
    }

    pub async fn open(&self) -> core::Result<core::Image> {
        core::Image::open(&self.path, &self.opts).await
    }
}

/// An open qcow2 image.
#[pyclass(frozen, module = "qcow2rs", name = "Image")]
pub struct Image {
    slot: parking_lot::RwLock<Option<Arc<Shared>>>,
    /// The file name (shared with the requests in flight, for their errors).
    name: Arc<str>,
    read_only: bool,
    /// QEMU's name of the cache mode it was opened in.
    cache: &'static str,
    size: std::sync::atomic::AtomicU64,
    cluster_size: u64,
    backing_file: Option<String>,
}

/// Validate a non-negative integer argument.
fn non_negative(v: i64, what: &str) -> PyResult<u64> {
    u64::try_from(v).map_err(|_| PyValueError::new_err(format!("{what} must not be negative")))
}

impl Image {
    /// Wrap an image opened by the core.
    pub fn new(img: core::Image, name: String) -> Image {
        let h = img.header();
        Image {
            name: name.into(),
            read_only: !img.is_writable(),
            // Only named modes can be asked for from Python.
            cache: core::CacheMode::of(img.options())
                .name()
                .unwrap_or("writeback"),
            size: std::sync::atomic::AtomicU64::new(img.size()),
            cluster_size: img.layout().cluster_size,
            backing_file: h.backing_file.clone(),
            slot: parking_lot::RwLock::new(Some(Arc::new(Shared {
                img,
                gate: Arc::new(RwLock::new(())),
            }))),
        }
    }

    /// The open image and a permit keeping it open (`ValueError` once closed or closing).
    pub fn acquire(&self) -> PyResult<(Arc<Shared>, Permit)> {
        let sh = self.slot.read().clone().ok_or_else(closed)?;
        let permit = sh.gate.clone().try_read_owned().map_err(|_| closed())?;
        Ok((sh, permit))
    }

    /// Run `f` on the open image with the GIL released, holding the slot's read lock for
    /// the whole call (`ValueError` once closed or closing): the cheap way for a blocking
    /// call to keep the image open, since closing takes the write lock first ([`take`]).
    /// Against [`acquire`] it saves, per call, the `Arc<Shared>` clone and drop and the
    /// gate's permit (an `Arc` clone, a semaphore acquire and a release that locks the
    /// semaphore's waiter list): atomic operations on lines every thread shares, which
    /// bounce between cores when several threads read at once. `f` must not wait for
    /// anything that needs this image's slot or the GIL. Coming back, the thread waits a
    /// little for another one back from such a call to let the GIL go ([`gil`]).
    ///
    /// [`take`]: Image::take
    /// [`acquire`]: Image::acquire
    pub fn with_open<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Shared) -> core::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            gil::released();
            let r = {
                let slot = self.slot.read();
                let sh = slot.as_deref().ok_or_else(closed)?;
                f(sh)
            };
            gil::before_taking();
            r.map_err(|e| self.err(&e))
        })
    }

    /// Take the image out for closing (None when already closed). Waits (with the GIL
    /// released) for the blocking calls running in [`with_open`](Image::with_open).
    pub fn take(&self, py: Python<'_>) -> Option<Arc<Shared>> {
        py.detach(|| self.slot.write().take())
    }

    /// Translate a core error, naming this image's file.
    pub fn err(&self, e: &core::Error) -> PyErr {
        to_pyerr(e, Some(&self.name))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtual size (it changes when a snapshot of another size is applied).
    pub fn cur_size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A read of `length` bytes at `offset`, clipped at the end of the image (as `os.pread`).
    /// `ValueError` when `offset` lies past the end.
    pub fn read_range(&self, length: u64, offset: i64) -> PyResult<(u64, usize)> {
        let off = non_negative(offset, "offset")?;
        let size = self.cur_size();
        if off > size {
            return Err(PyValueError::new_err(format!(
                "offset {off} is beyond the end of the image ({size} bytes)"
            )));
        }
        let n = length.min(size - off);
        let n = usize::try_from(n).map_err(|_| PyValueError::new_err("length is too large"))?;
        Ok((off, n))
    }

    /// A write of `length` bytes at `offset`, which must lie inside the image.
    pub fn write_range(&self, length: u64, offset: i64) -> PyResult<u64> {
        let off = non_negative(offset, "offset")?;
        match off.checked_add(length) {
            Some(end) if end <= self.cur_size() => Ok(off),
            _ => Err(PyValueError::new_err(format!(
                "request at offset {off} length {length} is beyond the end of the image ({} bytes)",
                self.cur_size()
            ))),
        }
    }

    /// Flush and close `sh` once every request holding a permit has finished.
    pub async fn close_shared(sh: Arc<Shared>) -> core::Result<()> {
        let _all = sh.gate.clone().write_owned().await;
        sh.img.clone().close().await
    }

    /// Run one bitmap change of the core with the GIL released.
    fn bitmap_job<F, Fut>(&self, py: Python<'_>, f: F) -> PyResult<()>
    where
        F: FnOnce(core::Image) -> Fut + Send,
        Fut: std::future::Future<Output = core::Result<()>>,
    {
        let (sh, permit) = self.acquire()?;
        py.detach(|| {
            let r = runtime::block_on(f(sh.img.clone()));
            drop(permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    fn zero_mode(unmap: bool) -> ZeroMode {
        if unmap {
            ZeroMode::Unmap
        } else {
            ZeroMode::Keep
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // An image dropped without close() is flushed and closed, as Python files are: here
        // with the GIL released (the requests it waits for never need the GIL); from inside
        // the runtime (a callback), in the background.
        let Some(sh) = self.slot.get_mut().take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            runtime::spawn(async move {
                let _ = Image::close_shared(sh).await;
            });
            return;
        }
        let closed = Python::try_attach(|py| {
            py.detach(|| {
                let _ = runtime::block_on(Image::close_shared(sh.clone()));
            })
        });
        if closed.is_none() {
            runtime::spawn(async move {
                let _ = Image::close_shared(sh).await;
            });
        }
    }
}

#[pymethods]
impl Image {
    /// Virtual size of the disk in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.cur_size()
    }

    /// Cluster size in bytes.
    #[getter]
    fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The backing file name as stored in the image, or None.
    #[getter]
    fn backing_file(&self) -> Option<String> {
        self.backing_file.clone()
    }

    /// Whether the image was opened read-only (mode "r").
    #[getter]
    fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the image is closed.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.read().is_none()
    }

    /// The file name the image was opened with.
    #[getter]
    fn filename(&self) -> &str {
        &self.name
    }

    /// "r" or "r+".
    /// The cache mode, as QEMU names it: `writeback` (the default), `writethrough`, `none`,
    /// `directsync` or `unsafe`.
    #[getter]
    fn cache(&self) -> &'static str {
        self.cache
    }

    #[getter]
    fn mode(&self) -> &'static str {
        if self.read_only {
            "r"
        } else {
            "r+"
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<qcow2rs.Image {:?} mode={:?} size={}{}>",
            self.name,
            self.mode(),
            self.cur_size(),
            if self.closed() { " closed" } else { "" }
        )
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    /// Read up to `length` bytes at `offset` (fewer at the end of the image).
    fn pread<'py>(
        &self,
        py: Python<'py>,
        length: i64,
        offset: i64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let length = non_negative(length, "length")?;
        let (off, n) = self.read_range(length, offset)?;
        let (bytes, mem) = buffers::bytes_for_read(py, n)?;
        self.with_open(py, |sh| {
            // SAFETY: a new bytes object that no Python code has seen yet, alive until this
            // returns; a successful read writes all of it, a failed one drops it unseen.
            let dst = unsafe { mem.slice_mut(n) };
            runtime::block_on_read(&sh.img, dst, off)
        })?;
        Ok(bytes)
    }

    /// Read into `buf` (any writable C-contiguous buffer) at `offset`, without copying.
    /// Returns the number of bytes read (fewer than `len(buf)` at the end of the image).
    fn preadinto<'py>(
        &self,
        py: Python<'py>,
        buf: &Bound<'py, PyAny>,
        offset: i64,
    ) -> PyResult<Bound<'py, PyInt>> {
        buffers::with_writable(buf, "preadinto() argument 1", |mem| {
            let (off, n) = self.read_range(mem.byte_len() as u64, offset)?;
            self.with_open(py, |sh| {
                // SAFETY: the buffer is writable and held until `with_writable` returns,
                // and nothing else in Rust uses it.
                let dst = unsafe { mem.slice_mut(n) };
                runtime::block_on_read(&sh.img, dst, off)
            })?;
            Ok(buffers::byte_count(py, n))
        })
    }

    /// Write `data` (any bytes-like object) at `offset`. Returns the number of bytes written.
    fn pwrite<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        offset: i64,
    ) -> PyResult<Bound<'py, PyInt>> {
        let held = HeldBuffer::readable(data, "pwrite() argument 1")?;
        let n = held.len();
        let off = self.write_range(n as u64, offset)?;
        let held_ref = &held;
        let res = self.with_open(py, |sh| {
            // SAFETY: `held` outlives this call.
            let src = unsafe { held_ref.slice(n) };
            runtime::block_on(sh.img.write_at(src, off))
        });
        held.release(py);
        res?;
        Ok(buffers::byte_count(py, n))
    }

    /// Make `length` bytes at `offset` read as zeros (`unmap=True` frees the host clusters).
    #[pyo3(signature = (length, offset, *, unmap = false))]
    fn write_zeroes(&self, py: Python<'_>, length: i64, offset: i64, unmap: bool) -> PyResult<()> {
        let length = non_negative(length, "length")?;
        let off = self.write_range(length, offset)?;
        let (sh, permit) = self.acquire()?;
        py.detach(|| {
            let r = runtime::block_on(sh.img.write_zeroes(off, length, Self::zero_mode(unmap)));
            drop(permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    /// Discard `length` bytes at `offset`: the range reads as zeros afterwards and whole
    /// clusters are freed.
    fn discard(&self, py: Python<'_>, length: i64, offset: i64) -> PyResult<()> {
        let length = non_negative(length, "length")?;
        let off = self.write_range(length, offset)?;
        let (sh, permit) = self.acquire()?;
        py.detach(|| {
            let r = runtime::block_on(sh.img.discard(off, length));
            drop(permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    /// Make every completed write durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let (sh, permit) = self.acquire()?;
        py.detach(|| {
            let r = runtime::block_on(sh.img.flush());
            drop(permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    /// Flush and close the image (after every request in flight has finished). Closing a
    /// closed image does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Some(sh) = self.take(py) else {
            return Ok(());
        };
        py.detach(|| runtime::block_on(Image::close_shared(sh)))
            .map_err(|e| self.err(&e))
    }

    /// What `qcow2rs info --output=json` prints for this image, as a dict.
    fn info(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (sh, permit) = self.acquire()?;
        let v = py
            .detach(|| {
                let r = core::info::info_json(&Disk::Qcow2(sh.img.clone()));
                drop(permit);
                r
            })
            .map_err(|e| self.err(&e))?;
        json::to_py(py, &v)
    }

    /// The entries of `qcow2rs map --output=json` for this image, as a list of dicts.
    fn map(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (sh, permit) = self.acquire()?;
        let entries = py
            .detach(|| {
                let r = runtime::block_on(Disk::Qcow2(sh.img.clone()).map());
                drop(permit);
                r
            })
            .map_err(|e| self.err(&e))?;
        map_to_py(py, &entries)
    }

    /// The internal snapshots, as the `snapshots` list of `info()` (keys of `qemu-img info
    /// --output=json`: `id`, `name`, `date-sec`, `date-nsec`, `vm-clock-sec`, `vm-clock-nsec`,
    /// `vm-state-size`, `icount`).
    fn snapshots(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (sh, permit) = self.acquire()?;
        let v = serde_json::Value::Array(
            sh.img
                .snapshots()
                .iter()
                .map(core::info::snapshot_json)
                .collect(),
        );
        drop(permit);
        json::to_py(py, &v)
    }

    /// Create an internal snapshot named `name` of the current state (`qemu-img snapshot
    /// -c`); returns its ID. No other request may be in flight on the image meanwhile.
    fn snapshot_create(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        let (sh, permit) = self.acquire()?;
        py.detach(|| {
            let r = runtime::block_on(sh.img.snapshot_create(name));
            drop(permit);
            r
        })
        .map(|s| s.id)
        .map_err(|e| self.err(&e))
    }

    /// Revert to the snapshot with this ID, else this name (`qemu-img snapshot -a`); the
    /// size becomes the snapshot's. `FileNotFoundError` when there is no such snapshot.
    fn snapshot_apply(&self, py: Python<'_>, name_or_id: &str) -> PyResult<()> {
        let (sh, permit) = self.acquire()?;
        let key = core::SnapshotKey::IdOrName(name_or_id.to_string());
        py.detach(|| {
            let r = runtime::block_on(sh.img.snapshot_apply(&key));
            self.size
                .store(sh.img.size(), std::sync::atomic::Ordering::Relaxed);
            drop(permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    /// Delete the snapshot with this ID, else this name (`qemu-img snapshot -d`).
    fn snapshot_delete(&self, py: Python<'_>, name_or_id: &str) -> PyResult<()> {
        let (sh, permit) = self.acquire()?;
        let key = core::SnapshotKey::IdOrName(name_or_id.to_string());
        py.detach(|| {
            let r = runtime::block_on(sh.img.snapshot_delete(&key));
            drop(permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    /// The persistent dirty bitmaps, as `format-specific.data.bitmaps` of `info()` (keys of
    /// `qemu-img info --output=json`: `name`, `granularity`, `flags` with `auto` when enabled
    /// and `in-use` when inconsistent); an empty list when there are none.
    fn bitmaps(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (sh, permit) = self.acquire()?;
        let v = serde_json::Value::Array(
            sh.img
                .bitmaps()
                .iter()
                .map(core::info::bitmap_json)
                .collect(),
        );
        drop(permit);
        json::to_py(py, &v)
    }

    /// Add an enabled persistent dirty bitmap (`qemu-img bitmap --add [-g GRANULARITY]`);
    /// the granularity (a power of two from 512 bytes to 2 GiB) defaults to the cluster size,
    /// at least 4 KiB. `FileExistsError` when a bitmap of that name exists. No other request
    /// may be in flight on the image meanwhile (as for every bitmap change).
    #[pyo3(signature = (name, *, granularity = None))]
    fn bitmap_add(&self, py: Python<'_>, name: &str, granularity: Option<i64>) -> PyResult<()> {
        let granularity = granularity
            .map(|g| non_negative(g, "granularity"))
            .transpose()?;
        self.bitmap_job(
            py,
            |img| async move { img.bitmap_add(name, granularity).await },
        )
    }

    /// Remove a bitmap (`qemu-img bitmap --remove`), also one marked in use.
    /// `FileNotFoundError` when there is no bitmap of that name.
    fn bitmap_remove(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.bitmap_job(py, |img| async move { img.bitmap_remove(name).await })
    }

    /// Clear every bit of a bitmap (`qemu-img bitmap --clear`).
    fn bitmap_clear(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.bitmap_job(py, |img| async move { img.bitmap_clear(name).await })
    }

    /// Enable a bitmap: set its `auto` flag (`qemu-img bitmap --enable`).
    fn bitmap_enable(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.bitmap_job(
            py,
            |img| async move { img.bitmap_set_enabled(name, true).await },
        )
    }

    /// Disable a bitmap: clear its `auto` flag (`qemu-img bitmap --disable`).
    fn bitmap_disable(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.bitmap_job(py, |img| async move {
            img.bitmap_set_enabled(name, false).await
        })
    }

    /// The dirty ranges of bitmap `name`, as `(start, length)` tuples of guest bytes in
    /// ascending order (adjacent dirty granules merged, the last one ending at the virtual size
    /// at the latest): what an incremental backup copies; the same ranges QEMU reports as
    /// dirty for the bitmap (its `qemu:dirty-bitmap:NAME` NBD context). Works on a read-only
    /// image. `FileNotFoundError` when there is no such bitmap, `qcow2rs.Error` (EINVAL) when
    /// it is marked in use (inconsistent).
    fn bitmap_extents(&self, py: Python<'_>, name: &str) -> PyResult<Vec<(u64, u64)>> {
        let (sh, permit) = self.acquire()?;
        py.detach(|| {
            let r = runtime::block_on(sh.img.bitmap_extents(name));
            drop(permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    /// Merge bitmap `src_name` into bitmap `dst` (`qemu-img bitmap --merge SRC_NAME [-b
    /// SOURCE] FILE DST`): every range dirty in the source becomes dirty in `dst`. The source
    /// bitmap is in this image, or in `source` (another open Image of the same virtual size).
    #[pyo3(signature = (dst, src_name, *, source = None))]
    fn bitmap_merge(
        &self,
        py: Python<'_>,
        dst: &str,
        src_name: &str,
        source: Option<PyRef<'_, Image>>,
    ) -> PyResult<()> {
        let Some(source) = source else {
            return self.bitmap_job(py, |img| async move {
                img.bitmap_merge(dst, None, src_name).await
            });
        };
        let (src, src_permit) = source.acquire()?;
        // A source bitmap that does not exist is reported naming the source's file.
        if !src.img.bitmaps().iter().any(|b| b.name == src_name) {
            let e = core::Error::new(
                core::ErrorKind::NotFound,
                format!("Dirty bitmap '{src_name}' not found"),
            );
            return Err(source.err(&e));
        }
        let (sh, permit) = self.acquire()?;
        py.detach(|| {
            let r = runtime::block_on(sh.img.bitmap_merge(dst, Some(&src.img), src_name));
            drop(permit);
            drop(src_permit);
            r
        })
        .map_err(|e| self.err(&e))
    }

    /// A file-like view of the guest disk: an `io.BufferedReader` ("rb") or
    /// `io.BufferedRandom` ("r+b") over an `io.RawIOBase`.
    #[pyo3(signature = (mode = "rb", buffering = -1))]
    fn fileobj(slf: &Bound<'_, Self>, mode: &str, buffering: i64) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let m = py.import("qcow2rs._fileobj")?;
        Ok(m.call_method1("open_view", (slf, mode, buffering))?
            .unbind())
    }

    // ---- asyncio submissions (used by qcow2rs.aio.AsyncImage) ----

    fn _aio_pread(
        &self,
        py: Python<'_>,
        owner: &Bound<'_, PyAny>,
        length: i64,
        offset: i64,
    ) -> PyResult<Py<PyAny>> {
        let length = non_negative(length, "length")?;
        let (off, n) = self.read_range(length, offset)?;
        let (sh, permit) = self.acquire()?;
        // Not zeroed first: the read writes every byte before the object is handed out, and
        // a failed read drops it unseen (see `bytes_for_read`).
        let (bytes, mem) = buffers::bytes_for_read(py, n)?;
        let obj = bytes.into_any().unbind();
        let name = self.name.clone();
        aio::submit(
            owner.py(),
            owner,
            None,
            n <= aio::INLINE_MAX,
            move || async move {
                // SAFETY: a new bytes object that no Python code has seen yet; it stays alive
                // (owned by the request, moved into the outcome after the read) until the
                // request completes, and it is handed out only then.
                let dst = unsafe { mem.slice_mut(n) };
                let r = sh.img.read_at(dst, off).await;
                drop(permit);
                match r {
                    Ok(()) => Outcome::Object(obj),
                    Err(e) => Outcome::Failed(e, Some(name)),
                }
            },
        )
    }

    fn _aio_preadinto(
        &self,
        owner: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
    ) -> PyResult<Py<PyAny>> {
        let held = HeldBuffer::writable(buf, "preadinto() argument 1")?;
        let (off, n) = self.read_range(held.len() as u64, offset)?;
        let (sh, permit) = self.acquire()?;
        let name = self.name.clone();
        let buf = held.ptr();
        aio::submit(
            owner.py(),
            owner,
            Some(held),
            n <= aio::INLINE_MAX,
            move || async move {
                // SAFETY: the buffer is writable and held (by the request's `done`, then its
                // completion) until after this future has finished or been dropped (see
                // `aio::submit`); nothing else in Rust uses it.
                let dst = unsafe { buf.slice_mut(n) };
                let r = sh.img.read_at(dst, off).await;
                drop(permit);
                match r {
                    Ok(()) => Outcome::Count(n as u64),
                    Err(e) => Outcome::Failed(e, Some(name)),
                }
            },
        )
    }

    fn _aio_pwrite(
        &self,
        owner: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
        offset: i64,
    ) -> PyResult<Py<PyAny>> {
        let held = HeldBuffer::readable(data, "pwrite() argument 1")?;
        let n = held.len();
        let off = self.write_range(n as u64, offset)?;
        let (sh, permit) = self.acquire()?;
        let name = self.name.clone();
        let buf = held.ptr();
        aio::submit(
            owner.py(),
            owner,
            Some(held),
            n <= aio::INLINE_MAX,
            move || async move {
                // SAFETY: the buffer is held (by the request's `done`, then its completion)
                // until after this future has finished or been dropped (see `aio::submit`).
                let src = unsafe { buf.slice(n) };
                let r = sh.img.write_at(src, off).await;
                drop(permit);
                match r {
                    Ok(()) => Outcome::Count(n as u64),
                    Err(e) => Outcome::Failed(e, Some(name)),
                }
            },
        )
    }

    fn _aio_write_zeroes(
        &self,
        owner: &Bound<'_, PyAny>,
        length: i64,
        offset: i64,
        unmap: bool,
    ) -> PyResult<Py<PyAny>> {
        let length = non_negative(length, "length")?;
        let off = self.write_range(length, offset)?;
        let (sh, permit) = self.acquire()?;
        let name = self.name.clone();
        aio::submit(owner.py(), owner, None, false, move || async move {
            let r = sh
                .img
                .write_zeroes(off, length, Self::zero_mode(unmap))
                .await;
            drop(permit);
            Outcome::unit(r, name)
        })
    }

    fn _aio_discard(
        &self,
        owner: &Bound<'_, PyAny>,
        length: i64,
        offset: i64,
    ) -> PyResult<Py<PyAny>> {
        let length = non_negative(length, "length")?;
        let off = self.write_range(length, offset)?;
        let (sh, permit) = self.acquire()?;
        let name = self.name.clone();
        aio::submit(owner.py(), owner, None, false, move || async move {
            let r = sh.img.discard(off, length).await;
            drop(permit);
            Outcome::unit(r, name)
        })
    }

    fn _aio_flush(&self, owner: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let (sh, permit) = self.acquire()?;
        let name = self.name.clone();
        aio::submit(owner.py(), owner, None, false, move || async move {
            let r = sh.img.flush().await;
            drop(permit);
            Outcome::unit(r, name)
        })
    }

    fn _aio_close(&self, owner: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let name = self.name.clone();
        match self.take(owner.py()) {
            None => aio::submit(owner.py(), owner, None, false, move || async {
                Outcome::Unit
            }),
            Some(sh) => aio::submit(owner.py(), owner, None, false, move || async move {
                Outcome::unit(Image::close_shared(sh).await, name)
            }),
        }
    }

    fn _aio_info(&self, owner: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let (sh, permit) = self.acquire()?;
        let name = self.name.clone();
        aio::submit(owner.py(), owner, None, false, move || async move {
            let r = core::info::info_json(&Disk::Qcow2(sh.img.clone()));
            drop(permit);
            match r {
                Ok(v) => Outcome::Json(v),
                Err(e) => Outcome::Failed(e, Some(name)),
            }
        })
    }

    /// A bitmap change for `AsyncImage`: `op` is the name of the `Image` method, `name` the
    /// bitmap, `arg` the granularity (add) or the source bitmap's name (merge), `source` the
    /// image holding that source bitmap (merge).
    #[pyo3(signature = (owner, op, name, arg = None, source = None))]
    fn _aio_bitmap(
        &self,
        owner: &Bound<'_, PyAny>,
        op: &str,
        name: String,
        arg: Option<&Bound<'_, PyAny>>,
        source: Option<PyRef<'_, Image>>,
    ) -> PyResult<Py<PyAny>> {
        enum Op {
            Add(Option<u64>),
            Remove,
            Clear,
            Enable(bool),
            Merge(String),
            Extents,
        }
        let op = match op {
            "add" => Op::Add(
                arg.map(|g| g.extract::<i64>())
                    .transpose()?
                    .map(|g| non_negative(g, "granularity"))
                    .transpose()?,
            ),
            "remove" => Op::Remove,
            "clear" => Op::Clear,
            "enable" => Op::Enable(true),
            "disable" => Op::Enable(false),
            "merge" => Op::Merge(
                arg.ok_or_else(|| PyValueError::new_err("merge needs the source bitmap"))?
                    .extract()?,
            ),
            "extents" => Op::Extents,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "unknown bitmap operation {op}"
                )))
            }
        };
        let src = match (&op, source) {
            (Op::Merge(src_name), Some(source)) => {
                let (src, src_permit) = source.acquire()?;
                if !src.img.bitmaps().iter().any(|b| b.name == *src_name) {
                    let e = core::Error::new(
                        core::ErrorKind::NotFound,
                        format!("Dirty bitmap '{src_name}' not found"),
                    );
                    return Err(source.err(&e));
                }
                Some((src, src_permit))
            }
            _ => None,
        };
        let (sh, permit) = self.acquire()?;
        let fname = self.name.clone();
        aio::submit(owner.py(), owner, None, false, move || async move {
            let img = &sh.img;
            let r = match op {
                Op::Add(g) => img.bitmap_add(&name, g).await,
                Op::Remove => img.bitmap_remove(&name).await,
                Op::Clear => img.bitmap_clear(&name).await,
                Op::Enable(on) => img.bitmap_set_enabled(&name, on).await,
                Op::Merge(src_name) => {
                    let src_img = src.as_ref().map(|(s, _)| &s.img);
                    img.bitmap_merge(&name, src_img, &src_name).await
                }
                Op::Extents => {
                    let r = img.bitmap_extents(&name).await;
                    drop(permit);
                    return match r {
                        Ok(v) => Outcome::Extents(v),
                        Err(e) => Outcome::Failed(e, Some(fname)),
                    };
                }
            };
            drop(src);
            drop(permit);
            Outcome::unit(r, fname)
        })
    }

    fn _aio_map(&self, owner: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let (sh, permit) = self.acquire()?;
        let name = self.name.clone();
        aio::submit(owner.py(), owner, None, false, move || async move {
            let r = Disk::Qcow2(sh.img.clone()).map().await;
            drop(permit);
            match r {
                Ok(v) => Outcome::Map(v),
                Err(e) => Outcome::Failed(e, Some(name)),
            }
        })
    }
}

/// Map entries as a list of dicts with the keys of `qcow2rs map --output=json`.
pub fn map_to_py(py: Python<'_>, entries: &[core::MapEntry]) -> PyResult<Py<PyAny>> {
    let list = pyo3::types::PyList::empty(py);
    for e in entries {
        list.append(json::to_py(py, &core::info::map_entry_json(e))?)?;
    }
    Ok(list.into_any().unbind())
}
