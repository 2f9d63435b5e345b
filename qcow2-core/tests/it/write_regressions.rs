//! Small deterministic reproducers of write-side bugs found by the randomized suites (see
//! the comment on each). Those needing qemu-img skip without it (and fail in CI).

use crate::common::*;
use qcow2_core::create::{create_qcow2, CreateOptions, Preallocation};
use qcow2_core::ZeroMode;
use std::path::Path;
use std::time::Duration;

async fn ours(path: &Path, size: u64, co: CreateOptions) {
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

fn compressible(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 100) as u8))
        .collect()
}

/// A compressed cluster freed and a new one written at the same host offset: the cache of
/// decompressed clusters (keyed by host offset) served the old content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompressed_cache_is_not_stale_after_reuse() {
    let dir = tmpdir();
    let path = dir.path().join("z.qcow2");
    ours(&path, 4 << 20, CreateOptions::default()).await;
    let img = open_rw(&path).await;
    let cs = img.layout().cluster_size as usize;
    let a = compressible(1, cs);
    let b = compressible(100, cs);
    img.write_compressed(0, &a).await.unwrap();
    let mut buf = vec![0u8; cs];
    img.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(buf, a);
    img.write_at(&vec![7u8; cs], 0).await.unwrap();
    img.flush().await.unwrap();
    img.write_compressed(cs as u64, &b).await.unwrap();
    img.read_at(&mut buf, cs as u64).await.unwrap();
    assert!(buf == b, "stale decompressed data");
    img.close().await.unwrap();
}

/// The compressed-data cursor pointed into a host cluster that had been freed and handed
/// out again as a data cluster: the next compressed write went into that data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_cursor_never_points_into_a_freed_cluster() {
    let dir = tmpdir();
    let path = dir.path().join("c.qcow2");
    ours(&path, 4 << 20, CreateOptions::default()).await;
    let img = open_rw(&path).await;
    let cs = img.layout().cluster_size;
    img.write_compressed(0, &compressible(1, cs as usize))
        .await
        .unwrap();
    img.write_at(&vec![7u8; cs as usize], 0).await.unwrap();
    img.flush().await.unwrap();
    let data = vec![0x5au8; cs as usize];
    img.write_at(&data, 5 * cs).await.unwrap();
    img.write_compressed(cs, &compressible(9, cs as usize))
        .await
        .unwrap();
    let mut buf = vec![0u8; cs as usize];
    img.read_at(&mut buf, 5 * cs).await.unwrap();
    assert!(buf == data, "a compressed write landed in a data cluster");
    img.close().await.unwrap();
    if have_qemu() {
        assert_clean(&path, "compressed cursor");
    }
}

/// With 1-bit refcounts a host cluster cannot hold two compressed clusters: the second
/// compressed write failed with a refcount overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_writes_with_one_bit_refcounts() {
    let dir = tmpdir();
    let path = dir.path().join("rc1.qcow2");
    ours(
        &path,
        4 << 20,
        CreateOptions {
            refcount_bits: 1,
            ..Default::default()
        },
    )
    .await;
    let img = open_rw(&path).await;
    let cs = img.layout().cluster_size;
    for i in 0..8 {
        img.write_compressed(i * cs, &compressible(i as u8, cs as usize))
            .await
            .unwrap();
    }
    img.close().await.unwrap();
    if have_qemu() {
        assert_clean(&path, "rc1 compressed");
        let map = qemu_map(&path);
        assert!(map.iter().any(|e| e["compressed"] == true));
    }
}

/// v2 has no zero flag: write-zeroes keeping the cluster set bit 0 anyway, which QEMU
/// reports as "Zero cluster entry found in pre-v3 image" (and marks the image corrupt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_write_zeroes_keep_writes_zeros() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = dir.path().join("v2.qcow2");
    ours(
        &path,
        4 << 20,
        CreateOptions {
            version: 2,
            ..Default::default()
        },
    )
    .await;
    let img = open_rw(&path).await;
    let cs = img.layout().cluster_size;
    img.write_at(&vec![1u8; 4 * cs as usize], 0).await.unwrap();
    img.write_zeroes(cs, 2 * cs, ZeroMode::Keep).await.unwrap();
    img.close().await.unwrap();
    assert_clean(&path, "v2 zero keep");
    let mut model = vec![0u8; 4 << 20];
    model[..cs as usize].fill(1);
    model[3 * cs as usize..4 * cs as usize].fill(1);
    let m = dir.path().join("m.raw");
    std::fs::write(&m, &model).unwrap();
    qemu_compare_raw(&m, &path, "v2 zero keep");
}

/// Whole-cluster write-zeroes on a v2 image with a backing file (and on a raw data file with
/// extended L2) waited forever on the in-flight mark it held itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_zeroes_do_not_deadlock() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    ours(&base, 4 << 20, CreateOptions::default()).await;
    let b = open_rw(&base).await;
    b.write_at(&vec![3u8; 4 << 20], 0).await.unwrap();
    b.close().await.unwrap();
    let top = dir.path().join("top.qcow2");
    ours(
        &top,
        4 << 20,
        CreateOptions {
            version: 2,
            backing_file: Some("base.qcow2".into()),
            ..Default::default()
        },
    )
    .await;
    let img = open_rw(&top).await;
    let cs = img.layout().cluster_size;
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        img.write_zeroes(0, 2 * cs, ZeroMode::Unmap).await.unwrap();
        img.discard(2 * cs, cs).await.unwrap();
    })
    .await;
    assert!(r.is_ok(), "write_zeroes hangs");
    let mut buf = vec![9u8; 3 * cs as usize];
    img.read_at(&mut buf, 0).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    img.close().await.unwrap();
    if have_qemu() {
        assert_clean(&top, "v2 zeroes over backing");
    }
}

/// Allocations of at least a refcount block's range of clusters (preallocation with 4 KiB
/// clusters and 64-bit refcounts: 512 clusters per block, 512 per L2 table) never found a
/// free run: each new refcount block was put inside the run being allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_allocations_across_new_refcount_blocks() {
    let dir = tmpdir();
    let path = dir.path().join("p.qcow2");
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        ours(
            &path,
            32 << 20,
            CreateOptions {
                cluster_size: 4096,
                refcount_bits: 64,
                preallocation: Preallocation::Metadata,
                ..Default::default()
            },
        ),
    )
    .await;
    assert!(r.is_ok(), "preallocation does not finish");
    if have_qemu() {
        assert_clean(&path, "preallocated");
    }
}

/// A fresh cluster that received only zeros was never written, so the L2 entry pointed
/// wholly past the end of the file: a corruption to qemu-img check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_zero_cluster_is_inside_the_file() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = dir.path().join("f.qcow2");
    ours(&path, 4 << 20, CreateOptions::default()).await;
    let img = open_rw(&path).await;
    img.write_zeroes(100, 1000, ZeroMode::Unmap).await.unwrap();
    img.write_at(&[0u8; 10], 70_000).await.unwrap();
    img.write_at(&[1u8; 10], 140_000).await.unwrap();
    img.close().await.unwrap();
    assert_clean(&path, "fresh zero clusters");
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len % 65536, 0, "the file ends inside a cluster");
}
