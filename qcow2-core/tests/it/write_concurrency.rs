//! Allocation races: many tasks writing the same cluster, adjacent subclusters, and the
//! same L2 table at once, with reads of the untouched parts interleaved; 4 KiB writes at
//! queue depth 32; tiny metadata caches (eviction while writing). Checked against a model,
//! then with `qemu-img check` (when installed).

use crate::common::*;
use qcow2_core::create::{create_qcow2, CreateOptions};
use qcow2_core::{Image, OpenOptions};
use rand::seq::SliceRandom;
use rand::Rng;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

async fn create(path: &Path, size: u64, co: CreateOptions) {
    create_qcow2(
        path,
        &CreateOptions {
            size: Some(size),
            ..co
        },
    )
    .await
    .unwrap();
}

async fn open_with_cache(path: &Path, cache: usize) -> Image {
    Image::open(path, &{
        let mut o = OpenOptions::default();
        o.writable = true;
        o.cache_size = cache;
        o
    })
    .await
    .unwrap()
}

/// Every batch: `pieces` tasks write disjoint slices of a few clusters while as many tasks
/// read the other slices of the same clusters; the reads must see the model.
async fn same_cluster_batches(
    img: &Image,
    model: &mut [u8],
    seed: u64,
    pieces: u64,
    batches: usize,
) {
    let mut rng = rng(seed);
    let cs = img.layout().cluster_size;
    let size = img.size();
    let nclusters = size / cs;
    for batch in 0..batches {
        // 1 to 3 adjacent clusters, cut into 2*pieces slices of random lengths.
        let span_cl = rng.gen_range(1..=3u64).min(nclusters);
        let first = rng.gen_range(0..=nclusters - span_cl);
        let start = first * cs + rng.gen_range(0..cs / 2);
        let end = ((first + span_cl) * cs).min(size);
        let mut cuts: Vec<u64> = (0..2 * pieces - 1)
            .map(|_| rng.gen_range(start..end))
            .collect();
        cuts.push(start);
        cuts.push(end);
        cuts.sort();
        cuts.dedup();
        let mut slices: Vec<(u64, u64)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        slices.shuffle(&mut rng);
        let mut handles = Vec::new();
        let mut writes = Vec::new();
        for (i, &(a, b)) in slices.iter().enumerate() {
            let img = img.clone();
            if i % 2 == 0 {
                let data = random_data(&mut rng, (b - a) as usize);
                writes.push((a, data.clone()));
                handles.push(tokio::spawn(async move {
                    img.write_at(&data, a).await.unwrap();
                    None
                }));
            } else {
                handles.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; (b - a) as usize];
                    img.read_at(&mut buf, a).await.unwrap();
                    Some((a, buf))
                }));
            }
        }
        for h in handles {
            if let Some((a, got)) = h.await.unwrap() {
                assert_same(
                    &got,
                    &model[a as usize..a as usize + got.len()],
                    &format!("batch {batch}: concurrent read at {a}"),
                );
            }
        }
        for (a, d) in writes {
            model[a as usize..a as usize + d.len()].copy_from_slice(&d);
        }
        if batch % 7 == 3 {
            img.flush().await.unwrap();
        }
    }
}

async fn finish(img: Image, path: &Path, model: &[u8], what: &str) {
    assert_same(
        &read_all(&img).await,
        model,
        &format!("{what}: before close"),
    );
    img.close().await.unwrap();
    let again = open_ro(path).await;
    assert_same(
        &read_all(&again).await,
        model,
        &format!("{what}: after reopen"),
    );
    drop(again);
    if have_qemu() {
        assert_clean(path, what);
        let raw = path.with_extension("mirror");
        std::fs::write(&raw, model).unwrap();
        qemu_compare_raw(&raw, path, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_cluster_many_writers() {
    for (cs, ext) in [
        (65536u64, false),
        (512, false),
        (65536, true),
        (2 << 20, false),
    ] {
        let dir = tmpdir();
        let path = dir.path().join("a.qcow2");
        let size = if cs == 512 { 4 << 20 } else { 16 << 20 };
        create(
            &path,
            size,
            CreateOptions {
                cluster_size: cs,
                extended_l2: ext,
                ..Default::default()
            },
        )
        .await;
        let img = open_rw(&path).await;
        let mut model = vec![0u8; size as usize];
        same_cluster_batches(&img, &mut model, cs ^ ext as u64, 16, 60).await;
        finish(img, &path, &model, &format!("cs {cs} ext {ext}")).await;
    }
}

/// Adjacent subclusters of extended-L2 clusters over a backing file: each write allocates
/// one or two subclusters and must keep the backing data of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adjacent_subclusters_over_backing() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let size = 8u64 << 20;
    create(&base, size, CreateOptions::default()).await;
    let mut model = vec![0u8; size as usize];
    {
        let b = open_rw(&base).await;
        let mut r = rng(7);
        let data = random_data(&mut r, size as usize - 100_000);
        b.write_at(&data, 50_000).await.unwrap();
        model[50_000..50_000 + data.len()].copy_from_slice(&data);
        b.close().await.unwrap();
    }
    let top = dir.path().join("top.qcow2");
    create(
        &top,
        size,
        CreateOptions {
            extended_l2: true,
            cluster_size: 65536,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .await;
    let img = open_rw(&top).await;
    let sc = img.layout().sc_size;
    assert_eq!(sc, 2048);
    let mut r = rng(8);
    for round in 0..30 {
        // All 32 subclusters of two clusters, in random order, from 64 tasks; every other
        // subcluster is only read.
        let c = r.gen_range(0..size / 65536 - 1);
        let mut idx: Vec<u64> = (0..64).collect();
        idx.shuffle(&mut r);
        let mut hs = Vec::new();
        let mut writes = Vec::new();
        for i in idx {
            let off = c * 65536 + i * sc + r.gen_range(0..64);
            let len = r.gen_range(1..sc - 64);
            let img = img.clone();
            if (i + round) % 2 == 0 {
                let d = random_data(&mut r, len as usize);
                writes.push((off, d.clone()));
                hs.push(tokio::spawn(async move {
                    img.write_at(&d, off).await.unwrap();
                    None
                }));
            } else {
                hs.push(tokio::spawn(async move {
                    let mut b = vec![0u8; len as usize];
                    img.read_at(&mut b, off).await.unwrap();
                    Some((off, b))
                }));
            }
        }
        for h in hs {
            if let Some((off, b)) = h.await.unwrap() {
                assert_same(
                    &b,
                    &model[off as usize..off as usize + b.len()],
                    &format!("round {round}: read at {off}"),
                );
            }
        }
        for (off, d) in writes {
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
    }
    finish(img, &top, &model, "extended L2 over backing").await;
}

/// 4 KiB writes at queue depth 32 into an empty image, in random order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qd32_4k_writes_empty_image() {
    for cs in [65536u64, 4096, 512] {
        let dir = tmpdir();
        let path = dir.path().join("qd.qcow2");
        let size = 16u64 << 20;
        create(
            &path,
            size,
            CreateOptions {
                cluster_size: cs,
                ..Default::default()
            },
        )
        .await;
        let img = open_rw(&path).await;
        let mut model = vec![0u8; size as usize];
        let mut r = rng(cs);
        let mut blocks: Vec<u64> = (0..size / 4096).collect();
        blocks.shuffle(&mut r);
        let blocks = &blocks[..blocks.len() * 3 / 4];
        let data: Vec<Vec<u8>> = blocks
            .iter()
            .map(|&b| {
                let mut d = vec![0u8; 4096];
                r.fill(&mut d[..]);
                d[..8].copy_from_slice(&b.to_le_bytes());
                d
            })
            .collect();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut hs = Vec::new();
        for (i, &b) in blocks.iter().enumerate() {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let img = img.clone();
            let d = data[i].clone();
            hs.push(tokio::spawn(async move {
                img.write_at(&d, b * 4096).await.unwrap();
                drop(permit);
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        for (i, &b) in blocks.iter().enumerate() {
            model[(b * 4096) as usize..(b * 4096 + 4096) as usize].copy_from_slice(&data[i]);
        }
        finish(img, &path, &model, &format!("qd32 cs {cs}")).await;
    }
}

/// A metadata cache of a few slices: L2 and refcount slices are evicted while tasks
/// update them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_cache_eviction_races() {
    for (cs, rc_bits) in [(512u64, 16u32), (4096, 1), (512, 64)] {
        let dir = tmpdir();
        let path = dir.path().join("tiny.qcow2");
        let size = 8u64 << 20;
        create(
            &path,
            size,
            CreateOptions {
                cluster_size: cs,
                refcount_bits: rc_bits,
                ..Default::default()
            },
        )
        .await;
        let img = open_with_cache(&path, 8192).await;
        let mut model = vec![0u8; size as usize];
        let mut r = rng(cs + rc_bits as u64);
        let w = Workload {
            rounds: 100,
            tasks: 8,
            max_len: 3 * cs,
            compressed: true,
            ..Default::default()
        };
        // Readers all over the disk keep evicting slices (their data is not checked: they
        // race with the writes).
        let stop = Arc::new(AtomicBool::new(false));
        let noise: Vec<_> = (0..3u64)
            .map(|i| {
                let img = img.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut r = rng(1000 + i);
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        let len = r.gen_range(1..=65536u64);
                        let off = r.gen_range(0..size - len);
                        img.read_at(&mut buf[..len as usize], off).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        random_workload(&img, &mut model, &mut r, &w).await;
        same_cluster_batches(&img, &mut model, cs * 3, 8, 30).await;
        stop.store(true, Ordering::Relaxed);
        for n in noise {
            n.await.unwrap();
        }
        finish(
            img,
            &path,
            &model,
            &format!("tiny cache cs {cs} rc {rc_bits}"),
        )
        .await;
    }
}

/// Concurrent writes to every cluster of L2 tables shared with an internal snapshot: the
/// tables and clusters are copied once, the snapshot keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cow_of_shared_tables() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_create(dir.path(), "snap.qcow2", "cluster_size=4096", "8M");
    qemu_io(&path, None, &["write -P 0x31 0 8M"]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&path)]);
    let snap = qemu_export(&path, Some("s1"), &dir.path().join("s1.raw"));
    let mut model = snap.clone();
    let img = open_rw(&path).await;
    same_cluster_batches(&img, &mut model, 99, 12, 40).await;
    // Whole L2 ranges at once: 512 clusters per table, 64 writers.
    let mut hs = Vec::new();
    let mut r = rng(100);
    let mut writes = Vec::new();
    for t in 0..64u64 {
        let off = t * 8192 * 4 + r.gen_range(0..4096);
        let d = random_data(&mut r, 5000);
        writes.push((off, d.clone()));
        let img = img.clone();
        hs.push(tokio::spawn(
            async move { img.write_at(&d, off).await.unwrap() },
        ));
    }
    for h in hs {
        h.await.unwrap();
    }
    for (off, d) in writes {
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    finish(img, &path, &model, "cow of shared tables").await;
    let after = qemu_export(&path, Some("s1"), &dir.path().join("s1b.raw"));
    assert_same(&after, &snap, "snapshot content");
}
