//! Concurrency stress (issue 6): 8 threads, each with its own runtime and 32 requests in
//! flight per round (futures joined per thread), mixing reads, writes, discards,
//! write-zeroes (keep and unmap) and flushes on clones of one image handle, checked against
//! a raw in-memory model.
//!
//! Race-free by construction: the disk is cut into chunks of two clusters, dealt round-robin
//! to the threads (so neighbouring chunks, their L2 tables and refcount blocks are shared by
//! all threads); within a round a thread's 32 requests go to 32 different chunks of its own.
//! Every read is compared with the model when it completes; at the end the whole disk is
//! read back, `qemu-img check` must be clean and `qemu-img compare` must find the model.
//!
//! Variants: one image over nothing; two images sharing one backing file (requests go to
//! either); an image made by `qemu-img convert -c` (every cluster compressed).
//! `QCOW2RS_STRESS_ROUNDS=n` sets the rounds per thread (default 12).

use crate::common::*;
use parking_lot::Mutex;
use qcow2_core::{Image, ZeroMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const THREADS: usize = 8;
const IN_FLIGHT: usize = 32;

struct Target {
    img: Image,
    path: PathBuf,
    model: Mutex<Vec<u8>>,
}

fn rounds() -> usize {
    std::env::var("QCOW2RS_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// A random request inside chunk `[c0, c0+clen)`.
fn chunk_op(rng: &mut StdRng, c0: u64, clen: u64, cs: u64) -> Op {
    let (off, len) = match rng.gen_range(0..4) {
        0 => {
            let len = rng.gen_range(1..=4096u64);
            (c0 + rng.gen_range(0..clen - len), len)
        }
        1 => (c0, clen),
        2 => (c0 + cs / 2, cs),
        _ => {
            let a = rng.gen_range(0..clen);
            (c0 + a, rng.gen_range(1..=clen - a))
        }
    };
    match rng.gen_range(0..20) {
        0..=9 => Op::Write {
            off,
            data: random_data(rng, len as usize),
        },
        10..=13 => Op::Read { off, len },
        14..=15 => Op::Zero {
            off,
            len,
            mode: if rng.gen_bool(0.5) {
                ZeroMode::Keep
            } else {
                ZeroMode::Unmap
            },
        },
        16..=17 => Op::Discard { off, len },
        _ => Op::Flush,
    }
}

fn stress(name: &str, targets: Vec<Target>) {
    let t0 = std::time::Instant::now();
    let cs = targets[0].img.layout().cluster_size;
    let size = targets[0].img.size();
    let clen = 2 * cs;
    let nchunks = size / clen;
    assert!(nchunks as usize >= THREADS * IN_FLIGHT, "disk too small");
    let targets = Arc::new(targets);
    let ops_done = AtomicU64::new(0);
    let base_seed = seed_of(name)
        ^ std::env::var("QCOW2_TEST_SEED")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let (targets, ops_done) = (targets.clone(), &ops_done);
            sc.spawn(move || {
                let seed = base_seed ^ (t as u64 + 1);
                let mut rng = StdRng::seed_from_u64(seed);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mine: Vec<u64> = (t as u64..nchunks).step_by(THREADS).collect();
                for round in 0..rounds() {
                    let mut chunks = mine.clone();
                    let mut ops = Vec::new();
                    for _ in 0..IN_FLIGHT {
                        let c = chunks.swap_remove(rng.gen_range(0..chunks.len()));
                        let ti = rng.gen_range(0..targets.len());
                        ops.push((ti, chunk_op(&mut rng, c * clen, clen, cs)));
                    }
                    // What reads must see: the model before the round (chunks are disjoint).
                    let expect: Vec<Option<Vec<u8>>> = ops
                        .iter()
                        .map(|(ti, op)| match op {
                            Op::Read { off, len } => Some(
                                targets[*ti].model.lock()[*off as usize..(*off + *len) as usize]
                                    .to_vec(),
                            ),
                            _ => None,
                        })
                        .collect();
                    let results = rt.block_on(futures::future::join_all(
                        ops.iter().map(|(ti, op)| op.run(&targets[*ti].img)),
                    ));
                    for (((ti, op), r), want) in ops.iter().zip(results).zip(expect) {
                        let what = format!(
                            "{name}: thread {t} (seed {seed}) round {round}: image {ti}: {}",
                            short(op)
                        );
                        let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
                        if let (Some(got), Some(want)) = (r, want) {
                            assert_same(&got, &want, &what);
                        }
                        op.apply(&mut targets[*ti].model.lock());
                    }
                    ops_done.fetch_add(ops.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let targets = Arc::try_unwrap(targets).ok().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (i, t) in targets.into_iter().enumerate() {
        let model = t.model.into_inner();
        rt.block_on(async {
            assert_same(
                &read_all(&t.img).await,
                &model,
                &format!("{name}: image {i} read back"),
            );
            t.img.close().await.unwrap();
        });
        assert_clean(&t.path, &format!("{name}: image {i}"));
        let raw = t.path.with_extension("model.raw");
        std::fs::write(&raw, &model).unwrap();
        qemu_compare_raw(&raw, &t.path, &format!("{name}: image {i}"));
    }
    eprintln!(
        "stress {name}: {THREADS} threads x {IN_FLIGHT} in flight, {} requests, {:.1}s",
        ops_done.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
}

async fn target(path: &Path) -> Target {
    let img = open_rw(path).await;
    let model = read_all(&img).await;
    Target {
        img,
        path: path.to_path_buf(),
        model: Mutex::new(model),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn stress_one_image() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let img = qemu_create(dir.path(), "one.qcow2", "cluster_size=4096", "40M");
    qemu_io(
        &img,
        None,
        &["write -P 0x11 0 5M", "write -c -P 0x22 8M 1M"],
    );
    let t = block_on(target(&img));
    stress("stress-one", vec![t]);
}

#[test]
fn stress_two_images_one_backing() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let base = qemu_create(dir.path(), "base.qcow2", "cluster_size=4096", "40M");
    qemu_io(
        &base,
        None,
        &["write -P 0x33 0 20M", "write -P 0x44 30M 5M"],
    );
    let o = format!(
        "cluster_size=4096,backing_file={},backing_fmt=qcow2",
        p(&base)
    );
    let a = qemu_create(dir.path(), "a.qcow2", &o, "40M");
    let o2 = format!(
        "cluster_size=8192,extended_l2=off,backing_file={},backing_fmt=qcow2",
        p(&base)
    );
    let b = qemu_create(dir.path(), "b.qcow2", &o2, "40M");
    let ts = block_on(async { vec![target(&a).await, target(&b).await] });
    stress("stress-two-over-backing", ts);
}

#[test]
fn stress_compressed_image() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let raw = dir.path().join("src.raw");
    let data: Vec<u8> = (0..(40usize << 20))
        .map(|i| {
            if (i / 700) % 2 == 0 {
                0
            } else {
                (i / 4096) as u8
            }
        })
        .collect();
    std::fs::write(&raw, data).unwrap();
    let img = dir.path().join("comp.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&raw),
            p(&img),
        ],
    );
    let t = block_on(target(&img));
    stress("stress-compressed", vec![t]);
}
