//! Python buffers held across a request.
//!
//! A request borrows the memory of a Python object (bytearray, memoryview, mmap, numpy
//! array, bytes, ...) through the buffer protocol. The `Py_buffer` is held, and with it the
//! object (and, for resizable exporters such as bytearray, its size), until the request has
//! really completed, which for the asyncio API may be after the awaiting task was cancelled.
//! The buffer is released with the GIL held (on the thread that delivers the completion).

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyInt};

/// A held, C-contiguous Python buffer.
pub struct HeldBuffer {
    buf: PyUntypedBuffer,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer refers to memory owned by the exporting Python object, which the held
// `Py_buffer` keeps alive and in place until `buf` is released (PyUntypedBuffer is Send and
// Sync itself; releasing it attaches to the interpreter).
unsafe impl Send for HeldBuffer {}
// SAFETY: as above; `HeldBuffer` only hands out the pointer, never references.
unsafe impl Sync for HeldBuffer {}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

impl HeldBuffer {
    fn get(obj: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<HeldBuffer> {
        let buf = PyUntypedBuffer::get(obj).map_err(|_| {
            PyTypeError::new_err(format!(
                "{what} must be a{} bytes-like object, not {}",
                if writable { " writable" } else { "" },
                type_name(obj)
            ))
        })?;
        if writable && buf.readonly() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be a writable bytes-like object, not read-only {}",
                type_name(obj)
            )));
        }
        if !buf.is_c_contiguous() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be a C-contiguous buffer"
            )));
        }
        let len = buf.len_bytes();
        let ptr = buf.buf_ptr().cast::<u8>();
        Ok(HeldBuffer { buf, ptr, len })
    }

    /// A writable buffer (TypeError for read-only or non-contiguous buffers).
    pub fn writable(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<HeldBuffer> {
        Self::get(obj, what, true)
    }

    /// A readable buffer (any bytes-like object).
    pub fn readable(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<HeldBuffer> {
        Self::get(obj, what, false)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The first `n` bytes as a slice.
    ///
    /// # Safety
    /// `n <= len()` and `self` must outlive every use of the slice.
    pub unsafe fn slice<'a>(&self, n: usize) -> &'a [u8] {
        debug_assert!(n <= self.len);
        if n == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees the conditions above; `ptr` is valid for `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, n) }
    }

    /// The buffer's address and length, for a request future that uses the memory while
    /// something else holds this `HeldBuffer` (see [`BufPtr`]).
    pub fn ptr(&self) -> BufPtr {
        BufPtr {
            ptr: self.ptr as usize,
            len: self.len,
        }
    }

    /// Release the buffer now (the GIL is held).
    pub fn release(self, py: Python<'_>) {
        self.buf.release(py);
    }
}

/// Run `f` on the memory of `obj`, a writable C-contiguous buffer held for the length of
/// the call, with the GIL held before and after `f` (blocking calls: `f` may release it).
///
/// The cheap way for a blocking call: the buffer is asked for with `PyBUF_WRITABLE` alone
/// (no format, shape nor strides to fill in) into a `Py_buffer` on this stack frame, where
/// [`HeldBuffer`] asks for everything (`PyBUF_FULL_RO`) into a box. An object that refuses
/// that request goes through [`HeldBuffer::writable`], which gives the usual error (or takes
/// the buffer after all).
pub fn with_writable<R>(
    obj: &Bound<'_, PyAny>,
    what: &str,
    f: impl FnOnce(BufPtr) -> PyResult<R>,
) -> PyResult<R> {
    /// Releases the view when dropped (the GIL is held: `with_writable` is called with it,
    /// and `f` returns with it).
    struct View(std::mem::MaybeUninit<ffi::Py_buffer>);
    impl Drop for View {
        fn drop(&mut self) {
            // SAFETY: a `View` exists only once `PyObject_GetBuffer` filled it in, and it
            // is released once, here, with the GIL held.
            unsafe { ffi::PyBuffer_Release(self.0.as_mut_ptr()) }
        }
    }
    let mut raw = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
    // SAFETY: `obj` is a live object and `raw` room for one `Py_buffer`; the GIL is held.
    let rc =
        unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), raw.as_mut_ptr(), ffi::PyBUF_WRITABLE) };
    if rc != 0 {
        drop(PyErr::take(obj.py()));
        let held = HeldBuffer::writable(obj, what)?;
        let r = f(held.ptr());
        held.release(obj.py());
        return r;
    }
    let view = View(raw);
    // SAFETY: filled in by the successful call above.
    let (ptr, len) = unsafe {
        let v = view.0.assume_init_ref();
        (v.buf as usize, v.len as usize)
    };
    // The view stays where it is until it is released after `f` (some exporters point
    // into it), and it keeps the memory valid and in place meanwhile.
    let r = f(BufPtr { ptr, len });
    drop(view);
    r
}

/// The memory of a [`HeldBuffer`], without holding it: whoever uses it must make sure the
/// `HeldBuffer` is still held (the asyncio requests: their completion holds it until after
/// the request's future has finished).
#[derive(Clone, Copy)]
pub struct BufPtr {
    ptr: usize,
    len: usize,
}

impl BufPtr {
    /// Length in bytes.
    pub fn byte_len(self) -> usize {
        self.len
    }

    /// The first `n` bytes as a mutable slice.
    ///
    /// # Safety
    /// The buffer must be writable, `n <= len()`, the buffer this came from must stay held
    /// (not released) while the slice is used, and no other Rust reference to the memory may
    /// be used meanwhile. (Python code may still touch the memory concurrently, as with every
    /// buffer-protocol consumer that releases the GIL, e.g. `io.FileIO.readinto`: the bytes
    /// then hold an unspecified mix, but memory stays valid.)
    pub unsafe fn slice_mut<'a>(self, n: usize) -> &'a mut [u8] {
        debug_assert!(n <= self.len);
        if n == 0 {
            return &mut [];
        }
        // SAFETY: the caller guarantees the conditions above; `ptr` is valid for `len` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, n) }
    }

    /// The first `n` bytes as a slice.
    ///
    /// # Safety
    /// As [`HeldBuffer::slice`], and the `HeldBuffer` this came from must stay held while the
    /// slice is used.
    pub unsafe fn slice<'a>(self, n: usize) -> &'a [u8] {
        debug_assert!(n <= self.len);
        if n == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees the conditions above; `ptr` is valid for `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, n) }
    }
}

/// A new `bytes` object of `len` bytes for a read to fill, and the address of its contents.
///
/// Unlike `PyBytes::new_with`, the contents are not zeroed first (a `memset` of the whole
/// length with the GIL held: about 8% of the CPU of a 1 MiB `pread`). The caller must only
/// write the memory and must write every byte before any Python code sees the object (a
/// successful `read_at` does: it fills the whole buffer, zeros for unallocated clusters and
/// past the end of the file included), or drop the object unseen (a failed read).
pub fn bytes_for_read(py: Python<'_>, len: usize) -> PyResult<(Bound<'_, PyBytes>, BufPtr)> {
    let size = ffi::Py_ssize_t::try_from(len)
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("length too large"))?;
    // SAFETY: a NULL source asks CPython for a new bytes object of `size` bytes whose contents
    // are left for the caller to write; the result is a new reference (or NULL with an
    // exception set, turned into the error). `PyBytes_AsString` of a bytes object returns its
    // contents, valid for `size` bytes (plus the terminating NUL) while the object lives.
    unsafe {
        let obj = ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
        let bytes = Bound::from_owned_ptr_or_err(py, obj)?.cast_into_unchecked::<PyBytes>();
        let ptr = ffi::PyBytes_AsString(bytes.as_ptr()).cast::<u8>();
        Ok((
            bytes,
            BufPtr {
                ptr: ptr as usize,
                len,
            },
        ))
    }
}

/// `n`, a count of bytes a call returns, as a Python int.
///
/// A power of two (the length of a whole buffer, the usual result of `preadinto` and
/// `pwrite`) is one int object made once and shared, as CPython shares the ints up to 256:
/// a new int per call is an allocation and its free, about 130 of the 3000 instructions
/// of a 4 KiB `preadinto` served by the page cache. Other counts get a new int.
pub fn byte_count(py: Python<'_>, n: usize) -> Bound<'_, PyInt> {
    static POWERS_OF_TWO: [PyOnceLock<Py<PyInt>>; usize::BITS as usize] =
        [const { PyOnceLock::new() }; usize::BITS as usize];
    if n.is_power_of_two() {
        let cell = &POWERS_OF_TWO[n.trailing_zeros() as usize];
        return cell
            .get_or_init(py, || PyInt::new(py, n).unbind())
            .bind(py)
            .clone();
    }
    PyInt::new(py, n)
}
