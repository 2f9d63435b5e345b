/*
 * qcow2rs.h: libqcow2rs, a library for qcow2 disk images.
 *
 * Compile and link:   cc prog.c $(pkg-config --cflags --libs qcow2rs)
 *             or:     cc -I/path/to/include prog.c -L/path/to/lib -lqcow2rs
 *
 * OVERVIEW
 *   qcow2rs_open() gives a handle (struct qcow2rs_image *) to an image and its backing chain.
 *   Read and write the guest disk with blocking calls (qcow2rs_read, qcow2rs_write, ...) or
 *   asynchronous ones (qcow2rs_aio_*) that report through a completion callback; make writes
 *   durable with qcow2rs_flush; free the handle with qcow2rs_close. Offsets and lengths are
 *   bytes of the virtual disk, with no alignment required. Whole-image jobs: qcow2rs_create,
 *   qcow2rs_check, qcow2rs_convert.
 *
 * RETURN VALUES AND ERRORS
 *   Calls return 0 (or a count) on success and a negative errno on failure; the message of the
 *   last failure on the calling thread is qcow2rs_last_error() (never NULL). The errors are:
 *     -EFAULT   a required pointer argument is NULL
 *     -EINVAL   unknown flag bits, a bad option, a request not inside the virtual disk, not a
 *               qcow2 image, a file refused by QCOW2RS_OPEN_UNTRUSTED
 *     -EBADF    a write to an image opened read-only (or marked corrupt)
 *     -ENOENT   a file (image, backing file, data file) does not exist
 *     -EACCES   permission denied
 *     -ENOTSUP  the image uses an unsupported feature (e.g. encryption); the message names it
 *     -EUCLEAN  the image's metadata is corrupt (found at open or during a request)
 *     -ELOOP    the backing chain loops or is too long
 *     -EFBIG    a table is too large for the configured limits
 *     -ENOSPC   no space left for a write
 *     -EDEADLK  a blocking call made from a callback or a library thread (see THREADS)
 *     -ECHILD   the image was opened in the parent process before fork() (see FORK)
 *     -EIO      an I/O error (or other errnos the system reports), or an internal error: a
 *               bug in the library (a Rust panic) is caught and reported as -EIO with a
 *               message, and the request's callback still runs
 *   Each function's comment lists the errors it returns.
 *
 * OWNERSHIP
 *   - The handle belongs to the caller from qcow2rs_open until qcow2rs_close.
 *   - Buffers passed to qcow2rs_aio_* calls are borrowed until the request's callback returns:
 *     keep them valid, and do not touch a read buffer or change a write buffer, until then.
 *     iovec arrays are copied during the call (the buffers they point to are borrowed).
 *     Blocking calls borrow their buffers for the duration of the call.
 *   - Strings the library returns through `char **` (qcow2rs_info_json, qcow2rs_check) are the
 *     caller's, freed with qcow2rs_free. Other strings (qcow2rs_last_error, qcow2rs_version,
 *     error_msg in a completion, the strings of struct qcow2rs_info) belong to the library:
 *     each comment says how long they stay valid.
 *   - Option structs (struct qcow2rs_open_options, ...) start with a `size` field: set it to
 *     sizeof the struct (the *_INIT macros below do) and zero the rest, so that programs built
 *     against this header keep working with later versions of the library.
 *
 * THREADS AND CALLBACKS
 *   - Every function may be called from any thread. Any number of threads may submit requests
 *     on one image at once. Nothing may use an image during or after its qcow2rs_close.
 *   - Requests run on a small pool of library threads (named qcow2rs-rt-N and qcow2rs-rt-io-N,
 *     the latter waiting in their own io_uring ring for the requests they submit; the I/O
 *     engines add qcow2rs-io-N or qcow2rs-uring threads). The pool starts with the first open
 *     image and is stopped, its threads joined, when the last one closes.
 *   - A qcow2rs_aio_* call that returns 0 has submitted the request: its callback runs exactly
 *     once, on a library thread, never inside the submitting call. A negative return means the
 *     request was not submitted and the callback never runs. Submitting never waits for I/O.
 *   - Callbacks run with no library lock held. They may submit new requests and call the
 *     non-blocking functions. They must not block for long (that stalls a library thread, and
 *     the requests a callback submits reach the kernel together when its thread next waits for
 *     I/O, as in an event loop) and must not throw C++ exceptions or longjmp out.
 *   - Blocking calls (qcow2rs_open, qcow2rs_close, qcow2rs_read, qcow2rs_write, qcow2rs_flush,
 *     qcow2rs_write_zeroes, qcow2rs_discard, qcow2rs_readv, qcow2rs_writev, qcow2rs_create,
 *     qcow2rs_check, qcow2rs_convert) return -EDEADLK when called from inside a callback
 *     (completion or progress) or from a library thread: they would wait for themselves.
 *   - Requests in flight at the same time are not ordered: a read overlapping a write in
 *     flight sees old or new data. Submit the second after the first completes when order
 *     matters. A flush covers the writes that completed before it was submitted.
 *
 * EVENT-LOOP MODE (for programs that run their own poll loop, e.g. VMMs)
 *   Open with QCOW2RS_OPEN_POLL: completed requests are queued instead of calling back on
 *   library threads. qcow2rs_get_completion_fd() gives an eventfd that becomes readable when
 *   completions are queued; when it does, call qcow2rs_process_completions(), which runs the
 *   callbacks on the calling thread. qcow2rs_close() runs the callbacks still due itself.
 *
 * FORK
 *   After fork(), an image opened before the fork cannot be used in the child: every call on it
 *   there returns -ECHILD without waiting (qcow2rs_close too, which then frees nothing; the
 *   parent's threads do not exist in the child). The child may open images itself. The parent
 *   is not affected.
 *
 * RUNNING UNDER VALGRIND
 *   Closing the last image joins every library thread, so valgrind --leak-check=full finds
 *   nothing left behind. The library is linked with -z nodelete: dlclose() leaves it loaded.
 */


#ifndef QCOW2RS_H
#define QCOW2RS_H

/* Generated by cbindgen 0.29.4 from qcow2-capi/src (make header). Do not edit. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
/** Initializer of struct qcow2rs_open_options: the size set, every option at its default. */
#define QCOW2RS_OPEN_OPTIONS_INIT { sizeof(struct qcow2rs_open_options), 0, 0, 0, NULL, NULL, NULL, 0 }
/** Initializer of struct qcow2rs_create_options: the size set, every option at its default. */
#define QCOW2RS_CREATE_OPTIONS_INIT { sizeof(struct qcow2rs_create_options), 0, 0, 0, 0, 0, 0, NULL, NULL, NULL }
/** Initializer of struct qcow2rs_convert_options: the size set, every option at its default. */
#define QCOW2RS_CONVERT_OPTIONS_INIT { sizeof(struct qcow2rs_convert_options), 0, 0, NULL, NULL, NULL, NULL, NULL, 0, 0 }
/** Initializer of struct qcow2rs_dd_options: the size set, every option at its default. */
#define QCOW2RS_DD_OPTIONS_INIT { sizeof(struct qcow2rs_dd_options), 0, 0, 0, 0, 0, NULL, NULL }
/** Initializer of struct qcow2rs_rebase_options: the size set, every option at its default. */
#define QCOW2RS_REBASE_OPTIONS_INIT { sizeof(struct qcow2rs_rebase_options), 0, 0, NULL, NULL, NULL, NULL }
/** Initializer of struct qcow2rs_commit_options: the size set, every option at its default. */
#define QCOW2RS_COMMIT_OPTIONS_INIT { sizeof(struct qcow2rs_commit_options), 0, 0, NULL, NULL, NULL }
/** Initializer of struct qcow2rs_measure_options: the size set, every option at its default. */
#define QCOW2RS_MEASURE_OPTIONS_INIT { sizeof(struct qcow2rs_measure_options), 0, 0, NULL, NULL, NULL }
/** Initializer of struct qcow2rs_measurement: the size set. */
#define QCOW2RS_MEASUREMENT_INIT { sizeof(struct qcow2rs_measurement), 0, 0, 0, false }
/** Initializer of struct qcow2rs_info: the size set. */
#define QCOW2RS_INFO_INIT { sizeof(struct qcow2rs_info), 0, 0, 0, 0, NULL, NULL, NULL, NULL, NULL, false, false, false, false }


/**
 * Major version of the library (the `X` of `X.Y.Z`).
 */
#define QCOW2RS_VERSION_MAJOR 0

/**
 * Minor version of the library.
 */
#define QCOW2RS_VERSION_MINOR 1

/**
 * Patch version of the library.
 */
#define QCOW2RS_VERSION_PATCH 0

/**
 * The version as one number, `MAJOR * 10000 + MINOR * 100 + PATCH`, for `#if` tests.
 */
#define QCOW2RS_VERSION_NUMBER (((QCOW2RS_VERSION_MAJOR * 10000) + (QCOW2RS_VERSION_MINOR * 100)) + QCOW2RS_VERSION_PATCH)

/**
 * Open read-only (the value 0: no flag).
 */
#define QCOW2RS_OPEN_RDONLY 0

/**
 * Open for reading and writing.
 */
#define QCOW2RS_OPEN_RDWR (1 << 0)

/**
 * Bypass the host page cache (`O_DIRECT`) for every file of the image. Buffers and offsets
 * need no particular alignment (the library bounces unaligned requests), but 4 KiB-aligned
 * ones are faster. Fails with `-EINVAL` where the file system refuses `O_DIRECT` (tmpfs).
 */
#define QCOW2RS_OPEN_DIRECT (1 << 1)

/**
 * Do not open the backing file: unallocated clusters read as zeros. Refused with
 * `QCOW2RS_OPEN_RDWR` on an image that has a backing file (`-EINVAL`): partial-cluster
 * writes would copy zeros instead of the backing data.
 */
#define QCOW2RS_OPEN_NO_BACKING (1 << 2)

/**
 * For images from untrusted sources: open no file named inside the image (backing file,
 * external data file). Opening an image that names one fails with `-EINVAL`, unless the
 * file is given in `struct qcow2rs_open_options`.
 */
#define QCOW2RS_OPEN_UNTRUSTED (1 << 3)

/**
 * Event-loop mode: completions are queued instead of running on library threads;
 * `qcow2rs_get_completion_fd` gives an eventfd to poll and `qcow2rs_process_completions`
 * runs the callbacks on the calling thread.
 */
#define QCOW2RS_OPEN_POLL (1 << 4)

/**
 * Write-through (QEMU's cache modes `writethrough`, and `directsync` with
 * `QCOW2RS_OPEN_DIRECT`): every write, write-zeroes and discard is durable when it completes
 * (the library syncs the image's files, data and metadata, before it reports success), as a
 * disk with its write cache off. Much slower than the default (write-back: durable at the
 * next `qcow2rs_flush`).
 */
#define QCOW2RS_OPEN_WRITETHROUGH (1 << 5)

/**
 * Never sync (QEMU's cache mode `unsafe`): `qcow2rs_flush` and the flushes the library
 * orders its own metadata updates with return without syncing, so a crash of the host can
 * lose or damage what was written. For scratch images only. Refused with
 * `QCOW2RS_OPEN_WRITETHROUGH` (`-EINVAL`).
 */
#define QCOW2RS_OPEN_NO_FLUSH (1 << 6)

/**
 * I/O engine: io_uring where the kernel allows it, else the thread pool (the default).
 */
#define QCOW2RS_ENGINE_AUTO 0

/**
 * I/O engine: Linux io_uring (fails with `-ENOTSUP` or `-EPERM` where unavailable).
 */
#define QCOW2RS_ENGINE_IO_URING 1

/**
 * I/O engine: a pool of threads doing `pread`/`pwrite`.
 */
#define QCOW2RS_ENGINE_THREADS 2

/**
 * `qcow2rs_info_json`: the whole backing chain, as `qcow2rs info --backing-chain
 * --output=json` (a JSON array, top image first).
 */
#define QCOW2RS_INFO_BACKING_CHAIN (1 << 0)

/**
 * `qcow2rs_aio_write_zeroes` / `qcow2rs_write_zeroes`: the zeroed range may be deallocated
 * (whole clusters lose their host cluster and read as zeros); without it, host clusters stay
 * allocated (marked zero), which keeps later writes there cheap.
 */
#define QCOW2RS_ZEROES_MAY_UNMAP (1 << 0)

/**
 * Most `struct iovec` entries a vectored call takes (Linux's `IOV_MAX`).
 */
#define QCOW2RS_IOV_MAX 1024

/**
 * Compression type zlib (the default).
 */
#define QCOW2RS_COMPRESSION_ZLIB 0

/**
 * Compression type zstd (needs version 3).
 */
#define QCOW2RS_COMPRESSION_ZSTD 1

/**
 * Preallocation: none (the default).
 */
#define QCOW2RS_PREALLOC_OFF 0

/**
 * Preallocation: L2 tables and data cluster mappings; the file stays sparse.
 */
#define QCOW2RS_PREALLOC_METADATA 1

/**
 * Preallocation: metadata, plus `fallocate` of the data.
 */
#define QCOW2RS_PREALLOC_FALLOC 2

/**
 * Preallocation: metadata, plus zeros written to the data.
 */
#define QCOW2RS_PREALLOC_FULL 3

/**
 * `qcow2rs_create_options.flags`: lazy refcounts (`lazy_refcounts=on`, version 3).
 */
#define QCOW2RS_CREATE_LAZY_REFCOUNTS (1 << 0)

/**
 * `qcow2rs_create_options.flags`: extended L2 entries (`extended_l2=on`, version 3,
 * clusters of at least 16 KiB).
 */
#define QCOW2RS_CREATE_EXTENDED_L2 (1 << 1)

/**
 * `qcow2rs_create_options.flags`: keep the external data file a valid raw image
 * (`data_file_raw=on`).
 */
#define QCOW2RS_CREATE_DATA_FILE_RAW (1 << 2)

/**
 * `qcow2rs_create_options.flags`: do not open the backing file (`qemu-img create -u`); the
 * size must then be given.
 */
#define QCOW2RS_CREATE_UNSAFE_BACKING (1 << 3)

/**
 * `qcow2rs_check` repair mode: report only.
 */
#define QCOW2RS_REPAIR_NONE 0

/**
 * `qcow2rs_check` repair mode: repair leaked clusters (`-r leaks`).
 */
#define QCOW2RS_REPAIR_LEAKS 1

/**
 * `qcow2rs_check` repair mode: repair leaks and corruptions (`-r all`).
 */
#define QCOW2RS_REPAIR_ALL 2

/**
 * `qcow2rs_check` result: no problem found (qemu-img check's exit code 0).
 */
#define QCOW2RS_CHECK_CLEAN 0

/**
 * `qcow2rs_check` result: the check could not complete (check errors; exit code 1).
 */
#define QCOW2RS_CHECK_ERRORS 1

/**
 * `qcow2rs_check` result: corruptions remain (exit code 2).
 */
#define QCOW2RS_CHECK_CORRUPT 2

/**
 * `qcow2rs_check` result: only leaked clusters remain (exit code 3).
 */
#define QCOW2RS_CHECK_LEAKS 3

/**
 * `qcow2rs_convert_options.flags`: write compressed clusters (`-c`; qcow2 output only),
 * using every core.
 */
#define QCOW2RS_CONVERT_COMPRESS (1 << 0)

/**
 * `qcow2rs_convert_options.flags`: bypass the page cache for the output (`-t none`).
 */
#define QCOW2RS_CONVERT_DIRECT (1 << 1)

/**
 * `qcow2rs_convert_options.flags`: open no file named inside the source image (see
 * `QCOW2RS_OPEN_UNTRUSTED`).
 */
#define QCOW2RS_CONVERT_UNTRUSTED (1 << 2)

/**
 * `qcow2rs_convert_options.flags`: write into the existing `dst` (`-n`): it is opened in
 * the output format, not created, must be at least as large as the source and keeps its
 * size; what reads as zeros in the source is written as zeros.
 */
#define QCOW2RS_CONVERT_EXISTING (1 << 3)

/**
 * `qcow2rs_convert_options.flags`: with `QCOW2RS_CONVERT_EXISTING`, the target is known to
 * read as zeros, so zeros are not written (`--target-is-zero`).
 */
#define QCOW2RS_CONVERT_TARGET_IS_ZERO (1 << 4)

/**
 * `qcow2rs_convert_options.flags`: `sparse_size` is given (`-S`; without this flag the
 * default, 4 KiB, applies).
 */
#define QCOW2RS_CONVERT_SPARSE_SIZE (1 << 5)

/**
 * `qcow2rs_dd_options.flags`: `count` is given (`count=`; without this flag the copy goes
 * to the end of the source).
 */
#define QCOW2RS_DD_COUNT (1 << 0)

/**
 * `qcow2rs_dd_options.flags`: open no file named inside the source image (see
 * `QCOW2RS_OPEN_UNTRUSTED`).
 */
#define QCOW2RS_DD_UNTRUSTED (1 << 1)

/**
 * `qcow2rs_rebase_options.flags`: only write the new backing file name into the header
 * (`qemu-img rebase -u`): no data is compared or copied, so the guest sees different data
 * wherever the old and new backing chains differ.
 */
#define QCOW2RS_REBASE_UNSAFE (1 << 0)

/**
 * `qcow2rs_rebase_options.flags`: bypass the page cache for the image (`-t none`).
 */
#define QCOW2RS_REBASE_DIRECT (1 << 1)

/**
 * `qcow2rs_commit_options.flags`: keep the image's content after the commit (`-d`);
 * without it (and without `base`) the image is emptied: it then reads through to its
 * backing file, which holds the same data.
 */
#define QCOW2RS_COMMIT_DROP (1 << 0)

/**
 * `qcow2rs_commit_options.flags`: bypass the page cache (`-t none`).
 */
#define QCOW2RS_COMMIT_DIRECT (1 << 1)

/**
 * `qcow2rs_amend` flag: bypass the page cache (`-t none`).
 */
#define QCOW2RS_AMEND_DIRECT (1 << 0)

/**
 * `qcow2rs_measure_options.flags`: open no file named inside the source image (see
 * `QCOW2RS_OPEN_UNTRUSTED`).
 */
#define QCOW2RS_MEASURE_UNTRUSTED (1 << 0)

/**
 * Flag of `qcow2rs_bitmap_info.flags`: the bitmap is marked in use (a writer was
 * interrupted, so its bits cannot be trusted); it can only be removed.
 */
#define QCOW2RS_BITMAP_IN_USE (1 << 0)

/**
 * Flag of `qcow2rs_bitmap_info.flags`: the bitmap is enabled (`auto`: a writer that
 * tracks dirty regions, such as QEMU, updates it; this library does not, see
 * `qcow2rs_bitmap_add`).
 */
#define QCOW2RS_BITMAP_AUTO (1 << 1)

/**
 * An open image. Opaque: create it with `qcow2rs_open` or `qcow2rs_open_ext`, free it with
 * `qcow2rs_close`. Any number of threads may use one handle at once, except that nothing
 * may use it during or after `qcow2rs_close` (callbacks of its own requests excepted: they
 * run before `qcow2rs_close` returns).
 */
struct qcow2rs_image;

/**
 * Options of `qcow2rs_open_ext`. Zero-initialize it, set `size` to
 * `sizeof(struct qcow2rs_open_options)` (or use `QCOW2RS_OPEN_OPTIONS_INIT`), then set what
 * you need: a field left 0 or NULL means the default. Fields may be added at the end in
 * later versions; `size` tells the library which ones the caller knows.
 */
struct qcow2rs_open_options {
    /**
     * `sizeof(struct qcow2rs_open_options)` as the caller compiled it.
     */
    size_t size;
    /**
     * `QCOW2RS_OPEN_*` flags, as for `qcow2rs_open`.
     */
    uint32_t flags;
    /**
     * `QCOW2RS_ENGINE_*` (0: `QCOW2RS_ENGINE_AUTO`).
     */
    uint32_t engine;
    /**
     * Bytes of metadata cache (L2 tables and refcount blocks) for the image and for each
     * image of its backing chain (0: 32 MiB). Memory use is bounded by it, whatever the
     * image size.
     */
    uint64_t cache_size;
    /**
     * Use this file as the backing file instead of the one the image names (NULL: the
     * image's own). Relative names are relative to the current directory.
     */
    const char *backing_file;
    /**
     * Format of `backing_file`: `"qcow2"` or `"raw"` (NULL: probed).
     */
    const char *backing_format;
    /**
     * Use this file as the external data file instead of the one the image names (NULL: the
     * image's own).
     */
    const char *data_file;
    /**
     * Longest backing chain accepted (0: 64).
     */
    uint32_t max_chain;
};

/**
 * Facts about an open image, filled by `qcow2rs_get_info`. Set `size` to
 * `sizeof(struct qcow2rs_info)` before the call. Strings belong to the image and stay valid
 * until `qcow2rs_close`.
 */
struct qcow2rs_info {
    /**
     * `sizeof(struct qcow2rs_info)` as the caller compiled it (set by the caller).
     */
    size_t size;
    /**
     * Size of the virtual disk in bytes.
     */
    uint64_t virtual_size;
    /**
     * Cluster size in bytes.
     */
    uint64_t cluster_size;
    /**
     * qcow2 version: 2 (compat=0.10) or 3 (compat=1.1).
     */
    uint32_t version;
    /**
     * Refcount width in bits.
     */
    uint32_t refcount_bits;
    /**
     * The backing file name as stored in the image (NULL: none).
     */
    const char *backing_file;
    /**
     * The backing file actually opened (NULL: none, or `QCOW2RS_OPEN_NO_BACKING`).
     */
    const char *backing_path;
    /**
     * The backing file format stored in the image (NULL: none).
     */
    const char *backing_format;
    /**
     * The external data file name as stored in the image (NULL: none).
     */
    const char *data_file;
    /**
     * The external data file actually opened (NULL: none).
     */
    const char *data_path;
    /**
     * The image is dirty (lazy refcounts not written back after a crash).
     */
    bool dirty;
    /**
     * The image is marked corrupt (it opens read-only).
     */
    bool corrupt;
    /**
     * The image was opened read-only.
     */
    bool read_only;
    /**
     * The image uses extended L2 entries (subclusters).
     */
    bool extended_l2;
};

/**
 * What a completion callback receives. Valid only during the callback: copy what you need.
 */
struct qcow2rs_completion {
    /**
     * 0 on success, or a negative errno (see RETURN VALUES AND ERRORS at the top).
     */
    int ret;
    /**
     * NULL on success, else a one-line message saying what failed. Owned by the library;
     * valid until the callback returns.
     */
    const char *error_msg;
    /**
     * The image the request was submitted on.
     */
    struct qcow2rs_image *img;
};

/**
 * A completion callback: `user_data` is the pointer given at submission, `c` describes the
 * outcome (valid only during the call).
 *
 * The callback runs exactly once for every submission that returned 0, on a library thread
 * (or, for an image opened with `QCOW2RS_OPEN_POLL`, inside `qcow2rs_process_completions` or
 * `qcow2rs_close`), never inside the submitting call, with no library lock held. It may
 * submit new requests (on any image) and use non-blocking calls; blocking calls
 * (`qcow2rs_read`, `qcow2rs_close`, ...) return `-EDEADLK` there. It must not throw a C++
 * exception or `longjmp` out. Keep it short: while it runs, its library thread runs nothing
 * else.
 */
typedef void (*qcow2rs_completion_fn)(void *user_data,
                                      const struct qcow2rs_completion *c);

/**
 * Options of `qcow2rs_create` (and of the qcow2 output of `qcow2rs_convert`): the `-o`
 * options of `qcow2rs create`. Zero-initialize it and set `size` to
 * `sizeof(struct qcow2rs_create_options)` (or use `QCOW2RS_CREATE_OPTIONS_INIT`); fields left
 * 0 or NULL take the defaults.
 */
struct qcow2rs_create_options {
    /**
     * `sizeof(struct qcow2rs_create_options)` as the caller compiled it.
     */
    size_t size;
    /**
     * qcow2 version: 2 (compat=0.10) or 3 (compat=1.1); 0: 3.
     */
    uint32_t version;
    /**
     * Cluster size in bytes: a power of two from 512 to 2 MiB; 0: 65536.
     */
    uint32_t cluster_size;
    /**
     * Refcount width in bits: a power of two up to 64; 0: 16.
     */
    uint32_t refcount_bits;
    /**
     * `QCOW2RS_COMPRESSION_*`.
     */
    uint32_t compression_type;
    /**
     * `QCOW2RS_PREALLOC_*`.
     */
    uint32_t preallocation;
    /**
     * `QCOW2RS_CREATE_*` flags.
     */
    uint32_t flags;
    /**
     * Backing file name, stored as given (relative names are relative to the new image's
     * folder); NULL: none.
     */
    const char *backing_file;
    /**
     * Backing file format stored in the image (`"qcow2"`, `"raw"`); NULL: probed at create
     * time and not stored.
     */
    const char *backing_format;
    /**
     * External data file name, stored as given; NULL: none.
     */
    const char *data_file;
};

/**
 * A progress callback: `fraction` goes from 0.0 to 1.0. Called on the thread that called
 * the job, never concurrently; blocking library calls return `-EDEADLK` inside it.
 */
typedef void (*qcow2rs_progress_fn)(void *user_data,
                                    double fraction);

/**
 * Options of `qcow2rs_convert`. Zero-initialize it and set `size` to
 * `sizeof(struct qcow2rs_convert_options)` (or use `QCOW2RS_CONVERT_OPTIONS_INIT`); fields
 * left 0 or NULL take the defaults.
 */
struct qcow2rs_convert_options {
    /**
     * `sizeof(struct qcow2rs_convert_options)` as the caller compiled it.
     */
    size_t size;
    /**
     * `QCOW2RS_CONVERT_*` flags.
     */
    uint32_t flags;
    /**
     * Requests in flight (`-m`, 1 to 64; 0: 8).
     */
    uint32_t parallel;
    /**
     * Source format, `"qcow2"` or `"raw"` (`-f`; NULL: probed).
     */
    const char *src_format;
    /**
     * Output format, `"qcow2"` or `"raw"` (`-O`; NULL: `"raw"`, as qemu-img).
     */
    const char *dst_format;
    /**
     * Creation options of a qcow2 output (`-o`, `-B`, `-F`); NULL: the defaults. Its `size`
     * field aside, the virtual size is the source's.
     */
    const struct qcow2rs_create_options *create;
    /**
     * Called as the copy progresses (`-p`); NULL: not called.
     */
    qcow2rs_progress_fn progress;
    /**
     * Passed to `progress`.
     */
    void *progress_data;
    /**
     * `QCOW2RS_ENGINE_*` for every file (0: auto).
     */
    uint32_t engine;
    /**
     * With `QCOW2RS_CONVERT_SPARSE_SIZE` (`-S`): the shortest run of zeros left unallocated
     * in the target, a multiple of 512 up to 16 MiB; 0 allocates the whole target.
     */
    uint64_t sparse_size;
};

/**
 * Options of `qcow2rs_dd`. Zero-initialize it and set `size` to
 * `sizeof(struct qcow2rs_dd_options)` (or use `QCOW2RS_DD_OPTIONS_INIT`); fields left 0 or
 * NULL take the defaults.
 */
struct qcow2rs_dd_options {
    /**
     * `sizeof(struct qcow2rs_dd_options)` as the caller compiled it.
     */
    size_t size;
    /**
     * `QCOW2RS_DD_*` flags.
     */
    uint32_t flags;
    /**
     * `QCOW2RS_ENGINE_*` for every file (0: auto).
     */
    uint32_t engine;
    /**
     * Block size in bytes (`bs=`, 1 to 2147483647; 0: 512).
     */
    uint64_t bs;
    /**
     * With `QCOW2RS_DD_COUNT`: the number of blocks of input to stop at (`count=`).
     */
    uint64_t count;
    /**
     * Blocks of input to skip (`skip=`).
     */
    uint64_t skip;
    /**
     * Source format, `"qcow2"` or `"raw"` (`-f`; NULL: probed).
     */
    const char *src_format;
    /**
     * Output format, `"qcow2"` or `"raw"` (`-O`; NULL: `"raw"`, as qemu-img).
     */
    const char *dst_format;
};

/**
 * Options of `qcow2rs_rebase` (`qemu-img rebase`'s options). Zero-initialize it and set
 * `size` to `sizeof(struct qcow2rs_rebase_options)` (or use `QCOW2RS_REBASE_OPTIONS_INIT`).
 */
struct qcow2rs_rebase_options {
    /**
     * `sizeof(struct qcow2rs_rebase_options)` as the caller compiled it.
     */
    size_t size;
    /**
     * `QCOW2RS_REBASE_*` flags.
     */
    uint32_t flags;
    /**
     * `QCOW2RS_ENGINE_*` for every file (0: auto).
     */
    uint32_t engine;
    /**
     * The new backing file name (`-b`), stored in the header as given (a relative name is
     * relative to the image's folder); NULL or `""`: none, the image becomes standalone
     * (in safe mode, the old backing chain's data is copied into it first).
     */
    const char *backing_file;
    /**
     * The new backing file's format (`-F`), `"qcow2"` or `"raw"`: required with a backing
     * file (as qemu-img, the format is never probed here).
     */
    const char *backing_format;
    /**
     * Called as the copy progresses (safe mode; `-p`); NULL: not called.
     */
    qcow2rs_progress_fn progress;
    /**
     * Passed to `progress`.
     */
    void *progress_data;
};

/**
 * Options of `qcow2rs_commit` (`qemu-img commit`'s options). Zero-initialize it and set
 * `size` to `sizeof(struct qcow2rs_commit_options)` (or use `QCOW2RS_COMMIT_OPTIONS_INIT`);
 * fields left 0 or NULL take the defaults.
 */
struct qcow2rs_commit_options {
    /**
     * `sizeof(struct qcow2rs_commit_options)` as the caller compiled it.
     */
    size_t size;
    /**
     * `QCOW2RS_COMMIT_*` flags.
     */
    uint32_t flags;
    /**
     * `QCOW2RS_ENGINE_*` for every file (0: auto).
     */
    uint32_t engine;
    /**
     * The image of the backing chain to commit into (`-b`), by the name the layer above
     * stores or by a path to the same file; NULL: the image's backing file. Naming a base
     * implies `QCOW2RS_COMMIT_DROP`, as in qemu-img.
     */
    const char *base;
    /**
     * Called as the copy progresses (`-p`); NULL: not called.
     */
    qcow2rs_progress_fn progress;
    /**
     * Passed to `progress`.
     */
    void *progress_data;
};

/**
 * Options of `qcow2rs_measure` (`qemu-img measure`'s options). Zero-initialize it and set
 * `size` to `sizeof(struct qcow2rs_measure_options)` (or use
 * `QCOW2RS_MEASURE_OPTIONS_INIT`); fields left 0 or NULL take the defaults.
 */
struct qcow2rs_measure_options {
    /**
     * `sizeof(struct qcow2rs_measure_options)` as the caller compiled it.
     */
    size_t size;
    /**
     * `QCOW2RS_MEASURE_*` flags.
     */
    uint32_t flags;
    /**
     * The virtual size to measure when no source is given (`--size`; below 2^63). Must be
     * 0 with a source.
     */
    uint64_t virtual_size;
    /**
     * The source's format, `"qcow2"` or `"raw"` (`-f`); NULL: probed.
     */
    const char *src_format;
    /**
     * The new image's format, `"qcow2"` or `"raw"` (`-O`); NULL: `"raw"`, as qemu-img.
     */
    const char *dst_format;
    /**
     * The new image's creation options (`-o`, as for `qemu-img create`: e.g.
     * `"cluster_size=2M,compat=0.10"`, `"preallocation=full"`); NULL: the defaults.
     */
    const char *options;
};

/**
 * What `qcow2rs_measure` found, in bytes (`qemu-img measure`'s figures). Set `size` to
 * `sizeof(struct qcow2rs_measurement)` (or use `QCOW2RS_MEASUREMENT_INIT`): the library
 * fills the fields that fit in it.
 */
struct qcow2rs_measurement {
    /**
     * `sizeof(struct qcow2rs_measurement)` as the caller compiled it.
     */
    size_t size;
    /**
     * File size the new image needs as it would be written (`required`).
     */
    uint64_t required;
    /**
     * File size when every guest cluster is allocated (`fully-allocated`).
     */
    uint64_t fully_allocated;
    /**
     * Space for the source's persistent bitmaps (`bitmaps`); valid when `has_bitmaps`.
     */
    uint64_t bitmaps;
    /**
     * Whether `bitmaps` is given (a qcow2 v3 source and a qcow2 v3 output, as qemu-img).
     */
    bool has_bitmaps;
};

/**
 * One internal snapshot, as listed by `qcow2rs_snapshot_list`.
 */
struct qcow2rs_snapshot_info {
    /**
     * The snapshot's ID (a number, as text).
     */
    char *id;
    /**
     * The snapshot's name (tag).
     */
    char *name;
    /**
     * Creation time: seconds since the epoch.
     */
    uint32_t date_sec;
    /**
     * Creation time: nanoseconds.
     */
    uint32_t date_nsec;
    /**
     * Guest clock at creation, nanoseconds.
     */
    uint64_t vm_clock_nsec;
    /**
     * Size of the saved VM state in bytes (0: a disk-only snapshot).
     */
    uint64_t vm_state_size;
    /**
     * Virtual disk size when the snapshot was taken (0: not recorded).
     */
    uint64_t disk_size;
    /**
     * Instruction count (`UINT64_MAX`: not recorded).
     */
    uint64_t icount;
};

/**
 * One persistent bitmap, as listed by `qcow2rs_bitmap_list`.
 */
struct qcow2rs_bitmap_info {
    /**
     * The bitmap's name.
     */
    char *name;
    /**
     * Bytes of guest data one bit covers (a power of two from 512 to 2 GiB).
     */
    uint64_t granularity;
    /**
     * `QCOW2RS_BITMAP_IN_USE` and `QCOW2RS_BITMAP_AUTO` bits.
     */
    uint32_t flags;
};

/**
 * One range of guest bytes, as listed by `qcow2rs_bitmap_extents`.
 */
struct qcow2rs_extent {
    /**
     * Offset of the first byte.
     */
    uint64_t start;
    /**
     * Length in bytes (never 0).
     */
    uint64_t length;
};

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * The library's version, `"MAJOR.MINOR.PATCH"` (a static string, never NULL). Compare with
 * the `QCOW2RS_VERSION_*` macros to tell the library a program runs with from the header
 * it was compiled with.
 */
const char *qcow2rs_version(void);

/**
 * Open the qcow2 image at `path` (its backing chain and external data file too) and store a
 * new handle in `*out` (NULL on failure). `flags`: `QCOW2RS_OPEN_RDONLY` (0) or any of the
 * other `QCOW2RS_OPEN_*` flags. Blocking. The first open image starts the library's threads.
 *
 * Returns 0, or: `-EFAULT` (`path` or `out` NULL), `-EINVAL` (unknown flags, not a qcow2
 * image, a file named inside the image refused by `QCOW2RS_OPEN_UNTRUSTED`, `O_DIRECT`
 * refused by the file system, bad header fields), `-ENOENT` (the image, its backing file or
 * its data file does not exist), `-EACCES` (permission denied), `-ENOTSUP` (an unsupported
 * feature, e.g. encryption; the message names it), `-EUCLEAN` (corrupt metadata), `-EBADF`
 * (`QCOW2RS_OPEN_RDWR` on an image marked corrupt), `-ELOOP` (backing chain loop or too
 * long), `-EFBIG` (a table too large), `-EDEADLK` (called from a callback or a library
 * thread), `-EIO` and other I/O errnos.
 */
int qcow2rs_open(const char *path,
                 uint32_t flags,
                 struct qcow2rs_image **out);

/**
 * `qcow2rs_open` with options (`opts` NULL: the defaults, read-only). Errors as
 * `qcow2rs_open`, plus `-EINVAL` for an unknown engine, a `size` field smaller than
 * `sizeof(size_t)`, non-zero fields this library version does not know, or
 * `backing_format` without `backing_file`; `-ENOTSUP` for a `backing_format` other than
 * `"qcow2"` and `"raw"`.
 */
int qcow2rs_open_ext(const char *path,
                     const struct qcow2rs_open_options *opts,
                     struct qcow2rs_image **out);

/**
 * Close an image: wait until no request is in flight (their callbacks run first; for an
 * image in event-loop mode they run here, on the calling thread), flush a writable image,
 * and free the handle and everything it owns (the eventfd included). The last close stops
 * the library's threads. `img` NULL: does nothing and returns 0. Blocking.
 *
 * Returns 0, or the negative errno of the final flush (`-EIO`, `-ENOSPC`, ...; the handle
 * is freed all the same). Not freed, and unusable: `-EDEADLK` (called from a callback or a
 * library thread: close it from another thread) and `-ECHILD` (in a child process after
 * fork(): the parent's threads do not exist there; the memory is left as it is).
 */
int qcow2rs_close(struct qcow2rs_image *img);

/**
 * Size of the virtual disk in bytes (0 when `img` is NULL). Never fails, also in a child
 * after fork().
 */
uint64_t qcow2rs_get_size(const struct qcow2rs_image *img);

/**
 * Fill `*info` (whose `size` field the caller set) with facts about the image; fields
 * beyond what this library version knows are left as they are. Returns 0, or
 * `-EFAULT` (`img` or `info` NULL), `-EINVAL` (`info->size` smaller than `sizeof(size_t)`),
 * `-ECHILD`. Does no I/O.
 */
int qcow2rs_get_info(const struct qcow2rs_image *img,
                     struct qcow2rs_info *info);

/**
 * The image's `qcow2rs info --output=json` document (the keys of `qemu-img info`), as a
 * NUL-terminated string in `*json`, to be freed with `qcow2rs_free`. `flags`: 0 or
 * `QCOW2RS_INFO_BACKING_CHAIN`. Returns 0, or `-EFAULT` (`img` or `json` NULL), `-EINVAL`
 * (unknown flags), `-ECHILD`, `-ENOMEM`, an I/O errno. `*json` is NULL on failure.
 */
int qcow2rs_info_json(struct qcow2rs_image *img,
                      uint32_t flags,
                      char **json);

/**
 * Free a string the library returned (`qcow2rs_info_json`, `qcow2rs_check`) or the array of
 * `qcow2rs_bitmap_extents`. NULL is allowed.
 */
void qcow2rs_free(void *p);

/**
 * Start an asynchronous read of `len` bytes at guest offset `offset` into `buf`.
 *
 * Returns 0 when the request was submitted: `cb(user_data, c)` then runs exactly once, after
 * the data is in `buf` (`c->ret == 0`) or the read failed (`c->ret < 0`, `buf` undefined).
 * Returns a negative errno when it was not submitted (the callback never runs):
 * `-EFAULT` (`img` or `cb` NULL, or `buf` NULL with `len` > 0), `-EINVAL` (unknown `flags`,
 * or the range is not inside the virtual disk), `-ECHILD` (image opened before fork()).
 * Completion errors: `-EIO` and other I/O errnos, `-EUCLEAN` (corrupt metadata found),
 * `-ENOTSUP`.
 *
 * `buf` must stay valid, and must not be read or written by the caller, until the callback
 * returns. `flags` must be 0. Never blocks on I/O. Any thread may submit, including
 * callbacks.
 */
int qcow2rs_aio_read(struct qcow2rs_image *img,
                     void *buf,
                     size_t len,
                     uint64_t offset,
                     qcow2rs_completion_fn cb,
                     void *user_data,
                     uint32_t flags);

/**
 * Start an asynchronous write of `len` bytes from `buf` at guest offset `offset`.
 *
 * As `qcow2rs_aio_read`, plus `-EBADF` when the image was opened read-only (or is marked
 * corrupt). Completion errors also include `-ENOSPC`. `buf` must stay valid, unchanged,
 * until the callback returns. A completed write is durable only after a flush.
 */
int qcow2rs_aio_write(struct qcow2rs_image *img,
                      const void *buf,
                      size_t len,
                      uint64_t offset,
                      qcow2rs_completion_fn cb,
                      void *user_data,
                      uint32_t flags);

/**
 * Asynchronous vectored read: fills the `iovcnt` buffers of `iov` one after the other with
 * the guest data starting at `offset`. As `qcow2rs_aio_read`; also `-EINVAL` when `iovcnt`
 * is negative or above `QCOW2RS_IOV_MAX`. The `iov` array itself is copied during the call;
 * the buffers it points to stay borrowed until the callback returns.
 */
int qcow2rs_aio_readv(struct qcow2rs_image *img,
                      const struct iovec *iov,
                      int iovcnt,
                      uint64_t offset,
                      qcow2rs_completion_fn cb,
                      void *user_data,
                      uint32_t flags);

/**
 * Asynchronous vectored write of the `iovcnt` buffers of `iov`, back to back from
 * `offset`. As `qcow2rs_aio_write` and `qcow2rs_aio_readv`.
 */
int qcow2rs_aio_writev(struct qcow2rs_image *img,
                       const struct iovec *iov,
                       int iovcnt,
                       uint64_t offset,
                       qcow2rs_completion_fn cb,
                       void *user_data,
                       uint32_t flags);

/**
 * Asynchronous flush: when the callback reports success, every write that had completed
 * before this call was made is durable (metadata in order, then `fdatasync`). Requests still
 * in flight at submission are not covered. Enabled persistent bitmaps are stored too, as by
 * `qcow2rs_flush`. Errors as `qcow2rs_aio_read` (no range); on a
 * read-only image it succeeds and does nothing.
 */
int qcow2rs_aio_flush(struct qcow2rs_image *img,
                      qcow2rs_completion_fn cb,
                      void *user_data,
                      uint32_t flags);

/**
 * Make `len` bytes at `offset` read as zeros, asynchronously. Whole clusters are marked
 * zero in their L2 entries (no data written); partial clusters are written with zeros.
 * `flags`: 0 or `QCOW2RS_ZEROES_MAY_UNMAP`. Errors as `qcow2rs_aio_write`.
 */
int qcow2rs_aio_write_zeroes(struct qcow2rs_image *img,
                             uint64_t len,
                             uint64_t offset,
                             qcow2rs_completion_fn cb,
                             void *user_data,
                             uint32_t flags);

/**
 * Discard `len` bytes at `offset`, asynchronously: whole clusters are deallocated (they read
 * as zeros afterwards, never as backing-file data) and their space given back to the host
 * file system; partial clusters are written with zeros. `flags` must be 0. Errors as
 * `qcow2rs_aio_write`.
 */
int qcow2rs_aio_discard(struct qcow2rs_image *img,
                        uint64_t len,
                        uint64_t offset,
                        qcow2rs_completion_fn cb,
                        void *user_data,
                        uint32_t flags);

/**
 * The eventfd of an image opened with `QCOW2RS_OPEN_POLL`: it becomes readable when
 * completions are queued. Poll it for `POLLIN` (never read it yourself) and call
 * `qcow2rs_process_completions`. The descriptor belongs to the image (closed by
 * `qcow2rs_close`).
 *
 * Returns the descriptor (>= 0), or `-EFAULT` (`img` NULL), `-EINVAL` (image not opened with
 * `QCOW2RS_OPEN_POLL`), `-ECHILD` (image opened before fork()).
 */
int qcow2rs_get_completion_fd(struct qcow2rs_image *img);

/**
 * Run the callbacks of completed requests of an image opened with `QCOW2RS_OPEN_POLL`, on
 * the calling thread, at most `max` of them (`max` <= 0: all that are queued). Returns how
 * many ran (0 when none was ready: it never waits), or `-EFAULT`, `-EINVAL` (image not in
 * event-loop mode), `-ECHILD`. When callbacks remain queued after `max`, the eventfd stays
 * readable. Callbacks run here may submit requests; blocking calls return `-EDEADLK` in them.
 * May be called from several threads at once (each callback still runs once).
 */
int qcow2rs_process_completions(struct qcow2rs_image *img,
                                int max);

/**
 * Read `len` bytes of guest data at `offset` into `buf`. Blocking.
 *
 * Returns 0 (all `len` bytes read; there are no short reads), or: `-EFAULT` (`img` NULL, or
 * `buf` NULL with `len` > 0), `-EINVAL` (the range is not inside the virtual disk),
 * `-EDEADLK` (called from a callback or a library thread), `-ECHILD` (image opened before
 * fork()), `-EUCLEAN` (corrupt metadata found), `-EIO` and other I/O errnos.
 */
int qcow2rs_read(struct qcow2rs_image *img,
                 void *buf,
                 size_t len,
                 uint64_t offset);

/**
 * Write `len` bytes from `buf` at guest offset `offset`. Blocking; durable after a flush.
 *
 * Errors as `qcow2rs_read`, plus `-EBADF` (image opened read-only, or marked corrupt) and
 * `-ENOSPC`.
 */
int qcow2rs_write(struct qcow2rs_image *img,
                  const void *buf,
                  size_t len,
                  uint64_t offset);

/**
 * Vectored `qcow2rs_read`: fills the `iovcnt` buffers of `iov` one after the other. Also
 * `-EINVAL` when `iovcnt` is negative or above `QCOW2RS_IOV_MAX`.
 */
int qcow2rs_readv(struct qcow2rs_image *img,
                  const struct iovec *iov,
                  int iovcnt,
                  uint64_t offset);

/**
 * Vectored `qcow2rs_write`. Also `-EINVAL` when `iovcnt` is negative or above
 * `QCOW2RS_IOV_MAX`.
 */
int qcow2rs_writev(struct qcow2rs_image *img,
                   const struct iovec *iov,
                   int iovcnt,
                   uint64_t offset);

/**
 * Make every write completed so far durable, and store what the image's enabled persistent
 * bitmaps recorded (they stay marked in use until close). Blocking. Returns 0 (also on a
 * read-only image), or `-EFAULT`, `-EDEADLK`, `-ECHILD`, `-EIO` and other I/O errnos.
 */
int qcow2rs_flush(struct qcow2rs_image *img);

/**
 * Make `len` bytes at `offset` read as zeros (see `qcow2rs_aio_write_zeroes`). `flags`: 0 or
 * `QCOW2RS_ZEROES_MAY_UNMAP`. Blocking. Errors as `qcow2rs_write`, plus `-EINVAL` for
 * unknown flags.
 */
int qcow2rs_write_zeroes(struct qcow2rs_image *img,
                         uint64_t len,
                         uint64_t offset,
                         uint32_t flags);

/**
 * Discard `len` bytes at `offset` (see `qcow2rs_aio_discard`). `flags` must be 0. Blocking.
 * Errors as `qcow2rs_write`, plus `-EINVAL` for unknown flags.
 */
int qcow2rs_discard(struct qcow2rs_image *img,
                    uint64_t len,
                    uint64_t offset,
                    uint32_t flags);

/**
 * Create a qcow2 image at `path` (an existing file is replaced) with a virtual size of
 * `size` bytes, as `qcow2rs create -f qcow2 -o ... path size`. `opts` NULL: the defaults
 * (version 3, 64 KiB clusters, 16-bit refcounts, zlib, no preallocation). With a backing
 * file and `size` 0, the size is the backing file's. Blocking.
 *
 * Returns 0, or: `-EFAULT` (`path` NULL), `-EINVAL` (bad or inconsistent options, unknown
 * flags, names that are not UTF-8), `-ENOTSUP`, `-ENOENT` (the backing file does not
 * exist), `-EACCES`, `-ENOSPC`, `-EDEADLK` (called from a callback or a library thread),
 * `-EIO`.
 */
int qcow2rs_create(const char *path,
                   uint64_t size,
                   const struct qcow2rs_create_options *opts);

/**
 * Check the qcow2 image at `path` for consistency, as `qcow2rs check [-r leaks|all]` and
 * `qemu-img check`; with `repair` (`QCOW2RS_REPAIR_*`) also repair it (the image is opened
 * for writing; nobody else may use it meanwhile). Blocking.
 *
 * If `report_json` is not NULL, `*report_json` receives the report (the JSON of
 * `qcow2rs check --output=json`: `corruptions`, `leaks`, `check-errors`, `image-end-offset`,
 * ...), to be freed with `qcow2rs_free`; NULL when the call fails.
 *
 * Returns a `QCOW2RS_CHECK_*` value (>= 0: the check ran; qemu-img's exit codes), or a
 * negative errno when it could not run: `-EFAULT` (`path` NULL), `-EINVAL` (bad `repair`,
 * not a qcow2 image), `-ENOENT`, `-EACCES`, `-ENOTSUP`, `-EUCLEAN` (metadata too broken to
 * check: qemu-img's "Check failed"), `-EDEADLK`, `-EIO`.
 */
int qcow2rs_check(const char *path,
                  int repair,
                  char **report_json);

/**
 * Copy the disk at `src` into a new image at `dst` (replaced if it exists), as
 * `qcow2rs convert [-f FMT] [-O FMT] [-c] [-o ...] [-B ...] [-m N] [-t none] [-S SIZE]
 * [-n [--target-is-zero]] src dst`: zeros are detected and left unallocated, and with a
 * backing file in `opts->create` only what differs from it is written; with
 * `QCOW2RS_CONVERT_EXISTING` `dst` is written into, not created. `opts` NULL: raw output,
 * defaults. Blocking; progress is reported through `opts->progress`.
 *
 * Returns 0, or: `-EFAULT` (`src` or `dst` NULL), `-EINVAL` (bad options, unknown flags,
 * compression with raw output, a backing file with raw output, a bad `sparse_size`,
 * `QCOW2RS_CONVERT_TARGET_IS_ZERO` without `QCOW2RS_CONVERT_EXISTING`, an existing target
 * smaller than the source), `-ENOTSUP` (a format other
 * than `"qcow2"` and `"raw"`, an unsupported feature of the source), `-ENOENT`, `-EACCES`,
 * `-EUCLEAN` (corrupt source), `-ENOSPC`, `-EDEADLK`, `-EIO`.
 */
int qcow2rs_convert(const char *src,
                    const char *dst,
                    const struct qcow2rs_convert_options *opts);

/**
 * Copy part of the disk at `src` into a new image at `dst` (replaced if it exists), as
 * `qemu-img dd [-f FMT] [-O FMT] bs=BS count=COUNT skip=SKIP if=src of=dst`: from byte
 * `skip * bs` of the source up to byte `count * bs` (its end without `QCOW2RS_DD_COUNT`;
 * as qemu-img, `count` bounds the end, not the length, when `skip` is given too). The output
 * is fully allocated, its size that length rounded up to 512 bytes. `opts` NULL: the whole
 * disk in 512-byte blocks, raw output. Blocking.
 *
 * Returns 0; or 1 when `skip` lies past the end of that range: an empty output was created
 * (qemu-img then prints "dd: cannot skip to specified offset" and succeeds); or `-EFAULT`
 * (`src` or `dst` NULL), `-EINVAL` (`bs` above 2147483647, unknown flags, `dst` is a file
 * the source reads), `-ENOTSUP` (a format other than `"qcow2"` and `"raw"`, an unsupported
 * feature of the source), `-ENOENT`, `-EACCES`, `-EUCLEAN` (corrupt source), `-ENOSPC`,
 * `-EDEADLK`, `-EIO`.
 */
int qcow2rs_dd(const char *src,
               const char *dst,
               const struct qcow2rs_dd_options *opts);

/**
 * Change the backing file of the qcow2 image at `path`, as `qemu-img rebase [-u] [-b
 * backing_file] [-F backing_format] path` (the image must not be in use meanwhile). In safe
 * mode (the default) the image is opened with its old backing chain and the new one, and
 * the old chain's data is written into the image wherever the image does not decide the
 * content itself and the two chains differ, so the guest sees the same disk afterwards;
 * then the header is switched. With `QCOW2RS_REBASE_UNSAFE` only the header changes.
 * Blocking; progress through `opts->progress`.
 *
 * Returns 0, or: `-EFAULT` (`path` or `opts` NULL), `-EINVAL` (bad `size` or unknown flags
 * in `opts`, a backing file without `backing_format`, a name that is not UTF-8 or does not
 * fit in the header, the image itself as its new backing file or in the new chain),
 * `-ENOTSUP` (a raw image or a file that is not a qcow2 image, a format other than qcow2
 * and raw, an unsupported feature), `-ENOENT` (the image or the new backing file does not exist), `-EACCES`,
 * `-EAGAIN` (the image is locked by another process), `-EUCLEAN` (corrupt metadata),
 * `-ENOSPC`, `-EDEADLK` (called from a callback or a library thread), `-EIO`. A failure
 * before the header switch leaves the header unchanged (data copied into the image by safe
 * mode then reads the same as before).
 */
int qcow2rs_rebase(const char *path,
                   const struct qcow2rs_rebase_options *opts);

/**
 * Write the data of the qcow2 image at `path` into its backing file (or into `opts->base`
 * further down the chain), as `qemu-img commit [-d] [-b base] path`: every run that the
 * image (and the layers above the base) decides is written into the base, which grows if
 * it is shorter, and is flushed. Then, unless `QCOW2RS_COMMIT_DROP` or a base is given, the
 * image is emptied. Nothing else may use the chain meanwhile. Blocking; progress through
 * `opts->progress`. `opts` NULL: the defaults.
 *
 * Returns 0, or: `-EFAULT` (`path` NULL), `-EINVAL` (bad `size` or unknown flags in `opts`,
 * the image has no backing file, a raw image, names that are not UTF-8), `-ENOENT` (the
 * image does not exist, `base` is not in its backing chain), `-ENOTSUP`, `-EACCES`,
 * `-EAGAIN` (an image of the chain is locked by another process), `-EBADF` (the base cannot
 * be written), `-EUCLEAN` (corrupt metadata), `-ENOSPC`, `-EDEADLK`, `-EIO`.
 */
int qcow2rs_commit(const char *path,
                   const struct qcow2rs_commit_options *opts);

/**
 * Change options of the existing qcow2 image at `path`, as `qemu-img amend -o options
 * path`. `options` is the `-o` string: `key=value` pairs separated by commas (a comma in a
 * value is written twice), e.g. `"compat=0.10"`, `"compat=1.1,lazy_refcounts=on"`,
 * `"refcount_bits=64"`, `"size=20G"`. Keys: `compat` (`0.10` or `1.1`), `lazy_refcounts`,
 * `refcount_bits`, `data_file_raw` (`off`, or `on` where it already is), `data_file` (images
 * with an external data file), `size`, and `backing_file`/`backing_fmt` (only unchanged:
 * use `qcow2rs_rebase`). Every option is checked before anything is written: a refused
 * amend leaves the file as it was. The image must not be in use. `flags`: 0 or
 * `QCOW2RS_AMEND_DIRECT`. Blocking.
 *
 * Returns 0, or: `-EFAULT` (`path` or `options` NULL), `-EINVAL` (unknown flags, an empty
 * or malformed `options`, an unknown key or a bad value, a change qemu-img refuses such as
 * a backing file change or lazy refcounts with compat=0.10), `-ENOTSUP` (a raw image or a
 * file that is not a qcow2 image, a creation-only key such as `cluster_size`, a downgrade to compat=0.10 that
 * the image prevents: refcounts other than 16 bits, a data file, internal snapshots, ...;
 * an unsupported feature), `-ENOENT`, `-EACCES`, `-EAGAIN` (locked by another process), `-EUCLEAN`
 * (corrupt metadata), `-ENOSPC`, `-EDEADLK`, `-EIO`.
 */
int qcow2rs_amend(const char *path,
                  const char *options,
                  uint32_t flags);

/**
 * How large a new image would be, as `qemu-img measure [-f fmt] [-O fmt] [-o options]
 * (--size N | path)`: for a copy of the disk at `path` (opened read-only), or, with `path`
 * NULL, for an empty image of `opts->virtual_size` bytes.
 * `opts` NULL: raw output, defaults. Blocking.
 *
 * `out` (may be NULL) receives the figures: set `out->size` first. If `json_out` is not
 * NULL, `*json_out` receives qemu-img's JSON (`required`, `fully-allocated`, and `bitmaps`
 * when present), to be freed with `qcow2rs_free`; NULL when the call fails.
 *
 * Returns 0, or: `-EFAULT`, `-EINVAL` (bad `size` or unknown flags in `opts`, `out->size`
 * too small, a virtual size with a source or one of 2^63 or more, an unknown option key or a
 * bad or inconsistent value such as a cluster size that is not a power of two, names that
 * are not UTF-8), `-ENOTSUP` (a format other than `"qcow2"` and `"raw"`, LUKS encryption,
 * an unsupported feature of the source), `-ENOENT`, `-EACCES`, `-EAGAIN` (the source is
 * locked by a writer), `-EUCLEAN` (corrupt source), `-EDEADLK`, `-EIO`, `-ENOMEM`.
 */
int qcow2rs_measure(const char *path,
                    const struct qcow2rs_measure_options *opts,
                    struct qcow2rs_measurement *out,
                    char **json_out);

/**
 * Create an internal snapshot named `name` of the image's current state (`qemu-img snapshot
 * -c`). The image must be open read-write. Blocking: the call first waits for the requests
 * in flight on the handle to end; requests submitted meanwhile wait until it returns. The
 * change is atomic: after a crash the image is the one before or the one after. Returns 0,
 * or `-EFAULT` (`img` or `name` NULL), `-EBADF` (open read-only, or marked corrupt),
 * `-EINVAL` (name not UTF-8 or too long, a refcount that would overflow its width, e.g.
 * 1-bit refcounts, which cannot share a cluster: nothing is changed), `-EUCLEAN` (`check`
 * finds errors in the image: repair it first), `-ENOTSUP` (an external data file),
 * `-EDEADLK` (called from a completion callback), `-ECHILD`, I/O errnos.
 */
int qcow2rs_snapshot_create(struct qcow2rs_image *img,
                            const char *name);

/**
 * Revert the image to the snapshot `id_or_name` (an ID, else a name; `qemu-img snapshot
 * -a`): the current state is discarded and the virtual size becomes the snapshot's (see
 * `qcow2rs_get_size`). Conditions and errors as `qcow2rs_snapshot_create`, plus `-ENOENT`
 * (no such snapshot) and `-EUCLEAN` (the snapshot's tables are damaged).
 */
int qcow2rs_snapshot_apply(struct qcow2rs_image *img,
                           const char *id_or_name);

/**
 * Delete the snapshot `id_or_name` (an ID, else a name; `qemu-img snapshot -d`); clusters
 * only it held are freed. Conditions and errors as `qcow2rs_snapshot_apply`.
 */
int qcow2rs_snapshot_delete(struct qcow2rs_image *img,
                            const char *id_or_name);

/**
 * List the image's internal snapshots: `*list` receives an array of `*count` entries (NULL
 * and 0 when there is none), in table order, which the caller frees with
 * `qcow2rs_snapshot_list_free(*list, *count)`. Does no I/O. Returns 0, or `-EFAULT` (`img`,
 * `list` or `count` NULL), `-ECHILD`, `-ENOMEM`; on failure `*list` is NULL and `*count` 0.
 */
int qcow2rs_snapshot_list(struct qcow2rs_image *img,
                          struct qcow2rs_snapshot_info **list,
                          size_t *count);

/**
 * Free a list from `qcow2rs_snapshot_list` (its strings and the array). NULL is allowed.
 */
void qcow2rs_snapshot_list_free(struct qcow2rs_snapshot_info *list,
                                size_t count);

/**
 * Add an enabled persistent bitmap `name`, all bits clear (`qemu-img bitmap --add [-g
 * GRANULARITY]`). `granularity` is the bytes of guest data one bit covers: a power of two
 * from 512 to 2 GiB, or 0 for the default (the cluster size, at least 4 KiB, as QEMU).
 * The image must be open read-write and be a qcow2 v3 image.
 *
 * Blocking: the call first waits for the requests in flight on the handle to end; requests
 * submitted meanwhile wait until it returns. The change is crash-safe: after a crash the
 * image has the bitmaps before or after the call (at worst with leaked clusters). Guest
 * writes through a handle are recorded in the enabled bitmaps (marked in use on disk from
 * the first write) and stored by `qcow2rs_close`; a handle never closed leaves them in use
 * (inconsistent), as QEMU after a crash.
 *
 * Returns 0, or `-EFAULT` (`img` or `name` NULL), `-EEXIST` (a bitmap named `name`
 * exists), `-EINVAL` (a bad granularity; `name` empty, not UTF-8 or longer than 1023
 * bytes; the image already has 65535 bitmaps, or a virtual size of 0), `-EBADF` (open
 * read-only, or marked corrupt), `-ENOTSUP` (a qcow2 v2 image), `-EDEADLK` (called from a
 * completion callback or a library thread), `-ECHILD` (image opened before fork()),
 * `-EUCLEAN` (damaged bitmap metadata), `-ENOSPC` and other I/O errnos.
 */
int qcow2rs_bitmap_add(struct qcow2rs_image *img,
                       const char *name,
                       uint64_t granularity);

/**
 * Remove bitmap `name` and free its clusters (`qemu-img bitmap --remove`); also works on a
 * bitmap marked in use. Conditions and errors as `qcow2rs_bitmap_add`, except that
 * `-ENOENT` means there is no bitmap `name` (and there is no `-EEXIST`).
 */
int qcow2rs_bitmap_remove(struct qcow2rs_image *img,
                          const char *name);

/**
 * Clear every bit of bitmap `name` (`qemu-img bitmap --clear`). Conditions and errors as
 * `qcow2rs_bitmap_remove`, plus `-EINVAL` (the bitmap is marked in use).
 */
int qcow2rs_bitmap_clear(struct qcow2rs_image *img,
                         const char *name);

/**
 * Enable bitmap `name`: set its `QCOW2RS_BITMAP_AUTO` flag (`qemu-img bitmap --enable`;
 * nothing is written when it is set already). Conditions and errors as
 * `qcow2rs_bitmap_clear`.
 */
int qcow2rs_bitmap_enable(struct qcow2rs_image *img,
                          const char *name);

/**
 * Disable bitmap `name`: clear its `QCOW2RS_BITMAP_AUTO` flag (`qemu-img bitmap
 * --disable`). Conditions and errors as `qcow2rs_bitmap_clear`.
 */
int qcow2rs_bitmap_disable(struct qcow2rs_image *img,
                           const char *name);

/**
 * Merge bitmap `src_name` into bitmap `dst` of `img` (`qemu-img bitmap --merge SRC [-b
 * SRC_FILE] IMG DST`): every guest range dirty in the source becomes dirty in `dst`. The
 * source is a bitmap of `src_img`, an open handle (read-only is enough; it may be `img`
 * itself), or of `img` when `src_img` is NULL. Granularities may differ; both images must
 * have the same virtual size. Conditions and errors as `qcow2rs_bitmap_clear` (`-EFAULT`
 * for `dst` or `src_name` NULL, `-ENOENT` for a missing `dst` or source, `-EINVAL` for either
 * marked in use or different virtual sizes; `-ECHILD` also for `src_img`).
 */
int qcow2rs_bitmap_merge(struct qcow2rs_image *img,
                         const char *dst,
                         struct qcow2rs_image *src_img,
                         const char *src_name);

/**
 * List the image's persistent bitmaps (those `qemu-img info` lists: none when the image's
 * bitmaps are not marked consistent): `*list` receives an array of `*count` entries (NULL and
 * 0 when there is none), in directory order, which the caller frees with
 * `qcow2rs_bitmap_list_free(*list, *count)`. Does no I/O; works on a read-only handle.
 * Returns 0, or `-EFAULT` (`img`, `list` or `count` NULL), `-ECHILD`, `-ENOMEM`; on failure
 * `*list` is NULL and `*count` 0.
 */
int qcow2rs_bitmap_list(struct qcow2rs_image *img,
                        struct qcow2rs_bitmap_info **list,
                        size_t *count);

/**
 * Free a list from `qcow2rs_bitmap_list` (its strings and the array). NULL is allowed.
 */
void qcow2rs_bitmap_list_free(struct qcow2rs_bitmap_info *list,
                              size_t count);

/**
 * The dirty ranges of bitmap `name`: `*list` receives an array of `*count` ranges in
 * ascending order (NULL and 0 when nothing is dirty), adjacent dirty granules merged into
 * one range and the last one ending at the virtual size at the latest: the ranges QEMU
 * reports as dirty for the bitmap (its `qemu:dirty-bitmap:NAME` NBD context), what an
 * incremental backup copies. The caller frees the array with `qcow2rs_free`. Works on a read-only
 * handle. Blocking (it reads the bitmap's data).
 *
 * Returns 0, or `-EFAULT` (`img`, `name`, `list` or `count` NULL), `-ENOENT` (no bitmap
 * `name`), `-EINVAL` (`name` not UTF-8; the bitmap is marked in use), `-EUCLEAN` (damaged
 * bitmap metadata), `-EDEADLK` (called from a completion callback or a library thread),
 * `-ECHILD`, `-ENOMEM` and I/O errnos; on failure `*list` is NULL and `*count` 0.
 */
int qcow2rs_bitmap_extents(struct qcow2rs_image *img,
                           const char *name,
                           struct qcow2rs_extent **list,
                           size_t *count);

/**
 * The message of the last call that failed on the calling thread: a one-line, NUL-terminated
 * string, never NULL (`""` if no call has failed on this thread yet). Successful calls leave
 * it unchanged, as they leave `errno`. The string belongs to the library and stays valid until
 * the next `qcow2rs_*` call on the same thread; copy it to keep it.
 *
 * Errors of asynchronous requests are not recorded here: they are in the completion's
 * `error_msg`.
 */
const char *qcow2rs_last_error(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* QCOW2RS_H */
