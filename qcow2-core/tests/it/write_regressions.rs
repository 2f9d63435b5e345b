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

/// A real file whose `allocated_size` and holes are chosen by the test, for qemu's
/// metadata-preallocation heuristic in `map`.
struct FakeAlloc {
    file: std::sync::Arc<dyn qcow2_core::io::Storage>,
    allocated: u64,
    /// Host byte range reported as a hole by `data_run`.
    hole: (u64, u64),
}

impl qcow2_core::io::Storage for FakeAlloc {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> qcow2_core::io::IoFuture<'a, ()> {
        self.file.read_at(buf, off)
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> qcow2_core::io::IoFuture<'a, ()> {
        self.file.write_at(buf, off)
    }
    fn flush(&self) -> qcow2_core::io::IoFuture<'_, ()> {
        self.file.flush()
    }
    fn discard(&self, off: u64, len: u64) -> qcow2_core::io::IoFuture<'_, bool> {
        self.file.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> qcow2_core::io::IoFuture<'_, ()> {
        self.file.write_zeroes(off, len)
    }
    fn allocate(&self, off: u64, len: u64) -> qcow2_core::io::IoFuture<'_, ()> {
        self.file.allocate(off, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn allocated_size(&self) -> std::io::Result<u64> {
        Ok(self.allocated)
    }
    fn data_run(&self, off: u64, len: u64) -> std::io::Result<(u64, bool)> {
        let (hs, he) = self.hole;
        Ok(if off < hs {
            (len.min(hs - off), true)
        } else if off < he {
            (len.min(he - off), false)
        } else {
            (len, true)
        })
    }
    fn alignment(&self) -> usize {
        1
    }
    fn engine_name(&self) -> &'static str {
        "fake-alloc"
    }
}

/// qemu's metadata-preallocation rule in `map` is "at least the threshold": an image with
/// 6 clusters in use whose file has 4 clusters allocated (threshold max(4, 6) = 6) maps the
/// holes of its data clusters as zeros, as qemu-img does; with 5 allocated (threshold 7) it
/// does not. The first half fails with `>` in place of `>=` (the rule before this fix, which
/// made `map` and NBD block status differ from qemu-img's on small images written by qemu-io).
#[tokio::test]
async fn map_metadata_preallocation_threshold_is_inclusive() {
    use qcow2_core::create::{create_qcow2, CreateOptions};
    use qcow2_core::io::{open_file, FileOptions, Storage};
    use qcow2_core::{Disk, Image, OpenOptions};
    const CS: u64 = 65536;
    let dir = tmpdir();
    let path = dir.path().join("t.qcow2");
    create_qcow2(
        &path,
        &CreateOptions {
            size: Some(16 * CS),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    {
        let img = Image::open(&path, &{
            let mut o = OpenOptions::default();
            o.writable = true;
            o
        })
        .await
        .unwrap();
        img.write_at(&[7u8; 4096], 0).await.unwrap();
        img.close().await.unwrap();
    }
    // header, refcount table, refcount block, L1, L2, data: 6 clusters with a refcount.
    let host = {
        let d = Disk::Qcow2(Image::open(&path, &OpenOptions::default()).await.unwrap());
        let m = d.map().await.unwrap();
        m[0].offset.expect("guest cluster 0 is data")
    };
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        6 * CS,
        "six clusters in use"
    );
    for (allocated_clusters, expect_zero_tail) in [(4, true), (5, false)] {
        let file = open_file(&path, &FileOptions::default()).unwrap();
        let st = std::sync::Arc::new(FakeAlloc {
            file,
            allocated: allocated_clusters * CS + 4096,
            hole: (host + 4096, host + CS),
        });
        let img = Image::open_storage(
            st as std::sync::Arc<dyn Storage>,
            &path,
            &OpenOptions::default(),
        )
        .await
        .unwrap();
        let m = Disk::Qcow2(img).map().await.unwrap();
        let first = &m[0];
        assert!(first.data && !first.zero, "{m:?}");
        if expect_zero_tail {
            assert_eq!(first.length, 4096, "allocated {allocated_clusters}: {m:?}");
            assert!(m[1].data && m[1].zero && m[1].length == CS - 4096, "{m:?}");
        } else {
            assert_eq!(first.length, CS, "allocated {allocated_clusters}: {m:?}");
        }
    }
}

/// The metadata overlap check: a refcount of 0 on an L2 table or a refcount block (a corrupt
/// image) makes the allocator hand that cluster out for guest data; the write must fail with
/// a corrupt-image error naming the structure, and the structure must be left intact.
/// "last-l2": the victim is the L2 table of L1 entry 1 in the last cluster of the file (made
/// by a zero write at 512 MiB, after the data): the check skips its table scans for ranges
/// past the highest cluster the tables point at, and this range starts exactly at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_onto_metadata_is_refused() {
    if !have_qemu() {
        return;
    }
    for (victim, what) in [
        ("l2", "would overwrite the L2 table of L1 entry 0"),
        ("refblock", "would overwrite refcount block 0"),
        ("last-l2", "would overwrite the L2 table of L1 entry 1"),
    ] {
        let dir = tmpdir();
        let path = qemu_create(dir.path(), "o.qcow2", "", "1G");
        qemu_io(&path, None, &["write -P 1 0 64k"]);
        if victim == "last-l2" {
            qemu_io(&path, None, &["write -z 512M 64k"]);
        }
        let mut raw = crate::surgery::Raw::load(&path);
        let cs = raw.cs();
        let host = match victim {
            "l2" => raw.u64(raw.u64(40) as usize) & 0x00ff_ffff_ffff_fe00,
            "last-l2" => raw.u64(raw.u64(40) as usize + 8) & 0x00ff_ffff_ffff_fe00,
            _ => raw.u64(raw.u64(48) as usize) & !511,
        };
        if victim == "last-l2" {
            assert_eq!(host + cs, raw.b.len() as u64, "the L2 table is not last");
        }
        let mut before = raw.b[host as usize..(host + cs) as usize].to_vec();
        // The refcount block holds the victim's own refcount, which the allocation sets
        // again: every other byte must stay.
        let own = raw.refcount_pos(host / cs).unwrap() as u64;
        let own = (own >= host && own < host + cs).then(|| (own - host) as usize);
        raw.set_refcount(host / cs, 0);
        raw.save();
        let img = open_rw(&path).await;
        let err = img
            .write_at(&vec![0x78u8; cs as usize], cs)
            .await
            .expect_err("a write onto metadata was allowed");
        assert_eq!(
            err.kind(),
            qcow2_core::ErrorKind::Corrupt,
            "{victim}: {err}"
        );
        assert!(err.to_string().contains(what), "{victim}: {err}");
        drop(img);
        let after = std::fs::read(&path).unwrap();
        let mut after = after[host as usize..(host + cs) as usize].to_vec();
        if let Some(o) = own {
            after[o..o + 2].fill(0);
            before[o..o + 2].fill(0);
        }
        assert!(
            after == before,
            "{victim}: the metadata cluster was overwritten"
        );
        // Marked corrupt: qemu-io opens it read-only only; guest cluster 0 still reads back.
        let out = run(
            "qemu-io",
            &["-r", "-f", "qcow2", "-c", "read -P 1 0 64k", p(&path)],
        );
        assert!(!out.contains("fail"), "{victim}: {out}");
    }
}
