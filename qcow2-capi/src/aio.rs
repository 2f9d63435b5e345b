//! Asynchronous requests: completion callbacks, requests in flight, the event-loop mode.
//!
//! Every request runs the core future to its end on the library's request runner
//! (`qcow2_core::runner`: first polled inside the submitting call, then by the runner's
//! worker tasks on the runtime threads; it is never dropped halfway: the engines may still be
//! using the caller's buffer), then completes: in the default mode its callback runs on a
//! runtime thread, never inside the submitting call (see [`submit`]); with
//! `QCOW2RS_OPEN_POLL` the completion is queued and an eventfd signalled, and
//! `qcow2rs_process_completions` runs the callback on the caller's thread. A request counts
//! as in flight from its submission until its callback has returned; `qcow2rs_close` waits
//! for that count to reach zero.

use crate::error::{cstring, errno_of, ffi, panic_fail, Fail};
use crate::image::{image_ref, qcow2rs_image};
use crate::runtime::CallbackScope;
use parking_lot::{Condvar, Mutex};
use qcow2_core::runner::{Inline, Runner};
use qcow2_core::{Image, ZeroMode};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CString};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a completion callback receives. Valid only during the callback: copy what you need.
#[repr(C)]
pub struct qcow2rs_completion {
    /// 0 on success, or a negative errno (see RETURN VALUES AND ERRORS at the top).
    pub ret: c_int,
    /// NULL on success, else a one-line message saying what failed. Owned by the library;
    /// valid until the callback returns.
    pub error_msg: *const c_char,
    /// The image the request was submitted on.
    pub img: *mut qcow2rs_image,
}

/// A completion callback: `user_data` is the pointer given at submission, `c` describes the
/// outcome (valid only during the call).
///
/// The callback runs exactly once for every submission that returned 0, on a library thread
/// (or, for an image opened with `QCOW2RS_OPEN_POLL`, inside `qcow2rs_process_completions` or
/// `qcow2rs_close`), never inside the submitting call, with no library lock held. It may
/// submit new requests (on any image) and use non-blocking calls; blocking calls
/// (`qcow2rs_read`, `qcow2rs_close`, ...) return `-EDEADLK` there. It must not throw a C++
/// exception or `longjmp` out. Keep it short: while it runs, its library thread runs nothing
/// else.
pub type qcow2rs_completion_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, c: *const qcow2rs_completion)>;

/// `qcow2rs_aio_write_zeroes` / `qcow2rs_write_zeroes`: the zeroed range may be deallocated
/// (whole clusters lose their host cluster and read as zeros); without it, host clusters stay
/// allocated (marked zero), which keeps later writes there cheap.
pub const QCOW2RS_ZEROES_MAY_UNMAP: u32 = 1 << 0;

/// Most `struct iovec` entries a vectored call takes (Linux's `IOV_MAX`).
pub const QCOW2RS_IOV_MAX: c_int = 1024;

/// A pointer that may cross threads: the header's contract makes the caller keep what it
/// points to valid until the callback returns.
pub(crate) struct SendPtr<T>(pub *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: the pointee is owned by the C caller, who guarantees (header contract) that it
// stays valid and is not used conflictingly until the request's callback returns; the
// library only touches it from the one task of that request.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; shared references are only used to read the pointer value.
unsafe impl<T> Sync for SendPtr<T> {}

/// A finished request whose callback has not run yet.
pub(crate) struct Done {
    cb: CompletionFn,
    user_data: SendPtr<c_void>,
    ret: c_int,
    msg: Option<CString>,
    /// The handle of the request; alive until [`Done::finish`] (see [`Shared::finish`]).
    img: SendPtr<qcow2rs_image>,
}

impl Done {
    /// Run the callback on this thread (a library thread: blocking calls in it already
    /// return `-EDEADLK`), then count the request as finished.
    #[inline(always)]
    fn run(self) {
        let c = qcow2rs_completion {
            ret: self.ret,
            error_msg: self.msg.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
            img: self.img.0,
        };
        // SAFETY: `cb` is the caller's completion function, called as the header promises:
        // once, with its user data and a completion valid for the duration of the call.
        unsafe { (self.cb)(self.user_data.0, &c) };
        self.finish();
    }

    /// As [`Done::run`], on a thread that is not a library thread (the event-loop mode's
    /// `qcow2rs_process_completions` and `qcow2rs_close`): marked as inside a callback while
    /// it runs.
    fn run_in_scope(self) {
        let _scope = CallbackScope::enter();
        self.run();
    }

    /// The request's callback has returned.
    #[inline(always)]
    fn finish(self) {
        let img = self.img.0;
        drop(self);
        // SAFETY: the request is still counted in flight, so `qcow2rs_close` has not freed
        // the handle (it waits for the count to reach zero; see `Shared::finish`).
        unsafe { (*img).shared.finish() };
    }
}

#[derive(Default)]
struct Queue {
    done: VecDeque<Done>,
    /// `qcow2rs_close` is waiting: wake it on every queued completion.
    closing: bool,
}

/// Set in [`Shared::inflight`] once `qcow2rs_close` waits for the requests in flight.
const CLOSING: usize = 1 << (usize::BITS - 1);

/// Request bookkeeping of one image, owned by its handle.
pub(crate) struct Shared {
    /// Requests in flight (submitted, callback not yet returned), plus [`CLOSING`].
    inflight: AtomicUsize,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// The eventfd of the event-loop mode (`QCOW2RS_OPEN_POLL`); closed with the handle.
    efd: Option<OwnedFd>,
}

impl Shared {
    pub(crate) fn new(poll: bool) -> Result<Shared, Fail> {
        let efd = if poll {
            // SAFETY: eventfd(2) with constant flags; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                return Err(Fail::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cannot create the completion eventfd: {e}"),
                ));
            }
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        } else {
            None
        };
        Ok(Shared {
            inflight: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            efd,
        })
    }

    pub(crate) fn event_fd(&self) -> Option<c_int> {
        self.efd.as_ref().map(|f| f.as_raw_fd())
    }

    /// A request's callback has returned. The handle (which owns this struct) may be freed
    /// by `qcow2rs_close` as soon as the count reaches zero, so nothing here touches `self`
    /// after the decrement unless it holds the queue lock: once `drain` has set [`CLOSING`]
    /// (under the lock), the decrement is made under the lock too, and `drain` sees the count
    /// reach zero only after the lock is released, the last access to `self`. Without a
    /// closer the decrement is one compare-and-swap (no reference count on the bookkeeping
    /// per request).
    #[inline(always)]
    fn finish(&self) {
        let mut n = self.inflight.load(Ordering::Acquire);
        loop {
            if n & CLOSING != 0 {
                let _q = self.queue.lock();
                if self.inflight.fetch_sub(1, Ordering::AcqRel) & !CLOSING == 1 {
                    self.cv.notify_all();
                }
                return;
            }
            match self
                .inflight
                .compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(now) => n = now,
            }
        }
    }

    /// Event-loop mode: queue a finished request for `qcow2rs_process_completions` (never
    /// runs its callback, so it may be called inside the submitting call).
    fn enqueue(&self, d: Done, fd: c_int) {
        let mut q = self.queue.lock();
        q.done.push_back(d);
        if q.closing {
            self.cv.notify_all();
        }
        // Signalled under the lock: a poller that drained the eventfd before this push then
        // finds the completion when it takes the lock.
        signal(fd);
    }

    /// Run up to `max` queued callbacks on this thread (event-loop mode); returns how many.
    fn process(&self, max: usize) -> usize {
        let Some(fd) = &self.efd else { return 0 };
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into `buf` from our eventfd (non-blocking; EAGAIN when empty).
        unsafe { libc::read(fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        let mut n = 0;
        while n < max {
            let Some(d) = self.queue.lock().done.pop_front() else {
                break;
            };
            d.run_in_scope();
            n += 1;
        }
        if n == max {
            let q = self.queue.lock();
            if !q.done.is_empty() {
                signal(fd.as_raw_fd());
            }
        }
        n
    }

    /// Wait until no request is in flight, running queued callbacks (event-loop mode) on
    /// this thread meanwhile. Callbacks may submit more requests; those are waited for too.
    pub(crate) fn drain(&self) {
        let mut q = self.queue.lock();
        q.closing = true;
        self.inflight.fetch_or(CLOSING, Ordering::AcqRel);
        loop {
            while let Some(d) = q.done.pop_front() {
                drop(q);
                d.run_in_scope();
                q = self.queue.lock();
            }
            if self.inflight.load(Ordering::Acquire) & !CLOSING == 0 {
                break;
            }
            self.cv.wait(&mut q);
        }
    }
}

fn signal(fd: c_int) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from `one` to our eventfd. It can only fail with EAGAIN when the
    // counter is about to overflow, and then the poller is woken anyway.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Start the future `make(image)` as a request of `h`: its outcome goes to
/// `cb(user_data, ...)`.
///
/// The request runs on the library's request runner (`qcow2_core::runner`): with `inline`
/// (small reads and writes, see [`INLINE_MAX`]) it is polled first right here, and, if not
/// finished, by the runner's worker tasks as its I/O completes,
/// to its end. A request that finishes here (a page-cache hit) is delivered on a library
/// thread, never inside this call: after the running callback returns when the submitter is
/// itself a callback that [`deliver`] runs, else by a runner worker.
///
/// `make` gets the handle's image for the whole life of the request: the handle outlives its
/// requests (`qcow2rs_close` waits for them, and a request's future is dropped before its
/// callback runs), so the future borrows it instead of taking a reference count.
#[inline]
pub(crate) fn submit<F>(
    h: &qcow2rs_image,
    cb: CompletionFn,
    user_data: *mut c_void,
    inline: bool,
    make: impl FnOnce(&'static Image) -> F,
) where
    F: Future<Output = qcow2_core::Result<()>> + Send + 'static,
{
    let img = SendPtr(h as *const qcow2rs_image as *mut qcow2rs_image);
    let user_data = SendPtr(user_data);
    h.shared.inflight.fetch_add(1, Ordering::AcqRel);
    // SAFETY: the handle stays valid until this request's callback has returned (header
    // contract: no use after or during qcow2rs_close, which waits for requests in flight),
    // and the future that borrows the image is dropped before the callback runs.
    let image: &'static Image = unsafe { &(*img.0).img };
    let done = move |res: std::thread::Result<qcow2_core::Result<()>>, inline| {
        let (ret, msg) = match res {
            Ok(Ok(())) => (0, None),
            Ok(Err(e)) => request_error(&e),
            Err(p) => request_panic(&*p),
        };
        let d = Done {
            cb,
            user_data,
            ret,
            msg,
            img,
        };
        // SAFETY: in flight, so the handle is alive (see `Done::finish`).
        let shared = unsafe { &(*img.0).shared };
        if let Some(fd) = shared.event_fd() {
            shared.enqueue(d, fd);
        } else if inline == Inline::No {
            // On a runner worker (a library thread), outside any submitting call.
            deliver(d);
        } else {
            // Inside the submitting call: never run the callback here.
            defer_delivery(d);
        }
    };
    if inline {
        h.rt.runner().run_with(|| make(image), done);
    } else {
        h.rt.runner().spawn_with(|| make(image), done);
    }
}

/// The completion of a request that failed.
#[cold]
fn request_error(e: &qcow2_core::Error) -> (c_int, Option<CString>) {
    (-errno_of(e), Some(cstring(e.to_string())))
}

/// The completion of a request whose future panicked.
#[cold]
fn request_panic(p: &(dyn std::any::Any + Send)) -> (c_int, Option<CString>) {
    let f = panic_fail("request", p);
    (-f.errno, Some(cstring(f.msg)))
}

/// Reads and writes up to this size get their first poll inside the submitting call (see
/// [`submit`]); larger ones, and the other requests, go to the runner's workers at once: a
/// first poll can be long (a large read of unallocated clusters is a `memset` right there,
/// zeroes and discards of large ranges update many L2 entries), and it would hold up the
/// submitter.
pub(crate) const INLINE_MAX: usize = 256 << 10;

/// The queue of requests to deliver after the running callback (see [`deliver`]).
type DeliverQueue = RefCell<VecDeque<Done>>;

thread_local! {
    /// The queue of the [`deliver`] running callbacks on this thread (NULL when none is):
    /// a plain pointer, so that the thread-local needs no destructor and an access to it
    /// is one call in a shared library, with no state check.
    static DELIVERING: Cell<*const DeliverQueue> = const { Cell::new(std::ptr::null()) };
}

/// Callbacks [`deliver`] runs in a row before it hands the rest to another runner job
/// (so that a chain of page-cache hits cannot keep a library thread to itself).
const DELIVER_BUDGET: usize = 64;

/// A finished request's runner: valid while the request is in flight (before `finish`).
fn runner_of(d: &Done) -> Runner {
    // SAFETY: the request of `d` has not finished, so its handle is alive (see `submit`).
    unsafe { (*d.img.0).rt.runner().clone() }
}

/// Queue `d` for delivery after the callback running on this thread, if [`deliver`] is
/// running one; else hand it to a runner worker.
#[inline(always)]
fn defer_delivery(d: Done) {
    let q = DELIVERING.with(|c| c.get());
    if q.is_null() {
        runner_of(&d).defer(move || deliver(d));
    } else {
        // SAFETY: `deliver` set the pointer to its own queue, which it resets before the
        // queue goes away (also when unwinding: `Delivering`).
        unsafe { &*q }.borrow_mut().push_back(d);
    }
}

/// Marks the thread as delivering from `queue` while alive.
struct Delivering;

impl Delivering {
    fn enter(queue: &DeliverQueue) -> Delivering {
        DELIVERING.with(|c| c.set(queue));
        Delivering
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        DELIVERING.with(|c| c.set(std::ptr::null()));
    }
}

/// Run `d`'s callback on this library thread, then those of the requests that completed
/// inside submissions made by it, and so on; after [`DELIVER_BUDGET`] callbacks the rest
/// goes back to the runner as one job.
///
/// Only on a library thread (a runner worker), where blocking calls already return
/// `-EDEADLK`: the callbacks run without a [`CallbackScope`] of their own.
fn deliver(d: Done) {
    deliver_from(d, VecDeque::new());
}

/// [`deliver`] `d`, then the requests of `queue` (a batch handed over by an earlier
/// delivery) and those that complete meanwhile. The queue lives on this stack frame; the
/// thread-local only points to it.
fn deliver_from(d: Done, queue: VecDeque<Done>) {
    debug_assert!(crate::runtime::in_library_context());
    let outer = DELIVERING.with(|c| c.get());
    if !outer.is_null() {
        // Not expected (callbacks are not run from inside deliveries); stay correct anyway.
        // SAFETY: as in `defer_delivery`.
        let mut q = unsafe { &*outer }.borrow_mut();
        q.push_back(d);
        q.extend(queue);
        return;
    }
    let queue = RefCell::new(queue);
    {
        let _delivering = Delivering::enter(&queue);
        let mut next = Some(d);
        let mut n = 0;
        while let Some(d) = next {
            // No borrow of the queue is held while the callback runs (it may submit).
            d.run();
            n += 1;
            if n == DELIVER_BUDGET {
                break;
            }
            next = queue.borrow_mut().pop_front();
        }
    }
    let rest = queue.into_inner();
    if let Some(r) = rest.front().map(runner_of) {
        r.defer(move || deliver_batch(rest));
    }
}

/// Deliver a batch handed over by [`deliver`] after its budget ran out.
fn deliver_batch(mut batch: VecDeque<Done>) {
    if let Some(first) = batch.pop_front() {
        deliver_from(first, batch);
    }
}

/// The checks every submission makes; returns the image and the callback.
#[inline(always)]
fn begin<'a>(
    img: *const qcow2rs_image,
    cb: qcow2rs_completion_fn,
    flags: u32,
    known_flags: u32,
    call: &str,
) -> Result<(&'a qcow2rs_image, CompletionFn), Fail> {
    // SAFETY: the caller passes NULL or a handle from qcow2rs_open that is not closed.
    let h = unsafe { image_ref(img, call)? };
    let Some(cb) = cb else {
        return Err(Fail::fault("the completion callback"));
    };
    if flags & !known_flags != 0 {
        return Err(unknown_flags(call, flags & !known_flags));
    }
    Ok((h, cb))
}

#[cold]
fn unknown_flags(call: &str, flags: u32) -> Fail {
    Fail::inval(format!("{call}: unknown flags 0x{flags:x}"))
}

/// A buffer argument: NULL is allowed only with a length of 0.
#[inline]
pub(crate) fn check_buf(p: *const c_void, len: usize, what: &str) -> Result<(), Fail> {
    if p.is_null() && len != 0 {
        return Err(Fail::fault(what));
    }
    if len > isize::MAX as usize {
        return Err(too_large(what, len));
    }
    Ok(())
}

#[cold]
fn too_large(what: &str, len: usize) -> Fail {
    Fail::inval(format!("{what}: length {len} is too large"))
}

/// The buffers of a vectored request: (start, length), non-empty ones only.
pub(crate) type Segments = Vec<(SendPtr<u8>, usize)>;

/// A completion function that is not NULL.
pub(crate) type CompletionFn = unsafe extern "C" fn(*mut c_void, *const qcow2rs_completion);

/// Copy and check an iovec array; returns the segments and the total length.
pub(crate) fn iovecs(iov: *const libc::iovec, iovcnt: c_int) -> Result<(Segments, u64), Fail> {
    if !(0..=QCOW2RS_IOV_MAX).contains(&iovcnt) {
        return Err(Fail::inval(format!(
            "iovcnt {iovcnt} is outside 0..={QCOW2RS_IOV_MAX}"
        )));
    }
    if iov.is_null() && iovcnt > 0 {
        return Err(Fail::fault("iov"));
    }
    let mut segs = Vec::with_capacity(iovcnt as usize);
    let mut total = 0u64;
    for i in 0..iovcnt as usize {
        // SAFETY: the caller passes `iovcnt` readable entries at `iov` (header contract).
        let v = unsafe { &*iov.add(i) };
        check_buf(v.iov_base, v.iov_len, "iov_base")?;
        total = total
            .checked_add(v.iov_len as u64)
            .ok_or_else(|| Fail::inval("the iovec lengths overflow"))?;
        if v.iov_len > 0 {
            segs.push((SendPtr(v.iov_base.cast::<u8>()), v.iov_len));
        }
    }
    if total > isize::MAX as u64 {
        return Err(Fail::inval("the iovec lengths add up to too much"));
    }
    Ok((segs, total))
}

/// Writes gathered into one buffer (one engine request) up to this total size.
const GATHER_MAX: u64 = 1 << 20;

/// Read into the segments, which lie back to back from `off`.
pub(crate) async fn readv_segments(
    img: &Image,
    segs: Segments,
    off: u64,
) -> qcow2_core::Result<()> {
    let mut pos = off;
    let mut futs = Vec::with_capacity(segs.len());
    for (p, len) in segs {
        // SAFETY: header contract: each iov_base points to iov_len writable bytes that the
        // caller leaves alone until the request completes; the segments do not overlap.
        let buf = unsafe { std::slice::from_raw_parts_mut(p.0, len) };
        futs.push(img.read_at(buf, pos));
        pos += len as u64;
    }
    futures::future::try_join_all(futs).await.map(|_| ())
}

/// Write the segments, which lie back to back from `off`: small totals gathered into one
/// request, larger ones one segment after the other.
pub(crate) async fn writev_segments(
    img: &Image,
    segs: Segments,
    off: u64,
    total: u64,
) -> qcow2_core::Result<()> {
    if segs.len() > 1 && total <= GATHER_MAX {
        let mut data = Vec::with_capacity(total as usize);
        for (p, len) in &segs {
            // SAFETY: header contract: each iov_base points to iov_len readable bytes, valid
            // until the request completes.
            data.extend_from_slice(unsafe { std::slice::from_raw_parts(p.0, *len) });
        }
        return img.write_at(&data, off).await;
    }
    let mut pos = off;
    for (p, len) in segs {
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts(p.0, len) };
        img.write_at(buf, pos).await?;
        pos += len as u64;
    }
    Ok(())
}

/// Start an asynchronous read of `len` bytes at guest offset `offset` into `buf`.
///
/// Returns 0 when the request was submitted: `cb(user_data, c)` then runs exactly once, after
/// the data is in `buf` (`c->ret == 0`) or the read failed (`c->ret < 0`, `buf` undefined).
/// Returns a negative errno when it was not submitted (the callback never runs):
/// `-EFAULT` (`img` or `cb` NULL, or `buf` NULL with `len` > 0), `-EINVAL` (unknown `flags`,
/// or the range is not inside the virtual disk), `-ECHILD` (image opened before fork()).
/// Completion errors: `-EIO` and other I/O errnos, `-EUCLEAN` (corrupt metadata found),
/// `-ENOTSUP`.
///
/// `buf` must stay valid, and must not be read or written by the caller, until the callback
/// returns. `flags` must be 0. Never blocks on I/O. Any thread may submit, including
/// callbacks.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_aio_read(
    img: *mut qcow2rs_image,
    buf: *mut c_void,
    len: usize,
    offset: u64,
    cb: qcow2rs_completion_fn,
    user_data: *mut c_void,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_aio_read", move || {
        let (h, cb) = begin(img, cb, flags, 0, "qcow2rs_aio_read")?;
        check_buf(buf, len, "buf")?;
        h.check_range(offset, len as u64)?;
        let p = SendPtr(buf.cast::<u8>());
        submit(
            h,
            cb,
            user_data,
            len <= INLINE_MAX,
            // The core's future itself, with no `async` block around it (one state machine
            // less to set up and step through per request).
            move |image| {
                // SAFETY: header contract: `buf` points to `len` writable bytes that stay valid
                // and untouched by the caller until the callback returns, which happens only
                // after this future has finished (and been dropped).
                let slice = unsafe { make_slice_mut(p.0, len) };
                image.read_at(slice, offset)
            },
        );
        Ok(0)
    })
}

/// Start an asynchronous write of `len` bytes from `buf` at guest offset `offset`.
///
/// As `qcow2rs_aio_read`, plus `-EBADF` when the image was opened read-only (or is marked
/// corrupt). Completion errors also include `-ENOSPC`. `buf` must stay valid, unchanged,
/// until the callback returns. A completed write is durable only after a flush.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_aio_write(
    img: *mut qcow2rs_image,
    buf: *const c_void,
    len: usize,
    offset: u64,
    cb: qcow2rs_completion_fn,
    user_data: *mut c_void,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_aio_write", move || {
        let (h, cb) = begin(img, cb, flags, 0, "qcow2rs_aio_write")?;
        check_buf(buf, len, "buf")?;
        h.check_writable("qcow2rs_aio_write")?;
        h.check_range(offset, len as u64)?;
        let p = SendPtr(buf as *mut u8);
        submit(h, cb, user_data, len <= INLINE_MAX, move |image| {
            // SAFETY: header contract: `buf` points to `len` readable bytes that stay valid
            // and unchanged until the callback returns, after this future has finished
            // (and been dropped).
            let slice = unsafe { make_slice(p.0, len) };
            image.write_at(slice, offset)
        });
        Ok(0)
    })
}

/// Asynchronous vectored read: fills the `iovcnt` buffers of `iov` one after the other with
/// the guest data starting at `offset`. As `qcow2rs_aio_read`; also `-EINVAL` when `iovcnt`
/// is negative or above `QCOW2RS_IOV_MAX`. The `iov` array itself is copied during the call;
/// the buffers it points to stay borrowed until the callback returns.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_aio_readv(
    img: *mut qcow2rs_image,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
    cb: qcow2rs_completion_fn,
    user_data: *mut c_void,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_aio_readv", || {
        let (h, cb) = begin(img, cb, flags, 0, "qcow2rs_aio_readv")?;
        let (segs, total) = iovecs(iov, iovcnt)?;
        h.check_range(offset, total)?;
        let inline = total <= INLINE_MAX as u64;
        submit(h, cb, user_data, inline, move |image| {
            readv_segments(image, segs, offset)
        });
        Ok(0)
    })
}

/// Asynchronous vectored write of the `iovcnt` buffers of `iov`, back to back from
/// `offset`. As `qcow2rs_aio_write` and `qcow2rs_aio_readv`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_aio_writev(
    img: *mut qcow2rs_image,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
    cb: qcow2rs_completion_fn,
    user_data: *mut c_void,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_aio_writev", || {
        let (h, cb) = begin(img, cb, flags, 0, "qcow2rs_aio_writev")?;
        let (segs, total) = iovecs(iov, iovcnt)?;
        h.check_writable("qcow2rs_aio_writev")?;
        h.check_range(offset, total)?;
        let inline = total <= INLINE_MAX as u64;
        submit(h, cb, user_data, inline, move |image| {
            writev_segments(image, segs, offset, total)
        });
        Ok(0)
    })
}

/// Asynchronous flush: when the callback reports success, every write that had completed
/// before this call was made is durable (metadata in order, then `fdatasync`). Requests still
/// in flight at submission are not covered. Enabled persistent bitmaps are stored too, as by
/// `qcow2rs_flush`. Errors as `qcow2rs_aio_read` (no range); on a
/// read-only image it succeeds and does nothing.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_aio_flush(
    img: *mut qcow2rs_image,
    cb: qcow2rs_completion_fn,
    user_data: *mut c_void,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_aio_flush", || {
        let (h, cb) = begin(img, cb, flags, 0, "qcow2rs_aio_flush")?;
        submit(h, cb, user_data, false, |image| image.flush());
        Ok(0)
    })
}

/// Make `len` bytes at `offset` read as zeros, asynchronously. Whole clusters are marked
/// zero in their L2 entries (no data written); partial clusters are written with zeros.
/// `flags`: 0 or `QCOW2RS_ZEROES_MAY_UNMAP`. Errors as `qcow2rs_aio_write`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_aio_write_zeroes(
    img: *mut qcow2rs_image,
    len: u64,
    offset: u64,
    cb: qcow2rs_completion_fn,
    user_data: *mut c_void,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_aio_write_zeroes", || {
        let (h, cb) = begin(
            img,
            cb,
            flags,
            QCOW2RS_ZEROES_MAY_UNMAP,
            "qcow2rs_aio_write_zeroes",
        )?;
        h.check_writable("qcow2rs_aio_write_zeroes")?;
        h.check_range(offset, len)?;
        let mode = zero_mode(flags);
        submit(h, cb, user_data, false, move |image| {
            image.write_zeroes(offset, len, mode)
        });
        Ok(0)
    })
}

/// Discard `len` bytes at `offset`, asynchronously: whole clusters are deallocated (they read
/// as zeros afterwards, never as backing-file data) and their space given back to the host
/// file system; partial clusters are written with zeros. `flags` must be 0. Errors as
/// `qcow2rs_aio_write`.
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_aio_discard(
    img: *mut qcow2rs_image,
    len: u64,
    offset: u64,
    cb: qcow2rs_completion_fn,
    user_data: *mut c_void,
    flags: u32,
) -> c_int {
    ffi("qcow2rs_aio_discard", || {
        let (h, cb) = begin(img, cb, flags, 0, "qcow2rs_aio_discard")?;
        h.check_writable("qcow2rs_aio_discard")?;
        h.check_range(offset, len)?;
        submit(h, cb, user_data, false, move |image| {
            image.discard(offset, len)
        });
        Ok(0)
    })
}

pub(crate) fn zero_mode(flags: u32) -> ZeroMode {
    if flags & QCOW2RS_ZEROES_MAY_UNMAP != 0 {
        ZeroMode::Unmap
    } else {
        ZeroMode::Keep
    }
}

/// A mutable byte slice over caller memory (empty for a length of 0, whatever the pointer).
///
/// # Safety
/// With `len > 0`, `p` must point to `len` writable bytes that nothing else accesses while
/// the slice lives.
pub(crate) unsafe fn make_slice_mut<'a>(p: *mut u8, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller (see above).
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

/// A byte slice over caller memory (empty for a length of 0, whatever the pointer).
///
/// # Safety
/// With `len > 0`, `p` must point to `len` readable bytes that nobody changes while the
/// slice lives.
pub(crate) unsafe fn make_slice<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller (see above).
    unsafe { std::slice::from_raw_parts(p, len) }
}

/// The eventfd of an image opened with `QCOW2RS_OPEN_POLL`: it becomes readable when
/// completions are queued. Poll it for `POLLIN` (never read it yourself) and call
/// `qcow2rs_process_completions`. The descriptor belongs to the image (closed by
/// `qcow2rs_close`).
///
/// Returns the descriptor (>= 0), or `-EFAULT` (`img` NULL), `-EINVAL` (image not opened with
/// `QCOW2RS_OPEN_POLL`), `-ECHILD` (image opened before fork()).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_get_completion_fd(img: *mut qcow2rs_image) -> c_int {
    ffi("qcow2rs_get_completion_fd", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_get_completion_fd")? };
        h.shared.event_fd().ok_or_else(|| {
            Fail::inval(
                "qcow2rs_get_completion_fd: the image was not opened with QCOW2RS_OPEN_POLL",
            )
        })
    })
}

/// Run the callbacks of completed requests of an image opened with `QCOW2RS_OPEN_POLL`, on
/// the calling thread, at most `max` of them (`max` <= 0: all that are queued). Returns how
/// many ran (0 when none was ready: it never waits), or `-EFAULT`, `-EINVAL` (image not in
/// event-loop mode), `-ECHILD`. When callbacks remain queued after `max`, the eventfd stays
/// readable. Callbacks run here may submit requests; blocking calls return `-EDEADLK` in them.
/// May be called from several threads at once (each callback still runs once).
#[no_mangle]
pub unsafe extern "C" fn qcow2rs_process_completions(img: *mut qcow2rs_image, max: c_int) -> c_int {
    ffi("qcow2rs_process_completions", || {
        // SAFETY: NULL or a live handle (header contract).
        let h = unsafe { image_ref(img, "qcow2rs_process_completions")? };
        if h.shared.event_fd().is_none() {
            return Err(Fail::inval(
                "qcow2rs_process_completions: the image was not opened with QCOW2RS_OPEN_POLL",
            ));
        }
        let max = if max <= 0 { usize::MAX } else { max as usize };
        Ok(h.shared.process(max).min(c_int::MAX as usize) as c_int)
    })
}
