//! A [`Storage`] wrapper for tests that holds or fails chosen requests.
//!
//! [`HookStorage`] wraps any storage and passes every request through, except those matched
//! by a rule. A rule ([`Match`]) selects requests by kind ([`Op`]), by byte range, by their
//! place among the matching requests (let the first `n` pass, then act on the next `m`) and by
//! any predicate over the request (including the bytes of a write). It then either
//! - **holds** the request at a [`Gate`] until the test releases it: the test can wait until
//!   the request has arrived, run other requests to completion meanwhile, then let the held
//!   one go on ([`HookStorage::hold`]; [`HookStorage::hold_after`] performs the I/O first and
//!   holds only its completion);
//! - **fails** it with an errno ([`HookStorage::fail`]), or writes only a prefix and then
//!   fails ([`HookStorage::short_write`]);
//! - **defers** it: the request yields to the executor a few times before it reaches the
//!   wrapped storage, as a real disk completes later ([`HookStorage::defer`]); a future
//!   dropped meanwhile never performs its I/O.
//!
//! It can also record every request (kind, range, and the order in which requests started and
//! ended), so that a test can assert an ordering such as "a flush completed between these two
//! writes" ([`HookStorage::record`], [`HookStorage::events`]).
//!
//! Typical use (a deterministic race: hold X, run Y to completion, release X, check):
//!
//! ```no_run
//! # async fn demo() -> qcow2_core::Result<()> {
//! use qcow2_core::io::fault::{HookStorage, Match, Op};
//! use qcow2_core::io::mem::MemStorage;
//! use std::sync::Arc;
//! let hs = HookStorage::new(Arc::new(MemStorage::new()));
//! // Hold the first write that touches bytes [65536, 131072) of the file.
//! let gate = hs.hold(Match::op(Op::Write).range(65536, 65536));
//! // ... start request X (it blocks in the storage), then:
//! gate.wait_arrived(1).await;
//! // ... run requests Y and Z to completion, then:
//! gate.release();
//! // ... await X and check the result.
//! # Ok(()) }
//! ```
//!
//! The wrapper works with any executor (it waits on `tokio::sync::Notify`, which needs no
//! runtime). `set_len` is synchronous: holding it blocks the calling thread.

use super::{IoFuture, Storage};
use parking_lot::{Condvar, Mutex};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The kind of a storage request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `discard`.
    Discard,
    /// `write_zeroes`.
    WriteZeroes,
    /// `allocate`.
    Allocate,
    /// `set_len` (offset = the new length, length 0).
    SetLen,
}

impl Op {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
    /// Whether the request changes the stored bytes or the length.
    pub fn is_mutation(self) -> bool {
        !matches!(self, Op::Read | Op::Flush)
    }
}

/// A request as seen by a rule's predicate.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Kind.
    pub op: Op,
    /// Byte offset (for `SetLen`, the new length; for `Flush`, 0).
    pub offset: u64,
    /// Byte length (0 for `Flush` and `SetLen`).
    pub len: u64,
    /// The bytes of a write.
    pub data: Option<&'a [u8]>,
}

impl Request<'_> {
    /// Whether the request touches bytes of `[off, off+len)`.
    pub fn overlaps(&self, off: u64, len: u64) -> bool {
        self.len > 0 && self.offset < off.saturating_add(len) && off < self.offset + self.len
    }
}

type Pred = Arc<dyn Fn(&Request<'_>) -> bool + Send + Sync>;

/// Which requests a rule acts on. Built with [`Match::op`], [`Match::ops`] or [`Match::any`]
/// and refined with the other methods; by default a rule acts on the first matching request
/// only.
#[derive(Clone)]
pub struct Match {
    ops: u8,
    range: Option<(u64, u64)>,
    skip: u64,
    times: u64,
    pred: Option<Pred>,
}

impl std::fmt::Debug for Match {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Match")
            .field("ops", &self.ops)
            .field("range", &self.range)
            .field("skip", &self.skip)
            .field("times", &self.times)
            .field("pred", &self.pred.is_some())
            .finish()
    }
}

impl Match {
    /// Requests of kind `op`.
    pub fn op(op: Op) -> Match {
        Self::ops(&[op])
    }
    /// Requests of any of these kinds.
    pub fn ops(ops: &[Op]) -> Match {
        Match {
            ops: ops.iter().fold(0, |a, o| a | o.bit()),
            range: None,
            skip: 0,
            times: 1,
            pred: None,
        }
    }
    /// Requests of every kind.
    pub fn any() -> Match {
        Match {
            ops: u8::MAX,
            ..Self::ops(&[])
        }
    }
    /// Every request that changes the storage (write, write-zeroes, discard, allocate, set_len).
    pub fn mutations() -> Match {
        Self::ops(&[
            Op::Write,
            Op::WriteZeroes,
            Op::Discard,
            Op::Allocate,
            Op::SetLen,
        ])
    }
    /// Only requests that touch bytes of `[off, off+len)` (flushes and `set_len` never do).
    pub fn range(mut self, off: u64, len: u64) -> Match {
        self.range = Some((off, len));
        self
    }
    /// Let the first `n` matching requests pass untouched.
    pub fn skip(mut self, n: u64) -> Match {
        self.skip = n;
        self
    }
    /// Act on `n` matching requests (after the skipped ones); the default is 1.
    pub fn times(mut self, n: u64) -> Match {
        self.times = n;
        self
    }
    /// Act on every matching request (after the skipped ones).
    pub fn always(self) -> Match {
        self.times(u64::MAX)
    }
    /// Only requests for which `f` returns true.
    pub fn when(mut self, f: impl Fn(&Request<'_>) -> bool + Send + Sync + 'static) -> Match {
        self.pred = Some(Arc::new(f));
        self
    }
    fn matches(&self, r: &Request<'_>) -> bool {
        if self.ops & r.op.bit() == 0 {
            return false;
        }
        if let Some((off, len)) = self.range {
            if !r.overlaps(off, len) {
                return false;
            }
        }
        self.pred.as_ref().is_none_or(|p| p(r))
    }
}

/// Identifies a rule (to remove it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleId(u64);

#[derive(Clone)]
enum Action {
    Defer(u32),
    Hold { gate: Gate, after: bool },
    Fail(i32),
    ShortWrite { bytes: usize, errno: i32 },
}

struct Rule {
    id: u64,
    m: Match,
    skipped: u64,
    done: u64,
    action: Action,
}

#[derive(Default)]
struct GateState {
    arrived: u64,
    waiting: u64,
    released: bool,
}

struct GateInner {
    state: Mutex<GateState>,
    cond: Condvar,
    notify: Notify,
}

/// Where held requests wait. Cheap to clone; all clones are the same gate.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.inner.state.lock();
        f.debug_struct("Gate")
            .field("arrived", &s.arrived)
            .field("waiting", &s.waiting)
            .field("released", &s.released)
            .finish()
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                state: Mutex::new(GateState::default()),
                cond: Condvar::new(),
                notify: Notify::new(),
            }),
        }
    }
    /// How many requests have reached the gate so far (held now or released).
    pub fn arrived(&self) -> u64 {
        self.inner.state.lock().arrived
    }
    /// How many requests are waiting at the gate now.
    pub fn waiting(&self) -> u64 {
        self.inner.state.lock().waiting
    }
    /// Whether the gate is open.
    pub fn is_released(&self) -> bool {
        self.inner.state.lock().released
    }
    /// Open the gate: every held request proceeds, and later ones pass without waiting.
    pub fn release(&self) {
        self.inner.state.lock().released = true;
        self.wake();
    }
    fn wake(&self) {
        self.inner.cond.notify_all();
        self.inner.notify.notify_waiters();
    }
    /// Wait until at least `n` requests have reached the gate.
    pub async fn wait_arrived(&self, n: u64) {
        self.wait_until(|s| s.arrived >= n).await
    }
    /// Wait until no request waits at the gate any more (after `release`).
    pub async fn wait_drained(&self) {
        self.wait_until(|s| s.waiting == 0).await
    }
    /// [`Gate::wait_arrived`] for threads outside any async runtime; false on timeout.
    pub fn wait_arrived_blocking(&self, n: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.inner.state.lock();
        while s.arrived < n {
            if self.inner.cond.wait_until(&mut s, deadline).timed_out() {
                return s.arrived >= n;
            }
        }
        true
    }
    async fn wait_until(&self, f: impl Fn(&GateState) -> bool) {
        loop {
            let n = self.inner.notify.notified();
            let mut n = std::pin::pin!(n);
            n.as_mut().enable();
            if f(&self.inner.state.lock()) {
                return;
            }
            n.await;
        }
    }
    /// A request arrives: count it and wait (asynchronously) until the gate opens.
    async fn pass(&self) {
        {
            let mut s = self.inner.state.lock();
            s.arrived += 1;
            s.waiting += 1;
        }
        self.wake();
        self.wait_until(|s| s.released).await;
        self.inner.state.lock().waiting -= 1;
        self.wake();
    }
    /// `pass` blocking the thread (for the synchronous `set_len`).
    fn pass_blocking(&self) {
        let mut s = self.inner.state.lock();
        s.arrived += 1;
        s.waiting += 1;
        self.inner.notify.notify_waiters();
        self.inner.cond.notify_all();
        while !s.released {
            self.inner.cond.wait(&mut s);
        }
        s.waiting -= 1;
        drop(s);
        self.wake();
    }
}

/// A future that is pending once (waking itself), then ready: a yield to the executor.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// One recorded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Kind.
    pub op: Op,
    /// Offset (see [`Request::offset`]).
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Sequence number when the request was passed to the inner storage (after any gate).
    pub start: u64,
    /// Sequence number when it completed (all sequence numbers come from one counter).
    pub end: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// A storage that holds or fails chosen requests of the storage it wraps (see the module
/// documentation).
pub struct HookStorage {
    inner: Arc<dyn Storage>,
    rules: Mutex<Vec<Rule>>,
    next_id: AtomicU64,
    recording: AtomicBool,
    events: Mutex<Vec<Event>>,
    seq: AtomicU64,
    counts: [AtomicU64; 7],
}

impl HookStorage {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Arc<HookStorage> {
        Arc::new(HookStorage {
            inner,
            rules: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            recording: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
            counts: Default::default(),
        })
    }
    /// The wrapped storage.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }
    fn add(&self, m: Match, action: Action) -> RuleId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.rules.lock().push(Rule {
            id,
            m,
            skipped: 0,
            done: 0,
            action,
        });
        RuleId(id)
    }
    /// Hold the matching requests at a new gate before they reach the wrapped storage.
    pub fn hold(&self, m: Match) -> Gate {
        let gate = Gate::new();
        self.add(
            m,
            Action::Hold {
                gate: gate.clone(),
                after: false,
            },
        );
        gate
    }
    /// Perform the matching requests, then hold their completion at a new gate (the I/O has
    /// happened but the caller does not know yet).
    pub fn hold_after(&self, m: Match) -> Gate {
        let gate = Gate::new();
        self.add(
            m,
            Action::Hold {
                gate: gate.clone(),
                after: true,
            },
        );
        gate
    }
    /// Let the matching requests yield to the executor `yields` times before they reach the
    /// wrapped storage (a request matched by a later rule too is then handled by that rule
    /// as well). A future dropped meanwhile performs no I/O, as a request not yet submitted
    /// to a disk.
    pub fn defer(&self, m: Match, yields: u32) -> RuleId {
        self.add(m, Action::Defer(yields))
    }
    /// Fail the matching requests with `errno` (for example `libc::EIO` or `libc::ENOSPC`)
    /// without passing them on.
    pub fn fail(&self, m: Match, errno: i32) -> RuleId {
        self.add(m, Action::Fail(errno))
    }
    /// Write only the first `bytes` bytes of the matching writes, then fail them with `errno`
    /// (other kinds of requests just fail).
    pub fn short_write(&self, m: Match, bytes: usize, errno: i32) -> RuleId {
        self.add(m, Action::ShortWrite { bytes, errno })
    }
    /// Remove a fail or short-write rule.
    pub fn remove(&self, id: RuleId) {
        self.rules.lock().retain(|r| r.id != id.0);
    }
    /// Remove every rule and open every gate.
    pub fn clear(&self) {
        let rules = std::mem::take(&mut *self.rules.lock());
        for r in rules {
            if let Action::Hold { gate, .. } = r.action {
                gate.release();
            }
        }
    }
    /// Start (or stop) recording requests.
    pub fn record(&self, on: bool) {
        self.recording.store(on, Ordering::SeqCst);
    }
    /// The requests recorded so far, in completion order.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }
    /// Take the recorded requests, leaving the record empty.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock())
    }
    /// How many requests of kind `op` arrived so far (recorded or not).
    pub fn count(&self, op: Op) -> u64 {
        self.counts[op as usize].load(Ordering::SeqCst)
    }

    /// The yields of the deferring rules that match, and the first other rule's action.
    fn action_for(&self, r: &Request<'_>) -> (u32, Option<Action>) {
        self.counts[r.op as usize].fetch_add(1, Ordering::SeqCst);
        let mut rules = self.rules.lock();
        let mut yields = 0u32;
        for rule in rules.iter_mut() {
            if rule.done >= rule.m.times || !rule.m.matches(r) {
                continue;
            }
            if rule.skipped < rule.m.skip {
                rule.skipped += 1;
                continue;
            }
            rule.done += 1;
            match rule.action {
                Action::Defer(n) => yields = yields.saturating_add(n),
                ref a => return (yields, Some(a.clone())),
            }
        }
        (yields, None)
    }

    fn begin(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn finish<T>(&self, r: &Request<'_>, start: u64, res: &io::Result<T>) {
        let end = self.seq.fetch_add(1, Ordering::SeqCst);
        if self.recording.load(Ordering::SeqCst) {
            self.events.lock().push(Event {
                op: r.op,
                offset: r.offset,
                len: r.len,
                start,
                end,
                ok: res.is_ok(),
            });
        }
    }

    /// Run one request through the rules.
    async fn run<'b, T, F>(&self, r: Request<'_>, io: F) -> io::Result<T>
    where
        F: FnOnce(Option<usize>) -> IoFuture<'b, T>,
    {
        let (yields, act) = self.action_for(&r);
        for _ in 0..yields {
            YieldOnce(false).await;
        }
        let mut after = None;
        let mut short = None;
        match act {
            Some(Action::Defer(_)) => {}
            Some(Action::Hold { gate, after: false }) => gate.pass().await,
            Some(Action::Hold { gate, after: true }) => after = Some(gate),
            Some(Action::Fail(errno)) => {
                let start = self.begin();
                let res = Err(io::Error::from_raw_os_error(errno));
                self.finish(&r, start, &res);
                return res;
            }
            Some(Action::ShortWrite { bytes, errno }) => short = Some((bytes, errno)),
            None => {}
        }
        let start = self.begin();
        let res = match short {
            Some((bytes, errno)) => {
                let prefix = if r.op == Op::Write {
                    io(Some(bytes.min(r.len as usize))).await.map(|_| ())
                } else {
                    Ok(())
                };
                prefix.and(Err(io::Error::from_raw_os_error(errno)))
            }
            None => io(None).await,
        };
        self.finish(&r, start, &res);
        if let Some(g) = after {
            g.pass().await;
        }
        res
    }
}

impl Storage for HookStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let r = Request {
                op: Op::Read,
                offset: off,
                len: buf.len() as u64,
                data: None,
            };
            let inner = &self.inner;
            self.run(r, move |_| inner.read_at(buf, off)).await
        })
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let r = Request {
                op: Op::Write,
                offset: off,
                len: buf.len() as u64,
                data: Some(buf),
            };
            let inner = &self.inner;
            self.run(r, move |n| {
                inner.write_at(&buf[..n.unwrap_or(buf.len())], off)
            })
            .await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = Request {
                op: Op::Flush,
                offset: 0,
                len: 0,
                data: None,
            };
            self.run(r, |_| self.inner.flush()).await
        })
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        Box::pin(async move {
            let r = Request {
                op: Op::Discard,
                offset: off,
                len,
                data: None,
            };
            self.run(r, |_| self.inner.discard(off, len)).await
        })
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = Request {
                op: Op::WriteZeroes,
                offset: off,
                len,
                data: None,
            };
            self.run(r, |_| self.inner.write_zeroes(off, len)).await
        })
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = Request {
                op: Op::Allocate,
                offset: off,
                len,
                data: None,
            };
            self.run(r, |_| self.inner.allocate(off, len)).await
        })
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let r = Request {
            op: Op::SetLen,
            offset: len,
            len: 0,
            data: None,
        };
        let (_, act) = self.action_for(&r);
        let mut after = None;
        match act {
            Some(Action::Defer(_)) => {}
            Some(Action::Hold { gate, after: false }) => gate.pass_blocking(),
            Some(Action::Hold { gate, after: true }) => after = Some(gate),
            Some(Action::Fail(errno)) | Some(Action::ShortWrite { errno, .. }) => {
                let start = self.begin();
                let res = Err(io::Error::from_raw_os_error(errno));
                self.finish(&r, start, &res);
                return res;
            }
            None => {}
        }
        let start = self.begin();
        let res = self.inner.set_len(len);
        self.finish(&r, start, &res);
        if let Some(g) = after {
            g.pass_blocking();
        }
        res
    }
    fn in_memory(&self) -> bool {
        self.inner.in_memory()
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }
    fn data_run(&self, off: u64, len: u64) -> io::Result<(u64, bool)> {
        self.inner.data_run(off, len)
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn engine_name(&self) -> &'static str {
        self.inner.engine_name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemStorage;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn fail_skip_times_and_short_write() {
        block_on(async {
            let hs = HookStorage::new(Arc::new(MemStorage::new()));
            let id = hs.fail(
                Match::op(Op::Write).range(100, 10).skip(1).times(2),
                libc::ENOSPC,
            );
            hs.write_at(&[1; 4], 0).await.unwrap(); // no overlap
            hs.write_at(&[1; 4], 98).await.unwrap(); // skipped
            let e = hs.write_at(&[1; 4], 105).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
            hs.write_at(&[1; 4], 105).await.unwrap_err();
            hs.write_at(&[1; 4], 105).await.unwrap(); // times exhausted
            hs.remove(id);
            hs.short_write(Match::op(Op::Write), 3, libc::EIO);
            let e = hs.write_at(&[9; 8], 200).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            let mut b = [0u8; 8];
            hs.read_at(&mut b, 200).await.unwrap();
            assert_eq!(b, [9, 9, 9, 0, 0, 0, 0, 0]);
            assert_eq!(hs.count(Op::Write), 6);
        });
    }

    #[test]
    fn hold_and_record() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let hs = HookStorage::new(Arc::new(MemStorage::new()));
            hs.record(true);
            let gate = hs.hold(Match::op(Op::Write).when(|r| r.data == Some(&[7u8; 2][..])));
            let h2 = hs.clone();
            let t = tokio::spawn(async move { h2.write_at(&[7; 2], 0).await });
            gate.wait_arrived(1).await;
            hs.write_at(&[8; 2], 0).await.unwrap();
            hs.flush().await.unwrap();
            assert!(!t.is_finished());
            gate.release();
            t.await.unwrap().unwrap();
            let mut b = [0u8; 2];
            hs.read_at(&mut b, 0).await.unwrap();
            assert_eq!(b, [7, 7]);
            let ev = hs.events();
            let ops: Vec<Op> = ev.iter().map(|e| e.op).collect();
            assert_eq!(ops, [Op::Write, Op::Flush, Op::Write, Op::Read]);
            assert!(ev[2].start > ev[1].end);
        });
    }
}
