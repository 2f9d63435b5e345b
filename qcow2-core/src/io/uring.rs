//! Linux io_uring engine.
//!
//! Design:
//! - **A few rings shared by every open file, one per CPU** (at most
//!   [`MAX_RINGS`]), each with one completion thread (`qcow2rs-uring-N`). A thread
//!   submits to "its" ring (threads are spread over the rings round-robin, so each
//!   runtime worker mostly has a ring of its own), whatever the file: a 64-image
//!   backing chain costs no more rings or threads than one image. The set starts
//!   with the first open file and stops (joining its threads) when the last one is
//!   dropped, as the threads engine's pool does.
//! - **Page-cache hits never reach a ring.** Reads of files opened without
//!   `O_DIRECT` are first tried on the submitting thread with
//!   `preadv2(RWF_NOWAIT)` straight into the caller's buffer (plain
//!   `pread`/`pwrite` on tmpfs, which never waits for a device); only what would
//!   block goes to the ring (see [`super::threads`] `FileCore::read_inline`). So a
//!   request that completes at once costs no wake-up of another thread at all.
//! - **Submission from any thread.** A request is registered in the ring's table
//!   of operations and its SQE pushed under a mutex (the only place a submission
//!   queue is touched); the submitting thread then calls `io_uring_enter` itself,
//!   without the mutex, so no thread hop is added. If the ring is full (more than
//!   the completion queue can hold in flight, or the submission queue has no free
//!   slot), the request waits in a backlog that the completion thread drains as
//!   operations finish, so any number of requests can be outstanding and the
//!   completion queue never overflows.
//! - **The completion thread** waits in `io_uring_enter`, which
//!   also submits whatever SQEs are pending, reaps CQEs and, with the mutex held,
//!   advances each operation: a short read or write is resubmitted for the rest,
//!   `EAGAIN`/`EINTR` are resubmitted, and finished operations are completed
//!   through their oneshot sender after the mutex is released. A submitter never
//!   waits for the completion thread and the completion thread never blocks with
//!   the mutex held, so they cannot deadlock.
//! - **Ownership.** Every operation owns its (aligned) buffer and a reference to
//!   its file (so the fd stays open), and keeps both in the table until its CQE is
//!   reaped: dropping the caller's future only drops the receiving end. Dropping a
//!   [`UringFile`] waits until the operations of its dropped futures have finished.
//! - **Teardown.** Dropping the ring set queues a `NOP` marked as the exit
//!   request on each ring; a completion thread exits once it has seen it and no
//!   operation is left, and the drop joins it.
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
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
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
    Fsync {
        tx: oneshot::Sender<io::Result<()>>,
    },
    Fallocate {
        mode: i32,
        len: u64,
        tx: oneshot::Sender<io::Result<()>>,
    },
    /// The file was dropped: the completion thread exits when nothing is left.
    Exit,
}

/// One operation, from registration until its last CQE.
struct Op {
    kind: Kind,
    /// The file (`None` for the exit request): kept open until the operation is finished.
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
            Kind::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Fallocate { mode, len, .. } => opcode::Fallocate::new(fd, *len)
                .offset(self.off)
                .mode(*mode)
                .build(),
            Kind::Exit => opcode::Nop::new().build(),
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
            Kind::Write { tx, .. } | Kind::Fsync { tx } | Kind::Fallocate { tx, .. } => {
                let _ = tx.send(r.map(drop));
            }
            Kind::Exit => {}
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
}

/// A ring, shared by the files of the threads that submit to it and its completion thread.
struct Ring {
    uring: IoUring,
    state: Mutex<State>,
    /// Most operations in the ring at once: the completion queue's size, so it
    /// cannot overflow.
    cap: usize,
}

impl Ring {
    /// Register an operation and get it submitted.
    fn start(&self, kind: Kind, core: Option<Arc<FileCore>>, off: u64, hold: Hold) {
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
        let pushed = self.enqueue(&mut st, id);
        drop(st);
        if pushed {
            self.submit();
        }
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
            return Step::Done(Ok(0)); // the exit request
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
            Kind::Write {
                buf, truncate_to, ..
            } => {
                if n == 0 {
                    return Step::Done(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the kernel wrote no byte",
                    )));
                }
                op.done += n;
                if op.done < buf.len() {
                    return Step::Again;
                }
                if let Some(len) = truncate_to {
                    if let Err(e) = core.set_len(*len) {
                        return Step::Done(Err(e));
                    }
                }
                Step::Done(Ok(op.done))
            }
            Kind::Fsync { .. } | Kind::Fallocate { .. } | Kind::Exit => Step::Done(Ok(0)),
        }
    }
}

/// The completion thread: reap, advance, refill from the backlog, answer.
fn reap(ring: Arc<Ring>) {
    super::mark_engine_thread();
    let mut exiting = false;
    let mut cqes: Vec<(u64, i32)> = Vec::new();
    let mut finished: Vec<(Op, io::Result<usize>)> = Vec::new();
    loop {
        let wait = {
            let st = ring.state.lock();
            if exiting && st.ops.is_empty() {
                return;
            }
            // Nothing would wake us while operations wait outside the ring with
            // none inside it (not expected, see `Ring::enqueue`): poll instead.
            st.in_ring > 0 || st.backlog.is_empty()
        };
        if !wait {
            let _ = ring.uring.submit();
            thread::sleep(Duration::from_millis(1));
        }
        // Submits pending SQEs (resubmissions, backlog) and waits for a completion.
        match ring.uring.submitter().submit_and_wait(usize::from(wait)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
        // SAFETY: `completion_shared` requires that no other `CompletionQueue`
        // exists: only this thread ever creates one for this ring.
        cqes.extend(unsafe { ring.uring.completion_shared() }.map(|c| (c.user_data(), c.result())));
        {
            let mut st = ring.state.lock();
            for (id, res) in cqes.drain(..) {
                st.in_ring -= 1;
                let Some(mut op) = st.ops.remove(&id) else {
                    continue;
                };
                match ring.advance(&mut op, res) {
                    Step::Again => {
                        st.ops.insert(id, op);
                        ring.enqueue(&mut st, id);
                    }
                    Step::Done(r) => {
                        if matches!(op.kind, Kind::Exit) {
                            exiting = true;
                        }
                        finished.push((op, r));
                    }
                }
            }
            while st.in_ring < ring.cap {
                let Some(&id) = st.backlog.front() else {
                    break;
                };
                if !ring.push_or_flush(&mut st, id) {
                    break;
                }
                st.backlog.pop_front();
                st.in_ring += 1;
            }
        }
        // Answer without the mutex: waking a task may run arbitrary code.
        for (op, r) in finished.drain(..) {
            op.finish(r);
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
        let uring = new_ring()?;
        let cap = uring.params().cq_entries().max(1) as usize;
        let ring = Arc::new(Ring {
            uring,
            state: Mutex::new(State {
                ops: HashMap::new(),
                next_id: 0,
                in_ring: 0,
                backlog: VecDeque::new(),
            }),
            cap,
        });
        let r = ring.clone();
        let reaper = thread::Builder::new()
            .name(format!("qcow2rs-uring-{i}"))
            .spawn(move || reap(r))?;
        Ok(RingThread {
            ring,
            reaper: Some(reaper),
        })
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        self.ring.start(Kind::Exit, None, 0, None);
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
static RINGS: parking_lot::Mutex<Weak<RingSet>> = parking_lot::const_mutex(Weak::new());
/// Hands out ring slots to threads, round-robin.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's ring slot (taken modulo the number of rings).
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

impl RingSet {
    /// The shared set, started if no open file holds it.
    fn get() -> io::Result<Arc<RingSet>> {
        let mut cur = RINGS.lock();
        if let Some(s) = cur.upgrade() {
            if s.pid == std::process::id() {
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
        let s = Arc::new(RingSet {
            rings,
            pid: std::process::id(),
        });
        *cur = Arc::downgrade(&s);
        Ok(s)
    }

    /// The calling thread's ring.
    fn ring(&self) -> &Ring {
        let slot = SLOT.with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed));
            }
            s.get()
        });
        &self.rings[slot % self.rings.len()].ring
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
        self.rings
            .ring()
            .start(kind, Some(self.core.clone()), off, hold);
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
