//! I/O errors (issue 6): a fixed workload (allocating writes, partial writes over compressed
//! clusters and over a backing file, discards, write-zeroes keep and unmap, reads, flushes)
//! runs on an image whose storage fails its N-th request, for every N: EIO, ENOSPC and short
//! writes (a prefix written, then EIO) in turn, on reads, writes, discards, write-zeroes and
//! flushes, guest data and metadata alike. Then:
//!
//! - the request that met the fault fails with that errno and a message; nothing panics;
//! - every later request succeeds (a handle poisoned by a failed header switch is reopened,
//!   as documented), and so do the final flush and close: metadata whose write failed is
//!   written by a later flush;
//! - right after the failure, the failed request's range holds old or new bytes, each;
//! - `qemu-img check` finds no corruption (leaks allowed), and the content read back after
//!   close is what the handle read before (the model).
//!
//! Each case is then classified (printed as a table, by class): the storage request that met
//! the fault (kind; header, guest data or other for a write or read, by the host clusters
//! mapped at close; the phase) and who saw it. The test fails on any case in which no
//! caller saw the error except a failed hole punch of a freed cluster (best effort by
//! design: the cluster is free either way) and an N past the run's last request.
//!
//! `QCOW2RS_FAULTS_STEP=k` tests every k-th N only (default 1: every request).

use crate::common::*;
use qcow2_core::engine::disk::Disk;
use qcow2_core::io::fault::{Event, HookStorage, Match, Op as IoOp};
use qcow2_core::io::mem::MemStorage;
use qcow2_core::io::Storage;
use qcow2_core::{Image, OpenOptions, ZeroMode};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn workload(size: u64, cs: u64) -> Vec<Op> {
    let mut rng = rng(seed_of("faults-io"));
    let mut ops = vec![
        // Partial writes over compressed clusters (qemu-io -c below) and over the backing file.
        Op::Write {
            off: (2 << 20) + 1000,
            data: random_data(&mut rng, 3000),
        },
        Op::Write {
            off: (5 << 20) + 300,
            data: random_data(&mut rng, 5000),
        },
        Op::Read {
            off: 2 << 20,
            len: 2 * cs,
        },
        Op::Zero {
            off: 3 << 20,
            len: 3 * cs,
            mode: ZeroMode::Unmap,
        },
        Op::Flush,
        Op::Discard {
            off: 0,
            len: 4 * cs,
        },
        Op::Zero {
            off: 100_000,
            len: 70_000,
            mode: ZeroMode::Keep,
        },
    ];
    for i in 0..8u64 {
        ops.push(Op::Write {
            off: (i * 977_777) % (size - 200_000),
            data: random_data(&mut rng, 1000 + (i as usize * 17_000)),
        });
        if i % 3 == 2 {
            ops.push(Op::Flush);
        }
    }
    ops.push(Op::Read {
        off: 0,
        len: 1 << 20,
    });
    // A long allocating write (new L2 tables, refcount blocks).
    ops.push(Op::Write {
        off: size - (1 << 20),
        data: random_data(&mut rng, 1 << 20),
    });
    ops.push(Op::Flush);
    ops
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Eio,
    Enospc,
    Short,
}

async fn open_hs(bytes: &[u8], path: &Path) -> (Arc<MemStorage>, Arc<HookStorage>, Image) {
    let mem = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let hs = HookStorage::new(mem.clone());
    let img = reopen(&hs, path).await;
    (mem, hs, img)
}

async fn reopen(hs: &Arc<HookStorage>, path: &Path) -> Image {
    let st: Arc<dyn Storage> = hs.clone();
    Image::open_storage(st, path, &{
        let mut o = OpenOptions::default();
        o.writable = true;
        o
    })
    .await
    .unwrap_or_else(|e| panic!("open: {e}"))
}

#[derive(Default)]
struct Tally {
    injected: AtomicUsize,
    surfaced: AtomicUsize,
    absorbed: AtomicUsize,
    poisoned: AtomicUsize,
    /// One line per case: (class, explained, detail).
    cases: std::sync::Mutex<Vec<(String, bool, String)>>,
}

/// Where the workload was when the fault hit.
#[derive(Clone, Debug)]
enum Phase {
    Guest(String),
    ReadAfterFault,
    Reopen,
    FinalFlush,
    Close,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Guest(_) => "guest request",
            Phase::ReadAfterFault => "read after the fault",
            Phase::Reopen => "reopen",
            Phase::FinalFlush => "final flush",
            Phase::Close => "close",
        }
    }
}

/// The request that met the fault, if any, taken from the record (`hs.record(true)`).
fn take_fault(hs: &HookStorage, phase: &Phase, hit: &mut Option<(Event, Phase)>) {
    for e in hs.take_events() {
        if !e.ok {
            assert!(hit.is_none(), "two failed requests: {hit:?} and {e:?}");
            *hit = Some((e, phase.clone()));
        }
    }
}

/// How many storage requests `hs` has seen.
fn count(hs: &HookStorage) -> u64 {
    [
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Discard,
        IoOp::WriteZeroes,
        IoOp::Allocate,
        IoOp::SetLen,
    ]
    .iter()
    .map(|&o| hs.count(o))
    .sum::<u64>()
}

/// One run with the N-th request (after open) failing.
async fn one(image: &[u8], src: &Path, ops: &[Op], n: u64, tdir: &Path, t: &Tally) {
    let fault = [Fault::Eio, Fault::Enospc, Fault::Short][(n % 3) as usize];
    let what = format!("faults: request {n} fails with {fault:?}");
    let (mem, hs, mut img) = open_hs(image, src).await;
    let mut model = read_all(&img).await;
    let before = count(&hs);
    let m = Match::any().skip(n);
    let want = match fault {
        Fault::Eio => {
            hs.fail(m, libc::EIO);
            libc::EIO
        }
        Fault::Enospc => {
            hs.fail(m, libc::ENOSPC);
            libc::ENOSPC
        }
        Fault::Short => {
            hs.short_write(m, 100, libc::EIO);
            libc::EIO
        }
    };
    hs.record(true);
    let mut hit: Option<(Event, Phase)> = None;
    let mut failed: Option<Op> = None;
    for op in ops {
        let res = op.run(&img).await;
        take_fault(&hs, &Phase::Guest(short(op)), &mut hit);
        match res {
            Ok(Some(got)) => {
                let (a, b) = op.range().unwrap();
                assert_same(
                    &got,
                    &model[a as usize..b as usize],
                    &format!("{what}: {}", short(op)),
                );
            }
            Ok(None) => op.apply(&mut model),
            Err(e) => {
                assert!(
                    failed.is_none(),
                    "{what}: {} failed after the fault cleared: {e}",
                    short(op)
                );
                assert_eq!(
                    e.errno(),
                    want,
                    "{what}: {} failed with errno {} ({e}), not {want}",
                    short(op),
                    e.errno()
                );
                assert!(!e.message().is_empty(), "{what}: empty message");
                failed = Some(op.clone());
                if img.is_poisoned() {
                    t.poisoned.fetch_add(1, Ordering::Relaxed);
                    drop(img);
                    img = reopen(&hs, src).await;
                    take_fault(&hs, &Phase::Reopen, &mut hit);
                }
                // The failed request may be partly done: its range holds old or new bytes
                // (checked), and from now on the model is what it holds.
                if let (false, Some((a, b))) = (matches!(op, Op::Read { .. }), op.range()) {
                    let mut got = vec![0u8; (b - a) as usize];
                    img.read_at(&mut got, a)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: read after the fault: {e}"));
                    take_fault(&hs, &Phase::ReadAfterFault, &mut hit);
                    let mut new = model.clone();
                    op.apply(&mut new);
                    for (i, &g) in got.iter().enumerate() {
                        let j = a as usize + i;
                        assert!(
                            g == model[j] || g == new[j],
                            "{what}: after the failed {}, byte {j} is {g:#04x}: neither old {:#04x} nor new {:#04x}",
                            short(op),
                            model[j],
                            new[j]
                        );
                    }
                    model[a as usize..b as usize].copy_from_slice(&got);
                }
            }
        }
    }
    // The fault may fall in the final flush or close: that one fails, the next succeeds.
    let mut tail_failed = false;
    let mut close_failed = false;
    let res = img.flush().await;
    take_fault(&hs, &Phase::FinalFlush, &mut hit);
    if let Err(e) = res {
        assert!(failed.is_none(), "{what}: flush after the fault: {e}");
        assert_eq!(e.errno(), want, "{what}: final flush: {e}");
        tail_failed = true;
        img.flush()
            .await
            .unwrap_or_else(|e| panic!("{what}: flush after the failed flush: {e}"));
    }
    let res = img.clone().close().await;
    take_fault(&hs, &Phase::Close, &mut hit);
    if let Err(e) = res {
        assert!(
            failed.is_none() && !tail_failed,
            "{what}: close after the fault: {e}"
        );
        assert_eq!(e.errno(), want, "{what}: close: {e}");
        tail_failed = true;
        close_failed = true;
        img.close()
            .await
            .unwrap_or_else(|e| panic!("{what}: close after the failed close: {e}"));
    }
    take_fault(&hs, &Phase::Close, &mut hit);
    let requests = count(&hs) - before;
    let guest_failed = failed.is_some();
    if tail_failed {
        failed = Some(Op::Flush);
    }
    t.injected.fetch_add(1, Ordering::Relaxed);
    if failed.is_some() {
        t.surfaced.fetch_add(1, Ordering::Relaxed);
    } else {
        t.absorbed.fetch_add(1, Ordering::Relaxed);
    }
    let out = tdir.join("faulted.qcow2");
    std::fs::write(&out, mem.snapshot()).unwrap();
    assert_no_corruption(&out, &what);
    let img = Image::open(&out, &OpenOptions::default()).await.unwrap();
    let got = read_all(&img).await;
    assert_same(&got, &model, &format!("{what}: read back after close"));
    // Classify the case: which storage request met the fault, in which phase, and who saw it.
    let data: Vec<(u64, u64)> = Disk::Qcow2(img.clone())
        .map()
        .await
        .unwrap()
        .iter()
        .filter(|e| e.depth == 0 && e.data && !e.compressed)
        .filter_map(|e| e.offset.map(|o| (o, o + e.length)))
        .collect();
    let (class, explained, detail) = classify(
        hit.as_ref(),
        guest_failed,
        tail_failed && !close_failed,
        close_failed,
        n >= requests,
        &data,
    );
    t.cases
        .lock()
        .unwrap()
        .push((class, explained, format!("{what}: {detail}")));
}

/// The class of one case, whether it is explained, and the details (kind, range, phase).
fn classify(
    hit: Option<&(Event, Phase)>,
    guest_failed: bool,
    flush_failed: bool,
    close_failed: bool,
    past_end: bool,
    data: &[(u64, u64)],
) -> (String, bool, String) {
    let Some((e, phase)) = hit else {
        return (
            "no request met the fault (N past this run's last request)".into(),
            past_end && !(guest_failed || flush_failed || close_failed),
            "no failed storage request".into(),
        );
    };
    let what = if e.op == IoOp::Flush || e.op == IoOp::SetLen {
        "-"
    } else if e.op == IoOp::Discard {
        // The engine discards in the image file only in `release_quarantine`: the hole punch
        // of a cluster whose refcount reached 0 and whose requests have drained.
        "freed cluster"
    } else if e.offset < 512 {
        "header"
    } else if data
        .iter()
        .any(|&(a, b)| e.offset < b && a < e.offset + e.len.max(1))
    {
        "data"
    } else {
        "metadata or since freed"
    };
    let detail = format!(
        "{:?} [{:#x}, +{:#x}) ({what}) during {}{}",
        e.op,
        e.offset,
        e.len,
        phase.name(),
        match phase {
            Phase::Guest(s) => format!(" {s}"),
            _ => String::new(),
        }
    );
    let kind = format!("{:?} ({what})", e.op);
    // The request that failed must be the one during which the fault was met.
    let (class, ok) = if guest_failed {
        (
            format!("guest request failed: {kind}"),
            matches!(phase, Phase::Guest(_)),
        )
    } else if flush_failed {
        (
            format!("final flush failed: {kind}"),
            matches!(phase, Phase::FinalFlush),
        )
    } else if close_failed {
        (
            format!("close failed: {kind}"),
            matches!(phase, Phase::Close),
        )
    } else if e.op == IoOp::Discard {
        // `release_quarantine`: the hole punch of a freed cluster is best effort (the cluster
        // is free either way; at worst the file keeps its space).
        (
            "nothing failed: hole punch of a freed cluster, ignored by design".into(),
            true,
        )
    } else {
        (format!("SWALLOWED: {kind} during {}", phase.name()), false)
    };
    (class, ok, detail)
}

fn faults(name: &str, opts: &str) {
    if !have_qemu() {
        return;
    }
    let t0 = std::time::Instant::now();
    let dir = tmpdir();
    let base = qemu_create(dir.path(), "base.qcow2", "", "8M");
    qemu_io(&base, None, &["write -P 0x44 4M 2M"]);
    let o = format!("{opts},backing_file={},backing_fmt=qcow2", p(&base));
    let src = qemu_create(dir.path(), &format!("{name}.qcow2"), &o, "8M");
    qemu_io(
        &src,
        None,
        &[
            "write -P 0x11 0 300k",
            "write -c -P 0x33 2M 128k",
            "write -P 0x22 3M 64k",
        ],
    );
    let image = std::fs::read(&src).unwrap();
    let rt = runtime_current();
    let (ops, total) = rt.block_on(async {
        let (_, hs, img) = open_hs(&image, &src).await;
        let cs = img.layout().cluster_size;
        let ops = workload(img.size(), cs);
        // As `one` does: read the whole disk first (it fills the caches), so that the N-th
        // request after it is the same request in both runs.
        read_all(&img).await;
        let before = count(&hs);
        for op in &ops {
            op.run(&img).await.unwrap();
        }
        img.flush().await.unwrap();
        img.close().await.unwrap();
        (ops, count(&hs) - before)
    });
    drop(rt);
    let step = std::env::var("QCOW2RS_FAULTS_STEP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        .max(1);
    let ns: Vec<u64> = (0..total).step_by(step as usize).collect();
    let tally = Tally::default();
    for_each_on_threads(2, ns.len(), dir.path(), |rt, k, tdir| {
        rt.block_on(one(&image, &src, &ops, ns[k], tdir, &tally));
    });
    eprintln!(
        "faults {name}: {} faults injected over {total} requests (EIO, ENOSPC, short write in turn): {} failed a guest request, the final flush or close, {} failed none, {} poisoned the handle; {:.1}s",
        tally.injected.load(Ordering::Relaxed),
        tally.surfaced.load(Ordering::Relaxed),
        tally.absorbed.load(Ordering::Relaxed),
        tally.poisoned.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    let cases = tally.cases.into_inner().unwrap();
    let mut table = std::collections::BTreeMap::<(bool, &str), usize>::new();
    for (class, ok, _) in &cases {
        *table.entry((!ok, class.as_str())).or_default() += 1;
    }
    eprintln!("faults {name}: cases by class:");
    for ((bad, class), n) in &table {
        eprintln!(
            "  {n:4}  {class}{}",
            if *bad { "  <- UNEXPLAINED" } else { "" }
        );
    }
    let bad: Vec<&String> = cases.iter().filter(|c| !c.1).map(|c| &c.2).collect();
    assert!(
        bad.is_empty(),
        "faults {name}: {} fault(s) that no caller saw:\n{}",
        bad.len(),
        bad.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn faults_every_request_4k() {
    faults("faults-4k", "cluster_size=4096");
}

#[test]
fn faults_every_request_extended_l2() {
    faults("faults-extl2", "extended_l2=on,cluster_size=32k");
}
