//! Internal snapshots: list, create, apply, delete (`qemu-img snapshot -l/-c/-a/-d`).

use crate::error::ffi;
use crate::image::{change_with_name, image_ref, malloc_string, qcow2rs_image, OutList};
use qcow2_core::SnapshotKey;
use std::ffi::{c_char, c_int};

/// One internal snapshot, as listed by `qcow2rs_snapshot_list`.
#[repr(C)]
pub struct qcow2rs_snapshot_info {
    /// The snapshot's ID (a number, as text).
    pub id: *mut c_char,
    /// The snapshot's name (tag).
    pub name: *mut c_char,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state in bytes (0: a disk-only snapshot).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (0: not recorded).
    pub disk_size: u64,
    /// Instruction count (`UINT64_MAX`: not recorded).
    pub icount: u64,
}

/// The snapshot named by `id_or_name` (an ID, else a name, as qemu-img).
fn key(id_or_name: &str) -> SnapshotKey {
    SnapshotKey::IdOrName(id_or_name.to_string())
}

/// Create an internal snapshot named `name` of the image's current state (`qemu-img snapshot
/// -c`). The image must be open read-write. Blocking: the call first waits for the requests
/// in flight on the handle to end; requests submitted meanwhile wait until it returns. The
/// change is atomic: after a crash the image is the one before or the one after. Returns 0,
/// or `-EFAULT` (`img` or `name` NULL), `-EBADF` (open read-only, or marked corrupt),
/// `-EINVAL` (name not UTF-8 or too long, a refcount that would overflow its width, e.g.
/// 1-bit refcounts, which cannot share a cluster: nothing is changed), `-EUCLEAN` (`check`
/// finds errors in the image: repair it first), `-ENOTSUP` (an external data file),
/// `-EDEADLK` (called from a completion callback), `-ECHILD`, I/O errnos.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_snapshot_create(
    img: *mut qcow2rs_image,
    name: *const c_char,
) -> c_int {
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name("qcow2rs_snapshot_create", img, name, "name", |h, name| {
            h.img.snapshot_create(name)
        })
    }
}

/// Revert the image to the snapshot `id_or_name` (an ID, else a name; `qemu-img snapshot
/// -a`): the current state is discarded and the virtual size becomes the snapshot's (see
/// `qcow2rs_get_size`). Conditions and errors as `qcow2rs_snapshot_create`, plus `-ENOENT`
/// (no such snapshot) and `-EUCLEAN` (the snapshot's tables are damaged).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_snapshot_apply(
    img: *mut qcow2rs_image,
    id_or_name: *const c_char,
) -> c_int {
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name(
            "qcow2rs_snapshot_apply",
            img,
            id_or_name,
            "id_or_name",
            |h, id_or_name| async move {
                h.img.snapshot_apply(&key(id_or_name)).await?;
                h.size
                    .store(h.img.size(), std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
        )
    }
}

/// Delete the snapshot `id_or_name` (an ID, else a name; `qemu-img snapshot -d`); clusters
/// only it held are freed. Conditions and errors as `qcow2rs_snapshot_apply`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_snapshot_delete(
    img: *mut qcow2rs_image,
    id_or_name: *const c_char,
) -> c_int {
    // SAFETY: NULL or a live handle, NULL or a string (header contract).
    unsafe {
        change_with_name(
            "qcow2rs_snapshot_delete",
            img,
            id_or_name,
            "id_or_name",
            |h, id_or_name| async move { h.img.snapshot_delete(&key(id_or_name)).await },
        )
    }
}

/// List the image's internal snapshots: `*list` receives an array of `*count` entries (NULL
/// and 0 when there is none), in table order, which the caller frees with
/// `qcow2rs_snapshot_list_free(*list, *count)`. Does no I/O. Returns 0, or `-EFAULT` (`img`,
/// `list` or `count` NULL), `-ECHILD`, `-ENOMEM`; on failure `*list` is NULL and `*count` 0.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_snapshot_list(
    img: *mut qcow2rs_image,
    list: *mut *mut qcow2rs_snapshot_info,
    count: *mut usize,
) -> c_int {
    ffi("qcow2rs_snapshot_list", || {
        // SAFETY: NULL or valid places (header contract).
        let out = unsafe { OutList::new(list, count)? };
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_snapshot_list")? };
        out.fill(
            &h.img.snapshots(),
            |s| {
                let id = malloc_string(&s.id)?;
                let name = malloc_string(&s.name).inspect_err(|_| {
                    // SAFETY: from malloc_string.
                    unsafe { libc::free(id.cast()) }
                })?;
                Ok(qcow2rs_snapshot_info {
                    id,
                    name,
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_nsec: s.vm_clock_nsec,
                    vm_state_size: s.vm_state_size,
                    disk_size: s.disk_size.unwrap_or(0),
                    icount: s.icount.unwrap_or(u64::MAX),
                })
            },
            // SAFETY: a partly filled list is freed as a whole one (NULL strings).
            |arr, n| unsafe { qcow2rs_snapshot_list_free(arr, n) },
        )
    })
}

/// Free a list from `qcow2rs_snapshot_list` (its strings and the array). NULL is allowed.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_snapshot_list_free(
    list: *mut qcow2rs_snapshot_info,
    count: usize,
) {
    if list.is_null() {
        return;
    }
    for i in 0..count {
        // SAFETY: `list` has `count` entries from qcow2rs_snapshot_list (header contract);
        // their strings are NULL or from malloc.
        unsafe {
            let e = &*list.add(i);
            libc::free(e.id.cast());
            libc::free(e.name.cast());
        }
    }
    // SAFETY: the array came from calloc.
    unsafe { libc::free(list.cast()) }
}
