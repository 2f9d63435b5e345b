//! Blocking I/O calls: the request runs to its end on the calling thread.
//!
//! The core's futures complete on the I/O engines' own threads and need no particular
//! executor, so a blocking call polls its future right on the caller's thread (inside the
//! runtime's context, for the work the core offloads): no hop to a library thread and back. A
//! request that waits for the device waits in the caller's own io_uring ring and is reaped by
//! the caller ([`crate::runtime::block_on`]).
//! Called where that would wait for itself (a library thread, a callback) they return
//! `-EDEADLK`.

use crate::aio::{
    check_buf, iovecs, make_slice, make_slice_mut, readv_segments, writev_segments, zero_mode,
    QCOW2RS_ZEROES_MAY_UNMAP,
};
use crate::error::{ffi, Fail};
use crate::image::{image_ref, qcow2rs_image};
use std::ffi::{c_int, c_void};

fn check_flags(flags: u32, known: u32, call: &str) -> Result<(), Fail> {
    if flags & !known != 0 {
        return Err(Fail::inval(format!(
            "{call}: unknown flags 0x{:x}",
            flags & !known
        )));
    }
    Ok(())
}

/// Read `len` bytes of guest data at `offset` into `buf`. Blocking.
///
/// Returns 0 (all `len` bytes read; there are no short reads), or: `-EFAULT` (`img` NULL, or
/// `buf` NULL with `len` > 0), `-EINVAL` (the range is not inside the virtual disk),
/// `-EDEADLK` (called from a callback or a library thread), `-ECHILD` (image opened before
/// fork()), `-EUCLEAN` (corrupt metadata found), `-EIO` and other I/O errnos.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_read(
    img: *mut qcow2rs_image,
    buf: *mut c_void,
    len: usize,
    offset: u64,
) -> c_int {
    ffi("qcow2rs_read", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_read")? };
        check_buf(buf, len, "buf")?;
        h.check_range(offset, len as u64)?;
        // SAFETY: `buf` points to `len` writable bytes for the duration of the call.
        let slice = unsafe { make_slice_mut(buf.cast(), len) };
        h.block_on("qcow2rs_read", h.img.read_at(slice, offset))
            .map(|()| 0)
    })
}

/// Write `len` bytes from `buf` at guest offset `offset`. Blocking; durable after a flush.
///
/// Errors as `qcow2rs_read`, plus `-EBADF` (image opened read-only, or marked corrupt) and
/// `-ENOSPC`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_write(
    img: *mut qcow2rs_image,
    buf: *const c_void,
    len: usize,
    offset: u64,
) -> c_int {
    ffi("qcow2rs_write", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_write")? };
        check_buf(buf, len, "buf")?;
        h.check_writable("qcow2rs_write")?;
        h.check_range(offset, len as u64)?;
        // SAFETY: `buf` points to `len` readable bytes for the duration of the call.
        let slice = unsafe { make_slice(buf.cast(), len) };
        h.block_on("qcow2rs_write", h.img.write_at(slice, offset))
            .map(|()| 0)
    })
}

/// Vectored `qcow2rs_read`: fills the `iovcnt` buffers of `iov` one after the other. Also
/// `-EINVAL` when `iovcnt` is negative or above `QCOW2RS_IOV_MAX`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_readv(
    img: *mut qcow2rs_image,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
) -> c_int {
    ffi("qcow2rs_readv", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_readv")? };
        let (segs, total) = iovecs(iov, iovcnt)?;
        h.check_range(offset, total)?;
        h.block_on("qcow2rs_readv", readv_segments(&h.img, segs, offset))
            .map(|()| 0)
    })
}

/// Vectored `qcow2rs_write`. Also `-EINVAL` when `iovcnt` is negative or above
/// `QCOW2RS_IOV_MAX`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_writev(
    img: *mut qcow2rs_image,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
) -> c_int {
    ffi("qcow2rs_writev", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_writev")? };
        let (segs, total) = iovecs(iov, iovcnt)?;
        h.check_writable("qcow2rs_writev")?;
        h.check_range(offset, total)?;
        h.block_on(
            "qcow2rs_writev",
            writev_segments(&h.img, segs, offset, total),
        )
        .map(|()| 0)
    })
}

/// Make every write completed so far durable, and store what the image's enabled persistent
/// bitmaps recorded (they stay marked in use until close). Blocking. Returns 0 (also on a
/// read-only image), or `-EFAULT`, `-EDEADLK`, `-ECHILD`, `-EIO` and other I/O errnos.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_flush(img: *mut qcow2rs_image) -> c_int {
    ffi("qcow2rs_flush", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_flush")? };
        h.block_on("qcow2rs_flush", h.img.flush()).map(|()| 0)
    })
}

/// Make `len` bytes at `offset` read as zeros (see `qcow2rs_aio_write_zeroes`). `flags`: 0 or
/// `QCOW2RS_ZEROES_MAY_UNMAP`. Blocking. Errors as `qcow2rs_write`, plus `-EINVAL` for
/// unknown flags.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_write_zeroes(
    img: *mut qcow2rs_image,
    len: u64,
    offset: u64,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_write_zeroes", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_write_zeroes")? };
        check_flags(flags, QCOW2RS_ZEROES_MAY_UNMAP, "qcow2rs_write_zeroes")?;
        h.check_writable("qcow2rs_write_zeroes")?;
        h.check_range(offset, len)?;
        h.block_on(
            "qcow2rs_write_zeroes",
            h.img.write_zeroes(offset, len, zero_mode(flags)),
        )
        .map(|()| 0)
    })
}

/// Discard `len` bytes at `offset` (see `qcow2rs_aio_discard`). `flags` must be 0. Blocking.
/// Errors as `qcow2rs_write`, plus `-EINVAL` for unknown flags.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_discard(
    img: *mut qcow2rs_image,
    len: u64,
    offset: u64,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_discard", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_discard")? };
        check_flags(flags, 0, "qcow2rs_discard")?;
        h.check_writable("qcow2rs_discard")?;
        h.check_range(offset, len)?;
        h.block_on("qcow2rs_discard", h.img.discard(offset, len))
            .map(|()| 0)
    })
}
