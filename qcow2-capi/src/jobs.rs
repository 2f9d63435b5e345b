//! Whole-image jobs: create, check, convert, dd, rebase, commit, amend, measure (the CLI's
//! semantics).

use crate::aio::SendPtr;
use crate::error::{ffi, Fail};
use crate::image::{
    engine_arg, malloc_string, opt_str, path_arg, pretty_json, read_sized, str_arg, utf8,
};
use crate::runtime::{self, CallbackScope};
use qcow2_core::check::{CheckOptions, Repair};
use qcow2_core::commit::{self, CommitOptions};
use qcow2_core::convert::{self, ConvertOptions, Target};
use qcow2_core::create::{self, CreateOptions, Preallocation};
use qcow2_core::disk::{Disk, Format};
use qcow2_core::format::header::CompressionType;
use qcow2_core::jobs::amend::{self, AmendOptions};
use qcow2_core::jobs::measure::{self, MeasureOptions};
use qcow2_core::rebase::{self, RebaseOptions};
use qcow2_core::{Image, OpenOptions};
use std::ffi::{c_char, c_int, c_void};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

/// Compression type zlib (the default).
pub const QCOW2RS_COMPRESSION_ZLIB: u32 = 0;
/// Compression type zstd (needs version 3).
pub const QCOW2RS_COMPRESSION_ZSTD: u32 = 1;

/// Preallocation: none (the default).
pub const QCOW2RS_PREALLOC_OFF: u32 = 0;
/// Preallocation: L2 tables and data cluster mappings; the file stays sparse.
pub const QCOW2RS_PREALLOC_METADATA: u32 = 1;
/// Preallocation: metadata, plus `fallocate` of the data.
pub const QCOW2RS_PREALLOC_FALLOC: u32 = 2;
/// Preallocation: metadata, plus zeros written to the data.
pub const QCOW2RS_PREALLOC_FULL: u32 = 3;

/// `qcow2rs_create_options.flags`: lazy refcounts (`lazy_refcounts=on`, version 3).
pub const QCOW2RS_CREATE_LAZY_REFCOUNTS: u32 = 1 << 0;
/// `qcow2rs_create_options.flags`: extended L2 entries (`extended_l2=on`, version 3,
/// clusters of at least 16 KiB).
pub const QCOW2RS_CREATE_EXTENDED_L2: u32 = 1 << 1;
/// `qcow2rs_create_options.flags`: keep the external data file a valid raw image
/// (`data_file_raw=on`).
pub const QCOW2RS_CREATE_DATA_FILE_RAW: u32 = 1 << 2;
/// `qcow2rs_create_options.flags`: do not open the backing file (`qemu-img create -u`); the
/// size must then be given.
pub const QCOW2RS_CREATE_UNSAFE_BACKING: u32 = 1 << 3;

const CREATE_FLAGS: u32 = QCOW2RS_CREATE_LAZY_REFCOUNTS
    | QCOW2RS_CREATE_EXTENDED_L2
    | QCOW2RS_CREATE_DATA_FILE_RAW
    | QCOW2RS_CREATE_UNSAFE_BACKING;

/// Options of `qcow2rs_create` (and of the qcow2 output of `qcow2rs_convert`): the `-o`
/// options of `qcow2rs create`. Zero-initialize it and set `size` to
/// `sizeof(struct qcow2rs_create_options)` (or use `QCOW2RS_CREATE_OPTIONS_INIT`); fields left
/// 0 or NULL take the defaults.
#[repr(C)]
pub struct qcow2rs_create_options {
    /// `sizeof(struct qcow2rs_create_options)` as the caller compiled it.
    pub size: usize,
    /// qcow2 version: 2 (compat=0.10) or 3 (compat=1.1); 0: 3.
    pub version: u32,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB; 0: 65536.
    pub cluster_size: u32,
    /// Refcount width in bits: a power of two up to 64; 0: 16.
    pub refcount_bits: u32,
    /// `QCOW2RS_COMPRESSION_*`.
    pub compression_type: u32,
    /// `QCOW2RS_PREALLOC_*`.
    pub preallocation: u32,
    /// `QCOW2RS_CREATE_*` flags.
    pub flags: u32,
    /// Backing file name, stored as given (relative names are relative to the new image's
    /// folder); NULL: none.
    pub backing_file: *const c_char,
    /// Backing file format stored in the image (`"qcow2"`, `"raw"`); NULL: probed at create
    /// time and not stored.
    pub backing_format: *const c_char,
    /// External data file name, stored as given; NULL: none.
    pub data_file: *const c_char,
}

fn create_options(opts: *const qcow2rs_create_options) -> Result<CreateOptions, Fail> {
    let mut co = CreateOptions::default();
    if opts.is_null() {
        return Ok(co);
    }
    // SAFETY: `opts` points to a struct qcow2rs_create_options of `opts->size` bytes.
    let o = unsafe { read_sized(opts, "struct qcow2rs_create_options")? };
    if o.flags & !CREATE_FLAGS != 0 {
        return Err(Fail::inval(format!(
            "struct qcow2rs_create_options: unknown flags 0x{:x}",
            o.flags & !CREATE_FLAGS
        )));
    }
    if o.version != 0 {
        co.version = o.version;
    }
    if o.cluster_size != 0 {
        co.cluster_size = o.cluster_size as u64;
    }
    if o.refcount_bits != 0 {
        co.refcount_bits = o.refcount_bits;
    }
    co.compression_type = match o.compression_type {
        QCOW2RS_COMPRESSION_ZLIB => CompressionType::Zlib,
        QCOW2RS_COMPRESSION_ZSTD => CompressionType::Zstd,
        t => return Err(Fail::inval(format!("unknown compression type {t}"))),
    };
    co.preallocation = match o.preallocation {
        QCOW2RS_PREALLOC_OFF => Preallocation::Off,
        QCOW2RS_PREALLOC_METADATA => Preallocation::Metadata,
        QCOW2RS_PREALLOC_FALLOC => Preallocation::Falloc,
        QCOW2RS_PREALLOC_FULL => Preallocation::Full,
        p => return Err(Fail::inval(format!("unknown preallocation mode {p}"))),
    };
    co.lazy_refcounts = o.flags & QCOW2RS_CREATE_LAZY_REFCOUNTS != 0;
    co.extended_l2 = o.flags & QCOW2RS_CREATE_EXTENDED_L2 != 0;
    co.data_file_raw = o.flags & QCOW2RS_CREATE_DATA_FILE_RAW != 0;
    co.unsafe_backing = o.flags & QCOW2RS_CREATE_UNSAFE_BACKING != 0;
    if let Some(b) = opt_str(o.backing_file) {
        co.backing_file = Some(utf8(b, "backing_file")?.to_string());
    }
    if let Some(f) = opt_str(o.backing_format) {
        co.backing_format = Some(utf8(f, "backing_format")?.to_string());
    }
    if let Some(d) = opt_str(o.data_file) {
        co.data_file = Some(utf8(d, "data_file")?.to_string());
    }
    Ok(co)
}

/// Run a job on the calling thread, with the library runtime up meanwhile.
fn run_job<T>(call: &str, fut: impl Future<Output = qcow2_core::Result<T>>) -> Result<T, Fail> {
    if runtime::in_library_context() {
        return Err(Fail::deadlock(call));
    }
    let rt = runtime::acquire().map_err(|e| {
        Fail::new(
            e.raw_os_error().unwrap_or(libc::EAGAIN),
            format!("cannot start the library threads: {e}"),
        )
    })?;
    let res = runtime::block_on(rt.handle(), fut);
    drop(rt);
    Ok(res?)
}

/// An error message that names `file` first.
fn named(file: &Path, e: qcow2_core::Error) -> qcow2_core::Error {
    let f = file.display().to_string();
    if e.message().starts_with(&f) {
        e
    } else {
        e.context(f)
    }
}

/// Create a qcow2 image at `path` (an existing file is replaced) with a virtual size of
/// `size` bytes, as `qcow2rs create -f qcow2 -o ... path size`. `opts` NULL: the defaults
/// (version 3, 64 KiB clusters, 16-bit refcounts, zlib, no preallocation). With a backing
/// file and `size` 0, the size is the backing file's. Blocking.
///
/// Returns 0, or: `-EFAULT` (`path` NULL), `-EINVAL` (bad or inconsistent options, unknown
/// flags, names that are not UTF-8), `-ENOTSUP`, `-ENOENT` (the backing file does not
/// exist), `-EACCES`, `-ENOSPC`, `-EDEADLK` (called from a callback or a library thread),
/// `-EIO`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_create(
    path: *const c_char,
    size: u64,
    opts: *const qcow2rs_create_options,
) -> c_int {
    ffi("qcow2rs_create", || {
        let path = path_arg(path, "path")?;
        let mut co = create_options(opts)?;
        co.size = if size == 0 && co.backing_file.is_some() {
            None
        } else {
            Some(size)
        };
        run_job("qcow2rs_create", async {
            create::create_qcow2(&path, &co)
                .await
                .map_err(|e| named(&path, e))
        })?;
        Ok(0)
    })
}

/// `qcow2rs_check` repair mode: report only.
pub const QCOW2RS_REPAIR_NONE: c_int = 0;
/// `qcow2rs_check` repair mode: repair leaked clusters (`-r leaks`).
pub const QCOW2RS_REPAIR_LEAKS: c_int = 1;
/// `qcow2rs_check` repair mode: repair leaks and corruptions (`-r all`).
pub const QCOW2RS_REPAIR_ALL: c_int = 2;

/// `qcow2rs_check` result: no problem found (qemu-img check's exit code 0).
pub const QCOW2RS_CHECK_CLEAN: c_int = 0;
/// `qcow2rs_check` result: the check could not complete (check errors; exit code 1).
pub const QCOW2RS_CHECK_ERRORS: c_int = 1;
/// `qcow2rs_check` result: corruptions remain (exit code 2).
pub const QCOW2RS_CHECK_CORRUPT: c_int = 2;
/// `qcow2rs_check` result: only leaked clusters remain (exit code 3).
pub const QCOW2RS_CHECK_LEAKS: c_int = 3;

/// Check the qcow2 image at `path` for consistency, as `qcow2rs check [-r leaks|all]` and
/// `qemu-img check`; with `repair` (`QCOW2RS_REPAIR_*`) also repair it (the image is opened
/// for writing; nobody else may use it meanwhile). Blocking.
///
/// If `report_json` is not NULL, `*report_json` receives the report (the JSON of
/// `qcow2rs check --output=json`: `corruptions`, `leaks`, `check-errors`, `image-end-offset`,
/// ...), to be freed with `qcow2rs_free`; NULL when the call fails.
///
/// Returns a `QCOW2RS_CHECK_*` value (>= 0: the check ran; qemu-img's exit codes), or a
/// negative errno when it could not run: `-EFAULT` (`path` NULL), `-EINVAL` (bad `repair`,
/// not a qcow2 image), `-ENOENT`, `-EACCES`, `-ENOTSUP`, `-EUCLEAN` (metadata too broken to
/// check: qemu-img's "Check failed"), `-EDEADLK`, `-EIO`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_check(
    path: *const c_char,
    repair: c_int,
    report_json: *mut *mut c_char,
) -> c_int {
    ffi("qcow2rs_check", || {
        if !report_json.is_null() {
            // SAFETY: a valid place for a pointer (header contract).
            unsafe { *report_json = std::ptr::null_mut() };
        }
        let path = path_arg(path, "path")?;
        let repair = match repair {
            QCOW2RS_REPAIR_NONE => None,
            QCOW2RS_REPAIR_LEAKS => Some(Repair::Leaks),
            QCOW2RS_REPAIR_ALL => Some(Repair::All),
            r => return Err(Fail::inval(format!("unknown repair mode {r}"))),
        };
        let mut oo = OpenOptions::default();
        oo.writable = repair.is_some();
        oo.for_repair = repair.is_some();
        let report = run_job("qcow2rs_check", async {
            let img = Image::open(&path, &oo).await?;
            let r = qcow2_core::check::check(&img, &CheckOptions { repair }).await;
            let closed = img.close().await;
            let r = r?;
            closed?;
            Ok(r)
        })?;
        if !report_json.is_null() {
            let s = malloc_string(&pretty_json(&report.to_json()))?;
            // SAFETY: as above.
            unsafe { *report_json = s };
        }
        Ok(report.exit_code())
    })
}

/// A progress callback: `fraction` goes from 0.0 to 1.0. Called on the thread that called
/// the job, never concurrently; blocking library calls return `-EDEADLK` inside it.
pub type qcow2rs_progress_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, fraction: f64)>;

/// `qcow2rs_convert_options.flags`: write compressed clusters (`-c`; qcow2 output only),
/// using every core.
pub const QCOW2RS_CONVERT_COMPRESS: u32 = 1 << 0;
/// `qcow2rs_convert_options.flags`: bypass the page cache for the output (`-t none`).
pub const QCOW2RS_CONVERT_DIRECT: u32 = 1 << 1;
/// `qcow2rs_convert_options.flags`: open no file named inside the source image (see
/// `QCOW2RS_OPEN_UNTRUSTED`).
pub const QCOW2RS_CONVERT_UNTRUSTED: u32 = 1 << 2;
/// `qcow2rs_convert_options.flags`: write into the existing `dst` (`-n`): it is opened in
/// the output format, not created, must be at least as large as the source and keeps its
/// size; what reads as zeros in the source is written as zeros.
pub const QCOW2RS_CONVERT_EXISTING: u32 = 1 << 3;
/// `qcow2rs_convert_options.flags`: with `QCOW2RS_CONVERT_EXISTING`, the target is known to
/// read as zeros, so zeros are not written (`--target-is-zero`).
pub const QCOW2RS_CONVERT_TARGET_IS_ZERO: u32 = 1 << 4;
/// `qcow2rs_convert_options.flags`: `sparse_size` is given (`-S`; without this flag the
/// default, 4 KiB, applies).
pub const QCOW2RS_CONVERT_SPARSE_SIZE: u32 = 1 << 5;

const CONVERT_FLAGS: u32 = QCOW2RS_CONVERT_COMPRESS
    | QCOW2RS_CONVERT_DIRECT
    | QCOW2RS_CONVERT_UNTRUSTED
    | QCOW2RS_CONVERT_EXISTING
    | QCOW2RS_CONVERT_TARGET_IS_ZERO
    | QCOW2RS_CONVERT_SPARSE_SIZE;

/// Options of `qcow2rs_convert`. Zero-initialize it and set `size` to
/// `sizeof(struct qcow2rs_convert_options)` (or use `QCOW2RS_CONVERT_OPTIONS_INIT`); fields
/// left 0 or NULL take the defaults.
#[repr(C)]
pub struct qcow2rs_convert_options {
    /// `sizeof(struct qcow2rs_convert_options)` as the caller compiled it.
    pub size: usize,
    /// `QCOW2RS_CONVERT_*` flags.
    pub flags: u32,
    /// Requests in flight (`-m`, 1 to 64; 0: 8).
    pub parallel: u32,
    /// Source format, `"qcow2"` or `"raw"` (`-f`; NULL: probed).
    pub src_format: *const c_char,
    /// Output format, `"qcow2"` or `"raw"` (`-O`; NULL: `"raw"`, as qemu-img).
    pub dst_format: *const c_char,
    /// Creation options of a qcow2 output (`-o`, `-B`, `-F`); NULL: the defaults. Its `size`
    /// field aside, the virtual size is the source's.
    pub create: *const qcow2rs_create_options,
    /// Called as the copy progresses (`-p`); NULL: not called.
    pub progress: qcow2rs_progress_fn,
    /// Passed to `progress`.
    pub progress_data: *mut c_void,
    /// `QCOW2RS_ENGINE_*` for every file (0: auto).
    pub engine: u32,
    /// With `QCOW2RS_CONVERT_SPARSE_SIZE` (`-S`): the shortest run of zeros left unallocated
    /// in the target, a multiple of 512 up to 16 MiB; 0 allocates the whole target.
    pub sparse_size: u64,
}

/// Copy the disk at `src` into a new image at `dst` (replaced if it exists), as
/// `qcow2rs convert [-f FMT] [-O FMT] [-c] [-o ...] [-B ...] [-m N] [-t none] [-S SIZE]
/// [-n [--target-is-zero]] src dst`: zeros are detected and left unallocated, and with a
/// backing file in `opts->create` only what differs from it is written; with
/// `QCOW2RS_CONVERT_EXISTING` `dst` is written into, not created. `opts` NULL: raw output,
/// defaults. Blocking; progress is reported through `opts->progress`.
///
/// Returns 0, or: `-EFAULT` (`src` or `dst` NULL), `-EINVAL` (bad options, unknown flags,
/// compression with raw output, a backing file with raw output, a bad `sparse_size`,
/// `QCOW2RS_CONVERT_TARGET_IS_ZERO` without `QCOW2RS_CONVERT_EXISTING`, an existing target
/// smaller than the source), `-ENOTSUP` (a format other
/// than `"qcow2"` and `"raw"`, an unsupported feature of the source), `-ENOENT`, `-EACCES`,
/// `-EUCLEAN` (corrupt source), `-ENOSPC`, `-EDEADLK`, `-EIO`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_convert(
    src: *const c_char,
    dst: *const c_char,
    opts: *const qcow2rs_convert_options,
) -> c_int {
    ffi("qcow2rs_convert", || {
        let src = path_arg(src, "src")?;
        let dst = path_arg(dst, "dst")?;
        let o = if opts.is_null() {
            // SAFETY: every field is an integer, a raw pointer or an Option of a function
            // pointer: all-zero is valid (NULL / None).
            unsafe { std::mem::zeroed::<qcow2rs_convert_options>() }
        } else {
            // SAFETY: `opts` points to a struct qcow2rs_convert_options of `opts->size`
            // bytes.
            unsafe { read_sized(opts, "struct qcow2rs_convert_options")? }
        };
        if o.flags & !CONVERT_FLAGS != 0 {
            return Err(Fail::inval(format!(
                "struct qcow2rs_convert_options: unknown flags 0x{:x}",
                o.flags & !CONVERT_FLAGS
            )));
        }
        let parallel = match o.parallel {
            0 => 8,
            n @ 1..=64 => n as usize,
            n => {
                return Err(Fail::inval(format!(
                    "invalid number of requests in flight {n} (1 to 64)"
                )))
            }
        };
        let engine = engine_arg(o.engine)?;
        let src_format = match opt_str(o.src_format) {
            Some(f) => Some(utf8(f, "src_format")?.to_string()),
            None => None,
        };
        let dst_format = match opt_str(o.dst_format) {
            Some(f) => Format::parse(utf8(f, "dst_format")?)?,
            None => Format::Raw,
        };
        let mut create = create_options(o.create)?;
        create.size = None;
        if create.backing_file.is_some() && dst_format != Format::Qcow2 {
            return Err(Fail::inval(
                "a backing file requires the qcow2 output format",
            ));
        }
        let compress = o.flags & QCOW2RS_CONVERT_COMPRESS != 0;
        let existing = o.flags & QCOW2RS_CONVERT_EXISTING != 0;
        let target_is_zero = o.flags & QCOW2RS_CONVERT_TARGET_IS_ZERO != 0;
        if target_is_zero && !existing {
            return Err(Fail::inval(
                "QCOW2RS_CONVERT_TARGET_IS_ZERO requires QCOW2RS_CONVERT_EXISTING",
            ));
        }
        let sparse_size = if o.flags & QCOW2RS_CONVERT_SPARSE_SIZE == 0 {
            convert::ZERO_GRANULE as u64
        } else if o.sparse_size.is_multiple_of(512) && o.sparse_size <= 16 << 20 {
            o.sparse_size
        } else {
            return Err(Fail::inval(format!(
                "invalid sparse_size {} (a multiple of 512 up to 16777216)",
                o.sparse_size
            )));
        };
        let mut co = ConvertOptions {
            parallel,
            sparse_size,
            existing,
            target_is_zero,
            ..Default::default()
        };
        if compress {
            co.parallel = co.parallel.max(
                4 * std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            );
        }
        co.file.engine = engine;
        co.file.direct = o.flags & QCOW2RS_CONVERT_DIRECT != 0;
        co.progress = progress_of(o.progress, o.progress_data);
        let mut oo = OpenOptions::default();
        oo.engine = engine;
        oo.no_external_files = o.flags & QCOW2RS_CONVERT_UNTRUSTED != 0;
        let target = Target {
            format: dst_format,
            create,
            compress,
        };
        run_job("qcow2rs_convert", async {
            let disk: Disk = convert::open_disk(&src, src_format.as_deref(), &oo)
                .await
                .map_err(|e| named(&src, e))?;
            convert::convert(&disk, &dst, &target, &co)
                .await
                .map_err(|e| named(&dst, e))
        })?;
        Ok(0)
    })
}

/// `qcow2rs_dd_options.flags`: `count` is given (`count=`; without this flag the copy goes
/// to the end of the source).
pub const QCOW2RS_DD_COUNT: u32 = 1 << 0;
/// `qcow2rs_dd_options.flags`: open no file named inside the source image (see
/// `QCOW2RS_OPEN_UNTRUSTED`).
pub const QCOW2RS_DD_UNTRUSTED: u32 = 1 << 1;

const DD_FLAGS: u32 = QCOW2RS_DD_COUNT | QCOW2RS_DD_UNTRUSTED;

/// Options of `qcow2rs_dd`. Zero-initialize it and set `size` to
/// `sizeof(struct qcow2rs_dd_options)` (or use `QCOW2RS_DD_OPTIONS_INIT`); fields left 0 or
/// NULL take the defaults.
#[repr(C)]
pub struct qcow2rs_dd_options {
    /// `sizeof(struct qcow2rs_dd_options)` as the caller compiled it.
    pub size: usize,
    /// `QCOW2RS_DD_*` flags.
    pub flags: u32,
    /// `QCOW2RS_ENGINE_*` for every file (0: auto).
    pub engine: u32,
    /// Block size in bytes (`bs=`, 1 to 2147483647; 0: 512).
    pub bs: u64,
    /// With `QCOW2RS_DD_COUNT`: the number of blocks of input to stop at (`count=`).
    pub count: u64,
    /// Blocks of input to skip (`skip=`).
    pub skip: u64,
    /// Source format, `"qcow2"` or `"raw"` (`-f`; NULL: probed).
    pub src_format: *const c_char,
    /// Output format, `"qcow2"` or `"raw"` (`-O`; NULL: `"raw"`, as qemu-img).
    pub dst_format: *const c_char,
}

/// Copy part of the disk at `src` into a new image at `dst` (replaced if it exists), as
/// `qemu-img dd [-f FMT] [-O FMT] bs=BS count=COUNT skip=SKIP if=src of=dst`: from byte
/// `skip * bs` of the source up to byte `count * bs` (its end without `QCOW2RS_DD_COUNT`;
/// as qemu-img, `count` bounds the end, not the length, when `skip` is given too). The output
/// is fully allocated, its size that length rounded up to 512 bytes. `opts` NULL: the whole
/// disk in 512-byte blocks, raw output. Blocking.
///
/// Returns 0; or 1 when `skip` lies past the end of that range: an empty output was created
/// (qemu-img then prints "dd: cannot skip to specified offset" and succeeds); or `-EFAULT`
/// (`src` or `dst` NULL), `-EINVAL` (`bs` above 2147483647, unknown flags, `dst` is a file
/// the source reads), `-ENOTSUP` (a format other than `"qcow2"` and `"raw"`, an unsupported
/// feature of the source), `-ENOENT`, `-EACCES`, `-EUCLEAN` (corrupt source), `-ENOSPC`,
/// `-EDEADLK`, `-EIO`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_dd(
    src: *const c_char,
    dst: *const c_char,
    opts: *const qcow2rs_dd_options,
) -> c_int {
    ffi("qcow2rs_dd", || {
        let src = path_arg(src, "src")?;
        let dst = path_arg(dst, "dst")?;
        let o = if opts.is_null() {
            // SAFETY: every field is an integer or a raw pointer: all-zero is valid (NULL).
            unsafe { std::mem::zeroed::<qcow2rs_dd_options>() }
        } else {
            // SAFETY: `opts` points to a struct qcow2rs_dd_options of `opts->size` bytes.
            unsafe { read_sized(opts, "struct qcow2rs_dd_options")? }
        };
        known_flags(o.flags, DD_FLAGS, "struct qcow2rs_dd_options")?;
        let engine = engine_arg(o.engine)?;
        let src_format = match opt_str(o.src_format) {
            Some(f) => Some(utf8(f, "src_format")?.to_string()),
            None => None,
        };
        let format = match opt_str(o.dst_format) {
            Some(f) => Format::parse(utf8(f, "dst_format")?)?,
            None => Format::Raw,
        };
        let mut dd = qcow2_core::dd::DdOptions {
            bs: if o.bs == 0 { 512 } else { o.bs },
            count: (o.flags & QCOW2RS_DD_COUNT != 0).then_some(o.count),
            skip: o.skip,
            format,
            ..Default::default()
        };
        dd.file.engine = engine;
        let mut oo = OpenOptions::default();
        oo.engine = engine;
        oo.no_external_files = o.flags & QCOW2RS_DD_UNTRUSTED != 0;
        let outcome = run_job("qcow2rs_dd", async {
            let disk: Disk = convert::open_disk(&src, src_format.as_deref(), &oo)
                .await
                .map_err(|e| named(&src, e))?;
            qcow2_core::dd::dd(&disk, &dst, &dd)
                .await
                .map_err(|e| named(&dst, e))
        })?;
        Ok(match outcome {
            qcow2_core::dd::DdOutcome::Copied => 0,
            qcow2_core::dd::DdOutcome::SkipPastEnd => 1,
        })
    })
}

/// The progress callback of a job as the core takes it: serialized, and marked as a
/// callback (blocking library calls return `-EDEADLK` inside it).
fn progress_of(cb: qcow2rs_progress_fn, data: *mut c_void) -> Option<qcow2_core::rebase::Progress> {
    let cb = cb?;
    let data = SendPtr(data);
    let serial = parking_lot::Mutex::new(());
    Some(Arc::new(move |f: f64| {
        let _serial = serial.lock();
        let _scope = CallbackScope::enter();
        let data = data;
        // SAFETY: the caller's progress function with its own data pointer, which stays
        // valid for the duration of the job (header contract).
        unsafe { cb(data.0, f) };
    }))
}

/// Reject flag bits this library does not know.
fn known_flags(flags: u32, known: u32, what: &str) -> Result<(), Fail> {
    if flags & !known != 0 {
        return Err(Fail::inval(format!(
            "{what}: unknown flags 0x{:x}",
            flags & !known
        )));
    }
    Ok(())
}

/// `qcow2rs_rebase_options.flags`: only write the new backing file name into the header
/// (`qemu-img rebase -u`): no data is compared or copied, so the guest sees different data
/// wherever the old and new backing chains differ.
pub const QCOW2RS_REBASE_UNSAFE: u32 = 1 << 0;
/// `qcow2rs_rebase_options.flags`: bypass the page cache for the image (`-t none`).
pub const QCOW2RS_REBASE_DIRECT: u32 = 1 << 1;

const REBASE_FLAGS: u32 = QCOW2RS_REBASE_UNSAFE | QCOW2RS_REBASE_DIRECT;

/// Options of `qcow2rs_rebase` (`qemu-img rebase`'s options). Zero-initialize it and set
/// `size` to `sizeof(struct qcow2rs_rebase_options)` (or use `QCOW2RS_REBASE_OPTIONS_INIT`).
#[repr(C)]
pub struct qcow2rs_rebase_options {
    /// `sizeof(struct qcow2rs_rebase_options)` as the caller compiled it.
    pub size: usize,
    /// `QCOW2RS_REBASE_*` flags.
    pub flags: u32,
    /// `QCOW2RS_ENGINE_*` for every file (0: auto).
    pub engine: u32,
    /// The new backing file name (`-b`), stored in the header as given (a relative name is
    /// relative to the image's folder); NULL or `""`: none, the image becomes standalone
    /// (in safe mode, the old backing chain's data is copied into it first).
    pub backing_file: *const c_char,
    /// The new backing file's format (`-F`), `"qcow2"` or `"raw"`: required with a backing
    /// file (as qemu-img, the format is never probed here).
    pub backing_format: *const c_char,
    /// Called as the copy progresses (safe mode; `-p`); NULL: not called.
    pub progress: qcow2rs_progress_fn,
    /// Passed to `progress`.
    pub progress_data: *mut c_void,
}

/// Change the backing file of the qcow2 image at `path`, as `qemu-img rebase [-u] [-b
/// backing_file] [-F backing_format] path` (the image must not be in use meanwhile). In safe
/// mode (the default) the image is opened with its old backing chain and the new one, and
/// the old chain's data is written into the image wherever the image does not decide the
/// content itself and the two chains differ, so the guest sees the same disk afterwards;
/// then the header is switched. With `QCOW2RS_REBASE_UNSAFE` only the header changes.
/// Blocking; progress through `opts->progress`.
///
/// Returns 0, or: `-EFAULT` (`path` or `opts` NULL), `-EINVAL` (bad `size` or unknown flags
/// in `opts`, a backing file without `backing_format`, a name that is not UTF-8 or does not
/// fit in the header, the image itself as its new backing file or in the new chain),
/// `-ENOTSUP` (a raw image or a file that is not a qcow2 image, a format other than qcow2
/// and raw, an unsupported feature), `-ENOENT` (the image or the new backing file does not exist), `-EACCES`,
/// `-EAGAIN` (the image is locked by another process), `-EUCLEAN` (corrupt metadata),
/// `-ENOSPC`, `-EDEADLK` (called from a callback or a library thread), `-EIO`. A failure
/// before the header switch leaves the header unchanged (data copied into the image by safe
/// mode then reads the same as before).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_rebase(
    path: *const c_char,
    opts: *const qcow2rs_rebase_options,
) -> c_int {
    ffi("qcow2rs_rebase", || {
        let path = path_arg(path, "path")?;
        if opts.is_null() {
            return Err(Fail::fault("opts"));
        }
        // SAFETY: `opts` points to a struct qcow2rs_rebase_options of `opts->size` bytes.
        let o = unsafe { read_sized(opts, "struct qcow2rs_rebase_options")? };
        known_flags(o.flags, REBASE_FLAGS, "struct qcow2rs_rebase_options")?;
        let engine = engine_arg(o.engine)?;
        let backing = match opt_str(o.backing_file) {
            Some(b) => utf8(b, "backing_file")?.to_string(),
            None => String::new(),
        };
        let backing_format = match opt_str(o.backing_format) {
            Some(f) => Some(Format::parse(utf8(f, "backing_format")?)?),
            None => None,
        };
        let unsafe_mode = o.flags & QCOW2RS_REBASE_UNSAFE != 0;
        let ro = RebaseOptions {
            backing,
            backing_format,
            unsafe_mode,
            open: {
                let mut oo = OpenOptions::default();
                oo.engine = engine;
                oo.direct = o.flags & QCOW2RS_REBASE_DIRECT != 0;
                oo
            },
            progress: if unsafe_mode {
                None
            } else {
                progress_of(o.progress, o.progress_data)
            },
        };
        run_job("qcow2rs_rebase", rebase::rebase(&path, &ro))?;
        Ok(0)
    })
}

/// `qcow2rs_commit_options.flags`: keep the image's content after the commit (`-d`);
/// without it (and without `base`) the image is emptied: it then reads through to its
/// backing file, which holds the same data.
pub const QCOW2RS_COMMIT_DROP: u32 = 1 << 0;
/// `qcow2rs_commit_options.flags`: bypass the page cache (`-t none`).
pub const QCOW2RS_COMMIT_DIRECT: u32 = 1 << 1;

const COMMIT_FLAGS: u32 = QCOW2RS_COMMIT_DROP | QCOW2RS_COMMIT_DIRECT;

/// Options of `qcow2rs_commit` (`qemu-img commit`'s options). Zero-initialize it and set
/// `size` to `sizeof(struct qcow2rs_commit_options)` (or use `QCOW2RS_COMMIT_OPTIONS_INIT`);
/// fields left 0 or NULL take the defaults.
#[repr(C)]
pub struct qcow2rs_commit_options {
    /// `sizeof(struct qcow2rs_commit_options)` as the caller compiled it.
    pub size: usize,
    /// `QCOW2RS_COMMIT_*` flags.
    pub flags: u32,
    /// `QCOW2RS_ENGINE_*` for every file (0: auto).
    pub engine: u32,
    /// The image of the backing chain to commit into (`-b`), by the name the layer above
    /// stores or by a path to the same file; NULL: the image's backing file. Naming a base
    /// implies `QCOW2RS_COMMIT_DROP`, as in qemu-img.
    pub base: *const c_char,
    /// Called as the copy progresses (`-p`); NULL: not called.
    pub progress: qcow2rs_progress_fn,
    /// Passed to `progress`.
    pub progress_data: *mut c_void,
}

/// Write the data of the qcow2 image at `path` into its backing file (or into `opts->base`
/// further down the chain), as `qemu-img commit [-d] [-b base] path`: every run that the
/// image (and the layers above the base) decides is written into the base, which grows if
/// it is shorter, and is flushed. Then, unless `QCOW2RS_COMMIT_DROP` or a base is given, the
/// image is emptied. Nothing else may use the chain meanwhile. Blocking; progress through
/// `opts->progress`. `opts` NULL: the defaults.
///
/// Returns 0, or: `-EFAULT` (`path` NULL), `-EINVAL` (bad `size` or unknown flags in `opts`,
/// the image has no backing file, a raw image, names that are not UTF-8), `-ENOENT` (the
/// image does not exist, `base` is not in its backing chain), `-ENOTSUP`, `-EACCES`,
/// `-EAGAIN` (an image of the chain is locked by another process), `-EBADF` (the base cannot
/// be written), `-EUCLEAN` (corrupt metadata), `-ENOSPC`, `-EDEADLK`, `-EIO`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_commit(
    path: *const c_char,
    opts: *const qcow2rs_commit_options,
) -> c_int {
    ffi("qcow2rs_commit", || {
        let path = path_arg(path, "path")?;
        let o = if opts.is_null() {
            // SAFETY: every field is an integer, a raw pointer or an Option of a function
            // pointer: all-zero is valid (NULL / None).
            unsafe { std::mem::zeroed::<qcow2rs_commit_options>() }
        } else {
            // SAFETY: `opts` points to a struct qcow2rs_commit_options of `opts->size` bytes.
            unsafe { read_sized(opts, "struct qcow2rs_commit_options")? }
        };
        known_flags(o.flags, COMMIT_FLAGS, "struct qcow2rs_commit_options")?;
        let engine = engine_arg(o.engine)?;
        let base = match opt_str(o.base) {
            Some(b) => Some(utf8(b, "base")?.to_string()),
            None => None,
        };
        let co = CommitOptions {
            base,
            drop: o.flags & QCOW2RS_COMMIT_DROP != 0,
            open: {
                let mut oo = OpenOptions::default();
                oo.engine = engine;
                oo.direct = o.flags & QCOW2RS_COMMIT_DIRECT != 0;
                oo
            },
            progress: progress_of(o.progress, o.progress_data),
        };
        run_job("qcow2rs_commit", commit::commit(&path, &co))?;
        Ok(0)
    })
}

/// `qcow2rs_amend` flag: bypass the page cache (`-t none`).
pub const QCOW2RS_AMEND_DIRECT: u32 = 1 << 0;

/// Change options of the existing qcow2 image at `path`, as `qemu-img amend -o options
/// path`. `options` is the `-o` string: `key=value` pairs separated by commas (a comma in a
/// value is written twice), e.g. `"compat=0.10"`, `"compat=1.1,lazy_refcounts=on"`,
/// `"refcount_bits=64"`, `"size=20G"`. Keys: `compat` (`0.10` or `1.1`), `lazy_refcounts`,
/// `refcount_bits`, `data_file_raw` (`off`, or `on` where it already is), `data_file` (images
/// with an external data file), `size`, and `backing_file`/`backing_fmt` (only unchanged:
/// use `qcow2rs_rebase`). Every option is checked before anything is written: a refused
/// amend leaves the file as it was. The image must not be in use. `flags`: 0 or
/// `QCOW2RS_AMEND_DIRECT`. Blocking.
///
/// Returns 0, or: `-EFAULT` (`path` or `options` NULL), `-EINVAL` (unknown flags, an empty
/// or malformed `options`, an unknown key or a bad value, a change qemu-img refuses such as
/// a backing file change or lazy refcounts with compat=0.10), `-ENOTSUP` (a raw image or a
/// file that is not a qcow2 image, a creation-only key such as `cluster_size`, a downgrade to compat=0.10 that
/// the image prevents: refcounts other than 16 bits, a data file, internal snapshots, ...;
/// an unsupported feature), `-ENOENT`, `-EACCES`, `-EAGAIN` (locked by another process), `-EUCLEAN`
/// (corrupt metadata), `-ENOSPC`, `-EDEADLK`, `-EIO`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_amend(
    path: *const c_char,
    options: *const c_char,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_amend", || {
        let path = path_arg(path, "path")?;
        let options = utf8(str_arg(options, "options")?, "options")?;
        known_flags(flags, QCOW2RS_AMEND_DIRECT, "qcow2rs_amend")?;
        if options.is_empty() {
            return Err(Fail::inval("qcow2rs_amend: no options given"));
        }
        let mut ao = AmendOptions::default();
        for (k, v) in create::split_options(options)? {
            ao.set(&k, &v)?;
        }
        let mut oo = OpenOptions::default();
        oo.writable = true;
        oo.no_backing = true;
        oo.direct = flags & QCOW2RS_AMEND_DIRECT != 0;
        run_job("qcow2rs_amend", async {
            let disk = convert::open_disk(&path, None, &oo)
                .await
                .map_err(|e| named(&path, e))?;
            let Disk::Qcow2(img) = disk else {
                return Err(qcow2_core::Error::unsupported(
                    "Format driver 'raw' does not support option amendment",
                ));
            };
            amend::amend(img, &ao).await.map_err(|e| named(&path, e))
        })?;
        Ok(0)
    })
}

/// `qcow2rs_measure_options.flags`: open no file named inside the source image (see
/// `QCOW2RS_OPEN_UNTRUSTED`).
pub const QCOW2RS_MEASURE_UNTRUSTED: u32 = 1 << 0;

/// Options of `qcow2rs_measure` (`qemu-img measure`'s options). Zero-initialize it and set
/// `size` to `sizeof(struct qcow2rs_measure_options)` (or use
/// `QCOW2RS_MEASURE_OPTIONS_INIT`); fields left 0 or NULL take the defaults.
#[repr(C)]
pub struct qcow2rs_measure_options {
    /// `sizeof(struct qcow2rs_measure_options)` as the caller compiled it.
    pub size: usize,
    /// `QCOW2RS_MEASURE_*` flags.
    pub flags: u32,
    /// The virtual size to measure when no source is given (`--size`; below 2^63). Must be
    /// 0 with a source.
    pub virtual_size: u64,
    /// The source's format, `"qcow2"` or `"raw"` (`-f`); NULL: probed.
    pub src_format: *const c_char,
    /// The new image's format, `"qcow2"` or `"raw"` (`-O`); NULL: `"raw"`, as qemu-img.
    pub dst_format: *const c_char,
    /// The new image's creation options (`-o`, as for `qemu-img create`: e.g.
    /// `"cluster_size=2M,compat=0.10"`, `"preallocation=full"`); NULL: the defaults.
    pub options: *const c_char,
}

/// What `qcow2rs_measure` found, in bytes (`qemu-img measure`'s figures). Set `size` to
/// `sizeof(struct qcow2rs_measurement)` (or use `QCOW2RS_MEASUREMENT_INIT`): the library
/// fills the fields that fit in it.
#[repr(C)]
pub struct qcow2rs_measurement {
    /// `sizeof(struct qcow2rs_measurement)` as the caller compiled it.
    pub size: usize,
    /// File size the new image needs as it would be written (`required`).
    pub required: u64,
    /// File size when every guest cluster is allocated (`fully-allocated`).
    pub fully_allocated: u64,
    /// Space for the source's persistent bitmaps (`bitmaps`); valid when `has_bitmaps`.
    pub bitmaps: u64,
    /// Whether `bitmaps` is given (a qcow2 v3 source and a qcow2 v3 output, as qemu-img).
    pub has_bitmaps: bool,
}

/// How large a new image would be, as `qemu-img measure [-f fmt] [-O fmt] [-o options]
/// (--size N | path)`: for a copy of the disk at `path` (opened read-only), or, with `path`
/// NULL, for an empty image of `opts->virtual_size` bytes.
/// `opts` NULL: raw output, defaults. Blocking.
///
/// `out` (may be NULL) receives the figures: set `out->size` first. If `json_out` is not
/// NULL, `*json_out` receives qemu-img's JSON (`required`, `fully-allocated`, and `bitmaps`
/// when present), to be freed with `qcow2rs_free`; NULL when the call fails.
///
/// Returns 0, or: `-EFAULT`, `-EINVAL` (bad `size` or unknown flags in `opts`, `out->size`
/// too small, a virtual size with a source or one of 2^63 or more, an unknown option key or a
/// bad or inconsistent value such as a cluster size that is not a power of two, names that
/// are not UTF-8), `-ENOTSUP` (a format other than `"qcow2"` and `"raw"`, LUKS encryption,
/// an unsupported feature of the source), `-ENOENT`, `-EACCES`, `-EAGAIN` (the source is
/// locked by a writer), `-EUCLEAN` (corrupt source), `-EDEADLK`, `-EIO`, `-ENOMEM`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_measure(
    path: *const c_char,
    opts: *const qcow2rs_measure_options,
    out: *mut qcow2rs_measurement,
    json_out: *mut *mut c_char,
) -> c_int {
    ffi("qcow2rs_measure", || {
        if !json_out.is_null() {
            // SAFETY: a valid place for a pointer (header contract).
            unsafe { *json_out = std::ptr::null_mut() };
        }
        let path = match opt_str(path) {
            Some(_) => Some(path_arg(path, "path")?),
            None => None,
        };
        let o = if opts.is_null() {
            // SAFETY: every field is an integer or a raw pointer: all-zero is valid.
            unsafe { std::mem::zeroed::<qcow2rs_measure_options>() }
        } else {
            // SAFETY: `opts` points to a struct qcow2rs_measure_options of `opts->size`
            // bytes.
            unsafe { read_sized(opts, "struct qcow2rs_measure_options")? }
        };
        known_flags(
            o.flags,
            QCOW2RS_MEASURE_UNTRUSTED,
            "struct qcow2rs_measure_options",
        )?;
        let out_size = if out.is_null() {
            0
        } else {
            // SAFETY: `out` points to a struct whose first field is its size.
            let s = unsafe { std::ptr::read_unaligned(out.cast::<usize>()) };
            if s < std::mem::size_of::<usize>() {
                return Err(Fail::inval(format!(
                    "struct qcow2rs_measurement: size {s} is too small (set it to sizeof the struct)"
                )));
            }
            s
        };
        if path.is_some() && o.virtual_size != 0 {
            return Err(Fail::inval(
                "qcow2rs_measure: a virtual size cannot be used together with a source",
            ));
        }
        if o.virtual_size > i64::MAX as u64 {
            return Err(Fail::inval(
                "Invalid image size specified. Must be between 0 and 9223372036854775807.",
            ));
        }
        let dst_format = match opt_str(o.dst_format) {
            Some(f) => Format::parse(utf8(f, "dst_format")?)?,
            None => Format::Raw,
        };
        let src_format = match opt_str(o.src_format) {
            Some(f) => Some(utf8(f, "src_format")?.to_string()),
            None => None,
        };
        let mut mo = MeasureOptions::new(dst_format);
        if let Some(s) = opt_str(o.options) {
            for (k, v) in create::split_options(utf8(s, "options")?)? {
                mo.set(&k, &v)?;
            }
        }
        if path.is_none() {
            mo.size = Some(o.virtual_size);
        }
        let mut oo = OpenOptions::default();
        oo.no_external_files = o.flags & QCOW2RS_MEASURE_UNTRUSTED != 0;
        let m = run_job("qcow2rs_measure", async {
            let disk = match &path {
                Some(p) => Some(
                    convert::open_disk(p, src_format.as_deref(), &oo)
                        .await
                        .map_err(|e| named(p, e))?,
                ),
                None => None,
            };
            measure::measure(disk.as_ref(), &mo).await
        })?;
        if !out.is_null() {
            // SAFETY: every field is an integer or a bool: all-zero is valid (and the
            // padding bytes stay zero).
            let mut full: qcow2rs_measurement = unsafe { std::mem::zeroed() };
            full.size = out_size;
            full.required = m.required;
            full.fully_allocated = m.fully_allocated;
            full.bitmaps = m.bitmaps.unwrap_or(0);
            full.has_bitmaps = m.bitmaps.is_some();
            let n = out_size.min(std::mem::size_of::<qcow2rs_measurement>());
            // SAFETY: the caller's struct has `out_size` writable bytes; we write the first
            // min(out_size, ours) bytes of ours.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (&full as *const qcow2rs_measurement).cast::<u8>(),
                    out.cast::<u8>(),
                    n,
                )
            };
        }
        if !json_out.is_null() {
            let s = malloc_string(&pretty_json(&m.to_json()))?;
            // SAFETY: as above.
            unsafe { *json_out = s };
        }
        Ok(0)
    })
}
