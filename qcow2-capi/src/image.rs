//! Opening, closing and describing images.

use crate::aio::Shared;
use crate::error::{ffi, Fail};
use crate::runtime::{self, RtRef};
use qcow2_core::disk::{Disk, Format};
use qcow2_core::io::EngineKind;
use qcow2_core::{Image, OpenOptions};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Open read-only (the value 0: no flag).
pub const QCOW2RS_OPEN_RDONLY: u32 = 0;
/// Open for reading and writing.
pub const QCOW2RS_OPEN_RDWR: u32 = 1 << 0;
/// Bypass the host page cache (`O_DIRECT`) for every file of the image. Buffers and offsets
/// need no particular alignment (the library bounces unaligned requests), but 4 KiB-aligned
/// ones are faster. Fails with `-EINVAL` where the file system refuses `O_DIRECT` (tmpfs).
pub const QCOW2RS_OPEN_DIRECT: u32 = 1 << 1;
/// Do not open the backing file: unallocated clusters read as zeros. Refused with
/// `QCOW2RS_OPEN_RDWR` on an image that has a backing file (`-EINVAL`): partial-cluster
/// writes would copy zeros instead of the backing data.
pub const QCOW2RS_OPEN_NO_BACKING: u32 = 1 << 2;
/// For images from untrusted sources: open no file named inside the image (backing file,
/// external data file). Opening an image that names one fails with `-EINVAL`, unless the
/// file is given in `struct qcow2rs_open_options`.
pub const QCOW2RS_OPEN_UNTRUSTED: u32 = 1 << 3;
/// Event-loop mode: completions are queued instead of running on library threads;
/// `qcow2rs_get_completion_fd` gives an eventfd to poll and `qcow2rs_process_completions`
/// runs the callbacks on the calling thread.
pub const QCOW2RS_OPEN_POLL: u32 = 1 << 4;
/// Write-through (QEMU's cache modes `writethrough`, and `directsync` with
/// `QCOW2RS_OPEN_DIRECT`): every write, write-zeroes and discard is durable when it completes
/// (the library syncs the image's files, data and metadata, before it reports success), as a
/// disk with its write cache off. Much slower than the default (write-back: durable at the
/// next `qcow2rs_flush`).
pub const QCOW2RS_OPEN_WRITETHROUGH: u32 = 1 << 5;
/// Never sync (QEMU's cache mode `unsafe`): `qcow2rs_flush` and the flushes the library
/// orders its own metadata updates with return without syncing, so a crash of the host can
/// lose or damage what was written. For scratch images only. Refused with
/// `QCOW2RS_OPEN_WRITETHROUGH` (`-EINVAL`).
pub const QCOW2RS_OPEN_NO_FLUSH: u32 = 1 << 6;

const OPEN_FLAGS: u32 = QCOW2RS_OPEN_RDWR
    | QCOW2RS_OPEN_DIRECT
    | QCOW2RS_OPEN_NO_BACKING
    | QCOW2RS_OPEN_UNTRUSTED
    | QCOW2RS_OPEN_POLL
    | QCOW2RS_OPEN_WRITETHROUGH
    | QCOW2RS_OPEN_NO_FLUSH;

/// I/O engine: io_uring where the kernel allows it, else the thread pool (the default).
pub const QCOW2RS_ENGINE_AUTO: u32 = 0;
/// I/O engine: Linux io_uring (fails with `-ENOTSUP` or `-EPERM` where unavailable).
pub const QCOW2RS_ENGINE_IO_URING: u32 = 1;
/// I/O engine: a pool of threads doing `pread`/`pwrite`.
pub const QCOW2RS_ENGINE_THREADS: u32 = 2;

/// An open image. Opaque: create it with `qcow2rs_open` or `qcow2rs_open_ext`, free it with
/// `qcow2rs_close`. Any number of threads may use one handle at once, except that nothing
/// may use it during or after `qcow2rs_close` (callbacks of its own requests excepted: they
/// run before `qcow2rs_close` returns).
pub struct qcow2rs_image {
    pub(crate) img: Image,
    pub(crate) shared: std::sync::Arc<Shared>,
    pub(crate) writable: bool,
    /// The virtual size (changes when a snapshot of another size is applied).
    pub(crate) size: std::sync::atomic::AtomicU64,
    backing_file: Option<CString>,
    backing_path: Option<CString>,
    backing_format: Option<CString>,
    data_file: Option<CString>,
    data_path: Option<CString>,
    /// Last: dropping it may stop the runtime, after everything else is gone.
    pub(crate) rt: RtRef,
}

/// Options of `qcow2rs_open_ext`. Zero-initialize it, set `size` to
/// `sizeof(struct qcow2rs_open_options)` (or use `QCOW2RS_OPEN_OPTIONS_INIT`), then set what
/// you need: a field left 0 or NULL means the default. Fields may be added at the end in
/// later versions; `size` tells the library which ones the caller knows.
#[repr(C)]
pub struct qcow2rs_open_options {
    /// `sizeof(struct qcow2rs_open_options)` as the caller compiled it.
    pub size: usize,
    /// `QCOW2RS_OPEN_*` flags, as for `qcow2rs_open`.
    pub flags: u32,
    /// `QCOW2RS_ENGINE_*` (0: `QCOW2RS_ENGINE_AUTO`).
    pub engine: u32,
    /// Bytes of metadata cache (L2 tables and refcount blocks) for the image and for each
    /// image of its backing chain (0: 32 MiB). Memory use is bounded by it, whatever the
    /// image size.
    pub cache_size: u64,
    /// Use this file as the backing file instead of the one the image names (NULL: the
    /// image's own). Relative names are relative to the current directory.
    pub backing_file: *const c_char,
    /// Format of `backing_file`: `"qcow2"` or `"raw"` (NULL: probed).
    pub backing_format: *const c_char,
    /// Use this file as the external data file instead of the one the image names (NULL: the
    /// image's own).
    pub data_file: *const c_char,
    /// Longest backing chain accepted (0: 64).
    pub max_chain: u32,
}

/// Facts about an open image, filled by `qcow2rs_get_info`. Set `size` to
/// `sizeof(struct qcow2rs_info)` before the call. Strings belong to the image and stay valid
/// until `qcow2rs_close`.
#[repr(C)]
pub struct qcow2rs_info {
    /// `sizeof(struct qcow2rs_info)` as the caller compiled it (set by the caller).
    pub size: usize,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// qcow2 version: 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The backing file name as stored in the image (NULL: none).
    pub backing_file: *const c_char,
    /// The backing file actually opened (NULL: none, or `QCOW2RS_OPEN_NO_BACKING`).
    pub backing_path: *const c_char,
    /// The backing file format stored in the image (NULL: none).
    pub backing_format: *const c_char,
    /// The external data file name as stored in the image (NULL: none).
    pub data_file: *const c_char,
    /// The external data file actually opened (NULL: none).
    pub data_path: *const c_char,
    /// The image is dirty (lazy refcounts not written back after a crash).
    pub dirty: bool,
    /// The image is marked corrupt (it opens read-only).
    pub corrupt: bool,
    /// The image was opened read-only.
    pub read_only: bool,
    /// The image uses extended L2 entries (subclusters).
    pub extended_l2: bool,
}

/// `qcow2rs_info_json`: the whole backing chain, as `qcow2rs info --backing-chain
/// --output=json` (a JSON array, top image first).
pub const QCOW2RS_INFO_BACKING_CHAIN: u32 = 1 << 0;

/// The handle behind `img`, if it is not NULL and belongs to this process.
///
/// # Safety
/// `img` is NULL or a handle from `qcow2rs_open*` that has not been closed.
#[inline]
pub(crate) unsafe fn image_ref<'a>(
    img: *const qcow2rs_image,
    call: &str,
) -> Result<&'a qcow2rs_image, Fail> {
    if img.is_null() {
        return Err(Fail::fault("img"));
    }
    // SAFETY: guaranteed by the caller (see above).
    let h = unsafe { &*img };
    if h.rt.forked() {
        return Err(Fail::forked(call));
    }
    Ok(h)
}

/// The handle behind `img`, which must be open read-write.
///
/// # Safety
/// `img` is NULL or a handle from `qcow2rs_open*` that has not been closed.
pub(crate) unsafe fn writable_ref<'a>(
    img: *mut qcow2rs_image,
    call: &str,
) -> Result<&'a qcow2rs_image, Fail> {
    // SAFETY: guaranteed by the caller (see above).
    let h = unsafe { image_ref(img, call)? };
    h.check_writable(call)?;
    Ok(h)
}

/// The whole of a blocking C call `call` that changes the image behind `img` (open
/// read-write) given one string argument `arg` (UTF-8; `what` names it in errors): the
/// future `op` makes of the handle and the string is run to its end. Returns 0 or a
/// negative errno, the message in `qcow2rs_last_error()` (see `ffi`).
///
/// # Safety
/// `img` is NULL or a handle from `qcow2rs_open*` that has not been closed; `arg` is NULL
/// or a NUL-terminated string.
pub(crate) unsafe fn change_with_name<'a, T, F>(
    call: &str,
    img: *mut qcow2rs_image,
    arg: *const c_char,
    what: &str,
    op: impl FnOnce(&'a qcow2rs_image, &'a str) -> F,
) -> c_int
where
    F: std::future::Future<Output = qcow2_core::Result<T>> + 'a,
{
    ffi(call, || {
        // SAFETY: guaranteed by the caller (see above).
        let h = unsafe { writable_ref(img, call)? };
        let name = utf8(str_arg(arg, what)?, what)?;
        h.block_on(call, op(h, name)).map(|_| 0)
    })
}

impl qcow2rs_image {
    #[inline]
    pub(crate) fn check_range(&self, off: u64, len: u64) -> Result<(), Fail> {
        let size = self.size.load(std::sync::atomic::Ordering::Relaxed);
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(self.beyond_end(off, len, size)),
        }
    }

    #[cold]
    fn beyond_end(&self, off: u64, len: u64, size: u64) -> Fail {
        Fail::inval(format!(
            "{}: request at offset {off} length {len} is beyond the end of the disk ({size} bytes)",
            self.img.path().display(),
        ))
    }

    #[inline]
    pub(crate) fn check_writable(&self, call: &str) -> Result<(), Fail> {
        if self.writable {
            Ok(())
        } else {
            Err(self.read_only(call))
        }
    }

    #[cold]
    fn read_only(&self, call: &str) -> Fail {
        Fail::new(
            libc::EBADF,
            format!(
                "{call}: {}: the image is open read-only",
                self.img.path().display()
            ),
        )
    }

    /// Run `fut` to its end on the calling thread (blocking calls).
    pub(crate) fn block_on<T>(
        &self,
        call: &str,
        fut: impl std::future::Future<Output = qcow2_core::Result<T>>,
    ) -> Result<T, Fail> {
        if runtime::in_library_context() {
            return Err(Fail::deadlock(call));
        }
        Ok(runtime::block_on(self.rt.handle(), fut)?)
    }
}

/// A path argument.
pub(crate) fn path_arg(p: *const c_char, what: &str) -> Result<PathBuf, Fail> {
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(
        str_arg(p, what)?.to_bytes(),
    )))
}

/// A string argument (non-NULL).
pub(crate) fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a CStr, Fail> {
    if p.is_null() {
        return Err(Fail::fault(what));
    }
    // SAFETY: the caller passes a NUL-terminated string (header contract).
    Ok(unsafe { CStr::from_ptr(p) })
}

/// An optional string argument (NULL: `None`).
pub(crate) fn opt_str<'a>(p: *const c_char) -> Option<&'a CStr> {
    // SAFETY: NULL or a NUL-terminated string (header contract).
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

pub(crate) fn utf8<'a>(s: &'a CStr, what: &str) -> Result<&'a str, Fail> {
    s.to_str()
        .map_err(|_| Fail::inval(format!("{what} is not valid UTF-8")))
}

pub(crate) fn engine_arg(e: u32) -> Result<EngineKind, Fail> {
    match e {
        QCOW2RS_ENGINE_AUTO => Ok(EngineKind::Auto),
        QCOW2RS_ENGINE_IO_URING => Ok(EngineKind::IoUring),
        QCOW2RS_ENGINE_THREADS => Ok(EngineKind::Threads),
        _ => Err(Fail::inval(format!("unknown I/O engine {e}"))),
    }
}

pub(crate) fn format_arg(p: *const c_char, what: &str) -> Result<Option<Format>, Fail> {
    match opt_str(p) {
        None => Ok(None),
        Some(s) => Ok(Some(Format::parse(utf8(s, what)?)?)),
    }
}

/// Copy a caller's size-first struct into a zeroed `T`: the fields the caller's `size` covers
/// are taken, the others stay 0 (their defaults). Bytes the caller has beyond `T` (a newer
/// header) must be zero.
///
/// # Safety
/// `p` points to at least `size` readable bytes, where `size` is the struct's first field.
pub(crate) unsafe fn read_sized<T>(p: *const T, what: &str) -> Result<T, Fail> {
    let mut out = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: `p` points to a struct whose first field is a size_t (caller's contract).
    let size = unsafe { std::ptr::read_unaligned(p.cast::<usize>()) };
    let ours = std::mem::size_of::<T>();
    if size < std::mem::size_of::<usize>() {
        return Err(Fail::inval(format!(
            "{what}: size {size} is too small (set it to sizeof the struct)"
        )));
    }
    if size > ours {
        // SAFETY: the caller's struct has `size` readable bytes.
        let extra = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(ours), size - ours) };
        if extra.iter().any(|&b| b != 0) {
            return Err(Fail::inval(format!(
                "{what}: set fields this library version does not know (size {size}, known {ours})"
            )));
        }
    }
    // SAFETY: copies min(size, ours) bytes from the caller's struct into ours. Every field
    // of T is an integer, a bool holding a valid value, or a raw pointer, all valid when
    // zero, and the caller's bytes come from the same C struct definition.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            out.as_mut_ptr().cast::<u8>(),
            size.min(ours),
        );
        Ok(out.assume_init())
    }
}

fn open_impl(
    path: *const c_char,
    opts: &qcow2rs_open_options,
    out: *mut *mut qcow2rs_image,
    call: &str,
) -> Result<c_int, Fail> {
    if out.is_null() {
        return Err(Fail::fault("out"));
    }
    // SAFETY: `out` is a valid place for a pointer (header contract). NULL until success.
    unsafe { *out = std::ptr::null_mut() };
    let path = path_arg(path, "path")?;
    if opts.flags & !OPEN_FLAGS != 0 {
        return Err(Fail::inval(format!(
            "{call}: unknown flags 0x{:x}",
            opts.flags & !OPEN_FLAGS
        )));
    }
    if runtime::in_library_context() {
        return Err(Fail::deadlock(call));
    }
    let flags = opts.flags;
    if flags & QCOW2RS_OPEN_WRITETHROUGH != 0 && flags & QCOW2RS_OPEN_NO_FLUSH != 0 {
        return Err(Fail::inval(format!(
            "{call}: QCOW2RS_OPEN_WRITETHROUGH and QCOW2RS_OPEN_NO_FLUSH exclude each other"
        )));
    }
    let mut oo = OpenOptions::default();
    oo.writable = flags & QCOW2RS_OPEN_RDWR != 0;
    oo.direct = flags & QCOW2RS_OPEN_DIRECT != 0;
    oo.write_through = flags & QCOW2RS_OPEN_WRITETHROUGH != 0;
    oo.no_flush = flags & QCOW2RS_OPEN_NO_FLUSH != 0;
    oo.no_backing = flags & QCOW2RS_OPEN_NO_BACKING != 0;
    oo.no_external_files = flags & QCOW2RS_OPEN_UNTRUSTED != 0;
    oo.engine = engine_arg(opts.engine)?;
    if opts.cache_size != 0 {
        oo.cache_size =
            usize::try_from(opts.cache_size).map_err(|_| Fail::inval("cache_size is too large"))?;
    }
    if opts.max_chain != 0 {
        oo.max_chain = opts.max_chain as usize;
    }
    if let Some(b) = opt_str(opts.backing_file) {
        oo.backing_file = Some(PathBuf::from(std::ffi::OsStr::from_bytes(b.to_bytes())));
        oo.backing_format = format_arg(opts.backing_format, "backing_format")?;
    } else if !opts.backing_format.is_null() {
        return Err(Fail::inval("backing_format is set without backing_file"));
    }
    if let Some(d) = opt_str(opts.data_file) {
        oo.data_file = Some(PathBuf::from(std::ffi::OsStr::from_bytes(d.to_bytes())));
    }
    let shared = std::sync::Arc::new(Shared::new(flags & QCOW2RS_OPEN_POLL != 0)?);
    let rt = runtime::acquire().map_err(|e| {
        Fail::new(
            e.raw_os_error().unwrap_or(libc::EAGAIN),
            format!("cannot start the library threads: {e}"),
        )
    })?;
    // On error, `rt` is dropped here, which stops the runtime if nothing else uses it.
    let img = runtime::block_on(rt.handle(), Image::open(&path, &oo))?;
    let h = img.header();
    if oo.writable && oo.no_backing && h.backing_file.is_some() {
        drop(img);
        return Err(Fail::inval(format!(
            "{}: QCOW2RS_OPEN_NO_BACKING with QCOW2RS_OPEN_RDWR on an image with a backing file \
             (writes would copy zeros instead of the backing data)",
            path.display()
        )));
    }
    let c = |s: Option<&str>| s.map(crate::error::cstring);
    let cp =
        |p: Option<&std::path::Path>| p.map(|p| crate::error::cstring(p.as_os_str().as_bytes()));
    let handle = Box::new(qcow2rs_image {
        size: std::sync::atomic::AtomicU64::new(img.size()),
        writable: oo.writable,
        backing_file: c(h.backing_file.as_deref()),
        backing_path: cp(img.backing().map(|b| b.path())),
        backing_format: c(h.backing_format.as_deref()),
        data_file: c(h.data_file.as_deref()),
        data_path: cp(img.data_file_path()),
        img,
        shared,
        rt,
    });
    // SAFETY: checked non-NULL above.
    unsafe { *out = Box::into_raw(handle) };
    Ok(0)
}

/// Open the qcow2 image at `path` (its backing chain and external data file too) and store a
/// new handle in `*out` (NULL on failure). `flags`: `QCOW2RS_OPEN_RDONLY` (0) or any of the
/// other `QCOW2RS_OPEN_*` flags. Blocking. The first open image starts the library's threads.
///
/// Returns 0, or: `-EFAULT` (`path` or `out` NULL), `-EINVAL` (unknown flags, not a qcow2
/// image, a file named inside the image refused by `QCOW2RS_OPEN_UNTRUSTED`, `O_DIRECT`
/// refused by the file system, bad header fields), `-ENOENT` (the image, its backing file or
/// its data file does not exist), `-EACCES` (permission denied), `-ENOTSUP` (an unsupported
/// feature, e.g. encryption; the message names it), `-EUCLEAN` (corrupt metadata), `-EBADF`
/// (`QCOW2RS_OPEN_RDWR` on an image marked corrupt), `-ELOOP` (backing chain loop or too
/// long), `-EFBIG` (a table too large), `-EDEADLK` (called from a callback or a library
/// thread), `-EIO` and other I/O errnos.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_open(
    path: *const c_char,
    flags: u32,
    out: *mut *mut qcow2rs_image,
) -> c_int {
    ffi("qcow2rs_open", || {
        let opts = qcow2rs_open_options {
            size: std::mem::size_of::<qcow2rs_open_options>(),
            flags,
            engine: QCOW2RS_ENGINE_AUTO,
            cache_size: 0,
            backing_file: std::ptr::null(),
            backing_format: std::ptr::null(),
            data_file: std::ptr::null(),
            max_chain: 0,
        };
        open_impl(path, &opts, out, "qcow2rs_open")
    })
}

/// `qcow2rs_open` with options (`opts` NULL: the defaults, read-only). Errors as
/// `qcow2rs_open`, plus `-EINVAL` for an unknown engine, a `size` field smaller than
/// `sizeof(size_t)`, non-zero fields this library version does not know, or
/// `backing_format` without `backing_file`; `-ENOTSUP` for a `backing_format` other than
/// `"qcow2"` and `"raw"`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_open_ext(
    path: *const c_char,
    opts: *const qcow2rs_open_options,
    out: *mut *mut qcow2rs_image,
) -> c_int {
    ffi("qcow2rs_open_ext", || {
        let opts = if opts.is_null() {
            qcow2rs_open_options {
                size: std::mem::size_of::<qcow2rs_open_options>(),
                flags: 0,
                engine: 0,
                cache_size: 0,
                backing_file: std::ptr::null(),
                backing_format: std::ptr::null(),
                data_file: std::ptr::null(),
                max_chain: 0,
            }
        } else {
            // SAFETY: `opts` points to a struct qcow2rs_open_options of `opts->size` bytes.
            unsafe { read_sized(opts, "struct qcow2rs_open_options")? }
        };
        open_impl(path, &opts, out, "qcow2rs_open_ext")
    })
}

/// Close an image: wait until no request is in flight (their callbacks run first; for an
/// image in event-loop mode they run here, on the calling thread), flush a writable image,
/// and free the handle and everything it owns (the eventfd included). The last close stops
/// the library's threads. `img` NULL: does nothing and returns 0. Blocking.
///
/// Returns 0, or the negative errno of the final flush (`-EIO`, `-ENOSPC`, ...; the handle
/// is freed all the same). Not freed, and unusable: `-EDEADLK` (called from a callback or a
/// library thread: close it from another thread) and `-ECHILD` (in a child process after
/// fork(): the parent's threads do not exist there; the memory is left as it is).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_close(img: *mut qcow2rs_image) -> c_int {
    ffi("qcow2rs_close", || {
        if img.is_null() {
            return Ok(0);
        }
        // SAFETY: a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_close")? };
        if runtime::in_library_context() {
            return Err(Fail::deadlock("qcow2rs_close"));
        }
        h.shared.drain();
        let res = h.block_on("qcow2rs_close", h.img.clone().close());
        // SAFETY: the handle came from Box::into_raw in open_impl; no request is in flight
        // and the caller does not use it any more (header contract).
        drop(unsafe { Box::from_raw(img) });
        res.map(|()| 0)
    })
}

/// Size of the virtual disk in bytes (0 when `img` is NULL). Never fails, also in a child
/// after fork().
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_get_size(img: *const qcow2rs_image) -> u64 {
    if img.is_null() {
        return 0;
    }
    // SAFETY: a live handle (header contract); only reads a plain field.
    unsafe { (*img).size.load(std::sync::atomic::Ordering::Relaxed) }
}

/// Fill `*info` (whose `size` field the caller set) with facts about the image; fields
/// beyond what this library version knows are left as they are. Returns 0, or
/// `-EFAULT` (`img` or `info` NULL), `-EINVAL` (`info->size` smaller than `sizeof(size_t)`),
/// `-ECHILD`. Does no I/O.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_get_info(
    img: *const qcow2rs_image,
    info: *mut qcow2rs_info,
) -> c_int {
    ffi("qcow2rs_get_info", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_get_info")? };
        if info.is_null() {
            return Err(Fail::fault("info"));
        }
        // SAFETY: `info` points to a struct whose first field is its size.
        let size = unsafe { std::ptr::read_unaligned(info.cast::<usize>()) };
        if size < std::mem::size_of::<usize>() {
            return Err(Fail::inval(format!(
                "struct qcow2rs_info: size {size} is too small (set it to sizeof the struct)"
            )));
        }
        let hd = h.img.header();
        let p = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: every field is an integer, a bool or a raw pointer: all-zero is valid
        // (and the padding bytes stay zero).
        let mut full: qcow2rs_info = unsafe { std::mem::zeroed() };
        full.size = size;
        full.virtual_size = h.size.load(std::sync::atomic::Ordering::Relaxed);
        full.cluster_size = hd.cluster_size();
        full.version = hd.version;
        full.refcount_bits = hd.refcount_bits();
        full.backing_file = p(&h.backing_file);
        full.backing_path = p(&h.backing_path);
        full.backing_format = p(&h.backing_format);
        full.data_file = p(&h.data_file);
        full.data_path = p(&h.data_path);
        full.dirty = hd.dirty();
        full.corrupt = hd.corrupt();
        full.read_only = !h.writable;
        full.extended_l2 = hd.extended_l2();
        let n = size.min(std::mem::size_of::<qcow2rs_info>());
        // SAFETY: the caller's struct has `size` writable bytes; we write the first
        // min(size, ours) bytes of ours.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&full as *const qcow2rs_info).cast::<u8>(),
                info.cast::<u8>(),
                n,
            )
        };
        Ok(0)
    })
}

/// Copy `s` into memory from `malloc`, which the caller frees with `qcow2rs_free`.
pub(crate) fn malloc_string(s: &str) -> Result<*mut c_char, Fail> {
    let c = crate::error::cstring(s);
    let bytes = c.as_bytes_with_nul();
    // SAFETY: malloc of a non-zero size; the result is checked.
    let p = unsafe { libc::malloc(bytes.len()) }.cast::<c_char>();
    if p.is_null() {
        return Err(Fail::new(libc::ENOMEM, "out of memory"));
    }
    // SAFETY: `p` has room for `bytes.len()` bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), p, bytes.len()) };
    Ok(p)
}

/// The two out-parameters of a call that hands the caller a C array: `*list` and `*count`.
/// What a failure leaves in them is NULL and 0.
pub(crate) struct OutList<T> {
    list: *mut *mut T,
    count: *mut usize,
}

impl<T> OutList<T> {
    /// Checks that neither pointer is NULL (`-EFAULT` naming it) and stores NULL and 0, so
    /// every later failure leaves them so.
    ///
    /// # Safety
    /// Each pointer is NULL or valid for a write (header contract).
    pub(crate) unsafe fn new(list: *mut *mut T, count: *mut usize) -> Result<Self, Fail> {
        if list.is_null() {
            return Err(Fail::fault("list"));
        }
        if count.is_null() {
            return Err(Fail::fault("count"));
        }
        // SAFETY: both are valid places (checked non-NULL; the caller's contract).
        unsafe {
            *list = std::ptr::null_mut();
            *count = 0;
        }
        Ok(Self { list, count })
    }

    /// Hands the caller an array from `calloc` with one entry per item, made by `entry`
    /// (nothing is allocated for no items: NULL and 0). When `entry` fails, `free` gets the
    /// array with the entries made so far, the others all-zero, and must free it all.
    pub(crate) fn fill<S>(
        self,
        items: &[S],
        mut entry: impl FnMut(&S) -> Result<T, Fail>,
        free: impl FnOnce(*mut T, usize),
    ) -> Result<c_int, Fail> {
        let n = items.len();
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: calloc of n entries; the result is checked.
        let arr = unsafe { libc::calloc(n, std::mem::size_of::<T>()) }.cast::<T>();
        if arr.is_null() {
            return Err(Fail::new(libc::ENOMEM, "out of memory"));
        }
        for (i, item) in items.iter().enumerate() {
            match entry(item) {
                // SAFETY: `arr` has `n` entries and i < n.
                Ok(e) => unsafe { arr.add(i).write(e) },
                Err(e) => {
                    free(arr, n);
                    return Err(e);
                }
            }
        }
        // SAFETY: valid places (checked in `new`).
        unsafe {
            *self.list = arr;
            *self.count = n;
        }
        Ok(0)
    }
}

/// JSON as the CLI prints it (4-space indent, final newline).
pub(crate) fn pretty_json(v: &serde_json::Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)
        .expect("JSON serialization of a Value cannot fail");
    out.push(b'\n');
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// The image's `qcow2rs info --output=json` document (the keys of `qemu-img info`), as a
/// NUL-terminated string in `*json`, to be freed with `qcow2rs_free`. `flags`: 0 or
/// `QCOW2RS_INFO_BACKING_CHAIN`. Returns 0, or `-EFAULT` (`img` or `json` NULL), `-EINVAL`
/// (unknown flags), `-ECHILD`, `-ENOMEM`, an I/O errno. `*json` is NULL on failure.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_info_json(
    img: *mut qcow2rs_image,
    flags: u32,
    json: *mut *mut c_char,
) -> c_int {
    ffi("qcow2rs_info_json", || {
        if json.is_null() {
            return Err(Fail::fault("json"));
        }
        // SAFETY: `json` is a valid place for a pointer.
        unsafe { *json = std::ptr::null_mut() };
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_info_json")? };
        if flags & !QCOW2RS_INFO_BACKING_CHAIN != 0 {
            return Err(Fail::inval(format!(
                "qcow2rs_info_json: unknown flags 0x{:x}",
                flags & !QCOW2RS_INFO_BACKING_CHAIN
            )));
        }
        let disk = Disk::Qcow2(h.img.clone());
        let v = if flags & QCOW2RS_INFO_BACKING_CHAIN != 0 {
            serde_json::Value::Array(
                qcow2_core::info::chain(&disk)
                    .into_iter()
                    .map(qcow2_core::info::info_json)
                    .collect::<qcow2_core::Result<_>>()?,
            )
        } else {
            qcow2_core::info::info_json(&disk)?
        };
        let p = malloc_string(&pretty_json(&v))?;
        // SAFETY: as above.
        unsafe { *json = p };
        Ok(0)
    })
}

/// Free a string the library returned (`qcow2rs_info_json`, `qcow2rs_check`) or the array of
/// `qcow2rs_bitmap_extents`. NULL is allowed.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_free(p: *mut c_void) {
    // SAFETY: NULL or memory from malloc_string (header contract).
    unsafe { libc::free(p) }
}
