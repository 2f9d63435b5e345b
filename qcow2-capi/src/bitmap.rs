//! Persistent dirty bitmaps: add, remove, clear, enable, disable, merge, list (`qemu-img
//! bitmap`, and the bitmaps of `qemu-img info`).

use crate::error::{ffi, Fail};
use crate::image::{
    change_with_name, image_ref, malloc_string, qcow2rs_image, str_arg, utf8, writable_ref, OutList,
};
use std::ffi::{c_char, c_int};

/// Flag of `qcow2rs_bitmap_info.flags`: the bitmap is marked in use (a writer was
/// interrupted, so its bits cannot be trusted); it can only be removed.
pub const QCOW2RS_BITMAP_IN_USE: u32 = 1 << 0;
/// Flag of `qcow2rs_bitmap_info.flags`: the bitmap is enabled (`auto`: a writer that
/// tracks dirty regions, such as QEMU, updates it; this library does not, see
/// `qcow2rs_bitmap_add`).
pub const QCOW2RS_BITMAP_AUTO: u32 = 1 << 1;

/// One persistent bitmap, as listed by `qcow2rs_bitmap_list`.
#[repr(C)]
pub struct qcow2rs_bitmap_info {
    /// The bitmap's name.
    pub name: *mut c_char,
    /// Bytes of guest data one bit covers (a power of two from 512 to 2 GiB).
    pub granularity: u64,
    /// `QCOW2RS_BITMAP_IN_USE` and `QCOW2RS_BITMAP_AUTO` bits.
    pub flags: u32,
}

fn name_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    utf8(str_arg(p, what)?, what)
}

/// Add an enabled persistent bitmap `name`, all bits clear (`qemu-img bitmap --add [-g
/// GRANULARITY]`). `granularity` is the bytes of guest data one bit covers: a power of two
/// from 512 to 2 GiB, or 0 for the default (the cluster size, at least 4 KiB, as QEMU).
/// The image must be open read-write and be a qcow2 v3 image.
///
/// Blocking: the call first waits for the requests in flight on the handle to end; requests
/// submitted meanwhile wait until it returns. The change is crash-safe: after a crash the
/// image has the bitmaps before or after the call (at worst with leaked clusters). Guest
/// writes through a handle are recorded in the enabled bitmaps (marked in use on disk from
/// the first write) and stored by `qcow2rs_close`; a handle never closed leaves them in use
/// (inconsistent), as QEMU after a crash.
///
/// Returns 0, or `-EFAULT` (`img` or `name` NULL), `-EEXIST` (a bitmap named `name`
/// exists), `-EINVAL` (a bad granularity; `name` empty, not UTF-8 or longer than 1023
/// bytes; the image already has 65535 bitmaps, or a virtual size of 0), `-EBADF` (open
/// read-only, or marked corrupt), `-ENOTSUP` (a qcow2 v2 image), `-EDEADLK` (called from a
/// completion callback or a library thread), `-ECHILD` (image opened before fork()),
/// `-EUCLEAN` (damaged bitmap metadata), `-ENOSPC` and other I/O errnos.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_add(
    img: *mut qcow2rs_image,
    name: *const c_char,
    granularity: u64,
) -> c_int {
    let g = (granularity != 0).then_some(granularity);
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name("qcow2rs_bitmap_add", img, name, "name", |h, name| {
            h.img.bitmap_add(name, g)
        })
    }
}

/// Remove bitmap `name` and free its clusters (`qemu-img bitmap --remove`); also works on a
/// bitmap marked in use. Conditions and errors as `qcow2rs_bitmap_add`, except that
/// `-ENOENT` means there is no bitmap `name` (and there is no `-EEXIST`).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_remove(
    img: *mut qcow2rs_image,
    name: *const c_char,
) -> c_int {
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name("qcow2rs_bitmap_remove", img, name, "name", |h, name| {
            h.img.bitmap_remove(name)
        })
    }
}

/// Clear every bit of bitmap `name` (`qemu-img bitmap --clear`). Conditions and errors as
/// `qcow2rs_bitmap_remove`, plus `-EINVAL` (the bitmap is marked in use).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_clear(
    img: *mut qcow2rs_image,
    name: *const c_char,
) -> c_int {
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name("qcow2rs_bitmap_clear", img, name, "name", |h, name| {
            h.img.bitmap_clear(name)
        })
    }
}

/// Enable bitmap `name`: set its `QCOW2RS_BITMAP_AUTO` flag (`qemu-img bitmap --enable`;
/// nothing is written when it is set already). Conditions and errors as
/// `qcow2rs_bitmap_clear`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_enable(
    img: *mut qcow2rs_image,
    name: *const c_char,
) -> c_int {
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name("qcow2rs_bitmap_enable", img, name, "name", |h, name| {
            h.img.bitmap_set_enabled(name, true)
        })
    }
}

/// Disable bitmap `name`: clear its `QCOW2RS_BITMAP_AUTO` flag (`qemu-img bitmap
/// --disable`). Conditions and errors as `qcow2rs_bitmap_clear`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_disable(
    img: *mut qcow2rs_image,
    name: *const c_char,
) -> c_int {
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name("qcow2rs_bitmap_disable", img, name, "name", |h, name| {
            h.img.bitmap_set_enabled(name, false)
        })
    }
}

/// Merge bitmap `src_name` into bitmap `dst` of `img` (`qemu-img bitmap --merge SRC [-b
/// SRC_FILE] IMG DST`): every guest range dirty in the source becomes dirty in `dst`. The
/// source is a bitmap of `src_img`, an open handle (read-only is enough; it may be `img`
/// itself), or of `img` when `src_img` is NULL. Granularities may differ; both images must
/// have the same virtual size. Conditions and errors as `qcow2rs_bitmap_clear` (`-EFAULT`
/// for `dst` or `src_name` NULL, `-ENOENT` for a missing `dst` or source, `-EINVAL` for either
/// marked in use or different virtual sizes; `-ECHILD` also for `src_img`).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_merge(
    img: *mut qcow2rs_image,
    dst: *const c_char,
    src_img: *mut qcow2rs_image,
    src_name: *const c_char,
) -> c_int {
    ffi("qcow2rs_bitmap_merge", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { writable_ref(img, "qcow2rs_bitmap_merge")? };
        let dst = name_arg(dst, "dst")?;
        let src_name = name_arg(src_name, "src_name")?;
        let src = if src_img.is_null() {
            None
        } else {
            // SAFETY: a live handle (header contract).
            Some(unsafe { image_ref(src_img, "qcow2rs_bitmap_merge")? })
        };
        h.block_on(
            "qcow2rs_bitmap_merge",
            h.img.bitmap_merge(dst, src.map(|s| &s.img), src_name),
        )
        .map(|()| 0)
    })
}

/// List the image's persistent bitmaps (those `qemu-img info` lists: none when the image's
/// bitmaps are not marked consistent): `*list` receives an array of `*count` entries (NULL and
/// 0 when there is none), in directory order, which the caller frees with
/// `qcow2rs_bitmap_list_free(*list, *count)`. Does no I/O; works on a read-only handle.
/// Returns 0, or `-EFAULT` (`img`, `list` or `count` NULL), `-ECHILD`, `-ENOMEM`; on failure
/// `*list` is NULL and `*count` 0.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_list(
    img: *mut qcow2rs_image,
    list: *mut *mut qcow2rs_bitmap_info,
    count: *mut usize,
) -> c_int {
    ffi("qcow2rs_bitmap_list", || {
        // SAFETY: NULL or valid places (header contract).
        let out = unsafe { OutList::new(list, count)? };
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_bitmap_list")? };
        out.fill(
            &h.img.bitmaps(),
            |b| {
                Ok(qcow2rs_bitmap_info {
                    name: malloc_string(&b.name)?,
                    granularity: b.granularity,
                    flags: b.flags & (QCOW2RS_BITMAP_IN_USE | QCOW2RS_BITMAP_AUTO),
                })
            },
            // SAFETY: a partly filled list is freed as a whole one (NULL names).
            |arr, n| unsafe { qcow2rs_bitmap_list_free(arr, n) },
        )
    })
}

/// Free a list from `qcow2rs_bitmap_list` (its strings and the array). NULL is allowed.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_list_free(list: *mut qcow2rs_bitmap_info, count: usize) {
    if list.is_null() {
        return;
    }
    for i in 0..count {
        // SAFETY: `list` has `count` entries from qcow2rs_bitmap_list (header contract);
        // their names are NULL or from malloc.
        unsafe { libc::free((*list.add(i)).name.cast()) };
    }
    // SAFETY: the array came from calloc.
    unsafe { libc::free(list.cast()) }
}

/// One range of guest bytes, as listed by `qcow2rs_bitmap_extents`.
#[repr(C)]
pub struct qcow2rs_extent {
    /// Offset of the first byte.
    pub start: u64,
    /// Length in bytes (never 0).
    pub length: u64,
}

/// The dirty ranges of bitmap `name`: `*list` receives an array of `*count` ranges in
/// ascending order (NULL and 0 when nothing is dirty), adjacent dirty granules merged into
/// one range and the last one ending at the virtual size at the latest: the ranges QEMU
/// reports as dirty for the bitmap (its `qemu:dirty-bitmap:NAME` NBD context), what an
/// incremental backup copies. The caller frees the array with `qcow2rs_free`. Works on a read-only
/// handle. Blocking (it reads the bitmap's data).
///
/// Returns 0, or `-EFAULT` (`img`, `name`, `list` or `count` NULL), `-ENOENT` (no bitmap
/// `name`), `-EINVAL` (`name` not UTF-8; the bitmap is marked in use), `-EUCLEAN` (damaged
/// bitmap metadata), `-EDEADLK` (called from a completion callback or a library thread),
/// `-ECHILD`, `-ENOMEM` and I/O errnos; on failure `*list` is NULL and `*count` 0.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_bitmap_extents(
    img: *mut qcow2rs_image,
    name: *const c_char,
    list: *mut *mut qcow2rs_extent,
    count: *mut usize,
) -> c_int {
    ffi("qcow2rs_bitmap_extents", || {
        // SAFETY: NULL or valid places (header contract).
        let out = unsafe { OutList::new(list, count)? };
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_bitmap_extents")? };
        let name = name_arg(name, "name")?;
        let extents = h.block_on("qcow2rs_bitmap_extents", h.img.bitmap_extents(name))?;
        out.fill(
            &extents,
            |&(start, length)| Ok(qcow2rs_extent { start, length }),
            // SAFETY: from calloc; the entries own nothing.
            |arr, _| unsafe { libc::free(arr.cast()) },
        )
    })
}
