//! A schedule explorer for concurrent guest requests (issue 6, "Concurrency"). With the
//! storage and the polling of the request futures under the test's control, the engine is
//! deterministic (its locks, in-flight marks, epochs and caches only move when a future is
//! polled), so the test can enumerate the orders in which things happen.
//!
//! - [`ParkStorage`] wraps a [`MemStorage`] and parks every read, write, flush, discard,
//!   write-zeroes and allocate (guest data and metadata alike) until the test releases it,
//!   recording what is parked (issuing request, kind, offset, length). A released request is
//!   performed on the memory and completes at once. (`set_len` and `len` are synchronous in
//!   the `Storage` trait and cannot be parked; no request of these scenarios calls `set_len`,
//!   the final `close` does.)
//! - The 2 to 4 guest requests of a scenario run as futures on one `Image` (opened with
//!   `Image::open_storage`), polled by a tiny executor on the test thread: no runtime, no
//!   other thread, no timer (compression runs inline without a runtime).
//! - A step is one of: poll a woken request (it runs until it waits again), or complete one
//!   parked storage request and poll the request that issued it. The choices of a step are
//!   the woken requests (by index), then the parked I/Os (oldest first). With no choice left
//!   every request must be done: otherwise it is a deadlock, and the test fails.
//! - A schedule is the sequence of choices. The explorer enumerates them depth-first,
//!   replaying each schedule from the start (stateless model checking; a replay that does not
//!   meet the same choices fails the test). Taking the k-th choice of a step costs k
//!   "delays", and a scenario explores every schedule with at most `max_delays` delays
//!   (delay-bounded search, the default schedule being "oldest first"). A scenario whose
//!   bound never cut a branch was explored exhaustively; the test prints which, and counts.
//! - Each scenario runs with cold caches (every table a request uses is read through the
//!   storage; concurrent lookups wait for one load) and, where it matters, warm ones (every
//!   L2 and refcount slice loaded before the requests start: lookups race with updates).
//!
//! Checked for every complete schedule: every request succeeded; the guest content and the
//! data every read returned are those of one serial order of the requests that respects real
//! time (a request that starts only when another is done, `Scenario::after`, comes after it);
//! after `close`, a fresh open of the file reads what the handle read, and our `check` finds
//! no corruption and no leak. After every step that completed a write, write-zeroes, discard
//! or allocate (the file as a crash would leave it if the disk kept every completed write),
//! `check` finds no corruption (leaks allowed). When a flush returns, a fresh open of the
//! file reads the content after some of the requests in a serial order, including every
//! request done before the flush started. `qemu-img check` runs on the final file of the first
//! and last schedule of each scenario (and cache variant).
//!
//! Checked that it fails: with the quarantine of `engine/inflight.rs` bypassed (the allocator
//! reuses a freed cluster at once), three scenarios fail (the file read afresh differs from
//! what the handle read); with `flush_metadata` writing refcount blocks after the L2 tables
//! instead of before, `compressed-cow-read-flush` fails at the intermediate check (a data
//! cluster referenced with refcount 0).
//!
//! `QCOW2RS_SCHED_DELAYS=n` overrides every scenario's delay bound (for longer runs);
//! `QCOW2RS_SCHED_VERBOSE=1` prints every schedule.

use crate::common::{assert_clean, have_qemu, tmpdir};
use futures::task::ArcWake;
use parking_lot::Mutex;
use qcow2_core::check::{check, CheckOptions};
use qcow2_core::create::{create_qcow2, CreateOptions};
use qcow2_core::io::mem::MemStorage;
use qcow2_core::io::{IoFuture, Storage};
use qcow2_core::{Image, OpenOptions, ZeroMode};
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

// ---- The parking storage ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Allocate,
}

impl Kind {
    fn is_mutation(self) -> bool {
        !matches!(self, Kind::Read | Kind::Flush)
    }
}

/// A parked storage request: the task that issued it (index into the scenario's requests),
/// its kind and byte range.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IoDesc {
    task: usize,
    kind: Kind,
    off: u64,
    len: u64,
}

impl std::fmt::Display for IoDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Flush => write!(f, "r{}:flush", self.task),
            k => write!(f, "r{}:{k:?}@0x{:x}+{}", self.task, self.off, self.len),
        }
    }
}

struct Slot {
    id: u64,
    desc: IoDesc,
    released: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct ParkState {
    enabled: bool,
    next_id: u64,
    /// Parked requests in arrival order (released ones until their future sees it).
    slots: Vec<Slot>,
}

thread_local! {
    /// The task the executor is polling (tags the requests it issues).
    static TASK: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Storage over memory that parks every request until the test releases it (see the module
/// documentation). Parking is off until [`ParkStorage::enable`].
struct ParkStorage {
    mem: Arc<MemStorage>,
    st: Mutex<ParkState>,
    /// The end of the last byte ever written (the rest of the file was only extended by
    /// `allocate` and reads as zeros).
    written_end: AtomicU64,
}

impl ParkStorage {
    fn new(mem: Arc<MemStorage>) -> Arc<ParkStorage> {
        Arc::new(ParkStorage {
            written_end: AtomicU64::new(mem.len().unwrap()),
            mem,
            st: Mutex::new(ParkState::default()),
        })
    }
    fn enable(&self, on: bool) {
        let mut s = self.st.lock();
        s.enabled = on;
        if !on {
            for slot in s.slots.iter_mut() {
                slot.released = true;
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }
    /// Park a request (when parking is on): its id.
    fn enter(&self, kind: Kind, off: u64, len: u64) -> Option<u64> {
        let mut s = self.st.lock();
        if !s.enabled {
            return None;
        }
        let id = s.next_id;
        s.next_id += 1;
        let task = TASK.with(|t| t.get());
        s.slots.push(Slot {
            id,
            desc: IoDesc {
                task,
                kind,
                off,
                len,
            },
            released: false,
            waker: None,
        });
        Some(id)
    }
    /// The parked requests not yet released, oldest first.
    fn parked(&self) -> Vec<(u64, IoDesc)> {
        self.st
            .lock()
            .slots
            .iter()
            .filter(|s| !s.released)
            .map(|s| (s.id, s.desc.clone()))
            .collect()
    }
    fn release(&self, id: u64) {
        let mut s = self.st.lock();
        let slot = s
            .slots
            .iter_mut()
            .find(|s| s.id == id)
            .expect("released request is parked");
        slot.released = true;
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }
    /// The file up to the end of the cluster (of `cs` bytes) holding the last byte written:
    /// what is left is only space reserved by `allocate` (zeros). Cheaper to check than the
    /// whole file, whose reserved tail is megabytes long; and stricter: a table that points
    /// at a cluster never written is then a corruption ("beyond the end of the file").
    fn written(&self, cs: u64) -> Vec<u8> {
        let end = self.written_end.load(Ordering::SeqCst).div_ceil(cs) * cs;
        let n = end.min(self.mem.len().unwrap()) as usize;
        let mut b = vec![0u8; n];
        block_on(self.mem.read_at(&mut b, 0)).unwrap();
        b
    }
    /// Wait until the request `id` (if parked) is released, then run `io`.
    fn gated<'a, T: Send + 'a>(
        &'a self,
        kind: Kind,
        off: u64,
        len: u64,
        io: impl FnOnce() -> IoFuture<'a, T> + Send + 'a,
    ) -> IoFuture<'a, T> {
        Box::pin(async move {
            // Parked when first polled (not when created), by the task polling it.
            let id = self.enter(kind, off, len);
            Wait { st: self, id }.await;
            if matches!(kind, Kind::Write | Kind::WriteZeroes) {
                self.written_end.fetch_max(off + len, Ordering::SeqCst);
            }
            io().await
        })
    }
}

/// Waits for a parked request's release; removes it from the parked list when done or dropped.
struct Wait<'a> {
    st: &'a ParkStorage,
    id: Option<u64>,
}

impl Future for Wait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(id) = self.id else {
            return Poll::Ready(());
        };
        let mut s = self.st.st.lock();
        let i = s.slots.iter().position(|s| s.id == id).expect("parked");
        if s.slots[i].released {
            s.slots.remove(i);
            drop(s);
            self.id = None;
            Poll::Ready(())
        } else {
            s.slots[i].waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.st.st.lock().slots.retain(|s| s.id != id);
        }
    }
}

impl Storage for ParkStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        let len = buf.len() as u64;
        self.gated(Kind::Read, off, len, move || self.mem.read_at(buf, off))
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        self.gated(Kind::Write, off, buf.len() as u64, move || {
            self.mem.write_at(buf, off)
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.gated(Kind::Flush, 0, 0, move || self.mem.flush())
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        self.gated(Kind::Discard, off, len, move || self.mem.discard(off, len))
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        self.gated(Kind::WriteZeroes, off, len, move || {
            self.mem.write_zeroes(off, len)
        })
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        self.gated(Kind::Allocate, off, len, move || {
            self.mem.allocate(off, len)
        })
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.mem.allocated_size()
    }
    fn alignment(&self) -> usize {
        1
    }
    fn engine_name(&self) -> &'static str {
        "park"
    }
}

// ---- A deterministic executor ----

struct Flag(AtomicBool);

impl ArcWake for Flag {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.store(true, Ordering::SeqCst);
    }
}

type Outcome = qcow2_core::Result<Option<Vec<u8>>>;

struct Task {
    fut: Option<Pin<Box<dyn Future<Output = Outcome>>>>,
    flag: Arc<Flag>,
    out: Option<Outcome>,
    /// The step at which it started and the one after which it was done.
    start: Option<usize>,
    end: Option<usize>,
}

/// Poll task `i` once (it runs until it waits for something).
fn poll_task(tasks: &mut [Task], i: usize) {
    let t = &mut tasks[i];
    t.flag.0.store(false, Ordering::SeqCst);
    let Some(fut) = t.fut.as_mut() else {
        return;
    };
    let waker = futures::task::waker(t.flag.clone());
    let mut cx = Context::from_waker(&waker);
    TASK.with(|c| c.set(i));
    let r = fut.as_mut().poll(&mut cx);
    TASK.with(|c| c.set(usize::MAX));
    if let Poll::Ready(o) = r {
        t.out = Some(o);
        t.fut = None;
    }
}

// ---- Guest requests and their serial model ----

#[derive(Clone, Debug)]
enum Req {
    Write(u64, Vec<u8>),
    /// A compressed write of one whole cluster.
    Compressed(u64, Vec<u8>),
    Read(u64, u64),
    Zero(u64, u64, ZeroMode),
    Discard(u64, u64),
    Flush,
}

impl Req {
    fn start(&self, img: &Image) -> Pin<Box<dyn Future<Output = Outcome>>> {
        let img = img.clone();
        match self.clone() {
            Req::Write(off, data) => {
                Box::pin(async move { img.write_at(&data, off).await.map(|_| None) })
            }
            Req::Compressed(off, data) => {
                Box::pin(async move { img.write_compressed(off, &data).await.map(|_| None) })
            }
            Req::Read(off, len) => Box::pin(async move {
                let mut b = vec![0u8; len as usize];
                img.read_at(&mut b, off).await.map(|_| Some(b))
            }),
            Req::Zero(off, len, mode) => {
                Box::pin(async move { img.write_zeroes(off, len, mode).await.map(|_| None) })
            }
            Req::Discard(off, len) => {
                Box::pin(async move { img.discard(off, len).await.map(|_| None) })
            }
            Req::Flush => Box::pin(async move { img.flush().await.map(|_| None) }),
        }
    }
    /// The guest byte range it touches.
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Req::Write(off, d) | Req::Compressed(off, d) => Some((*off, off + d.len() as u64)),
            Req::Read(off, len) | Req::Zero(off, len, _) | Req::Discard(off, len) => {
                Some((*off, off + len))
            }
            Req::Flush => None,
        }
    }
    /// Apply to the model `m` of the guest bytes from `base` on; a read returns what it reads.
    fn apply(&self, m: &mut [u8], base: u64) -> Option<Vec<u8>> {
        let (a, b) = self.range()?;
        let r = (a - base) as usize..(b - base) as usize;
        match self {
            Req::Write(_, d) | Req::Compressed(_, d) => m[r].copy_from_slice(d),
            Req::Read(..) => return Some(m[r].to_vec()),
            Req::Zero(..) | Req::Discard(..) => m[r].fill(0),
            Req::Flush => {}
        }
        None
    }
    fn label(&self) -> String {
        match self {
            Req::Write(off, d) => format!("write 0x{off:x}+{}", d.len()),
            Req::Compressed(off, d) => format!("compressed write 0x{off:x}+{}", d.len()),
            Req::Read(off, len) => format!("read 0x{off:x}+{len}"),
            Req::Zero(off, len, mode) => format!("write-zeroes({mode:?}) 0x{off:x}+{len}"),
            Req::Discard(off, len) => format!("discard 0x{off:x}+{len}"),
            Req::Flush => "flush".into(),
        }
    }
}

/// Every permutation of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

/// Whether the final content and what the reads returned are those of some serial order.
/// Bytes outside every request's range must be as they were.
fn linearizable(
    base: &[u8],
    reqs: &[Req],
    before: &[(usize, usize)],
    reads: &[Option<Vec<u8>>],
    fin: &[u8],
) -> bool {
    let (lo, hi) = window(reqs);
    if fin.len() != base.len() || fin[..lo] != base[..lo] || fin[hi..] != base[hi..] {
        return false;
    }
    permutations(reqs.len()).into_iter().any(|perm| {
        if !respects(&perm, before) {
            return false;
        }
        let mut m = base[lo..hi].to_vec();
        for &i in &perm {
            let r = reqs[i].apply(&mut m, lo as u64);
            if r.is_some() && r != reads[i] {
                return false;
            }
        }
        m == fin[lo..hi]
    })
}

/// The guest bytes `[lo, hi)` that the requests may touch.
fn window(reqs: &[Req]) -> (usize, usize) {
    let ranges = reqs.iter().filter_map(|r| r.range());
    let lo = ranges.clone().map(|r| r.0).min().unwrap_or(0) as usize;
    let hi = ranges.map(|r| r.1).max().unwrap_or(0) as usize;
    (lo, hi)
}

/// Whether `perm` puts `i` before `j` for every `(i, j)` of `before`.
fn respects(perm: &[usize], before: &[(usize, usize)]) -> bool {
    let pos = |x: usize| perm.iter().position(|&y| y == x);
    before.iter().all(|&(i, j)| pos(i) < pos(j))
}

/// Whether `got` (the guest content of the file when a flush returned) is the content after
/// some of the requests in a serial order, including every request in `must` (those done
/// before the flush started): what the flush promises.
fn durable(
    base: &[u8],
    reqs: &[Req],
    before: &[(usize, usize)],
    must: &[usize],
    got: &[u8],
) -> bool {
    let n = reqs.len();
    let (lo, hi) = window(reqs);
    if got.len() != base.len() || got[..lo] != base[..lo] || got[hi..] != base[hi..] {
        return false;
    }
    permutations(n).into_iter().any(|perm| {
        respects(&perm, before)
            && (0..1u32 << n).any(|mask| {
                if must.iter().any(|&i| mask & (1 << i) == 0) {
                    return false;
                }
                let mut m = base[lo..hi].to_vec();
                for &i in &perm {
                    if mask & (1 << i) != 0 {
                        reqs[i].apply(&mut m, lo as u64);
                    }
                }
                m == got[lo..hi]
            })
    })
}

// ---- Images ----

const PATH: &str = "sched.qcow2";

fn block_on<F: Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

fn opts(writable: bool, cache_size: usize) -> OpenOptions {
    let mut o = OpenOptions::default();
    o.writable = writable;
    o.cache_size = cache_size;
    o
}

/// A new image's bytes (made by our `create`).
fn create(co: CreateOptions) -> Vec<u8> {
    let dir = tmpdir();
    let path = dir.path().join("base.qcow2");
    block_on(create_qcow2(&path, &co)).unwrap();
    std::fs::read(&path).unwrap()
}

/// Populating a base image.
enum Fill {
    Data(u64, Vec<u8>),
    Compressed(u64, Vec<u8>),
    ZeroKeep(u64, u64),
}

/// The bytes of image `bytes` after `fill` and `close`.
fn populate(bytes: Vec<u8>, fill: &[Fill]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::from_vec(bytes));
    block_on(async {
        let img = Image::open_storage(mem.clone(), Path::new(PATH), &opts(true, 1 << 20))
            .await
            .unwrap();
        for f in fill {
            match f {
                Fill::Data(off, d) => img.write_at(d, *off).await.unwrap(),
                Fill::Compressed(off, d) => img.write_compressed(*off, d).await.unwrap(),
                Fill::ZeroKeep(off, len) => {
                    img.write_zeroes(*off, *len, ZeroMode::Keep).await.unwrap()
                }
            }
        }
        img.close().await.unwrap();
    });
    mem.snapshot()
}

/// The guest content of an image file.
fn guest(bytes: &[u8]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    block_on(async {
        let img = Image::open_storage(mem, Path::new(PATH), &opts(false, 1 << 20))
            .await
            .unwrap();
        let mut b = vec![0u8; img.size() as usize];
        img.read_at(&mut b, 0).await.unwrap();
        b
    })
}

/// Our `check` of an image file: (corruptions + check errors, leaks, first messages).
fn check_bytes(bytes: Vec<u8>) -> (u64, u64, String) {
    let mem = Arc::new(MemStorage::from_vec(bytes));
    block_on(async {
        let mut o = opts(false, 1 << 20);
        o.for_check = true;
        let img = Image::open_storage(mem, Path::new(PATH), &o).await.unwrap();
        let r = check(&img, &CheckOptions::default()).await.unwrap();
        let msgs: Vec<String> = r.messages.iter().take(6).cloned().collect();
        (r.corruptions + r.check_errors, r.leaks, msgs.join("; "))
    })
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 256) as u8) | 1)
        .collect()
}

fn compressible(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

// ---- The explorer ----

struct Scenario {
    name: &'static str,
    /// The image file before the requests.
    base: Vec<u8>,
    reqs: Vec<Req>,
    /// Most delays per schedule (see the module documentation).
    max_delays: usize,
    /// Metadata cache size of the handle under test (small: lookups read the tables).
    cache_size: usize,
    /// `(i, j)`: request `j` starts only once request `i` is done.
    after: Vec<(usize, usize)>,
    /// Run with cold caches (every table a request uses is read, and concurrent lookups
    /// wait for one load), with warm ones (every L2 slice and refcount block the image has is
    /// loaded before the requests start: lookups race with the updates), or both.
    caches: &'static [Caches],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caches {
    Cold,
    Warm,
}

/// What a step may do: poll a woken task, or complete a parked storage request (and poll
/// the task that issued it).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Choice {
    Poll(usize),
    Io(IoDesc),
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Poll(i) => write!(f, "r{i}:run"),
            Choice::Io(io) => io.fmt(f),
        }
    }
}

/// One step of a schedule: the choices there were (woken tasks by index, then parked
/// requests oldest first) and the one taken.
struct Step {
    choice: usize,
    choices: Vec<Choice>,
}

impl Step {
    fn taken(&self) -> &Choice {
        &self.choices[self.choice]
    }
}

struct RunResult {
    steps: Vec<Step>,
    final_bytes: Vec<u8>,
    step_checks: u64,
}

fn describe(sc: &Scenario, caches: Caches, steps: &[Step]) -> String {
    let reqs: Vec<String> = sc
        .reqs
        .iter()
        .enumerate()
        .map(|(i, r)| format!("r{i}={}", r.label()))
        .collect();
    let sched: Vec<String> = steps.iter().map(|s| s.taken().to_string()).collect();
    format!(
        "scenario {} ({caches:?} caches) [{}], schedule ({} steps): {}",
        sc.name,
        reqs.join(", "),
        steps.len(),
        sched.join(" ")
    )
}

/// Run the schedule that makes the choices `prefix`, then always the oldest parked request.
fn run_one(
    sc: &Scenario,
    caches: Caches,
    base_guest: &[u8],
    prefix: &[(usize, Choice)],
) -> RunResult {
    let mem = Arc::new(MemStorage::from_vec(sc.base.clone()));
    let ps = ParkStorage::new(mem.clone());
    let img = block_on(Image::open_storage(
        ps.clone(),
        Path::new(PATH),
        &opts(true, sc.cache_size),
    ))
    .unwrap();
    let cs = img.layout().cluster_size;
    if caches == Caches::Warm {
        block_on(async {
            let mut b = vec![0u8; img.size() as usize];
            img.read_at(&mut b, 0).await.unwrap();
            for c in 0..mem.len().unwrap().div_ceil(cs) {
                img.refcount(c).await.unwrap();
            }
        });
    }
    ps.enable(true);
    let mut tasks: Vec<Task> = sc
        .reqs
        .iter()
        .map(|_| Task {
            fut: None,
            flag: Arc::new(Flag(AtomicBool::new(true))),
            out: None,
            start: None,
            end: None,
        })
        .collect();
    let mut steps: Vec<Step> = Vec::new();
    // Start the requests whose predecessors are done; note the ones that are done now; check
    // what each flush that is done now promises.
    let progress = |tasks: &mut [Task], steps: &[Step]| {
        let now = steps.len();
        for i in 0..tasks.len() {
            if tasks[i].out.is_some() && tasks[i].end.is_none() {
                tasks[i].end = Some(now);
                if matches!(sc.reqs[i], Req::Flush) {
                    let started = tasks[i].start.unwrap();
                    let must: Vec<usize> = (0..tasks.len())
                        .filter(|&j| tasks[j].end.is_some_and(|e| e <= started))
                        .collect();
                    let got = guest(&ps.written(cs));
                    assert!(
                        durable(base_guest, &sc.reqs, &sc.after, &must, &got),
                        "{}: when r{i} (flush) returned, the file does not hold every request \
                         done before it started ({must:?})",
                        describe(sc, caches, steps)
                    );
                }
            }
        }
        for i in 0..tasks.len() {
            let ready = sc
                .after
                .iter()
                .filter(|&&(_, j)| j == i)
                .all(|&(k, _)| tasks[k].end.is_some());
            if tasks[i].start.is_none() && ready {
                tasks[i].start = Some(now);
                tasks[i].fut = Some(sc.reqs[i].start(&img));
            }
        }
    };
    progress(&mut tasks, &steps);
    let mut step_checks = 0;
    loop {
        let woken = tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.fut.is_some() && t.flag.0.load(Ordering::SeqCst))
            .map(|(i, _)| i);
        let parked = ps.parked();
        let choices: Vec<Choice> = woken
            .map(Choice::Poll)
            .chain(parked.iter().map(|p| Choice::Io(p.1.clone())))
            .collect();
        if choices.is_empty() {
            let stuck: Vec<String> = tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| t.fut.is_some())
                .map(|(i, _)| format!("r{i}"))
                .collect();
            assert!(
                stuck.is_empty(),
                "{}: deadlock: {} wait with nothing to run and no I/O parked",
                describe(sc, caches, &steps),
                stuck.join(", ")
            );
            break;
        }
        // The file as it stands (a crash keeping every completed write) is consistent.
        if let Some(Choice::Io(io)) = steps.last().map(|s| s.taken()) {
            if io.kind.is_mutation() {
                let (bad, _, msgs) = check_bytes(ps.written(cs));
                step_checks += 1;
                assert!(
                    bad == 0,
                    "{}: the file is inconsistent after the last step: {msgs}",
                    describe(sc, caches, &steps)
                );
            }
        }
        let k = steps.len();
        let choice = prefix.get(k).map_or(0, |p| p.0);
        assert!(
            choice < choices.len(),
            "{}: replay diverged: choice {choice} of {}",
            describe(sc, caches, &steps),
            choices.len()
        );
        // A replay meets the same choices as the run it replays.
        if let Some((_, want)) = prefix.get(k) {
            assert!(
                *want == choices[choice],
                "{}: replay diverged: {} where {want} was",
                describe(sc, caches, &steps),
                choices[choice]
            );
        }
        match &choices[choice] {
            Choice::Poll(i) => poll_task(&mut tasks, *i),
            Choice::Io(io) => {
                let (id, _) = parked
                    .iter()
                    .find(|p| p.1 == *io)
                    .expect("the chosen request is parked");
                ps.release(*id);
                poll_task(&mut tasks, io.task);
            }
        }
        steps.push(Step { choice, choices });
        progress(&mut tasks, &steps);
        assert!(
            steps.len() < 10_000,
            "{}: schedule too long",
            describe(sc, caches, &steps)
        );
    }
    let what = describe(sc, caches, &steps);
    // Every request succeeded.
    let mut reads = Vec::new();
    for (i, t) in tasks.iter_mut().enumerate() {
        match t.out.take().expect("task done") {
            Ok(r) => reads.push(r),
            Err(e) => panic!("{what}: r{i} ({}) failed: {e}", sc.reqs[i].label()),
        }
    }
    for t in tasks.iter_mut() {
        t.fut = None;
    }
    ps.enable(false);
    // The content is that of a serial order, reads included.
    let live = block_on(async {
        let mut b = vec![0u8; img.size() as usize];
        img.read_at(&mut b, 0).await.unwrap();
        b
    });
    // Real-time order: a request done before another started comes first.
    let mut before = Vec::new();
    for (i, a) in tasks.iter().enumerate() {
        for (j, b) in tasks.iter().enumerate() {
            if a.end.unwrap() <= b.start.unwrap() {
                before.push((i, j));
            }
        }
    }
    drop(tasks);
    assert!(
        linearizable(base_guest, &sc.reqs, &before, &reads, &live),
        "{what}: the content or a read matches no serial order of the requests"
    );
    block_on(img.close()).unwrap_or_else(|e| panic!("{what}: close: {e}"));
    let final_bytes = mem.snapshot();
    assert!(
        guest(&final_bytes) == live,
        "{what}: the file read afresh differs from what the handle read"
    );
    let (bad, leaks, msgs) = check_bytes(final_bytes.clone());
    assert!(
        bad == 0 && leaks == 0,
        "{what}: check after close: {bad} corruptions, {leaks} leaks: {msgs}"
    );
    RunResult {
        steps,
        final_bytes,
        step_checks,
    }
}

fn qemu_check_bytes(sc: &Scenario, bytes: &[u8], which: &str) {
    let dir = tmpdir();
    let path = dir.path().join(format!("{}-{which}.qcow2", sc.name));
    std::fs::write(&path, bytes).unwrap();
    assert_clean(&path, &format!("scenario {}, {which} schedule", sc.name));
}

/// Explore the scenario's schedules depth-first (see the module documentation).
fn explore(sc: Scenario) {
    for &c in sc.caches {
        explore_with(&sc, c);
    }
}

fn explore_with(sc: &Scenario, caches: Caches) {
    let qemu = have_qemu();
    let max_delays = std::env::var("QCOW2RS_SCHED_DELAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(sc.max_delays);
    let verbose = std::env::var_os("QCOW2RS_SCHED_VERBOSE").is_some();
    let t0 = Instant::now();
    let base_guest = guest(&sc.base);
    let mut prefix: Vec<(usize, Choice)> = Vec::new();
    let mut count = 0u64;
    let mut longest = 0usize;
    let mut step_checks = 0u64;
    let mut cut = false;
    let last;
    loop {
        let r = run_one(sc, caches, &base_guest, &prefix);
        count += 1;
        if verbose {
            println!("{}", describe(sc, caches, &r.steps));
        }
        longest = longest.max(r.steps.len());
        step_checks += r.step_checks;
        if count == 1 && qemu {
            qemu_check_bytes(sc, &r.final_bytes, "first");
        }
        // Next schedule: the deepest step with an untried choice within the delay budget.
        let mut used: Vec<usize> = Vec::with_capacity(r.steps.len());
        let mut acc = 0;
        for s in &r.steps {
            used.push(acc);
            acc += s.choice;
        }
        let mut next = None;
        for i in (0..r.steps.len()).rev() {
            let s = &r.steps[i];
            if s.choice + 1 < s.choices.len() {
                if used[i] + s.choice < max_delays {
                    next = Some(i);
                    break;
                }
                cut = true;
            }
        }
        let Some(i) = next else {
            last = r;
            break;
        };
        prefix = r.steps[..i]
            .iter()
            .map(|s| (s.choice, s.taken().clone()))
            .collect();
        let alt = r.steps[i].choice + 1;
        prefix.push((alt, r.steps[i].choices[alt].clone()));
    }
    if qemu && count > 1 {
        qemu_check_bytes(sc, &last.final_bytes, "last");
    }
    println!(
        "engine_schedules {} ({caches:?} caches): {count} schedules ({}), up to {longest} \
         steps, {step_checks} intermediate checks, {:.1} s",
        sc.name,
        if cut {
            format!("delay bound {max_delays}")
        } else {
            "exhaustive".to_string()
        },
        t0.elapsed().as_secs_f64()
    );
}

// ---- Scenarios ----

const K4: u64 = 4096;

fn co(size: u64, cluster_size: u64) -> CreateOptions {
    CreateOptions {
        size: Some(size),
        cluster_size,
        ..Default::default()
    }
}

/// A 1 MiB image with 4 KiB clusters and its first cluster written (the L2 table exists, so
/// lookups read it), plus `more`.
fn base_4k(more: Vec<Fill>) -> Vec<u8> {
    let mut fill = vec![Fill::Data(0, pattern(1, K4 as usize))];
    fill.extend(more);
    populate(create(co(1 << 20, K4)), &fill)
}

/// Small enough that the handle starts with cold caches and reads every table it uses.
const TINY_CACHE: usize = 0;

#[test]
fn sched_two_allocating_writes_same_cluster() {
    explore(Scenario {
        name: "alloc-alloc-same-cluster",
        base: base_4k(vec![]),
        reqs: vec![
            Req::Write(2 * K4, pattern(2, 2048)),
            Req::Write(2 * K4 + 2048, pattern(3, 2048)),
        ],
        max_delays: usize::MAX,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

#[test]
fn sched_allocating_and_in_place_write_same_l2() {
    explore(Scenario {
        name: "alloc-inplace-same-l2",
        base: base_4k(vec![]),
        reqs: vec![
            Req::Write(3 * K4 + 512, pattern(4, 1024)),
            Req::Write(1024, pattern(5, 1024)),
        ],
        max_delays: usize::MAX,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

#[test]
fn sched_write_discard_flush_same_cluster() {
    explore(Scenario {
        name: "write-discard-flush",
        base: base_4k(vec![Fill::Data(K4, pattern(6, K4 as usize))]),
        reqs: vec![
            Req::Write(K4 + 1024, pattern(7, 1024)),
            Req::Discard(K4, K4),
            Req::Flush,
        ],
        max_delays: 5,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

#[test]
fn sched_write_zeroes_unmap_and_read_same_cluster() {
    explore(Scenario {
        name: "zero-unmap-read-flush",
        base: base_4k(vec![Fill::Data(K4, pattern(8, K4 as usize))]),
        reqs: vec![
            Req::Zero(K4, K4, ZeroMode::Unmap),
            Req::Read(K4, K4),
            Req::Flush,
        ],
        max_delays: 8,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

#[test]
fn sched_extended_l2_writes_into_one_subcluster() {
    // 64 KiB clusters, 2 KiB subclusters. Cluster 0 is allocated with every subcluster zero
    // (written, then write-zeroes keeping the cluster), then subcluster 0 written again: the
    // first two requests allocate subcluster 1 in place (`subcluster_alloc_write`, under the
    // cluster's in-flight mark), the third writes into subcluster 0 in place (no lock).
    let base = populate(
        create(CreateOptions {
            extended_l2: true,
            ..co(1 << 20, 65536)
        }),
        &[
            Fill::Data(0, pattern(9, 65536)),
            Fill::ZeroKeep(0, 65536),
            Fill::Data(0, pattern(27, 2048)),
        ],
    );
    explore(Scenario {
        name: "extended-l2-one-subcluster",
        base,
        reqs: vec![
            Req::Write(2048, pattern(10, 512)),
            Req::Write(2048 + 1024, pattern(11, 512)),
            Req::Write(512, pattern(12, 512)),
        ],
        max_delays: usize::MAX,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

#[test]
fn sched_write_to_compressed_cluster_and_read() {
    let base = base_4k(vec![Fill::Compressed(
        2 * K4,
        compressible(13, K4 as usize),
    )]);
    explore(Scenario {
        name: "compressed-cow-read-flush",
        base,
        reqs: vec![
            Req::Write(2 * K4 + 1024, pattern(14, 1024)),
            Req::Read(2 * K4, K4),
            Req::Flush,
        ],
        max_delays: 6,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

#[test]
fn sched_write_and_flush() {
    // A 4 MiB image: guest offset 2 MiB needs a new L2 table (an L1 entry to write back).
    let base = populate(create(co(4 << 20, K4)), &[Fill::Data(0, pattern(15, 4096))]);
    explore(Scenario {
        name: "write-flush",
        base,
        // r3 starts when r0 is done: when it returns, the file must hold r0's data.
        reqs: vec![
            Req::Write((2 << 20) + 512, pattern(16, 1024)),
            Req::Flush,
            Req::Write(2048, pattern(17, 1024)),
            Req::Flush,
        ],
        after: vec![(0, 3)],
        max_delays: 4,
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

/// A 4 MiB image with 512-byte clusters and 64-bit refcounts (a refcount block covers 64
/// clusters, the one-cluster refcount table 4096) whose next allocation grows the refcount
/// table, and the guest cluster index that allocation is for.
fn reftable_full_base() -> (Vec<u8>, u64) {
    let fresh = create(CreateOptions {
        refcount_bits: 64,
        ..co(4 << 20, 512)
    });
    // Find the first single-cluster write that grows the table ...
    let mem = Arc::new(MemStorage::from_vec(fresh.clone()));
    let k = block_on(async {
        let img = Image::open_storage(mem, Path::new(PATH), &opts(true, 1 << 20))
            .await
            .unwrap();
        for i in 0..8192u64 {
            let before = img.refcount_table().len();
            img.write_at(&pattern(i as u8, 512), i * 512).await.unwrap();
            if img.refcount_table().len() != before {
                return i;
            }
        }
        panic!("the refcount table never grew");
    });
    // ... and stop just before it.
    let fill: Vec<Fill> = (0..k)
        .map(|i| Fill::Data(i * 512, pattern(i as u8, 512)))
        .collect();
    (populate(fresh, &fill), k)
}

#[test]
fn sched_refcount_table_growth_and_allocating_write() {
    let (base, k) = reftable_full_base();
    explore(Scenario {
        name: "reftable-growth-alloc",
        base,
        reqs: vec![
            Req::Write(k * 512, pattern(18, 512)),
            Req::Write((k + 1) * 512 + 100, pattern(19, 300)),
        ],
        max_delays: 5,
        after: vec![],
        cache_size: 1 << 20,
        // Cold, the allocator would read the 64 refcount blocks one by one.
        caches: &[Caches::Warm],
    });
}

// The in-flight rule under every order: a request that looked a cluster up before a discard
// (or write-zeroes with unmap) and a flush freed it, while an allocating write looks for a
// free cluster. Reusing the cluster before the first request is done would put that request's
// bytes into the new cluster (or read the new cluster's bytes): the serial-order check sees
// either.

#[test]
fn sched_in_place_write_discard_flush_and_allocation() {
    explore(Scenario {
        name: "write-discard-flush-alloc",
        base: base_4k(vec![Fill::Data(K4, pattern(20, K4 as usize))]),
        reqs: vec![
            Req::Write(K4 + 1024, pattern(21, 1024)),
            Req::Discard(K4, K4),
            Req::Flush,
            Req::Write(5 * K4, pattern(22, K4 as usize)),
        ],
        max_delays: 4,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

#[test]
fn sched_read_write_zeroes_flush_and_allocation() {
    explore(Scenario {
        name: "read-zero-unmap-flush-alloc",
        base: base_4k(vec![Fill::Data(K4, pattern(23, K4 as usize))]),
        reqs: vec![
            Req::Read(K4, K4),
            Req::Zero(K4, K4, ZeroMode::Unmap),
            Req::Flush,
            Req::Write(5 * K4 + 512, pattern(24, 2048)),
        ],
        max_delays: 4,
        after: vec![],
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

// Two compressed writes share one host cluster (the compressed-data cursor); a discard of the
// first and a flush drop one of its references (and must not let the cursor point into a
// freed cluster).
#[test]
fn sched_compressed_writes_sharing_a_cluster_discard_flush() {
    explore(Scenario {
        name: "compressed-compressed-discard-flush",
        base: base_4k(vec![]),
        reqs: vec![
            Req::Compressed(2 * K4, compressible(25, K4 as usize)),
            Req::Compressed(3 * K4, compressible(26, K4 as usize)),
            Req::Discard(2 * K4, K4),
            Req::Flush,
        ],
        after: vec![],
        max_delays: 3,
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold, Caches::Warm],
    });
}

// Cache eviction: 512-byte clusters, so each L2 table is one cache slice, and 64 of them
// against caches of 32 slices. The read loads every L2 table and evicts the slice the first
// allocating write dirtied; the second allocating write starts when the read is done, sees
// the evicted dirty slices and writes the metadata back (`maybe_writeback`) while the first
// may still run.
#[test]
fn sched_evictions_allocating_writes_and_wide_read() {
    let fill: Vec<Fill> = (0..64u64)
        .map(|t| Fill::Data(t * 32768, pattern(t as u8, 512)))
        .collect();
    let base = populate(create(co(2 << 20, 512)), &fill);
    explore(Scenario {
        name: "evictions-alloc-read-alloc",
        base,
        reqs: vec![
            Req::Write(512, pattern(28, 512)),
            Req::Read(0, 2 << 20),
            Req::Write(40 * 32768 + 1024, pattern(29, 512)),
        ],
        after: vec![(1, 2)],
        max_delays: 1,
        cache_size: TINY_CACHE,
        caches: &[Caches::Cold],
    });
}
