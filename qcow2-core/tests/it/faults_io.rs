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
//! `QCOW2RS_FAULTS_STEP=k` tests every k-th N only (default 1: every request).

use crate::common::*;
use qcow2_core::io::fault::{HookStorage, Match, Op as IoOp};
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
    Image::open_storage(
        st,
        path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open: {e}"))
}

#[derive(Default)]
struct Tally {
    injected: AtomicUsize,
    surfaced: AtomicUsize,
    absorbed: AtomicUsize,
    poisoned: AtomicUsize,
}

/// One run with the N-th request (after open) failing.
async fn one(image: &[u8], src: &Path, ops: &[Op], n: u64, tdir: &Path, t: &Tally) {
    let fault = [Fault::Eio, Fault::Enospc, Fault::Short][(n % 3) as usize];
    let what = format!("faults: request {n} fails with {fault:?}");
    let (mem, hs, mut img) = open_hs(image, src).await;
    let mut model = read_all(&img).await;
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
    let mut failed: Option<Op> = None;
    for op in ops {
        match op.run(&img).await {
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
                }
                // The failed request may be partly done: its range holds old or new bytes
                // (checked), and from now on the model is what it holds.
                if let (false, Some((a, b))) = (matches!(op, Op::Read { .. }), op.range()) {
                    let mut got = vec![0u8; (b - a) as usize];
                    img.read_at(&mut got, a)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: read after the fault: {e}"));
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
    if let Err(e) = img.flush().await {
        assert!(failed.is_none(), "{what}: flush after the fault: {e}");
        assert_eq!(e.errno(), want, "{what}: final flush: {e}");
        tail_failed = true;
        img.flush()
            .await
            .unwrap_or_else(|e| panic!("{what}: flush after the failed flush: {e}"));
    }
    if let Err(e) = img.clone().close().await {
        assert!(
            failed.is_none() && !tail_failed,
            "{what}: close after the fault: {e}"
        );
        assert_eq!(e.errno(), want, "{what}: close: {e}");
        tail_failed = true;
        img.close()
            .await
            .unwrap_or_else(|e| panic!("{what}: close after the failed close: {e}"));
    }
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ops, total) = rt.block_on(async {
        let (_, hs, img) = open_hs(&image, &src).await;
        let cs = img.layout().cluster_size;
        let ops = workload(img.size(), cs);
        let count = |hs: &HookStorage| {
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
        };
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
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for t in 0..2 {
            let tdir = dir.path().join(format!("t{t}"));
            std::fs::create_dir_all(&tdir).unwrap();
            let (image, src, ops, ns, tally, next) = (&image, &src, &ops, &ns, &tally, &next);
            sc.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= ns.len() {
                        break;
                    }
                    rt.block_on(one(image, src, ops, ns[k], &tdir, tally));
                }
            });
        }
    });
    eprintln!(
        "faults {name}: {} faults injected over {total} requests (EIO, ENOSPC, short write in turn): {} failed a guest request, {} absorbed (no request failed), {} poisoned the handle; {:.1}s",
        tally.injected.load(Ordering::Relaxed),
        tally.surfaced.load(Ordering::Relaxed),
        tally.absorbed.load(Ordering::Relaxed),
        tally.poisoned.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
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
