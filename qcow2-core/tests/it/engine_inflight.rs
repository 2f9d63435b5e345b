//! The in-flight rule (issue 6, bugs 2 and 7): a host cluster freed while a request that
//! looked it up is still in flight is not reused until that request is done, and `check`
//! through a handle being written sees a consistent image.
//!
//! Each race is replayed with `HookStorage`: the request is held at a gate in the storage,
//! the cluster is freed (discard or write-zeroes with unmap, or copy-on-write away from a
//! compressed cluster), the free is made durable by a flush, an allocation that would reuse
//! the cluster runs, then the held request goes on. Each test fails with the quarantine of
//! `engine/inflight.rs` reverted (the allocator then hands the cluster out at once).

use crate::common::*;
use qcow2_core::check::{check, CheckOptions};
use qcow2_core::create::{create_qcow2, CreateOptions};
use qcow2_core::format::l2::{self, ClusterEntry};
use qcow2_core::io::fault::{Gate, Match, Op};
use qcow2_core::{Image, ZeroMode};
use rand::Rng;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CS: u64 = 65536;

async fn make(path: &Path, size: u64) {
    create_qcow2(
        path,
        &CreateOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

async fn arrived(g: &Gate, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), g.wait_arrived(1))
        .await
        .unwrap_or_else(|_| panic!("{what}: the request never reached the gate"));
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) | 1)
        .collect()
}

fn compressible(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 100) as u8))
        .collect()
}

/// Host offset of the data cluster mapped at guest `off`.
async fn host_of(img: &Image, off: u64) -> u64 {
    img.layer_status(off, 1)
        .await
        .unwrap()
        .offset
        .expect("a data cluster")
        & !(CS - 1)
}

async fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, off).await.unwrap();
    b
}

#[derive(Clone, Copy, Debug)]
enum Free {
    Discard,
    ZeroUnmap,
}

async fn free(img: &Image, off: u64, how: Free) {
    match how {
        Free::Discard => img.discard(off, CS).await.unwrap(),
        Free::ZeroUnmap => img.write_zeroes(off, CS, ZeroMode::Unmap).await.unwrap(),
    }
}

/// Close, reopen read-only, compare `[off, off+want.len())`, and `qemu-img check` clean.
async fn verify_closed(img: Image, path: &Path, checks: &[(u64, Vec<u8>)], what: &str) {
    img.close().await.unwrap();
    let again = open_ro(path).await;
    for (off, want) in checks {
        assert_same(
            &read(&again, *off, want.len()).await,
            want,
            &format!("{what}: reopened, at {off}"),
        );
    }
    drop(again);
    if have_qemu() {
        assert_clean(path, what);
    }
}

/// (a), (b), (e): an in-place write held (its data write at the gate) across a free of its
/// cluster, a flush and an allocation that reuses the offset, for guest data (`l2 ==
/// false`) or a new L2 table (`l2`). The late write landed in the other cluster: another
/// guest's data was overwritten, or an L2 table got garbage entries (qemu-img check: dozens
/// of errors).
async fn inplace_write_across_free(how: Free, l2: bool) {
    let what = format!(
        "in-place write across {how:?}, reuse as {}",
        if l2 { "L2 table" } else { "data" }
    );
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 1 << 30).await;
    let (img, hs) = open_hooked(&path).await;
    img.write_at(&pattern(1, CS as usize), 0).await.unwrap();
    img.flush().await.unwrap();
    let h = host_of(&img, 0).await;
    let gate = hs.hold(Match::op(Op::Write).range(h, CS));
    let i2 = img.clone();
    let w = tokio::spawn(async move { i2.write_at(&pattern(0xa0, 4096), 0).await });
    arrived(&gate, &what).await;
    assert!(img.requests_in_flight() >= 1, "{what}: no ticket held");
    free(&img, 0, how).await;
    img.flush().await.unwrap();
    // The allocation that would take the freed cluster: a data cluster, or a new L2 table
    // (the first allocation for guest offsets past 512 MiB).
    let target = if l2 { 512 << 20 } else { 5 * CS };
    let b = pattern(2, CS as usize);
    img.write_at(&b, target).await.unwrap();
    img.flush().await.unwrap();
    let quarantined = img.quarantined_clusters().await;
    gate.release();
    w.await.unwrap().unwrap();
    assert_same(&read(&img, target, CS as usize).await, &b, &what);
    // The discard won (the held write went to the quarantined cluster).
    assert_same(
        &read(&img, 0, CS as usize).await,
        &vec![0u8; CS as usize],
        &what,
    );
    // Once the request is done the cluster is reused.
    img.write_at(&pattern(3, CS as usize), 9 * CS)
        .await
        .unwrap();
    img.flush().await.unwrap();
    let left = img.quarantined_clusters().await;
    verify_closed(img, &path, &[(target, b)], &what).await;
    assert!(
        quarantined >= 1,
        "{what}: the freed cluster was not quarantined"
    );
    assert_eq!(left, 0, "{what}: still quarantined after the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inplace_write_across_discard_and_reuse_as_data() {
    inplace_write_across_free(Free::Discard, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inplace_write_across_discard_and_reuse_as_l2_table() {
    inplace_write_across_free(Free::Discard, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inplace_write_across_zero_unmap_and_reuse() {
    inplace_write_across_free(Free::ZeroUnmap, false).await;
    inplace_write_across_free(Free::ZeroUnmap, true).await;
}

/// (c), (e): a read held (its data read at the gate) across a free of its cluster, a flush
/// and a reuse returns the old data or zeros, never the new cluster's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_across_free_and_reuse_never_sees_the_new_cluster() {
    for how in [Free::Discard, Free::ZeroUnmap] {
        let what = format!("read across {how:?}");
        let dir = tmpdir();
        let path = dir.path().join("a.qcow2");
        make(&path, 64 << 20).await;
        let (img, hs) = open_hooked(&path).await;
        let a = pattern(1, CS as usize);
        img.write_at(&a, 0).await.unwrap();
        img.flush().await.unwrap();
        let h = host_of(&img, 0).await;
        let gate = hs.hold(Match::op(Op::Read).range(h, CS));
        let i2 = img.clone();
        let r = tokio::spawn(async move {
            let mut b = vec![0u8; 8192];
            i2.read_at(&mut b, 4096).await.map(|_| b)
        });
        arrived(&gate, &what).await;
        free(&img, 0, how).await;
        img.flush().await.unwrap();
        let b = pattern(2, CS as usize);
        img.write_at(&b, 5 * CS).await.unwrap();
        img.flush().await.unwrap();
        gate.release();
        let got = r.await.unwrap().unwrap();
        assert!(
            got == a[4096..4096 + 8192] || got.iter().all(|&x| x == 0),
            "{what}: the held read returned neither the old data nor zeros (first bytes {:02x?})",
            &got[..8]
        );
        assert_same(&read(&img, 5 * CS, CS as usize).await, &b, &what);
        verify_closed(img, &path, &[(5 * CS, b)], &what).await;
    }
}

/// Host offset of the compressed data of guest cluster `gc`, read from the file.
fn compressed_offset(img: &Image, path: &Path, gc: u64) -> u64 {
    let lay = img.layout();
    let l2_off = img.l1_table()[(gc / lay.l2_entries) as usize] & l2::OFFSET_MASK;
    let bytes = std::fs::read(path).unwrap();
    let at = (l2_off + (gc % lay.l2_entries) * lay.l2_entry_size) as usize;
    let e = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    match l2::decode(e, lay.cluster_bits, lay.extended) {
        ClusterEntry::Compressed(d) => d.offset,
        o => panic!("guest cluster {gc} is not compressed: {o:?}"),
    }
}

/// (d): a compressed read held across a copy-on-write away from its compressed cluster, a
/// flush and a reuse of the offset for another compressed cluster. Held before its read
/// (`after == false`) it read the new cluster's bytes and failed with a deflate error or
/// returned the wrong data; held after its read, it put the old content into the
/// decompressed-cluster cache under the offset of the new cluster, which later reads then
/// returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_read_across_cow_and_reuse() {
    for after in [false, true] {
        let what = format!(
            "compressed read held {}",
            if after { "after" } else { "before" }
        );
        let dir = tmpdir();
        let path = dir.path().join("z.qcow2");
        make(&path, 64 << 20).await;
        let a = compressible(3, CS as usize);
        let c = compressible(77, CS as usize);
        {
            let img = open_rw(&path).await;
            img.write_compressed(0, &a).await.unwrap();
            img.close().await.unwrap();
        }
        // A fresh handle: nothing cached.
        let (img, hs) = open_hooked(&path).await;
        let x = compressed_offset(&img, &path, 0);
        let m = Match::op(Op::Read).range(x, 512);
        let gate = if after { hs.hold_after(m) } else { hs.hold(m) };
        let i2 = img.clone();
        let r = tokio::spawn(async move {
            let mut b = vec![0u8; CS as usize];
            i2.read_at(&mut b, 0).await.map(|_| b)
        });
        arrived(&gate, &what).await;
        // Copy-on-write away from the compressed cluster frees it at the flush.
        let new0 = pattern(9, 4096);
        img.write_at(&new0, 0).await.unwrap();
        img.flush().await.unwrap();
        // A new compressed cluster: without the in-flight rule it went to the same offset.
        img.write_compressed(7 * CS, &c).await.unwrap();
        img.flush().await.unwrap();
        gate.release();
        let got = r
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: the held read failed: {e}"));
        assert_same(&got, &a, &format!("{what}: the held read"));
        assert_same(
            &read(&img, 7 * CS, CS as usize).await,
            &c,
            &format!("{what}: new cluster"),
        );
        let mut want0 = a.clone();
        want0[..4096].copy_from_slice(&new0);
        assert_same(
            &read(&img, 0, CS as usize).await,
            &want0,
            &format!("{what}: COW"),
        );
        // Once drained, the offset is reused and the cache still serves the right data.
        img.write_compressed(8 * CS, &compressible(5, CS as usize))
            .await
            .unwrap();
        img.flush().await.unwrap();
        assert_same(&read(&img, 7 * CS, CS as usize).await, &c, &what);
        assert_same(
            &read(&img, 8 * CS, CS as usize).await,
            &compressible(5, CS as usize),
            &what,
        );
        verify_closed(img, &path, &[(0, want0), (7 * CS, c)], &what).await;
    }
}

/// The allocator grows the file rather than waiting while every free cluster is
/// quarantined, and the quarantine drains once the held request is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_grows_the_file_instead_of_waiting() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 64 << 20).await;
    let (img, hs) = open_hooked(&path).await;
    let mut model = vec![0u8; 64 << 20];
    for i in 0..16u64 {
        let d = pattern(i as u8, CS as usize);
        img.write_at(&d, i * CS).await.unwrap();
        model[(i * CS) as usize..((i + 1) * CS) as usize].copy_from_slice(&d);
    }
    img.flush().await.unwrap();
    let h = host_of(&img, 15 * CS).await;
    let gate = hs.hold(Match::op(Op::Read).range(h, CS));
    let i2 = img.clone();
    let r = tokio::spawn(async move { read(&i2, 15 * CS, 4096).await });
    arrived(&gate, "held read").await;
    // Free everything, then allocate as much again: all of it past the old clusters.
    img.discard(0, 16 * CS).await.unwrap();
    img.flush().await.unwrap();
    model[..(16 * CS) as usize].fill(0);
    let quarantined = img.quarantined_clusters().await;
    for i in 16..32u64 {
        let d = pattern(i as u8, CS as usize);
        img.write_at(&d, i * CS).await.unwrap();
        model[(i * CS) as usize..((i + 1) * CS) as usize].copy_from_slice(&d);
        let host = host_of(&img, i * CS).await;
        assert!(
            host > h,
            "cluster {i} reused a quarantined cluster at 0x{host:x}"
        );
    }
    img.flush().await.unwrap();
    gate.release();
    let got = r.await.unwrap();
    assert!(
        got == pattern(15, CS as usize)[..4096] || got == vec![0u8; 4096],
        "the held read returned other data"
    );
    img.flush().await.unwrap();
    assert_eq!(quarantined, 16, "quarantined while the read was held");
    assert_eq!(img.quarantined_clusters().await, 0);
    assert_eq!(img.requests_in_flight(), 0);
    assert_same(&read_all(&img).await, &model, "after the drain");
    img.close().await.unwrap();
    if have_qemu() {
        assert_clean(&path, "quarantine growth");
    }
}

/// Bug 7: `check` through a handle that other tasks write (allocating writes, overwrites,
/// discards, write-zeroes, compressed writes, flushes) reported leaks and corruptions that
/// were not there: it read the file while metadata was half written back and while
/// allocated clusters were not yet referenced. Every check must be clean now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_on_a_live_handle_sees_a_consistent_image() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    create_qcow2(
        &path,
        &CreateOptions {
            size: Some(32 << 20),
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let img = open_rw(&path).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..4u64 {
        let img = img.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = rng(0x1c0ffee + t);
            let cs = 4096u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 50 {
                // Each writer its own 8 MiB quarter: no overlaps between writers.
                let base = t * (8 << 20);
                let off = base + rng.gen_range(0..(8 << 20) / cs - 4) * cs;
                match rng.gen_range(0..10) {
                    0..=3 => {
                        let len = rng.gen_range(1..4) * cs;
                        img.write_at(&pattern(n as u8, len as usize), off)
                            .await
                            .unwrap()
                    }
                    4 => img.write_at(&[n as u8 | 1; 512], off + 1024).await.unwrap(),
                    5 => img.discard(off, 2 * cs).await.unwrap(),
                    6 => img.write_zeroes(off, cs, ZeroMode::Unmap).await.unwrap(),
                    7 => img
                        .write_compressed(off, &compressible(n as u8, cs as usize))
                        .await
                        .unwrap(),
                    _ => img.flush().await.unwrap(),
                }
                n += 1;
            }
            n
        }));
    }
    let mut checks = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline || checks < 10 {
        let r = check(&img, &CheckOptions::default()).await.unwrap();
        assert!(
            r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
            "check {checks} on the live handle: {} corruptions, {} leaks, {} errors: {:?}",
            r.corruptions,
            r.leaks,
            r.check_errors,
            r.messages
        );
        checks += 1;
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    for w in writers {
        ops += w.await.unwrap();
    }
    assert!(ops > 100, "{ops} operations");
    img.close().await.unwrap();
    if have_qemu() {
        assert_clean(&path, "after checks on the live handle");
    }
}
