//! Crash safety. An image made by qemu-img is loaded into a `MemStorage`; a fixed sequence
//! of writes, write-zeroes, discards, compressed writes and flushes runs against it with
//! `fail_writes_after(n)` for every n (every write before the n-th is kept, none after: a
//! crash at that point). The bytes left behind must pass `qemu-img check` without
//! corruption (leaks are fine), everything completed before the last successful flush must
//! read back intact, and other bytes must hold either their durable value or one that a
//! later request wrote. The crashed image must also accept new writes.

use crate::common::*;
use qcow2_core::io::mem::MemStorage;
use qcow2_core::io::{IoFuture, Storage};
use qcow2_core::{Image, OpenOptions};
use rand::rngs::StdRng;
use std::path::Path;
use std::sync::Arc;

fn ops_for(rng: &mut StdRng, size: u64, cs: u64, n: usize, compressed: bool) -> Vec<Op> {
    let w = Workload {
        max_len: (3 * cs).max(70_000),
        compressed,
        reads: false,
        flushes: false,
        ..Default::default()
    };
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(random_op(rng, size, cs, &w));
        if i % 5 == 4 {
            ops.push(Op::Flush);
        }
    }
    // A long write that allocates many clusters (refcount blocks / table growth).
    let big = (size / 3).min(3 << 20);
    ops.insert(
        n / 2,
        Op::Write {
            off: size - big,
            data: random_data(rng, big as usize),
        },
    );
    ops.push(Op::Flush);
    ops
}

/// A `MemStorage` that remembers the write count at every flush (the interesting crash
/// points are around them: metadata is written back there).
struct Recorder {
    mem: Arc<MemStorage>,
    flushes: parking_lot::Mutex<Vec<u64>>,
}

impl Storage for Recorder {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        self.mem.read_at(buf, off)
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        self.mem.write_at(buf, off)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.flushes.lock().push(self.mem.write_count());
        self.mem.flush()
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        self.mem.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        self.mem.write_zeroes(off, len)
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        self.mem.allocate(off, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mem.set_len(len)
    }
    fn allocated_size(&self) -> std::io::Result<u64> {
        self.mem.allocated_size()
    }
    fn alignment(&self) -> usize {
        1
    }
    fn engine_name(&self) -> &'static str {
        "recorder"
    }
}

/// Crash points: every write around a flush (up to 24 before and after), plus an even
/// sweep; at most about `max` in all.
fn crash_points(total: u64, flushes: &[u64], max: usize) -> Vec<u64> {
    let mut near: Vec<u64> = flushes
        .iter()
        .flat_map(|&f| f.saturating_sub(24)..=(f + 24).min(total))
        .collect();
    near.sort_unstable();
    near.dedup();
    let keep = (near.len() / (max * 2 / 3).max(1)).max(1);
    let mut pts: Vec<u64> = near.into_iter().step_by(keep).collect();
    let step = (total / (max as u64 / 3).max(1)).max(1);
    pts.extend((0..=total).step_by(step as usize));
    pts.push(total);
    pts.sort_unstable();
    pts.dedup();
    pts
}

async fn open_mem(bytes: Vec<u8>, path: &Path, writable: bool) -> (Arc<MemStorage>, Image) {
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let st: Arc<dyn Storage> = mem.clone();
    let img = Image::open_storage(st, path, &{
        let mut o = OpenOptions::default();
        o.writable = writable;
        o.cache_size = cache_size();
        o
    })
    .await
    .unwrap_or_else(|e| panic!("open: {e}"));
    (mem, img)
}

struct Outcome {
    durable: Vec<u8>,
    /// Requests issued after the last successful flush (possibly partly done).
    after: Vec<Op>,
    bytes: Vec<u8>,
}

/// Run `ops` allowing `limit` writes; stop at the first error.
async fn run_until_crash(
    image: &[u8],
    path: &Path,
    start: &[u8],
    ops: &[Op],
    limit: u64,
) -> Outcome {
    let (mem, img) = open_mem(image.to_vec(), path, true).await;
    mem.fail_writes_after(limit);
    let mut durable = start.to_vec();
    let mut current = start.to_vec();
    let mut after: Vec<Op> = Vec::new();
    let mut failed = false;
    for op in ops {
        let r = op.run(&img).await;
        match r {
            Ok(_) => {
                op.apply(&mut current);
                if matches!(op, Op::Flush) {
                    durable.clone_from(&current);
                    after.clear();
                } else {
                    after.push(op.clone());
                }
            }
            Err(_) => {
                after.push(op.clone());
                failed = true;
                break;
            }
        }
    }
    if !failed && img.close().await.is_ok() {
        durable = current;
        after.clear();
    }
    Outcome {
        durable,
        after,
        bytes: mem.snapshot(),
    }
}

fn check_content(got: &[u8], o: &Outcome, what: &str) {
    for (i, (&g, &d)) in got.iter().zip(&o.durable).enumerate() {
        if g == d {
            continue;
        }
        let ok = o.after.iter().any(|op| match op {
            Op::Write { off, data } | Op::Compressed { off, data } => {
                let off = *off as usize;
                i >= off && i < off + data.len() && data[i - off] == g
            }
            Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                i >= *off as usize && i < (*off + *len) as usize && g == 0
            }
            _ => false,
        });
        assert!(
            ok,
            "{what}: byte {i} (0x{i:x}) is {g:#04x}, durable value {d:#04x}, and no later request wrote that"
        );
    }
}

/// What else the image has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Extra {
    Plain,
    Snapshot,
    /// Two persistent bitmaps (the first write marks them in use; a crash leaves them so).
    Bitmap,
}

/// `expect_growth`: the workload must create refcount blocks (Some(false)) and also grow
/// the refcount table (Some(true)).
async fn sweep(
    name: &str,
    create_opts: &str,
    size: &str,
    fill: &[&str],
    extra: Extra,
    compressed: bool,
    expect_growth: Option<bool>,
) {
    let snapshot = extra == Extra::Snapshot;
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let src = qemu_create(dir.path(), &format!("{name}.qcow2"), create_opts, size);
    qemu_io(&src, None, fill);
    if snapshot {
        run("qemu-img", &["snapshot", "-c", "s1", p(&src)]);
        qemu_io(&src, None, &["write -P 0x99 100k 200k"]);
    }
    if extra == Extra::Bitmap {
        run("qemu-img", &["bitmap", "--add", p(&src), "b0"]);
        run("qemu-img", &["bitmap", "--add", p(&src), "b1"]);
        qemu_io(&src, None, &["write -P 0x98 1M 300k"]);
    }
    let image = std::fs::read(&src).unwrap();
    let start = qemu_export(&src, None, &dir.path().join("start.raw"));
    let snap = if snapshot {
        Some(qemu_export(&src, Some("s1"), &dir.path().join("s1.raw")))
    } else {
        None
    };
    let (cs, vsize) = {
        let (_, img) = open_mem(image.clone(), &src, false).await;
        (img.layout().cluster_size, img.size())
    };
    let mut rng = rng(seed_of(name));
    let ops = ops_for(&mut rng, vsize, cs, 30, compressed);

    // Count the writes of a full run, and where the flushes are.
    let (total, flushes) = {
        let rec = Arc::new(Recorder {
            mem: Arc::new(MemStorage::from_vec(image.clone())),
            flushes: parking_lot::Mutex::new(Vec::new()),
        });
        let st: Arc<dyn Storage> = rec.clone();
        let img = Image::open_storage(st, &src, &{
            let mut o = OpenOptions::default();
            o.writable = true;
            o
        })
        .await
        .unwrap();
        let before = rec.mem.write_count();
        for op in &ops {
            op.run(&img).await.unwrap();
        }
        let blocks = |i: &Image| i.refcount_table().iter().filter(|&&e| e != 0).count();
        let (rt0, rb0) = {
            let (_, ro) = open_mem(image.clone(), &src, false).await;
            (ro.header().refcount_table_clusters, blocks(&ro))
        };
        let (rt1, rb1) = (img.header().refcount_table_clusters, blocks(&img));
        eprintln!("{name}: refcount table {rt0} -> {rt1} clusters, {rb0} -> {rb1} blocks");
        assert!(
            rb1 > rb0 || expect_growth.is_none(),
            "{name}: no new refcount block"
        );
        assert!(
            rt1 > rt0 || expect_growth != Some(true),
            "{name}: refcount table did not grow"
        );
        img.close().await.unwrap();
        let f: Vec<u64> = rec.flushes.lock().iter().map(|&f| f - before).collect();
        (rec.mem.write_count() - before, f)
    };
    let points = crash_points(total, &flushes, 300);
    let crashed = dir.path().join("crashed.qcow2");
    let mut runs = 0;
    for (k, &n) in points.iter().enumerate() {
        let o = run_until_crash(&image, &src, &start, &ops, n).await;
        let what = format!("{name}: crash after {n} of {total} writes");
        std::fs::write(&crashed, &o.bytes).unwrap();
        assert_no_corruption(&crashed, &what);
        let (_, ro) = open_mem(o.bytes.clone(), &crashed, false).await;
        check_content(&read_all(&ro).await, &o, &what);
        drop(ro);
        if let Some(s) = &snap {
            if k % 10 == 0 {
                let got = qemu_export(&crashed, Some("s1"), &dir.path().join("s1-crashed.raw"));
                assert_same(&got, s, &format!("{what}: snapshot"));
            }
        }
        // Recovery: the crashed image takes new writes and stays consistent.
        if k % 8 == 0 {
            let (mem, img) = open_mem(o.bytes.clone(), &crashed, true).await;
            let mut model = read_all(&img).await;
            let mut r = rng_for(n);
            let w = Workload {
                rounds: 5,
                tasks: 4,
                max_len: 3 * cs,
                compressed,
                ..Default::default()
            };
            random_workload(&img, &mut model, &mut r, &w).await;
            img.close().await.unwrap();
            std::fs::write(&crashed, mem.snapshot()).unwrap();
            assert_no_corruption(&crashed, &format!("{what}, then new writes"));
            let (_, ro) = open_mem(mem.snapshot(), &crashed, false).await;
            assert_same(
                &read_all(&ro).await,
                &model,
                &format!("{what}, then new writes"),
            );
        }
        runs += 1;
    }
    eprintln!(
        "{name}: {runs} crash points over {total} writes ({} flushes)",
        flushes.len()
    );
}

fn rng_for(n: u64) -> StdRng {
    use rand::SeedableRng;
    StdRng::seed_from_u64(n.wrapping_mul(0x9e37_79b9))
}

const FILL: &[&str] = &[
    "write -P 0x11 0 300k",
    "write -P 0x22 1M 64k",
    "write -c -P 0x33 2M 64k",
    "write -z 3M 128k",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_default() {
    sweep("crash-default", "", "8M", FILL, Extra::Plain, true, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_snapshot() {
    sweep(
        "crash-snap",
        "cluster_size=4096",
        "8M",
        FILL,
        Extra::Snapshot,
        true,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_refcount_bits_1_small_clusters() {
    sweep(
        "crash-rc1",
        "cluster_size=512,refcount_bits=1",
        "6M",
        &["write -P 0x11 0 300k", "write -P 0x22 1M 64k"],
        Extra::Plain,
        false,
        Some(false),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_reftable_growth() {
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and one
    // refcount table cluster 2 MiB, so the workload grows the table.
    sweep(
        "crash-rc64",
        "cluster_size=512,refcount_bits=64",
        "6M",
        &["write -P 0x11 0 300k", "write -c -P 0x22 1M 64k"],
        Extra::Plain,
        true,
        Some(true),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_extended_l2() {
    sweep(
        "crash-extl2",
        "extended_l2=on,cluster_size=32k",
        "8M",
        FILL,
        Extra::Plain,
        true,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_bitmaps() {
    sweep(
        "crash-bitmap",
        "cluster_size=4096",
        "8M",
        FILL,
        Extra::Bitmap,
        true,
        None,
    )
    .await;
}

/// A resize that moves the L1 table (512-byte clusters: one L1 cluster maps 2 MiB), between
/// writes and flushes. After a crash the disk has the old or the new size; what was flushed
/// before is intact; the grown area reads as zeros or as the data written there later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_resize() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let src = qemu_create(dir.path(), "resize.qcow2", "cluster_size=512", "2M");
    qemu_io(&src, None, &["write -P 0x11 0 1M"]);
    let image = std::fs::read(&src).unwrap();
    let (old, new) = (2u64 << 20, 5u64 << 20);
    let a = vec![0x22u8; 100_000];
    let b = vec![0x33u8; 200_000];
    let (a_off, b_off) = (1_500_000u64, 4u64 << 20);
    // Returns how many steps completed (1: a written and flushed, 2: resized, 3: b written,
    // 4: flushed and closed).
    let workload = |img: Image| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let mut done = 0;
            if img.write_at(&a, a_off).await.is_err() || img.flush().await.is_err() {
                return done;
            }
            done += 1;
            if img.resize(new, false).await.is_err() {
                return done;
            }
            done += 1;
            if img.write_at(&b, b_off).await.is_err() {
                return done;
            }
            done += 1;
            if img.flush().await.is_err() || img.close().await.is_err() {
                return done;
            }
            done + 1
        }
    };
    let total = {
        let (mem, img) = open_mem(image.clone(), &src, true).await;
        let before = mem.write_count();
        assert_eq!(workload(img).await, 4);
        mem.write_count() - before
    };
    let crashed = dir.path().join("crashed.qcow2");
    for n in 0..=total {
        let (mem, img) = open_mem(image.clone(), &src, true).await;
        mem.fail_writes_after(n);
        let done = workload(img).await;
        let bytes = mem.snapshot();
        let what = format!("resize: crash after {n} of {total} writes ({done} steps done)");
        std::fs::write(&crashed, &bytes).unwrap();
        assert_no_corruption(&crashed, &what);
        let (_, ro) = open_mem(bytes, &crashed, false).await;
        let size = ro.size();
        assert!(size == old || size == new, "{what}: size {size}");
        assert!(done < 2 || size == new, "{what}: resize done, size {size}");
        let got = read_all(&ro).await;
        assert!(
            got[..1 << 20].iter().all(|&x| x == 0x11),
            "{what}: old data"
        );
        if done >= 1 {
            assert_same(&got[a_off as usize..a_off as usize + a.len()], &a, &what);
        }
        if done == 4 {
            assert_same(&got[b_off as usize..b_off as usize + b.len()], &b, &what);
        }
        for (i, &x) in got.iter().enumerate().skip(old as usize) {
            let in_b = (i as u64) >= b_off && (i as u64) < b_off + b.len() as u64;
            assert!(x == 0 || (in_b && x == 0x33), "{what}: byte {i} is {x:#x}");
        }
    }
}
