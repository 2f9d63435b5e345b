//! Memory bounds on hostile or huge images: compare, map and the convert plan stream (an
//! empty image of the largest size qemu-img creates completes, in constant memory: the old
//! code built a list of every 2 MiB range and aborted), check's messages are capped, and a
//! backing chain shares one cache budget (metadata caches and the decompressed-cluster cache).

use crate::common::{have_qemu, p, qemu_create, qemu_io, run, tmpdir};
use qcow2_core::check::{check, CheckOptions, MAX_MESSAGES};
use qcow2_core::convert::{compare, CompareResult};
use qcow2_core::{Disk, Image, OpenOptions};

/// The largest virtual size qemu-img accepts for qcow2: 2 EiB (2 MiB clusters, a 32 MiB L1).
const MAX_SIZE: &str = "2305843009213693952";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_map_the_largest_empty_image() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let a = qemu_create(dir.path(), "a.qcow2", "cluster_size=2M", MAX_SIZE);
    let b = qemu_create(dir.path(), "b.qcow2", "cluster_size=2M", MAX_SIZE);
    let o = OpenOptions::default();
    let da = Disk::Qcow2(Image::open(&a, &o).await.unwrap());
    let db = Disk::Qcow2(Image::open(&b, &o).await.unwrap());
    assert_eq!(
        compare(&da, &db, true).await.unwrap(),
        CompareResult::Identical
    );
    let mut n = 0;
    da.map_each(|e| {
        assert!(e.zero && e.length == da.size());
        n += 1;
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(n, 1);
    // A difference at the very end is found.
    drop(db);
    qemu_io(&b, Some("qcow2"), &["write -P 1 2305843009211596800 512"]);
    let db = Disk::Qcow2(Image::open(&b, &o).await.unwrap());
    assert_eq!(
        compare(&da, &db, true).await.unwrap(),
        CompareResult::Mismatch(2305843009211596800)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_messages_are_capped() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    // 512-byte clusters, 12,000 data clusters; then every refcount block zeroed: one
    // "refcount=0 reference=1" error per cluster.
    let img = qemu_create(dir.path(), "a.qcow2", "cluster_size=512", "8M");
    qemu_io(&img, Some("qcow2"), &["write -P 7 0 6000k"]);
    let i = Image::open(&img, &OpenOptions::default()).await.unwrap();
    let rt = i.refcount_table();
    drop(i);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for e in rt.iter().filter(|&&e| e != 0) {
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 512], e & !511).unwrap();
    }
    drop(f);
    let mut o = OpenOptions::default();
    o.for_check = true;
    let i = Image::open(&img, &o).await.unwrap();
    let r = check(&i, &CheckOptions::default()).await.unwrap();
    assert!(r.corruptions > MAX_MESSAGES as u64, "{}", r.corruptions);
    assert_eq!(r.messages.len(), MAX_MESSAGES + 1);
    let last = r.messages.last().unwrap();
    assert!(last.contains("more messages suppressed"), "{last}");
    let n: u64 = last.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(n > 0);
    assert!(r.human().contains("more messages suppressed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_chain_shares_one_cache_budget() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let mut prev = qemu_create(dir.path(), "0.qcow2", "", "64M");
    for k in 1..6 {
        let name = format!("{k}.qcow2");
        let opts = format!("backing_file={},backing_fmt=qcow2", p(&prev));
        prev = qemu_create(dir.path(), &name, &opts, "64M");
    }
    run("qemu-img", &["info", "--backing-chain", p(&prev)]);
    let budget = 8 << 20;
    let mut o = OpenOptions::default();
    o.cache_size = budget;
    let top = Image::open(&prev, &o).await.unwrap();
    let mut total = top.metadata_cache_capacity();
    let mut d = top.backing().cloned();
    let mut n = 1;
    while let Some(Disk::Qcow2(i)) = d {
        total += i.metadata_cache_capacity();
        d = i.backing().cloned();
        n += 1;
    }
    assert_eq!(n, 6);
    // Each cache keeps at least 2 slices per shard (16 shards, 4 KiB slices): 256 KiB per
    // image at least. Without sharing the chain would hold 6 x 8 MiB.
    let floor = 2 * 2 * 16 * 4096;
    assert!(
        total <= budget + n * floor,
        "{total} bytes of cache over a chain of {n}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_chain_shares_one_decompressed_cluster_cache() {
    if !have_qemu() {
        return;
    }
    // Four layers, each with 3 MiB of compressed clusters (64 KiB) of its own: reading the
    // whole disk through the top decompresses 12 MiB. The chain shares one 4 MiB cache
    // (it was 4 MiB per image: 12 MiB here).
    let dir = tmpdir();
    let mut prev = qemu_create(dir.path(), "0.qcow2", "", "16M");
    qemu_io(&prev, Some("qcow2"), &["write -c -P 0x10 0 3M"]);
    for k in 1..4u64 {
        let name = format!("{k}.qcow2");
        let opts = format!("backing_file={},backing_fmt=qcow2", p(&prev));
        prev = qemu_create(dir.path(), &name, &opts, "16M");
        let cmd = format!("write -c -P 0x{:x} {}M 3M", 0x10 + k, 3 * k);
        qemu_io(&prev, Some("qcow2"), &[cmd.as_str()]);
    }
    let top = Image::open(&prev, &OpenOptions::default()).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..12u64 << 20).step_by(1 << 20) {
        top.read_at(&mut buf, off).await.unwrap();
        let want = 0x10 + (off >> 20) / 3;
        assert!(buf.iter().all(|&b| b as u64 == want), "content at {off}");
    }
    let mut total = top.decompressed_cache_bytes();
    let mut d = top.backing().cloned();
    while let Some(Disk::Qcow2(i)) = d {
        total += i.decompressed_cache_bytes();
        d = i.backing().cloned();
    }
    assert!(total > 0, "nothing was cached");
    assert!(
        total <= 4 << 20,
        "{total} bytes of decompressed clusters cached over a chain of 4"
    );
}
