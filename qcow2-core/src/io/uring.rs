//! Linux io_uring engine.
//!
//! Design:
//! - **A few rings shared by every open file, one per CPU** (at most
//!   [`MAX_RINGS`]), each with one completion thread (`qcow2rs-uring-N`). A thread
//!   submits to "its" ring (threads are spread over the rings round-robin, so each
//!   runtime worker mostly has a ring of its own), whatever the file: a 64-image
//!   backing chain costs no more rings or threads than one image. The set starts
//!   with the first open file and stops (joining its threads) when the last one is
//!   dropped, as the threads engine's pool does; unless a [`RingsHold`] ([`hold_rings`])
//!   keeps it (the `qcow2rs` binary's, forgotten at exit: the exit ends the threads).
//! - **Page-cache hits never reach a ring.** Reads of files opened without
//!   `O_DIRECT` are first tried on the submitting thread with
//!   `preadv2(RWF_NOWAIT)` straight into the caller's buffer (plain
//!   `pread`/`pwrite` on tmpfs, which never waits for a device); only what would
//!   block goes to the ring (see [`super::threads`] `FileCore::read_inline`). So a
//!   request that completes at once costs no wake-up of another thread at all.
//!   Buffered writes up to 1 MiB are plain `pwrite`s on the submitting thread too,
//!   one thread per file at a time (`FileCore::write_inline`): file systems without
//!   `RWF_NOWAIT` buffered writes (ext4) make io_uring run each one on an io-wq
//!   worker, a thread hop more.
//! - **Submission from any thread.** A request is registered in the ring's table
//!   of operations and its SQE pushed under a mutex (the only place a submission
//!   queue is touched); the submitting thread then calls `io_uring_enter` itself,
//!   without the mutex, so no thread hop is added. If the ring is full (more than
//!   the completion queue can hold in flight, or the submission queue has no free
//!   slot), the request waits in a backlog that the completion thread drains as
//!   operations finish, so any number of requests can be outstanding and the
//!   completion queue never overflows.
//! - **Reaping** ([`Ring::reap_ready`]) takes the CQEs there are (one thread at a
//!   time consumes the completion queue) and, with the mutex held, advances each
//!   operation: a short read or write is resubmitted for the rest,
//!   `EAGAIN`/`EINTR` are resubmitted, and finished operations are completed
//!   through their oneshot sender after the mutex is released. A submitter never
//!   waits for the completion thread and no thread blocks with the mutex held, so
//!   they cannot deadlock.
//! - **The completion thread** waits in `epoll_wait` on the ring's fd (readable
//!   when completions are there) and an eventfd, and reaps. It is the backstop:
//!   every completion that no other thread reaps, it reaps.
//! - **Waiting in the ring** ([`block_on`]): a thread that blocks for a future
//!   waits in `io_uring_enter(GETEVENTS)` on its own ring (the one it submits to)
//!   and reaps every completion of that ring itself, so a request it submitted
//!   costs one wake-up (the kernel runs a request's completion work on the thread
//!   that submitted it, which wakes that thread anyway), not two (completion
//!   thread, then the waiting thread). One thread at a time waits in a ring, and
//!   while it does, it alone consumes the ring's completion queue ([`Ring::own`]
//!   gives the invariant): a waiter is woken by other threads with a `NOP` pushed
//!   to its ring, and an entry consumed by anyone else could leave it asleep on an
//!   empty queue. A second thread that would wait in the same ring waits
//!   on a condition variable instead, woken by whoever reaps its requests. While a thread
//!   waits in a ring, the ring's fd is taken out of its completion thread's epoll
//!   set (`EPOLL_CTL_MOD` with no events), so completions do not wake it too; the
//!   last waiter to leave puts it back, and epoll re-checks the fd then, so
//!   completions that arrived meanwhile wake the completion thread at once. A
//!   `block_on` call that has waited a few times stays among the waiters while it
//!   polls its future between waits ([`Lingering`]: two `epoll_ctl` calls less per
//!   wait), and the completion thread looks on a timer meanwhile.
//! - **Reaping in a tokio runtime** ([`reap_in_runtime`]): a runtime's workers
//!   cannot wait in a ring (tokio parks them in its reactor's `epoll_wait` or on a
//!   futex), and draining the ring in a park/unpark hook does not wake a parked
//!   worker for a completion that comes later (one posted by an io-wq worker, as
//!   buffered writes on ext4 are, wakes nobody but the ring's pollers). Instead
//!   one task per ring ([`watch`]) registers the ring's fd in the runtime's reactor:
//!   a completion wakes the worker sleeping there, which reaps the ring and runs
//!   the tasks it wakes itself. The task counts as a waiter of the ring (its fd
//!   leaves the completion thread's epoll set, as above), and the completion
//!   thread then looks every few milliseconds instead, as the fallback for a
//!   runtime whose threads all block. Neither the task nor the completion thread
//!   reaps a ring while a thread waits in it (the thread reaps it, and what is
//!   left when it goes).
//! - **Ownership.** Every operation owns its (aligned) buffer, or borrows the
//!   caller's memory for an aligned read or write (`ReadInto`, `WriteFrom`: the
//!   caller's future runs to its end, see `RunToEnd` in [`super::threads`]), and a
//!   reference to its file (so the fd stays open), and keeps both in the table until
//!   its CQE is reaped: dropping the caller's future only drops the receiving end. Dropping a
//!   [`UringFile`] waits until the operations of its dropped futures have finished.
//! - **Teardown.** Dropping the ring set marks each ring as exiting and wakes its
//!   completion thread (eventfd); a completion thread exits once no operation is
//!   left (polling every millisecond meanwhile, as the remaining completions may
//!   be reaped by a waiting thread), and the drop joins it. A thread still waiting
//!   in a ring of a dropped set holds that ring (an `Arc`) and is woken there as
//!   before.
//!
//! `flush` is `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`; `discard`,
//! `write_zeroes` and `allocate` are `IORING_OP_FALLOCATE`. Alignment bouncing,
//! read-modify-write and fallbacks are shared with the threads engine (see
//! [`super::threads`]).

use super::threads::{ops, AlignedBuf, Backend, FileCore, Hold, Pending, RawBuf};
use super::{FileOptions, IoFuture, Storage};
use futures::channel::oneshot;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use parking_lot::Mutex;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

/// Submission queue entries per ring (the completion queue gets twice as many).
const RING_ENTRIES: u32 = 256;
/// Most rings (and completion threads) in a process.
pub const MAX_RINGS: usize = 8;

/// Whether an open error means io_uring is not available here (so `Auto` falls back).
///
/// `io_uring_setup` fails with `ENOSYS` when the kernel lacks io_uring (or a
/// sandbox such as gVisor hides it), `EPERM` when it is disabled by
/// `kernel.io_uring_disabled` or filtered by seccomp (Docker's default profile),
/// `ENOMEM` when the locked-memory limit of older kernels is too small, and
/// [`UringFile::open`] reports `EOPNOTSUPP` when the kernel lacks an operation it
/// needs.
pub fn is_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EOPNOTSUPP) | Some(libc::ENOMEM)
    )
}

/// What an operation does, with what it owns and whom it answers.
enum Kind {
    Read {
        buf: AlignedBuf,
        tx: oneshot::Sender<io::Result<(AlignedBuf, usize)>>,
    },
    /// A read into the caller's memory (see [`RawBuf`]: the request runs to its end).
    ReadInto {
        buf: RawBuf,
        tx: oneshot::Sender<io::Result<usize>>,
    },
    Write {
        buf: AlignedBuf,
        truncate_to: Option<u64>,
        tx: oneshot::Sender<io::Result<()>>,
    },
    /// A write from the caller's memory (see [`RawBuf`]: the request runs to its end).
    WriteFrom {
        buf: RawBuf,
        tx: oneshot::Sender<io::Result<()>>,
    },
    Fsync {
        tx: oneshot::Sender<io::Result<()>>,
    },
    Fallocate {
        mode: i32,
        len: u64,
        tx: oneshot::Sender<io::Result<()>>,
    },
    /// A `NOP` that wakes the threads waiting in the ring (see [`Parker`]).
    Kick,
}

/// One operation, from registration until its last CQE.
struct Op {
    kind: Kind,
    /// The file (`None` for a kick): kept open until the operation is finished.
    core: Option<Arc<FileCore>>,
    /// File offset of the operation's start.
    off: u64,
    /// Bytes already transferred (short reads/writes are resubmitted for the rest).
    done: usize,
    /// Dropped once the operation has finished (a lock guard).
    hold: Hold,
}

impl Op {
    /// The SQE for the part of the operation not done yet.
    fn sqe(&mut self, id: u64) -> squeue::Entry {
        let fd = types::Fd(self.core.as_ref().map_or(-1, |c| c.file.as_raw_fd()));
        let pos = self.off + self.done as u64;
        let entry = match &mut self.kind {
            Kind::Read { buf, .. } => {
                let rest = (buf.len() - self.done) as u32;
                let p = buf.as_mut_ptr().wrapping_add(self.done);
                opcode::Read::new(fd, p, rest).offset(pos).build()
            }
            Kind::ReadInto { buf, .. } => {
                let rest = (buf.len() - self.done) as u32;
                let p = buf.as_mut_ptr().wrapping_add(self.done);
                opcode::Read::new(fd, p, rest).offset(pos).build()
            }
            Kind::Write { buf, .. } => {
                let rest = (buf.len() - self.done) as u32;
                let p = buf.as_mut_ptr().wrapping_add(self.done);
                opcode::Write::new(fd, p, rest).offset(pos).build()
            }
            Kind::WriteFrom { buf, .. } => {
                let rest = (buf.len() - self.done) as u32;
                let p = buf.as_mut_ptr().wrapping_add(self.done);
                opcode::Write::new(fd, p, rest).offset(pos).build()
            }
            Kind::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Fallocate { mode, len, .. } => opcode::Fallocate::new(fd, *len)
                .offset(self.off)
                .mode(*mode)
                .build(),
            Kind::Kick => opcode::Nop::new().build(),
        };
        entry.user_data(id)
    }

    /// Answer the caller (who may be gone) once the operation has finished.
    fn finish(self, r: io::Result<usize>) {
        drop(self.hold);
        match self.kind {
            Kind::Read { buf, tx } => {
                let _ = tx.send(r.map(|n| (buf, n)));
            }
            Kind::ReadInto { tx, .. } => {
                let _ = tx.send(r);
            }
            Kind::Write { tx, .. }
            | Kind::WriteFrom { tx, .. }
            | Kind::Fsync { tx }
            | Kind::Fallocate { tx, .. } => {
                let _ = tx.send(r.map(drop));
            }
            Kind::Kick => {}
        }
    }
}

/// What to do with an operation after a CQE.
enum Step {
    /// Submit it again (for the rest, or after `EAGAIN`/`EINTR`).
    Again,
    /// It has finished.
    Done(io::Result<usize>),
}

/// Operations and queueing state, under the ring's mutex.
struct State {
    ops: HashMap<u64, Op>,
    next_id: u64,
    /// Operations with an SQE in the ring or in the kernel and no CQE reaped yet.
    in_ring: usize,
    /// Operations waiting for room in the ring, in order.
    backlog: VecDeque<u64>,
    /// The completion thread sleeps without its fallback timer (the ring is watched
    /// by a [`watch`] task and has been idle): the next operation registered wakes it.
    idle_sleep: bool,
}

/// A ring, shared by the files of the threads that submit to it and its completion thread.
struct Ring {
    uring: IoUring,
    state: Mutex<State>,
    /// Most operations in the ring at once: the completion queue's size, so it
    /// cannot overflow.
    cap: usize,
    /// Held by the one thread that consumes the completion queue at a time. True
    /// while a thread waits in the ring ([`Ring::own`]): then only that thread
    /// consumes it (see [`Ring::reap_ready`]).
    cq: Mutex<bool>,
    /// The completion thread's epoll set: the ring's fd (armed while no thread
    /// waits in the ring) and `wake`.
    epoll: OwnedFd,
    /// An eventfd that wakes the completion thread (teardown).
    wake: OwnedFd,
    /// Threads waiting in the ring ([`Ring::park`]) and tokio tasks watching it
    /// ([`watch`]); the ring's fd is armed in `epoll` exactly when this is 0
    /// (changed under the lock).
    waiters: Mutex<usize>,
    /// Of `waiters`, the tokio tasks ([`watch`]): while there is one, the
    /// completion thread also wakes on a timer (see [`completion_thread`]).
    watchers: AtomicUsize,
    /// Of `waiters`, the threads that stay among them between two waits in the ring
    /// ([`Lingering`]): the completion thread then wakes on the timer too.
    lingerers: AtomicUsize,
    /// That timer while operations are in the ring, in milliseconds
    /// ([`FALLBACK_BUSY_MS`]; tests that must see who reaps make it long).
    fallback_ms: std::sync::atomic::AtomicI32,
    /// The ring set was dropped: the completion thread exits once no operation is left.
    exiting: AtomicBool,
    /// Wakes the [`watch`] tasks when `exiting` is set.
    exit: tokio::sync::Notify,
    /// Completions reaped by threads waiting in the ring (not the completion thread).
    #[cfg(test)]
    waiter_reaps: AtomicUsize,
    /// Completions reaped by [`watch`] tasks.
    #[cfg(test)]
    watcher_reaps: AtomicUsize,
    /// Completions reaped by the completion thread.
    #[cfg(test)]
    thread_reaps: AtomicUsize,
}

impl Ring {
    /// Register an operation and get it submitted.
    fn start(&self, kind: Kind, core: Option<Arc<FileCore>>, off: u64, hold: Hold) {
        if self.register(kind, core, off, hold) {
            self.submit();
        }
    }

    /// Register an operation and push its SQE if there is room (else it waits in the
    /// backlog). Returns whether an SQE was pushed: the caller must then submit it
    /// ([`Ring::submit`], or [`submit_or_defer`]).
    fn register(&self, kind: Kind, core: Option<Arc<FileCore>>, off: u64, hold: Hold) -> bool {
        let mut st = self.state.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.ops.insert(
            id,
            Op {
                kind,
                core,
                off,
                done: 0,
                hold,
            },
        );
        let wake = std::mem::take(&mut st.idle_sleep);
        let pushed = self.enqueue(&mut st, id);
        drop(st);
        if wake {
            // Back to its fallback timer (see `completion_thread`).
            self.wake_completion_thread();
        }
        pushed
    }

    /// Push the SQE of operation `id` if there is room (and nobody waits before
    /// it), else append it to the backlog. Returns whether it was pushed.
    ///
    /// Invariant: the backlog is empty, or some operation is in the ring and its
    /// completion will wake the completion thread, which drains the backlog.
    fn enqueue(&self, st: &mut State, id: u64) -> bool {
        if st.backlog.is_empty() && st.in_ring < self.cap && self.push_or_flush(st, id) {
            st.in_ring += 1;
            true
        } else {
            st.backlog.push_back(id);
            false
        }
    }

    /// [`Ring::push`], and if the submission queue looks full, submit what it
    /// holds and try once more. (It can look full with every operation already
    /// reaped: the kernel posts completions of a batch before it moves the
    /// queue's head. Submitting waits for that, as the kernel serializes
    /// submissions.) A queue still full afterwards holds operations in the ring.
    fn push_or_flush(&self, st: &mut State, id: u64) -> bool {
        if self.push(st, id) {
            return true;
        }
        let _ = self.uring.submit();
        self.push(st, id)
    }

    /// Push the SQE of operation `id`; false if the submission queue is full.
    fn push(&self, st: &mut State, id: u64) -> bool {
        let Some(op) = st.ops.get_mut(&id) else {
            return true; // unreachable: operations are registered before being queued
        };
        let sqe = op.sqe(id);
        // SAFETY: `submission_shared` requires that no other `SubmissionQueue`
        // exists: one is only ever created with the state mutex held (here and in
        // `kernel_busy`), and we hold it (we have `&mut State` from its guard).
        let mut sq = unsafe { self.uring.submission_shared() };
        // SAFETY: `push` requires the entry's resources to stay valid until the
        // operation completes. The buffer (if any) is owned by the operation,
        // which stays in `st.ops` (its heap memory never moves) until the
        // completion thread has reaped its CQE, or (`ReadInto`) is the caller's
        // memory, which the caller's `RunToEnd` keeps borrowed until the operation
        // has answered (after that CQE); the fd belongs to the operation's
        // `core`, an `Arc` the operation holds until then.
        let ok = unsafe { sq.push(&sqe) }.is_ok();
        drop(sq); // publishes the new tail
        ok
    }

    /// Whether the kernel holds an operation whose completion will wake the
    /// completion thread (which submits pending SQEs whenever it wakes).
    fn kernel_busy(&self) -> bool {
        let st = self.state.lock();
        // SAFETY: as in `push`: the state mutex is held, so this is the only
        // `SubmissionQueue`.
        let queued = unsafe { self.uring.submission_shared() }.len();
        st.in_ring > queued
    }

    /// Tell the kernel about pushed SQEs.
    fn submit(&self) {
        let mut delay = Duration::from_micros(100);
        loop {
            match self.uring.submit() {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // EAGAIN/EBUSY (the kernel is short of memory or busy flushing
                    // completions), or worse. The SQEs stay queued in the ring: if an
                    // operation is in the kernel, its completion wakes the completion
                    // thread, which submits them; otherwise retry after a pause.
                    if self.kernel_busy() {
                        return;
                    }
                    thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// Advance operation `op` after a CQE with result `res`.
    fn advance(&self, op: &mut Op, res: i32) -> Step {
        if res < 0 {
            let errno = -res;
            return if errno == libc::EAGAIN || errno == libc::EINTR {
                Step::Again
            } else {
                Step::Done(Err(io::Error::from_raw_os_error(errno)))
            };
        }
        let n = res as usize;
        let Some(core) = op.core.clone() else {
            return Step::Done(Ok(0)); // a kick
        };
        match &op.kind {
            Kind::Read { .. } | Kind::ReadInto { .. } => {
                let len = match &op.kind {
                    Kind::Read { buf, .. } => buf.len(),
                    Kind::ReadInto { buf, .. } => buf.len(),
                    _ => 0,
                };
                if n == 0 {
                    return Step::Done(Ok(op.done)); // end of file
                }
                op.done += n;
                let pos = op.off + op.done as u64;
                let align = core.align as u64;
                // With O_DIRECT, stopping at an unaligned position is the end of file.
                if op.done >= len || pos & (align - 1) != 0 {
                    Step::Done(Ok(op.done))
                } else {
                    Step::Again
                }
            }
            Kind::Write { .. } | Kind::WriteFrom { .. } => {
                let (len, truncate_to) = match &op.kind {
                    Kind::Write {
                        buf, truncate_to, ..
                    } => (buf.len(), *truncate_to),
                    Kind::WriteFrom { buf, .. } => (buf.len(), None),
                    _ => (0, None),
                };
                if n == 0 {
                    return Step::Done(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the kernel wrote no byte",
                    )));
                }
                op.done += n;
                if op.done < len {
                    return Step::Again;
                }
                if let Some(len) = truncate_to {
                    if let Err(e) = core.set_len(len) {
                        return Step::Done(Err(e));
                    }
                }
                Step::Done(Ok(op.done))
            }
            Kind::Fsync { .. } | Kind::Fallocate { .. } | Kind::Kick => Step::Done(Ok(0)),
        }
    }
}

/// epoll `data` of the ring's fd and of the wake eventfd.
const EP_RING: u64 = 0;
const EP_WAKE: u64 = 1;

impl Ring {
    fn new(uring: IoUring) -> io::Result<Ring> {
        let cap = uring.params().cq_entries().max(1) as usize;
        // SAFETY: plain system calls; each returned fd is checked and owned at once.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epoll` is a new fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        // SAFETY: as above.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `wake` is a new fd that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let ring = Ring {
            uring,
            state: Mutex::new(State {
                ops: HashMap::new(),
                next_id: 0,
                in_ring: 0,
                backlog: VecDeque::new(),
                idle_sleep: false,
            }),
            cap,
            cq: Mutex::new(false),
            epoll,
            wake,
            waiters: Mutex::new(0),
            watchers: AtomicUsize::new(0),
            lingerers: AtomicUsize::new(0),
            fallback_ms: std::sync::atomic::AtomicI32::new(FALLBACK_BUSY_MS),
            exiting: AtomicBool::new(false),
            exit: tokio::sync::Notify::new(),
            #[cfg(test)]
            waiter_reaps: AtomicUsize::new(0),
            #[cfg(test)]
            watcher_reaps: AtomicUsize::new(0),
            #[cfg(test)]
            thread_reaps: AtomicUsize::new(0),
        };
        ring.epoll_ctl(libc::EPOLL_CTL_ADD, ring.uring.as_raw_fd(), EP_RING, true)?;
        ring.epoll_ctl(libc::EPOLL_CTL_ADD, ring.wake.as_raw_fd(), EP_WAKE, true)?;
        Ok(ring)
    }

    /// Add `fd` to (or change it in) the completion thread's epoll set, reporting
    /// readability (`armed`) or nothing.
    fn epoll_ctl(&self, op: i32, fd: RawFd, data: u64, armed: bool) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: if armed { libc::EPOLLIN as u32 } else { 0 },
            u64: data,
        };
        // SAFETY: both fds are open (owned by `self`), `ev` is a valid event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Arm or disarm the ring's fd in the completion thread's epoll set. On an
    /// error (not expected: the fds are ours) it stays armed: the completion
    /// thread then also wakes for completions a waiting thread reaps, which costs
    /// a wake-up but loses nothing.
    fn arm(&self, armed: bool) {
        let _ = self.epoll_ctl(libc::EPOLL_CTL_MOD, self.uring.as_raw_fd(), EP_RING, armed);
    }

    /// Wake the completion thread (it re-checks `exiting`).
    fn wake_completion_thread(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reap every completion there is: advance its operation, refill the ring
    /// from the backlog, answer finished operations (without any lock held).
    /// Any thread may call this; one at a time consumes the completion queue.
    /// Returns how many completions it reaped.
    ///
    /// `owner`: the caller is the thread waiting in the ring ([`Ring::own`]). Any
    /// other caller reaps nothing while a thread waits in the ring: a completion
    /// queue consumed by another party could leave that thread asleep in
    /// `io_uring_enter` on an empty queue, its wake-up taken (see [`Ring::own`]).
    fn reap_ready(&self, owner: bool) -> usize {
        const CHUNK: usize = 32;
        let mut total = 0;
        loop {
            let mut cqes = [(0u64, 0i32); CHUNK];
            let mut n = 0;
            {
                let owned = self.cq.lock();
                if *owned && !owner {
                    return total;
                }
                // SAFETY: `completion_shared` requires that no other `CompletionQueue`
                // exists: one is only ever created with `cq` locked, and we hold it.
                let mut cq = unsafe { self.uring.completion_shared() };
                for c in &mut cq {
                    cqes[n] = (c.user_data(), c.result());
                    n += 1;
                    if n == CHUNK {
                        break;
                    }
                }
                drop(cq); // publishes the new head
            }
            if n == 0 {
                return total;
            }
            total += n;
            for &(id, res) in &cqes[..n] {
                let mut pushed = false;
                let finished = {
                    let mut st = self.state.lock();
                    st.in_ring -= 1;
                    let mut fin = None;
                    if let Some(mut op) = st.ops.remove(&id) {
                        match self.advance(&mut op, res) {
                            Step::Again => {
                                st.ops.insert(id, op);
                                pushed |= self.enqueue(&mut st, id);
                            }
                            Step::Done(r) => fin = Some((op, r)),
                        }
                    }
                    while st.in_ring < self.cap {
                        let Some(&id) = st.backlog.front() else {
                            break;
                        };
                        if !self.push_or_flush(&mut st, id) {
                            break;
                        }
                        st.backlog.pop_front();
                        st.in_ring += 1;
                        pushed = true;
                    }
                    fin
                };
                if pushed {
                    // Errors leave the SQEs queued: see the completion thread's loop.
                    let _ = self.uring.submit();
                }
                // Answer without the mutex: waking a task may run arbitrary code.
                if let Some((op, r)) = finished {
                    op.finish(r);
                }
            }
            if n < CHUNK {
                return total;
            }
        }
    }

    /// Wait in the ring until `woken` is set, reaping every completion meanwhile
    /// (see the module doc). `woken` is cleared on return.
    ///
    /// `flush`: the calling thread pushed SQEs to this ring that it has not submitted
    /// yet ([`submit_or_defer`]); they are submitted with the first wait, or before
    /// returning.
    ///
    /// Only for the ring's owner (the caller holds the [`Owned`] of [`Ring::own`]).
    fn park(&self, woken: &AtomicBool, mut flush: bool) {
        loop {
            if woken.swap(false, Ordering::AcqRel) {
                break;
            }
            let _reaped = self.reap_ready(true);
            #[cfg(test)]
            self.waiter_reaps.fetch_add(_reaped, Ordering::Relaxed);
            if woken.swap(false, Ordering::AcqRel) {
                break;
            }
            // Returns as soon as the completion queue holds an entry (at once if it
            // already does), and submits pending SQEs (the deferred ones too: one
            // system call for both).
            match self.uring.submitter().submit_and_wait(1) {
                Ok(_) => flush = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
        if flush {
            self.submit();
        }
    }

    /// Become the thread that waits in the ring, if no other thread does: until the
    /// [`Owned`] is dropped, only the caller consumes the ring's completion queue.
    ///
    /// Why (the invariant that keeps a waiting thread from sleeping forever): the
    /// owner waits in `io_uring_enter(GETEVENTS, 1)`, which returns once the
    /// completion queue holds an entry, and is woken by other threads with a `NOP`
    /// ([`Ring::kick`]) after they set its flag. The kernel samples the queue's head
    /// when the wait starts, some time after the thread last looked at its flag (it
    /// first submits its deferred SQEs, for instance), so if another party (a
    /// [`watch`] task, the completion thread, another thread waiting in the ring)
    /// consumed entries meanwhile, including the kick and the completions that led to
    /// it, the thread would wait for an entry that never comes. Hence:
    /// - `cq`'s flag is set and cleared under `cq`'s lock, and every consumer takes
    ///   that lock and checks the flag before it takes any entry: while it is set,
    ///   only the owner consumes, so every entry posted stays in the queue until the
    ///   owner takes it, and its wait returns.
    /// - An entry consumed by another party before the flag was set was consumed
    ///   before the owner's first look at its flag (lock order), so a kick it carried
    ///   was preceded by setting the flag, which the owner sees; the completion
    ///   answered afterwards by that party wakes the owner with a new kick, which
    ///   stays in the queue.
    /// - The owner publishes its ring in its [`Parker`] after taking the ring and
    ///   clears it before releasing it, so a waker that sees the ring kicks it while
    ///   only the owner consumes; one that does not, notifies the thread, which looks
    ///   at its flag before it waits.
    /// - Entries the others skipped are not lost: the owner reaps every entry while it
    ///   waits, and when it releases the ring (the [`Owned`]'s drop) it reaps once more
    ///   as a non-owner before it leaves the waiters; entries posted after that wake the
    ///   completion thread (its fd is re-armed, level-triggered) or a [`watch`] task
    ///   (an edge for each entry posted), and the completion thread's timer reaps
    ///   whatever a watching runtime leaves.
    /// - A second thread that wants to wait in an owned ring does not: it waits with
    ///   on a condition variable ([`Parker::park`]), and the owner (or whoever reaps) answers
    ///   its requests, whose wakers notify it.
    fn own(&self) -> Option<Owned<'_>> {
        let leave = self.enter_waiters();
        let taken = std::mem::replace(&mut *self.cq.lock(), true);
        if taken {
            return None; // drops `leave`
        }
        Some(Owned {
            ring: self,
            _leave: leave,
        })
    }

    /// Join the ring's waiters (a thread about to wait in the ring, or a [`watch`]
    /// task): the first one takes the ring's fd out of the completion thread's epoll
    /// set. The guard leaves, also when a waker run while reaping panics; the last
    /// one to leave puts the fd back.
    fn enter_waiters(&self) -> Leave<'_> {
        let mut w = self.waiters.lock();
        *w += 1;
        if *w == 1 {
            self.arm(false);
        }
        Leave(self)
    }

    /// Whether operations are in the ring (registered and not yet answered), including
    /// SQEs the calling thread deferred.
    fn busy(&self) -> bool {
        !self.state.lock().ops.is_empty()
    }

    /// Whether the completion thread looks on its timer: a [`watch`] task or a
    /// [`Lingering`] thread keeps the ring's fd out of its epoll set.
    fn timed(&self) -> bool {
        self.watchers.load(Ordering::Acquire) > 0 || self.lingerers.load(Ordering::Acquire) > 0
    }

    /// Wake the threads waiting in this ring (they re-check their flags).
    fn kick(&self) {
        self.start(Kind::Kick, None, 0, None);
    }
}

/// The ring's waiting thread ([`Ring::own`]); dropping it releases the ring.
struct Owned<'a> {
    ring: &'a Ring,
    /// Dropped after the `Drop` below has run: the ring's fd is re-armed in the
    /// completion thread's epoll set after the last reap.
    _leave: Leave<'a>,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        *self.ring.cq.lock() = false;
        // What was posted since the owner's last reap and skipped by the others
        // (see `Ring::own`). Not while unwinding from a waker's panic: the
        // completion thread reaps it then.
        if !thread::panicking() {
            let _reaped = self.ring.reap_ready(false);
            #[cfg(test)]
            self.ring.waiter_reaps.fetch_add(_reaped, Ordering::Relaxed);
        }
    }
}

/// A thread in [`block_on`] that stays among its ring's waiters between two waits in
/// the ring (after [`LINGER_AFTER_WAITS`] waits): its ring's fd stays out of the completion
/// thread's epoll set, instead of being put back and taken out again (two `epoll_ctl`
/// calls) around each time the thread polls its future. Completions that come while
/// the thread polls are reaped at its next wait. Should the thread block elsewhere
/// meanwhile, the completion thread looks on its timer (as for a [`watch`] task), so
/// requests of other threads in that ring finish a few milliseconds late at worst.
/// Ends when `block_on` returns or the thread is about to block outside its ring
/// ([`flush_deferred`]).
struct Lingering(Arc<Ring>);

impl Lingering {
    fn start(ring: Arc<Ring>) -> Lingering {
        std::mem::forget(ring.enter_waiters());
        if ring.lingerers.fetch_add(1, Ordering::AcqRel) == 0
            && ring.watchers.load(Ordering::Acquire) == 0
        {
            // It may sleep without a timeout: make it take up its timer.
            ring.wake_completion_thread();
        }
        Lingering(ring)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        self.0.lingerers.fetch_sub(1, Ordering::AcqRel);
        drop(Leave(&self.0));
    }
}

/// Leaves the ring's waiters (see [`Ring::enter_waiters`]).
struct Leave<'a>(&'a Ring);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut w = self.0.waiters.lock();
        *w -= 1;
        if *w == 0 {
            // epoll re-checks the fd: completions that are there wake the
            // completion thread.
            self.0.arm(true);
        }
    }
}

/// How long the completion thread sleeps between looks at a ring that a [`watch`]
/// task reaps: while operations are in it, and once when none are (after that
/// it sleeps until an operation is registered).
const FALLBACK_BUSY_MS: i32 = 10;
const FALLBACK_IDLE_MS: i32 = 100;

/// The completion thread: wait until the ring has completions, reap them.
///
/// While a [`watch`] task reaps the ring, the ring's fd is out of this thread's
/// epoll set and it wakes every [`FALLBACK_BUSY_MS`] instead and reaps what is
/// there: should every thread of the runtime block (a task waiting synchronously
/// for a request, a `current_thread` runtime inside a blocking call), the
/// requests still finish, a few milliseconds late. Once it finds the ring
/// without operations at two looks in a row (the second after at most
/// [`FALLBACK_IDLE_MS`]), it sleeps untimed
/// (`State::idle_sleep`) until the next operation is registered, which wakes the
/// thread: an idle process has no timer running.
fn completion_thread(ring: Arc<Ring>) {
    super::mark_engine_thread();
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
    // Consecutive looks that found the ring without operations.
    let mut idle_looks = 0u32;
    loop {
        let (poll, idle) = {
            let mut st = ring.state.lock();
            if ring.exiting.load(Ordering::Acquire) && st.ops.is_empty() {
                return;
            }
            let idle = st.ops.is_empty();
            idle_looks = if idle { idle_looks + 1 } else { 0 };
            // Set under the lock, so `register` sees it or this sees its operation.
            st.idle_sleep = idle && idle_looks > 1 && ring.timed();
            // SAFETY: as in `Ring::push`: the state mutex is held, so this is the
            // only `SubmissionQueue`.
            let queued = unsafe { ring.uring.submission_shared() }.len();
            // Poll instead of waiting when nothing may wake us: SQEs not yet
            // submitted (a submission failed), operations waiting outside the ring
            // with none inside it (not expected, see `Ring::enqueue`), or teardown
            // (the last completions may be reaped by a waiting thread).
            let poll = queued > 0
                || (st.in_ring == 0 && !st.backlog.is_empty())
                || ring.exiting.load(Ordering::Acquire);
            (poll, idle)
        };
        // Watched, the timer retries submissions (not at once: SQEs found queued are
        // most often a submitter's about to be submitted, and the thread that submits
        // a request is woken to complete it).
        let watched = ring.timed();
        let timeout = if ring.exiting.load(Ordering::Acquire) {
            1
        } else if watched {
            let busy = ring.fallback_ms.load(Ordering::Relaxed);
            if !idle {
                busy
            } else if idle_looks > 1 {
                -1 // `idle_sleep` is set: the next operation wakes us
            } else {
                FALLBACK_IDLE_MS.max(busy)
            }
        } else if poll {
            1
        } else {
            -1
        };
        if poll && !watched {
            let _ = ring.uring.submit();
        }
        // SAFETY: `events` is a valid buffer of 2 entries for the kernel to fill.
        let n = unsafe {
            libc::epoll_wait(
                ring.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout,
            )
        };
        // Reap on a timeout or a ring event. Woken only by the eventfd (a `watch`
        // task starting, an operation after an idle sleep) or interrupted (the task
        // work of a request this thread submitted), there is nothing to do: a watch
        // task reaps, or the ring's fd reports the completion at the next wait.
        let mut reap = n == 0;
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            thread::sleep(Duration::from_millis(10));
            reap = true;
        }
        for ev in &events[..n.max(0) as usize] {
            if ev.u64 == EP_WAKE {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a valid u64 from our (non-blocking) eventfd.
                let _ =
                    unsafe { libc::read(ring.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            } else {
                reap = true;
            }
        }
        if !reap {
            continue;
        }
        if poll && watched {
            let _ = ring.uring.submit();
        }
        let _reaped = ring.reap_ready(false);
        #[cfg(test)]
        ring.thread_reaps.fetch_add(_reaped, Ordering::Relaxed);
    }
}

/// A ring, as tokio's reactor watches its fd (which it keeps open).
struct RingFd(Arc<Ring>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.uring.as_raw_fd()
    }
}

/// A tokio task that reaps `ring` on the runtime's threads: the ring's fd is
/// registered in the runtime's reactor (the epoll set its idle worker sleeps in),
/// so a completion wakes that worker, which reaps it and runs the task it wakes
/// itself, instead of waking the ring's completion thread which then wakes a
/// worker (see [`reap_in_runtime`]). While it watches, the ring's fd is out of the
/// completion thread's epoll set (as for a thread waiting in the ring) and the
/// completion thread only looks on a timer, as the fallback. Ends when the ring
/// set is dropped ([`RingThread`]'s drop notifies `exit`) or the runtime shuts down
/// (the task is dropped: the completion thread takes over again at once).
async fn watch(ring: Arc<Ring>) {
    // SAFETY: the fd is the ring's, open as long as the `Ring` is, which `RingFd`
    // holds for the `AsyncFd`'s whole life; `as_raw_fd` always returns it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            RingFd(ring.clone()),
            tokio::io::Interest::READABLE,
        )
    };
    let Ok(fd) = registered else {
        return; // the completion thread reaps
    };
    let _leave = ring.enter_waiters();
    /// Counts the task among the ring's watchers while it lives.
    struct Watching<'a>(&'a Ring);
    impl Drop for Watching<'_> {
        fn drop(&mut self) {
            self.0.watchers.fetch_sub(1, Ordering::Release);
        }
    }
    ring.watchers.fetch_add(1, Ordering::Release);
    let _watching = Watching(&ring);
    // The completion thread may sleep with no timeout (it looked before this task
    // came): make it look again and take up its timer.
    ring.wake_completion_thread();
    // Before `exiting` is looked at: `notify_waiters` wakes a `Notified` from its creation.
    let exit = ring.exit.notified();
    let mut exit = std::pin::pin!(exit);
    while !ring.exiting.load(Ordering::Acquire) {
        // Completions posted before the fd was registered (or while this task was
        // away) are reaped first; each later one makes the fd readable again. Nothing
        // is reaped while a thread waits in the ring (see `Ring::own`): that thread
        // reaps, also what is left when it goes.
        let _reaped = ring.reap_ready(false);
        #[cfg(test)]
        ring.watcher_reaps.fetch_add(_reaped, Ordering::Relaxed);
        tokio::select! {
            biased;
            () = &mut exit => return,
            ready = fd.readable() => match ready {
                // Clears only if no new readiness event came since `readable` saw
                // it: a completion posted after the reap above is not lost.
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => return,
            },
        }
    }
}

/// A ring and its completion thread, as the ring set holds them.
struct RingThread {
    ring: Arc<Ring>,
    reaper: Option<thread::JoinHandle<()>>,
}

impl RingThread {
    fn start(i: usize) -> io::Result<RingThread> {
        let ring = Arc::new(Ring::new(new_ring()?)?);
        let r = ring.clone();
        let reaper = thread::Builder::new()
            .name(format!("qcow2rs-uring-{i}"))
            .spawn(move || completion_thread(r))?;
        Ok(RingThread {
            ring,
            reaper: Some(reaper),
        })
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        self.ring.exiting.store(true, Ordering::Release);
        self.ring.wake_completion_thread();
        // A `watch` task wakes and ends (dropping its ring). Not through the ring's fd:
        // epoll reports it only if the completion queue still holds an entry when the
        // task's worker collects the event, and another thread may have reaped it.
        self.ring.exit.notify_waiters();
        if let Some(h) = self.reaper.take() {
            // Waits for the operations of dropped futures to finish. Never join
            // ourselves, should the last file be dropped on a completion thread.
            if Some(h.thread().id()) != super::engine_thread_id() {
                let _ = h.join();
            }
        }
    }
}

/// The rings of the process, shared by every open [`UringFile`].
struct RingSet {
    rings: Vec<RingThread>,
    /// The process that started the threads: after `fork()` the child has none of them.
    pid: u32,
}

/// The current ring set, if any file holds it.
static RINGS: RingsCell = RingsCell {
    locked: AtomicBool::new(false),
    set: std::cell::UnsafeCell::new(Weak::new()),
    runtime: std::cell::UnsafeCell::new(None),
    holds: std::cell::UnsafeCell::new(0),
    kept: std::cell::UnsafeCell::new(None),
};

/// The lock around [`RINGS`]: a spin lock, not a mutex, so that a `fork()` child can take
/// it even when another thread of the parent held it at the fork (that thread does not
/// exist in the child: a mutex would stay locked, and the child's first file open and every
/// [`block_on`] wait would hang). The `pthread_atfork` child handler installed with the
/// first set releases it; what it guards is consistent at every instant (one `Weak`
/// pointer, replaced with a single store, whose counts are atomic), so the child may use
/// it. Held only for a few instructions, except while a new set starts its threads.
struct RingsCell {
    locked: AtomicBool,
    set: std::cell::UnsafeCell<Weak<RingSet>>,
    /// The runtime whose tasks reap the rings ([`reap_in_runtime`]), and the process
    /// that named it.
    runtime: std::cell::UnsafeCell<Option<(u32, tokio::runtime::Handle)>>,
    /// How many [`RingsHold`]s there are; while there is one, the set started last is
    /// also held in `kept`.
    holds: std::cell::UnsafeCell<usize>,
    kept: std::cell::UnsafeCell<Option<Arc<RingSet>>>,
}

// SAFETY: `set` is only accessed through a `RingsGuard`, i.e. with `locked` taken.
unsafe impl Sync for RingsCell {}

impl RingsCell {
    fn lock(&self) -> RingsGuard<'_> {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            thread::yield_now();
        }
        RingsGuard(self)
    }
}

struct RingsGuard<'a>(&'a RingsCell);

impl RingsGuard<'_> {
    fn upgrade(&self) -> Option<Arc<RingSet>> {
        // SAFETY: the lock is held (see `RingsCell`).
        unsafe { &*self.0.set.get() }.upgrade()
    }

    /// The runtime named by [`reap_in_runtime`] in this process, if any.
    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        // SAFETY: the lock is held (see `RingsCell`).
        match unsafe { &*self.0.runtime.get() } {
            Some((p, h)) if *p == pid() => Some(h.clone()),
            _ => None,
        }
    }

    /// Store `set` (one pointer store); the old value is given back, to be dropped after
    /// the lock is released.
    fn replace(&mut self, set: Weak<RingSet>) -> Weak<RingSet> {
        // SAFETY: the lock is held (see `RingsCell`).
        std::mem::replace(unsafe { &mut *self.0.set.get() }, set)
    }
}

impl RingsGuard<'_> {
    /// The number of [`RingsHold`]s.
    fn holds(&mut self) -> &mut usize {
        // SAFETY: the lock is held (see `RingsCell`).
        unsafe { &mut *self.0.holds.get() }
    }

    /// Hold `set` in `kept` (or hold nothing); the set held before is given back, to be
    /// dropped after the lock is released (`None` if it was a parent process's, which
    /// must never be dropped: see [`RingSet::get`]).
    fn keep(&mut self, set: Option<Arc<RingSet>>) -> Option<Arc<RingSet>> {
        // SAFETY: the lock is held (see `RingsCell`).
        let old = std::mem::replace(unsafe { &mut *self.0.kept.get() }, set);
        match old {
            Some(s) if s.pid != pid() => {
                std::mem::forget(s);
                None
            }
            old => old,
        }
    }
}

/// Keeps the io_uring engine's ring set (the rings and their completion threads) running
/// while it lives, also when no file is open: without a hold the set stops, joining its
/// threads, when the last file using it is dropped, and a new one starts with the next
/// open. From [`hold_rings`].
///
/// For a program that opens and closes files in turn, or that is about to exit: the
/// `qcow2rs` binary takes one at start and forgets it (`std::mem::forget`) at exit, as
/// the process's exit closes the rings and ends their threads anyway; joining them first
/// only made every command wait for two threads to be scheduled (up to a few
/// milliseconds each on a loaded machine). Dropping the last hold stops a set no file
/// uses any more, as dropping the last file would have. Files still close on their own
/// drop (their fd, their locks, their operations waited for) whatever holds the rings.
#[must_use = "the rings are held only while the hold lives"]
pub struct RingsHold(());

/// Take a [`RingsHold`]. Starts nothing: the set starts with the first file opened, as
/// without a hold, and is kept from then on (the set running now, if any, too).
pub fn hold_rings() -> RingsHold {
    install_atfork();
    let mut cur = RINGS.lock();
    *cur.holds() += 1;
    let old = match cur.upgrade() {
        Some(s) if s.pid == pid() => cur.keep(Some(s)),
        Some(s) => {
            std::mem::forget(s); // the parent's (see `RingSet::get`)
            None
        }
        None => None,
    };
    drop(cur);
    drop(old);
    RingsHold(())
}

impl Drop for RingsHold {
    fn drop(&mut self) {
        let mut cur = RINGS.lock();
        *cur.holds() -= 1;
        let old = if *cur.holds() == 0 {
            cur.keep(None)
        } else {
            None
        };
        drop(cur);
        // Stops the set if no file holds it (joins its threads, without the lock held).
        drop(old);
    }
}

impl Drop for RingsGuard<'_> {
    fn drop(&mut self) {
        self.0.locked.store(false, Ordering::Release);
    }
}

/// `pthread_atfork` child handler: release [`RINGS`] (see [`RingsCell`]) and forget the
/// parent's process id ([`pid`]).
extern "C" fn rings_atfork_child() {
    RINGS.locked.store(false, Ordering::Release);
    PID.store(0, Ordering::Relaxed);
}

/// Install [`rings_atfork_child`] (once per process).
fn install_atfork() {
    static ATFORK: std::sync::Once = std::sync::Once::new();
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only stores to atomics (async-signal-safe).
        unsafe { libc::pthread_atfork(None, None, Some(rings_atfork_child)) };
    });
}

/// This process's id as [`pid`] last read it (0: not read yet, or in a child after `fork()`).
static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `std::process::id()` without a system call each time (glibc does not cache it): every
/// [`block_on`] wait compares the ring set's process with this one. The `fork()` child
/// handler clears it, so a child reads its own.
fn pid() -> u32 {
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    // Before the id is stored: a fork after the store runs the handler, which clears it.
    install_atfork();
    let p = std::process::id();
    PID.store(p, Ordering::Relaxed);
    p
}
/// Hands out ring slots to threads, round-robin.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's ring slot (taken modulo the number of rings).
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

impl RingSet {
    /// The shared set, started if no open file holds it.
    fn get() -> io::Result<Arc<RingSet>> {
        install_atfork();
        let mut cur = RINGS.lock();
        if let Some(s) = cur.upgrade() {
            if s.pid == pid() {
                return Ok(s);
            }
            // A set of the parent process (files opened before fork() keep it alive): its
            // threads do not exist here, so start a new one, and never drop the parent's
            // (its Drop would join threads that are not there).
            std::mem::forget(s);
        }
        let n = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, MAX_RINGS);
        let mut rings = Vec::with_capacity(n);
        for i in 0..n {
            // On an error the rings already started are dropped, which stops them.
            rings.push(RingThread::start(i)?);
        }
        let s = Arc::new(RingSet { rings, pid: pid() });
        let old = cur.replace(Arc::downgrade(&s));
        let kept_before = if *cur.holds() > 0 {
            cur.keep(Some(s.clone()))
        } else {
            None
        };
        let rt = cur.runtime();
        drop(cur);
        drop(old);
        drop(kept_before);
        if let Some(rt) = rt {
            s.watch_in(&rt);
        }
        Ok(s)
    }

    /// Start a [`watch`] task on `rt` for each ring.
    fn watch_in(&self, rt: &tokio::runtime::Handle) {
        for r in &self.rings {
            // A runtime that has shut down drops the task at once: nothing changes.
            drop(rt.spawn(watch(r.ring.clone())));
        }
    }

    /// The calling thread's ring.
    fn ring(&self) -> &Arc<Ring> {
        let slot = SLOT.with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed));
            }
            s.get()
        });
        &self.rings[slot % self.rings.len()].ring
    }

    /// The calling thread's ring in the current set, if there is one (in this process).
    fn current_ring() -> Option<Arc<Ring>> {
        let set = RINGS.lock().upgrade()?;
        if set.pid != pid() {
            std::mem::forget(set); // the parent's (see `RingSet::get`)
            return None;
        }
        let ring = set.ring().clone();
        Some(ring)
    }
}

thread_local! {
    /// The [`Parker`] of the [`block_on`] running on this thread (its address), or 0.
    static CURRENT_PARKER: Cell<usize> = const { Cell::new(0) };
    /// Set while [`block_on`] polls its future on this thread: SQEs the thread pushes
    /// are submitted together when it next waits (see [`submit_or_defer`]).
    static PLUGGED: Cell<bool> = const { Cell::new(false) };
    /// The ring holding SQEs this thread pushed and has not submitted, and how many.
    static DEFERRED: Cell<Option<(Arc<Ring>, u32)>> = const { Cell::new(None) };
    /// The [`Parker`] of this thread's last [`block_on`], kept for the next one (no
    /// allocation per call) when no waker of it was left.
    static SPARE_PARKER: Cell<Option<Arc<Parker>>> = const { Cell::new(None) };
    /// The ring this thread's [`block_on`] stays a waiter of between waits.
    static LINGER: Cell<Option<Lingering>> = const { Cell::new(None) };
}

/// Stop lingering in a ring ([`Lingering`]), putting its fd back in the completion
/// thread's epoll set if no other waiter is left.
fn end_lingering() {
    let _ = LINGER.try_with(|l| drop(l.take()));
}

/// Waits in its ring after which a [`block_on`] call stays among the ring's waiters
/// between waits ([`Lingering`]).
const LINGER_AFTER_WAITS: u32 = 4;

/// Most SQEs a thread defers before it submits them anyway.
const DEFER_MAX: u32 = 32;

/// Submit the SQE just pushed to `ring`, or, on a thread polling inside [`block_on`],
/// leave it (with the others it pushes during that poll) for the thread's next wait in
/// its ring, which submits them all with the one `io_uring_enter` it makes anyway.
///
/// One system call (and, in the kernel, one plugged batch: one doorbell for the
/// device) per batch instead of one per request, as qemu's event loop does. Deferred
/// SQEs are submitted at the latest when the thread waits ([`Parker::park`]), leaves
/// `block_on`, blocks in a dropped request's `RunToEnd` ([`flush_deferred`]), or has
/// [`DEFER_MAX`] of them; nothing else on the thread blocks between a push and the
/// next wait, so a request is never left unsubmitted while its thread sleeps.
fn submit_or_defer(ring: &Arc<Ring>) {
    if PLUGGED.get() {
        let (keep, now) = match DEFERRED.take() {
            Some((r, n)) if Arc::ptr_eq(&r, ring) => {
                if n + 1 >= DEFER_MAX {
                    (None, true)
                } else {
                    (Some((r, n + 1)), false)
                }
            }
            // Another ring (the ring set changed): submit this one at once.
            Some(other) => (Some(other), true),
            None => (Some((ring.clone(), 1)), false),
        };
        DEFERRED.set(keep);
        if !now {
            return;
        }
    }
    ring.submit();
}

/// Submit the SQEs this thread deferred ([`submit_or_defer`]), before it blocks
/// elsewhere than in its ring.
pub(super) fn flush_deferred() {
    if let Some((r, _)) = DEFERRED.take() {
        r.submit();
    }
    end_lingering();
}

/// How a thread blocked in [`block_on`] is woken.
struct Parker {
    woken: AtomicBool,
    /// The ring the thread waits in, while it does.
    ring: Mutex<Option<Arc<Ring>>>,
    /// For waits without a ring: `woken` is looked at with `lock` held, and a waker
    /// takes `lock` after setting it. Not `thread::park`: `thread::current()` allocates
    /// a handle that the main thread of a C program never frees (it exits without
    /// running thread-local destructors), which valgrind reports as possibly lost.
    lock: std::sync::Mutex<()>,
    cv: std::sync::Condvar,
}

impl Parker {
    /// Wait until woken: in `ring` (the calling thread's) if there is one, it has
    /// operations in it and no other thread waits in it, else on a condition variable.
    ///
    /// `linger`: stay among the ring's waiters afterwards ([`Lingering`]).
    fn park(&self, ring: Option<Arc<Ring>>, linger: bool) {
        let deferred = DEFERRED.take().map(|(r, _)| r);
        // Only a ring with operations in it is worth waiting in. An idle thread (a
        // request worker with nothing in flight) waiting in its ring would keep it from
        // the thread whose requests go there next (a blocking call's caller), which then
        // waits outside it and costs three wake-ups per completion instead of
        // one: the kernel wakes it to post the completion, the owner wakes to reap it,
        // then wakes it again.
        let owned = ring
            .as_ref()
            .filter(|r| r.busy())
            .and_then(|r| Some((r, r.own()?)));
        match owned {
            Some((ring, owned)) => {
                // SQEs deferred to another ring (the ring set changed) are submitted
                // now; those of this ring with the wait.
                let flush = match deferred {
                    Some(d) if Arc::ptr_eq(&d, ring) => true,
                    Some(d) => {
                        d.submit();
                        false
                    }
                    None => false,
                };
                // Set once the ring is ours and before `woken` is checked (in
                // `Ring::park`): a waker that finds no ring here set `woken` before
                // looking, so it is seen; one that finds it kicks the ring, whose
                // completion queue only this thread consumes (see `Ring::own`).
                *self.ring.lock() = Some(ring.clone());
                ring.park(&self.woken, flush);
                // Cleared before the ring is released: a waker that finds no ring
                // notifies `cv`, and `woken` stays set for the thread's next look.
                *self.ring.lock() = None;
                // Before the ring is released, so its fd stays out of the epoll set.
                LINGER.with(|l| {
                    let cur = l.take();
                    let same = matches!(&cur, Some(c) if Arc::ptr_eq(&c.0, ring));
                    if same || !linger {
                        l.set(cur);
                        return;
                    }
                    drop(cur); // another ring's (the ring set changed)
                    l.set(Some(Lingering::start(ring.clone())));
                });
                drop(owned);
            }
            None => {
                // No ring, or another thread waits in it (and reaps what this
                // thread's requests complete, whose wakers notify it).
                if let Some(d) = deferred {
                    d.submit();
                }
                let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                while !self.woken.swap(false, Ordering::AcqRel) {
                    g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

impl Wake for Parker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.woken.swap(true, Ordering::AcqRel) {
            return; // not consumed yet: the waiter will see it (and was woken if it needed it)
        }
        if CURRENT_PARKER.with(|c| c.get()) == Arc::as_ptr(self) as usize {
            return; // woken by its own thread (reaping in its ring, or polling): it looks next
        }
        let ring = self.ring.lock().clone();
        match ring {
            Some(r) => r.kick(),
            None => {
                // Taken after `woken` was set: the waiter either looks at `woken`
                // after this, or waits in `cv` already and is notified.
                drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
                self.cv.notify_one();
            }
        }
    }
}

/// Let the tasks of the tokio runtime `rt` reap the io_uring rings' completions:
/// one task per ring ([`watch`]) registers the ring's fd in the runtime's reactor,
/// so a completion wakes the runtime's idle worker (the one waiting in the
/// reactor's epoll set), which reaps it and runs the task it wakes at once. Without
/// it, a completion wakes the ring's completion thread, which then wakes a worker:
/// two wake-ups per request instead of one. The completion threads stay as the
/// fallback (they look every few milliseconds while a task watches their ring), so
/// a runtime whose threads all block on something else delays requests but loses
/// none.
///
/// For the runtime a program runs its I/O on (the CLI's, the NBD server's); one
/// runtime per process: a later call replaces the earlier one for ring sets
/// started afterwards. The rings open now are watched at once; a ring set started
/// later (the rings stop when the last file closes) gets its tasks when it starts.
/// `rt` needs its I/O driver (`enable_io`); a runtime that has shut down is
/// ignored. Threads waiting in [`block_on`] still reap their own ring as before:
/// while one waits in a ring, that ring's task leaves it alone.
pub fn reap_in_runtime(rt: &tokio::runtime::Handle) {
    let cur = RINGS.lock();
    // SAFETY: the lock is held (see `RingsCell`).
    let old = unsafe { &mut *RINGS.runtime.get() }.replace((pid(), rt.clone()));
    let set = cur.upgrade();
    drop(cur);
    drop(old);
    if let Some(set) = set {
        if set.pid == pid() {
            set.watch_in(rt);
        } else {
            std::mem::forget(set); // the parent's (see `RingSet::get`)
        }
    }
}

/// Run `fut` to its end on the calling thread, blocking it while `fut` is pending.
///
/// While it blocks, the thread waits in its own io_uring ring (the one its requests
/// go to) and reaps that ring's completions itself: a request it submitted costs
/// one wake-up of this thread instead of a wake-up of the ring's completion thread
/// followed by one of this thread (see the module doc). Without an io_uring ring
/// set (no file open with io_uring, or in a child after `fork()`) it blocks
/// on a condition variable. Wakers may be called from any thread. Not for a thread of an
/// async runtime (which would stop running its other tasks); enter a tokio
/// runtime's context first (`Handle::enter`) if `fut` needs one.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    block_on_in(fut, RingSet::current_ring)
}

/// [`block_on`] for a future that takes its waker anew at every poll, as the request
/// futures of this crate do (oneshot receivers, tokio's locks, cells and join handles, the
/// futures of `futures`' combinators): the first poll gets a waker that does nothing, and
/// only a future still pending after it gets the thread's parker and is run to its end as
/// [`block_on`] runs it (polled again, now with the parker's waker, before any wait). A
/// request that completes in its first poll (a read the page cache serves) then costs no
/// parker, waker or thread-local bookkeeping at all. Not for a future that keeps the waker
/// of one poll for later (as a task loop that stores it once): it would never be woken.
///
/// SQEs pushed during the first poll are held back as in [`block_on`]'s polls, and are
/// submitted with the wait when the future is pending (or at once when it is ready).
///
/// The future is taken pinned (`block_on_request(pin!(image.read_at(..)))`), so that it is
/// built in place: a request future is large, and moving it into this function copied it
/// (a `memcpy` of about a hundred instructions per call).
pub fn block_on_request<F: Future>(mut fut: Pin<&mut F>) -> F::Output {
    /// Submits what the poll deferred and unplugs, unless forgotten (on the way to
    /// [`block_on`], whose wait submits it).
    struct Unplug(bool);
    impl Drop for Unplug {
        fn drop(&mut self) {
            flush_deferred();
            PLUGGED.set(self.0);
        }
    }
    let plugged = PLUGGED.replace(true);
    let unplug = Unplug(plugged);
    if let Poll::Ready(v) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        return v;
    }
    std::mem::forget(unplug);
    PLUGGED.set(plugged);
    block_on(fut)
}

/// [`block_on`] inside the context of the tokio runtime `handle` (for what `fut` spawns,
/// and its timers): how the C library and the Python package run a blocking call on the
/// caller's thread. The caller must not be a thread of an async runtime.
pub fn block_on_in_runtime<F: Future>(handle: &tokio::runtime::Handle, fut: F) -> F::Output {
    let _ctx = handle.enter();
    block_on(fut)
}

/// [`block_on`], waiting in the ring `ring` gives (called at each wait).
fn block_on_in<F: Future>(fut: F, ring: impl Fn() -> Option<Arc<Ring>>) -> F::Output {
    /// Gives the parker back to the thread on the way out (declared first, so dropped
    /// last, after the waker and the future): only when nothing else holds it, so no
    /// waker of this call can wake a later one. (A nested `block_on`, which a future
    /// may run, finds no spare and makes its own.)
    struct Spare(Arc<Parker>);
    impl Drop for Spare {
        fn drop(&mut self) {
            if Arc::strong_count(&self.0) == 1 {
                // Ordered after everything the dropped wakers did (as `Arc`'s own drop).
                std::sync::atomic::fence(Ordering::Acquire);
                self.0.woken.store(false, Ordering::Relaxed);
                let p = self.0.clone();
                let _ = SPARE_PARKER.try_with(|c| c.set(Some(p)));
            }
        }
    }
    let spare = Spare(SPARE_PARKER.with(|c| c.take()).unwrap_or_else(|| {
        Arc::new(Parker {
            woken: AtomicBool::new(false),
            ring: Mutex::new(None),
            lock: std::sync::Mutex::new(()),
            cv: std::sync::Condvar::new(),
        })
    }));
    let parker = &spare.0;
    let waker = Waker::from(parker.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    /// Restores the thread's state on the way out (also on a panic), after
    /// submitting what it deferred.
    /// (An enclosing `block_on`'s [`Lingering`] is kept here meanwhile, and given
    /// back.)
    struct Restore(usize, bool, Option<Lingering>);
    impl Drop for Restore {
        fn drop(&mut self) {
            flush_deferred(); // also ends this call's lingering
            PLUGGED.set(self.1);
            CURRENT_PARKER.with(|c| c.set(self.0));
            let outer = self.2.take();
            let _ = LINGER.try_with(|l| l.set(outer));
        }
    }
    let _restore = Restore(
        CURRENT_PARKER.with(|c| c.replace(Arc::as_ptr(parker) as usize)),
        PLUGGED.get(),
        LINGER.with(|l| l.take()),
    );
    let mut waits = 0u32;
    loop {
        PLUGGED.set(true);
        let poll = fut.as_mut().poll(&mut cx);
        PLUGGED.set(false);
        if let Poll::Ready(v) = poll {
            return v;
        }
        // Only after a few waits: a call that waits once or twice (a blocking read from
        // C or Python) does not change the completion thread's mode.
        parker.park(ring(), waits >= LINGER_AFTER_WAITS);
        waits = waits.saturating_add(1);
    }
}

/// A file accessed through io_uring.
pub struct UringFile {
    core: Arc<FileCore>,
    rings: Arc<RingSet>,
}

impl UringFile {
    /// Open a file. Fails with an error for which [`is_unavailable`] is true when
    /// io_uring cannot be used here; with `opts.direct`, fails (`InvalidInput`,
    /// errno `EINVAL`) when the file system refuses `O_DIRECT`.
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<Self> {
        // The rings first, so that their errors are the ones `is_unavailable` sees.
        let rings = RingSet::get()?;
        let core = Arc::new(FileCore::open(path, opts)?);
        Ok(UringFile { core, rings })
    }

    fn start(&self, kind: Kind, off: u64, hold: Hold) {
        let ring = self.rings.ring();
        if ring.register(kind, Some(self.core.clone()), off, hold) {
            submit_or_defer(ring);
        }
    }
}

/// A ring with the operations this engine uses, or the reason there is none.
fn new_ring() -> io::Result<IoUring> {
    let uring = match IoUring::builder()
        .dontfork()
        .setup_submit_all()
        .build(RING_ENTRIES)
    {
        Ok(u) => u,
        // Kernels before 5.18 do not know IORING_SETUP_SUBMIT_ALL.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::builder().dontfork().build(RING_ENTRIES)?
        }
        Err(e) => return Err(e),
    };
    let mut probe = Probe::new();
    let needed = [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
        opcode::Nop::CODE,
    ];
    if uring.submitter().register_probe(&mut probe).is_err()
        || !needed.iter().all(|&op| probe.is_supported(op))
    {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    Ok(uring)
}

impl Drop for UringFile {
    fn drop(&mut self) {
        // Operations of dropped futures hold the file: wait until they have finished, so
        // that the file is closed (and its locks released) when this returns. Not on a
        // completion thread, which would wait for itself.
        if super::engine_thread_id().is_none() {
            flush_deferred();
            let mut delay = Duration::from_micros(50);
            while Arc::strong_count(&self.core) > 1 {
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(5));
            }
        }
    }
}

impl Backend for UringFile {
    fn core(&self) -> &FileCore {
        &self.core
    }

    fn read_owned(&self, buf: AlignedBuf, off: u64) -> Pending<(AlignedBuf, usize)> {
        let (tx, pending) = Pending::channel();
        self.start(Kind::Read { buf, tx }, off, None);
        pending
    }

    fn read_into(&self, buf: RawBuf, off: u64) -> Pending<usize> {
        let (tx, pending) = Pending::channel();
        self.start(Kind::ReadInto { buf, tx }, off, None);
        pending
    }

    fn write_owned(
        &self,
        buf: AlignedBuf,
        off: u64,
        truncate_to: Option<u64>,
        hold: Hold,
    ) -> Pending<()> {
        let (tx, pending) = Pending::channel();
        self.start(
            Kind::Write {
                buf,
                truncate_to,
                tx,
            },
            off,
            hold,
        );
        pending
    }

    fn write_from(&self, buf: RawBuf, off: u64, hold: Hold) -> Pending<()> {
        let (tx, pending) = Pending::channel();
        self.start(Kind::WriteFrom { buf, tx }, off, hold);
        pending
    }

    fn fdatasync(&self) -> Pending<()> {
        if let Some(p) = self.core.fdatasync_inline() {
            return p;
        }
        let (tx, pending) = Pending::channel();
        self.start(Kind::Fsync { tx }, 0, None);
        pending
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64, hold: Hold) -> Pending<()> {
        if let Some(p) = self.core.fallocate_inline(mode, off, len) {
            return p;
        }
        let (tx, pending) = Pending::channel();
        self.start(Kind::Fallocate { mode, len, tx }, off, hold);
        pending
    }
}

impl Storage for UringFile {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(ops::read_at(self, buf, off))
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(ops::write_at(self, buf, off))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(ops::flush(self))
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        Box::pin(ops::discard(self, off, len))
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(ops::write_zeroes(self, off, len))
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(ops::allocate(self, off, len))
    }
    fn len(&self) -> io::Result<u64> {
        self.core.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.core.set_len(len)
    }
    fn in_memory(&self) -> bool {
        self.core.in_memory()
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.core.allocated_size()
    }
    fn start_writeback(&self, off: u64, len: u64) -> io::Result<()> {
        self.core.start_writeback(off, len)
    }
    fn data_run(&self, off: u64, len: u64) -> io::Result<(u64, bool)> {
        self.core.data_run(off, len)
    }
    fn alignment(&self) -> usize {
        self.core.align
    }
    fn engine_name(&self) -> &'static str {
        "io_uring"
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.core.file.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const WAIT: Duration = Duration::from_secs(20);

    /// A 64 KiB file on the disk (not tmpfs: the tests want O_DIRECT, whose reads always
    /// go through the ring and wait for the device), each 4 KiB block filled with its index.
    fn test_file(name: &str) -> (tempfile::TempDir, Arc<FileCore>) {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(&base).unwrap();
        let path = dir.path().join(name);
        let data: Vec<u8> = (0..16u8).flat_map(|i| [i; 4096]).collect();
        std::fs::write(&path, data).unwrap();
        let opts = FileOptions {
            direct: true,
            ..FileOptions::default()
        };
        let core = match FileCore::open(&path, &opts) {
            Ok(c) => c,
            // A file system without O_DIRECT (tmpfs): reads then still use the ring
            // when the page cache misses, which it does not here; test anyway.
            Err(_) => FileCore::open(&path, &FileOptions::default()).unwrap(),
        };
        (dir, Arc::new(core))
    }

    /// Start a 4 KiB read of block `block` on `ring`; its result arrives on the receiver,
    /// from a thread that waits with `futures::executor::block_on` (not in the ring).
    fn read_block(ring: &Ring, core: &Arc<FileCore>, block: u64) -> mpsc::Receiver<Vec<u8>> {
        let (tx, pending) = Pending::channel();
        let buf = AlignedBuf::zeroed(4096, 4096).unwrap();
        ring.start(
            Kind::Read { buf, tx },
            Some(core.clone()),
            block * 4096,
            None,
        );
        let (rtx, rrx) = mpsc::channel();
        thread::spawn(move || {
            let (buf, n) = futures::executor::block_on(pending).unwrap();
            rtx.send(buf[..n].to_vec()).unwrap();
        });
        rrx
    }

    /// Wait until `count` (a reaper's test counter) reaches `n`. A reaper counts what it
    /// reaped after it finished the operations, so the requests' answers can come first.
    fn wait_for_reaps(count: &AtomicUsize, n: usize, who: &str) {
        let t = std::time::Instant::now();
        while count.load(Ordering::Relaxed) < n {
            assert!(
                t.elapsed() < WAIT,
                "{who} reaped {} of {n} requests",
                count.load(Ordering::Relaxed)
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_for_waiters(ring: &Ring, n: usize) {
        let t = std::time::Instant::now();
        while *ring.waiters.lock() != n {
            assert!(t.elapsed() < WAIT, "no thread came to wait in the ring");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// A thread that waits in `ring` until the flag is set (and the ring kicked), once it
    /// waits there.
    fn park_a_waiter(ring: &Arc<Ring>) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
        let woken = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (ring, woken) = (ring.clone(), woken.clone());
            thread::spawn(move || {
                let _owned = ring.own().expect("another thread waits in the ring");
                ring.park(&woken, false)
            })
        };
        wait_for_waiters(ring, 1);
        (woken, waiter)
    }

    /// A thread waits in a ring; a request submitted by another thread to that ring
    /// completes: the completion thread does not see it (the ring's fd is out of its
    /// epoll set), so the waiting thread must reap it and answer. After the waiter
    /// leaves, the completion thread must reap again.
    #[test]
    fn waiter_reaps_the_requests_of_other_threads_and_hands_back() {
        let rt = RingThread::start(90).unwrap();
        let ring = rt.ring.clone();
        let (_dir, core) = test_file("a");
        let (woken, waiter) = park_a_waiter(&ring);
        for block in [3, 7, 11] {
            let got = read_block(&ring, &core, block).recv_timeout(WAIT);
            assert_eq!(
                got.expect("request never answered"),
                vec![block as u8; 4096]
            );
        }
        // The waiter counts what it reaped once `reap_ready` returns, after it answered:
        // the answers may arrive here first. Wait (bounded) for the count; the completion
        // thread reaping any of the three instead leaves it short and fails here.
        wait_for_reaps(&ring.waiter_reaps, 3, "the waiting thread");
        // Wake the waiter from here: a NOP in its ring.
        woken.store(true, Ordering::Release);
        ring.kick();
        waiter.join().unwrap();
        assert_eq!(*ring.waiters.lock(), 0);
        let before = ring.waiter_reaps.load(Ordering::Relaxed);
        let got = read_block(&ring, &core, 5).recv_timeout(WAIT);
        assert_eq!(
            got.expect("completion thread not re-armed"),
            vec![5u8; 4096]
        );
        assert_eq!(ring.waiter_reaps.load(Ordering::Relaxed), before);
        drop(rt);
    }

    /// A runtime with one worker that watches `ring` ([`watch`]), once the task watches.
    fn watching_runtime(ring: &Arc<Ring>) -> tokio::runtime::Runtime {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_io()
            .build()
            .unwrap();
        rt.spawn(watch(ring.clone()));
        let t = std::time::Instant::now();
        while ring.watchers.load(Ordering::Acquire) != 1 {
            assert!(t.elapsed() < WAIT, "the watch task never started");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*ring.waiters.lock(), 1);
        rt
    }

    /// A request completes while the runtime's only worker sleeps in the reactor (the
    /// task waiting for it was polled long before, and the request is submitted from
    /// another thread): the completion must wake the worker, whose watch task reaps it,
    /// with the completion thread out of the way (its fallback timer set to a minute,
    /// so it cannot be what answers). Several times, to cover the readiness being
    /// cleared and re-armed in between.
    #[test]
    fn watch_task_reaps_a_completion_that_comes_while_the_worker_sleeps() {
        let rt_ring = RingThread::start(93).unwrap();
        let ring = rt_ring.ring.clone();
        ring.fallback_ms.store(60_000, Ordering::Relaxed);
        let (_dir, core) = test_file("e");
        let rt = watching_runtime(&ring);
        for block in [9u8, 1, 14, 6] {
            let (tx, pending) = Pending::<(AlignedBuf, usize)>::channel();
            let (rtx, rrx) = mpsc::channel();
            rt.spawn(async move {
                let (buf, n) = pending.await.unwrap();
                rtx.send(buf[..n].to_vec()).unwrap();
            });
            // Long enough for the worker to have polled the task and gone to sleep.
            thread::sleep(Duration::from_millis(30));
            let buf = AlignedBuf::zeroed(4096, 4096).unwrap();
            ring.start(
                Kind::Read { buf, tx },
                Some(core.clone()),
                block as u64 * 4096,
                None,
            );
            let got = rrx
                .recv_timeout(WAIT)
                .expect("the sleeping worker was not woken");
            assert_eq!(got, vec![block; 4096]);
        }
        // The task counts what it reaped after it answered (see the waiter test above).
        wait_for_reaps(&ring.watcher_reaps, 4, "the watch task");
        assert_eq!(ring.thread_reaps.load(Ordering::Relaxed), 0);
        // The runtime goes: the completion thread must take the ring back at once.
        drop(rt);
        assert_eq!(*ring.waiters.lock(), 0);
        assert_eq!(ring.watchers.load(Ordering::Acquire), 0);
        let got = read_block(&ring, &core, 4).recv_timeout(WAIT);
        assert_eq!(
            got.expect("completion thread not re-armed"),
            vec![4u8; 4096]
        );
        wait_for_reaps(&ring.thread_reaps, 1, "the completion thread");
        drop(rt_ring);
    }

    /// While the runtime's only worker is blocked (a task that sleeps synchronously), its
    /// watch task cannot run: the completion thread's timer must reap the requests of
    /// the ring meanwhile, long before the worker comes back, also when the ring was
    /// idle (the completion thread sleeping untimed) before the request came.
    #[test]
    fn completion_thread_reaps_when_the_watching_runtime_is_blocked() {
        let rt_ring = RingThread::start(94).unwrap();
        let ring = rt_ring.ring.clone();
        let (_dir, core) = test_file("f");
        let rt = watching_runtime(&ring);
        let (btx, brx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        // The worker stays blocked until the test has its answer (not for a fixed time,
        // which a loaded machine can outlast before the completion thread runs).
        rt.spawn(async move {
            btx.send(()).unwrap();
            let _ = release_rx.recv_timeout(2 * WAIT);
        });
        brx.recv_timeout(WAIT).unwrap();
        // The completion thread, finding the ring idle, stops its timer: the request
        // must wake it.
        let t = std::time::Instant::now();
        while !ring.state.lock().idle_sleep {
            assert!(t.elapsed() < WAIT, "the completion thread kept its timer");
            thread::sleep(Duration::from_millis(1));
        }
        let got = read_block(&ring, &core, 12).recv_timeout(WAIT);
        let _ = release_tx.send(());
        assert_eq!(
            got.expect("nobody reaped while the runtime was blocked"),
            vec![12u8; 4096]
        );
        wait_for_reaps(&ring.thread_reaps, 1, "the completion thread");
        drop(rt);
        drop(rt_ring);
    }

    /// Dropping the ring set while a runtime's task watches a ring neither hangs nor leaves
    /// the task behind: it is woken, sees the teardown and ends (and with it its hold on
    /// the ring and its registration in the reactor).
    #[test]
    fn teardown_while_a_task_watches_the_ring() {
        let rt_ring = RingThread::start(95).unwrap();
        let ring = rt_ring.ring.clone();
        let (_dir, core) = test_file("g");
        let rt = watching_runtime(&ring);
        let rx = read_block(&ring, &core, 3);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), vec![3u8; 4096]);
        let (done_tx, done_rx) = mpsc::channel();
        thread::spawn(move || {
            drop(rt_ring);
            done_tx.send(()).unwrap();
        });
        done_rx.recv_timeout(WAIT).expect("teardown hung");
        let t = std::time::Instant::now();
        while ring.watchers.load(Ordering::Acquire) != 0 || Arc::strong_count(&ring) > 1 {
            assert!(t.elapsed() < WAIT, "the watch task did not end");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*ring.waiters.lock(), 0);
        drop(rt);
    }

    /// Dropping a ring's owner (teardown: exit flag, completion thread joined) while a
    /// thread waits in that ring neither hangs nor strands the waiter, which is still
    /// woken there afterwards.
    #[test]
    fn teardown_while_a_thread_waits_in_the_ring() {
        let rt = RingThread::start(91).unwrap();
        let ring = rt.ring.clone();
        let (_dir, core) = test_file("b");
        let (woken, waiter) = park_a_waiter(&ring);
        // An operation in flight at teardown: the waiter reaps it, and the completion
        // thread must still notice that nothing is left and exit.
        let rx = read_block(&ring, &core, 2);
        let (done_tx, done_rx) = mpsc::channel();
        thread::spawn(move || {
            drop(rt);
            done_tx.send(()).unwrap();
        });
        done_rx.recv_timeout(WAIT).expect("teardown hung");
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), vec![2u8; 4096]);
        woken.store(true, Ordering::Release);
        ring.kick();
        let (jtx, jrx) = mpsc::channel();
        thread::spawn(move || {
            waiter.join().unwrap();
            jtx.send(()).unwrap();
        });
        jrx.recv_timeout(WAIT)
            .expect("waiter not woken after teardown");
    }

    /// A [`RingsHold`] keeps the ring set (the rings and their completion threads) after
    /// the last file using it is dropped, so the next open or the process's exit does not
    /// wait for a stop and a start.
    #[test]
    fn a_hold_keeps_the_rings_after_the_last_file() {
        let hold = hold_rings();
        let (_dir, core) = test_file("h");
        let set = RingSet::get().unwrap();
        let weak = Arc::downgrade(&set);
        let file = UringFile { core, rings: set };
        let mut buf = vec![0u8; 4096];
        block_on_request(pin!(file.read_at(&mut buf, 4096))).unwrap();
        assert_eq!(buf, vec![1u8; 4096]);
        drop(file);
        let kept = weak.upgrade();
        assert!(kept.is_some(), "the ring set stopped with its last file");
        // Still the set new files get.
        let again = RingSet::get().unwrap();
        assert!(Arc::ptr_eq(kept.as_ref().unwrap(), &again));
        drop((kept, again));
        drop(hold);
    }

    /// `block_on` on a file's requests (the thread waits in its own ring and reaps its
    /// own completions), and on a future woken from another thread (which must kick the
    /// ring: nothing else would wake it).
    #[test]
    fn block_on_waits_in_the_ring() {
        let (dir, _) = test_file("c");
        let opts = FileOptions {
            direct: true,
            ..FileOptions::default()
        };
        let f = UringFile::open(&dir.path().join("c"), &opts)
            .or_else(|_| UringFile::open(&dir.path().join("c"), &FileOptions::default()))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                let mut buf = AlignedBuf::zeroed(4096, 4096).unwrap();
                for block in 0..16u8 {
                    block_on(f.read_at(&mut buf[..], block as u64 * 4096)).unwrap();
                    assert_eq!(&buf[..], &[block; 4096][..]);
                }
                let reaps = f.rings.ring().waiter_reaps.load(Ordering::Relaxed);
                assert!(reaps >= 16, "the thread did not reap in its ring ({reaps})");
                // Woken from another thread (with nothing in the ring, it waits outside it).
                let (otx, orx) = futures::channel::oneshot::channel::<u32>();
                s.spawn(move || {
                    thread::sleep(Duration::from_millis(50));
                    otx.send(9).unwrap();
                });
                tx.send(block_on(orx).unwrap()).unwrap();
            });
            assert_eq!(rx.recv_timeout(WAIT).expect("block_on never woke"), 9);
        });
    }

    /// `block_on_request`: a future ready in its first poll runs without a parker (none is
    /// current during the poll, and none is taken from or left for the thread); one that
    /// is pending then (waking the do-nothing waker of the first poll, or registering it
    /// with a channel) is polled again with the parker's waker and woken by it; a ring
    /// read's SQE, held back in the first poll, is submitted with the wait.
    #[test]
    fn block_on_request_polls_first_without_a_parker() {
        let current = || CURRENT_PARKER.with(|c| c.get());
        thread::spawn(move || {
            assert_eq!(
                block_on_request(pin!(std::future::poll_fn(|_| Poll::Ready(current())))),
                0,
                "a parker was set up for a future ready at once"
            );
            assert!(SPARE_PARKER.with(|c| {
                let p = c.take();
                let none = p.is_none();
                c.set(p);
                none
            }));
            // Pending once, having woken the first poll's waker (which does nothing).
            let mut polls = 0;
            let p = block_on_request(pin!(std::future::poll_fn(|cx| {
                polls += 1;
                if polls == 1 {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                } else {
                    Poll::Ready(current())
                }
            })));
            assert_ne!(p, 0, "the second poll had no parker");
            assert_eq!(polls, 2);
            // Pending until another thread sends: the receiver takes the parker's waker at
            // its second poll.
            let (tx, rx) = futures::channel::oneshot::channel::<u32>();
            let sender = thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                tx.send(7).unwrap();
            });
            assert_eq!(block_on_request(pin!(rx)), Ok(7));
            sender.join().unwrap();
            // An O_DIRECT read goes to the ring: its SQE, deferred in the first poll, is
            // submitted by the wait (else this would hang).
            let (_dir, core) = test_file("request.bin");
            let rings = RingSet::get().unwrap();
            let file = UringFile { core, rings };
            let mut buf = vec![0u8; 4096];
            block_on_request(pin!(file.read_at(&mut buf, 3 * 4096))).unwrap();
            assert!(buf.iter().all(|&b| b == 3));
        })
        .join()
        .unwrap();
    }

    /// A `block_on` call that has waited in its ring a few times stays among the ring's
    /// waiters while it polls (the ring's fd stays out of the completion thread's epoll
    /// set), and leaves when it returns. Meanwhile, should it block elsewhere, a request
    /// of another thread in that ring still finishes: the completion thread looks on
    /// its timer while a thread lingers.
    #[test]
    fn lingering_block_on_leaves_other_requests_to_the_timer() {
        let lingers = || {
            LINGER.with(|l| {
                let v = l.take();
                let some = v.is_some();
                l.set(v);
                some
            })
        };
        let (dir, core) = test_file("l");
        let opts = FileOptions {
            direct: true,
            ..FileOptions::default()
        };
        let f = UringFile::open(&dir.path().join("l"), &opts)
            .or_else(|_| UringFile::open(&dir.path().join("l"), &FileOptions::default()))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                let ring = f.rings.ring().clone();
                block_on(async {
                    let mut buf = AlignedBuf::zeroed(4096, 4096).unwrap();
                    for block in 0..16u8 {
                        f.read_at(&mut buf[..], block as u64 * 4096).await.unwrap();
                        assert_eq!(&buf[..], &[block; 4096][..]);
                    }
                    assert!(lingers(), "block_on does not linger after 16 waits");
                    assert!(ring.lingerers.load(Ordering::Acquire) >= 1);
                    // Blocks outside the ring, which nobody else waits in.
                    let got = read_block(&ring, &core, 5).recv_timeout(WAIT);
                    assert_eq!(
                        got.expect("a request in a lingering thread's ring never finished"),
                        vec![5u8; 4096]
                    );
                });
                assert!(!lingers(), "block_on still lingers after it returned");
                tx.send(()).unwrap();
            });
            rx.recv_timeout(WAIT).expect("block_on never returned");
        });
    }

    /// A thread's parker is kept from one `block_on` to the next only when no waker of
    /// the earlier call is left: a waker kept by a finished call's future and woken
    /// during a later call must not end that call's wait early (nor stop it from being
    /// woken by its own waker), and a call whose wakers were all dropped reuses the
    /// parker.
    #[test]
    fn block_on_keeps_its_parker_only_without_wakers_left() {
        let spare = || {
            SPARE_PARKER.with(|c| {
                let p = c.take();
                let r = p.as_ref().map(|p| Arc::as_ptr(p) as usize);
                c.set(p);
                r
            })
        };
        let addr = || {
            block_on(std::future::poll_fn(|_| {
                Poll::Ready(CURRENT_PARKER.with(|c| c.get()))
            }))
        };
        thread::spawn(move || {
            let a = addr();
            assert_eq!(spare(), Some(a), "the parker was not kept");
            assert_eq!(addr(), a, "the parker was not reused");
            // A call whose future keeps a clone of its waker.
            let mut kept: Option<Waker> = None;
            let mut first = true;
            block_on(std::future::poll_fn(|cx| {
                if first {
                    first = false;
                    kept = Some(cx.waker().clone());
                    cx.waker().wake_by_ref();
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            }));
            assert_eq!(spare(), None, "a parker with a waker left was kept");
            let kept = kept.expect("kept");
            // The next call: the stale waker fires while it waits; it stays pending
            // until its own sender sends, then returns what was sent.
            let (otx, orx) = futures::channel::oneshot::channel::<u32>();
            let waker = thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                kept.wake();
                thread::sleep(Duration::from_millis(50));
                otx.send(5).unwrap();
            });
            assert_eq!(block_on(orx), Ok(5));
            waker.join().unwrap();
        })
        .join()
        .unwrap();
    }

    /// A thread in `block_on` with nothing in its ring (an idle request worker) waits
    /// outside it (on its condition variable), leaving the ring to the next thread whose requests go
    /// there; it is still woken from another thread. (That a thread with requests in the
    /// ring waits in it and reaps them: `block_on_waits_in_the_ring`.)
    #[test]
    fn idle_block_on_leaves_the_ring_free() {
        let rt = RingThread::start(93).unwrap();
        let ring = rt.ring.clone();
        let (otx, orx) = futures::channel::oneshot::channel::<u32>();
        let (tx, rx) = mpsc::channel();
        let idle = {
            let ring = ring.clone();
            thread::spawn(move || tx.send(block_on_in(orx, || Some(ring.clone()))).unwrap())
        };
        thread::sleep(Duration::from_millis(100));
        assert!(!*ring.cq.lock(), "an idle thread took the ring");
        assert_eq!(*ring.waiters.lock(), 0);
        otx.send(7).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).expect("block_on never woke"), Ok(7));
        idle.join().unwrap();
    }

    /// Requests a thread pushes while it polls in `block_on` are submitted when it waits
    /// (several in one poll: all of them), and a request dropped after its first poll
    /// (its `RunToEnd` blocks until it has finished) is submitted before that wait:
    /// without the flush in `RunToEnd`'s drop, nothing would ever submit it (the ring's
    /// completion thread sleeps until a completion) and the thread would hang.
    #[test]
    fn block_on_submits_deferred_requests() {
        let (dir, _) = test_file("d");
        let opts = FileOptions {
            direct: true,
            ..FileOptions::default()
        };
        let f = Arc::new(UringFile::open(&dir.path().join("d"), &opts).unwrap());
        let (tx, rx) = mpsc::channel();
        // A thread of its own (not scoped): if it hangs, the test fails instead of hanging.
        thread::spawn(move || {
            let mut bufs: Vec<AlignedBuf> = (0..4)
                .map(|_| AlignedBuf::zeroed(4096, 4096).unwrap())
                .collect();
            block_on(async {
                let reads = bufs
                    .iter_mut()
                    .enumerate()
                    .map(|(i, b)| f.read_at(&mut b[..], i as u64 * 3 * 4096));
                futures::future::try_join_all(reads).await.unwrap();
            });
            for (i, b) in bufs.iter().enumerate() {
                assert_eq!(&b[..], &[i as u8 * 3; 4096][..]);
            }
            let mut buf = AlignedBuf::zeroed(4096, 4096).unwrap();
            block_on(async {
                let mut r = f.read_at(&mut buf[..], 5 * 4096);
                assert!(
                    futures::poll!(&mut r).is_pending(),
                    "O_DIRECT read done at once"
                );
                drop(r);
            });
            assert_eq!(&buf[..], &[5u8; 4096][..]);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(WAIT)
            .expect("a deferred request was never submitted");
    }

    /// Start a 4 KiB write (block `block` filled with its index) or read of block `block`
    /// on `ring` as [`UringFile`] does: inside [`block_on_in`] its SQE is deferred to the
    /// thread's next wait in the ring. Answers the bytes read (none for a write).
    fn start_deferred(
        ring: &Arc<Ring>,
        core: &Arc<FileCore>,
        block: u64,
        write: bool,
    ) -> impl Future<Output = io::Result<Vec<u8>>> {
        let mut buf = AlignedBuf::zeroed(4096, 4096).unwrap();
        let (rtx, rpending) = Pending::channel();
        let (wtx, wpending) = Pending::channel();
        let kind = if write {
            buf.fill(block as u8);
            drop(rtx);
            Kind::Write {
                buf,
                truncate_to: None,
                tx: wtx,
            }
        } else {
            drop(wtx);
            Kind::Read { buf, tx: rtx }
        };
        if ring.register(kind, Some(core.clone()), block * 4096, None) {
            submit_or_defer(ring);
        }
        async move {
            if write {
                wpending.await.map(|()| Vec::new())
            } else {
                rpending.await.map(|(buf, n)| buf[..n].to_vec())
            }
        }
    }

    /// `threads` threads each wait in `ring` ([`block_on_in`]) for 32 requests at a time,
    /// `rounds` times, beside a runtime whose task watches the same ring and reaps whatever
    /// it may there. Buffered writes (on ext4 they go to io-wq workers, which post their
    /// completions at any time, also while a waiting thread is on its way into
    /// `io_uring_enter`) and reads (page-cache hits, completed while they are submitted).
    /// Each round is bounded by a timeout: a hang fails the test instead of hanging it.
    fn depth_32_beside_a_watching_runtime(name: &str, threads: u64, rounds: u64) {
        let rt_ring = RingThread::start(96).unwrap();
        let ring = rt_ring.ring.clone();
        let (dir, _) = test_file(name);
        let opts = FileOptions {
            writable: true,
            ..FileOptions::default()
        };
        let core = Arc::new(FileCore::open(&dir.path().join(name), &opts).unwrap());
        let rt = watching_runtime(&ring);
        let (ptx, prx) = mpsc::channel();
        for t in 0..threads {
            let (ring, core, ptx) = (ring.clone(), core.clone(), ptx.clone());
            thread::spawn(move || {
                for round in 0..rounds {
                    let first = round + t * 5;
                    let ops =
                        (0..32).map(|i| start_deferred(&ring, &core, (first + i) % 16, i % 2 == 0));
                    let got = block_on_in(futures::future::join_all(ops), || Some(ring.clone()));
                    for (i, r) in (0..).zip(got) {
                        let data = r.unwrap();
                        if i % 2 == 1 {
                            assert_eq!(data, [((first + i) % 16) as u8; 4096]);
                        }
                    }
                    if ptx.send(t).is_err() {
                        return;
                    }
                }
            });
        }
        drop(ptx);
        let mut done = vec![0; threads as usize];
        for _ in 0..threads * rounds {
            match prx.recv_timeout(WAIT) {
                Ok(t) => done[t as usize] += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("a thread waiting in the ring hung (rounds done: {done:?} of {rounds})")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("a thread waiting in the ring failed (rounds done: {done:?})")
                }
            }
        }
        drop(rt);
        drop(rt_ring);
    }

    /// The mix that hung `qcow2rs bench -d 32` once the runtime reaped the rings (issue
    /// 9): a completion the watch task reaps wakes the waiting thread through a kick (a
    /// `NOP` in the ring), which nothing else may consume before that thread sees it, else
    /// the thread sleeps on an empty completion queue (hung in 2 of 10 runs of 3000 rounds
    /// when the task reaped rings in which a thread waited).
    #[test]
    fn waiting_thread_at_depth_beside_a_watching_runtime() {
        depth_32_beside_a_watching_runtime("h", 1, 10_000);
    }

    /// Two threads that wait in the same ring (more threads than rings): the second must
    /// not take the first one's kick either (it waits outside the ring while the first
    /// waits in the ring).
    #[test]
    fn two_threads_at_depth_in_one_ring_beside_a_watching_runtime() {
        depth_32_beside_a_watching_runtime("i", 2, 5_000);
    }

    /// As `threads`' `no_flush_skips_fdatasync` (the same check), through the ring: with
    /// `no_flush` a flush sends no `IORING_OP_FSYNC` (nor a `fdatasync` on the calling thread).
    #[test]
    fn no_flush_skips_fsync() {
        crate::io::check_no_flush(UringFile::open, |f| f.core.syncs.load(Ordering::Relaxed));
    }
}
