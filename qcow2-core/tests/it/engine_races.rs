//! Regression tests for the engine's race, ordering and panic bugs (issue 6). Every race is
//! replayed deterministically with `HookStorage`: hold request X at a gate, run Y and Z to
//! completion, release X, then check. Each test names the bug it covers; each fails with the
//! fix reverted.

use crate::common::*;
use qcow2_core::create::{create_qcow2, CreateOptions};
use qcow2_core::io::fault::{Match, Op};
use qcow2_core::{Disk, ErrorKind, Image, OpenOptions};
use std::path::Path;
use std::time::Duration;

/// Create an image of `size` bytes with our `create`.
async fn make(path: &Path, size: u64, co: CreateOptions) {
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

/// Wait (bounded) for a gate, so that a test that goes wrong fails instead of hanging.
async fn arrived(g: &qcow2_core::io::fault::Gate, n: u64, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), g.wait_arrived(n))
        .await
        .unwrap_or_else(|_| panic!("{what}: the request never reached the gate"));
}

/// Poll `f` until it is true (bounded).
async fn until(f: impl Fn() -> bool, what: &str) {
    for _ in 0..10_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{what}: timed out");
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

// ---- bug 6: panics reachable from the public API ----

/// `layer_status` at or past the end of the disk, or of zero bytes, hit `expect` in `run_at`;
/// so did `map_entry(off, 0)` on an allocated L1 entry. Both are errors now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_out_of_range_is_an_error_not_a_panic() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 1 << 20, CreateOptions::default()).await;
    let img = open_rw(&path).await;
    img.write_at(&[1u8; 4096], 0).await.unwrap();
    let size = img.size();
    for (off, len) in [
        (size, 1),
        (size + 4096, 4096),
        (u64::MAX, 1),
        (0, 0),
        (4096, 0),
    ] {
        let e = img.layer_status(off, len).await.unwrap_err();
        let want = if len == 0 && off < size {
            ErrorKind::InvalidArgument
        } else {
            ErrorKind::OutOfRange
        };
        assert_eq!(e.kind(), want, "layer_status({off}, {len}): {e}");
    }
    let d = Disk::Qcow2(img.clone());
    d.map_entry(0, 0).await.unwrap_err();
    d.map_entry(size, 10).await.unwrap_err();
    assert!(d.map_entry(0, size).await.unwrap().data);
    // Raw disks behave the same.
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![1u8; 8192]).unwrap();
    let r = Disk::open(&raw, Some(qcow2_core::Format::Raw), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(
        r.layer_status(8192, 1).await.unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    r.map_entry(0, 0).await.unwrap_err();
    img.close().await.unwrap();
}

/// A compressed read whose (de)compression task the runtime cancels at shutdown called
/// `into_panic()` on the cancellation error: a panic (an abort across a C boundary). It is
/// an error now. (A read of two clusters: one cluster alone inflates in the read's own task,
/// which needs nothing from the runtime, and succeeds.)
#[test]
fn compressed_read_after_runtime_shutdown_is_an_error() {
    let dir = tmpdir();
    let path = dir.path().join("z.qcow2");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let img = rt.block_on(async {
        make(&path, 1 << 20, CreateOptions::default()).await;
        let img = open_rw(&path).await;
        let cs = img.layout().cluster_size as usize;
        for i in 0..3 {
            img.write_compressed((i * cs) as u64, &compressible(3 + i as u8, cs))
                .await
                .unwrap();
        }
        img.close().await.unwrap();
        open_ro(&path).await
    });
    let cs = img.layout().cluster_size as usize;
    let handle = rt.handle().clone();
    rt.shutdown_background();
    let (one, two) = std::thread::spawn(move || {
        let _g = handle.enter();
        let mut b = vec![0u8; 4096];
        let one = futures::executor::block_on(img.read_at(&mut b, 0)).map(|()| b);
        let mut b = vec![0u8; 2 * cs];
        let two = futures::executor::block_on(img.read_at(&mut b, cs as u64));
        (one, two)
    })
    .join()
    .expect("the read panicked");
    assert_eq!(one.unwrap(), compressible(3, cs)[..4096]);
    let e = two.expect_err("a read needing a cancelled task cannot succeed");
    assert!(e.to_string().contains("cancelled"), "{e}");
}

/// `compress` of an empty buffer underflowed (`len - 1`).
#[test]
fn compress_of_nothing_is_not_a_panic() {
    use qcow2_core::format::header::CompressionType;
    for ty in [CompressionType::Zlib, CompressionType::Zstd] {
        assert!(qcow2_core::engine::compressed::compress(ty, &[])
            .unwrap()
            .is_none());
    }
}

/// `resize` to a size near `u64::MAX` overflowed while rounding up to 512 bytes (a panic in
/// debug builds; in release builds the size wrapped to 0 and, with shrinking allowed, the
/// whole disk was discarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_to_huge_size_is_an_error() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 1 << 20, CreateOptions::default()).await;
    let img = open_rw(&path).await;
    img.write_at(&[5u8; 4096], 0).await.unwrap();
    for s in [u64::MAX, u64::MAX - 100, 1 << 62] {
        img.resize(s, true).await.unwrap_err();
        assert_eq!(img.size(), 1 << 20);
    }
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 0).await.unwrap();
    assert_eq!(b, [5u8; 4096]);
    let cs = img.layout().cluster_size;
    img.write_compressed(!(cs - 1), &[1u8; 100])
        .await
        .unwrap_err();
    img.write_compressed(0, &[]).await.unwrap_err();
    img.close().await.unwrap();
}

/// Extended L2 entries with clusters under 16 KiB (subclusters under 512 bytes) were accepted
/// at open; QEMU refuses them ("Unsupported subcluster size").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_l2_with_small_clusters_is_refused() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(
        &path,
        1 << 20,
        CreateOptions {
            cluster_size: 65536,
            extended_l2: true,
            ..Default::default()
        },
    )
    .await;
    // Same image, cluster_bits 12: every offset in it is still 4 KiB aligned.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20..24].copy_from_slice(&12u32.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = Image::open(&path, &OpenOptions::default())
        .await
        .err()
        .expect("open must fail");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("subcluster size 128"), "{e}");
    if have_qemu() {
        let out = sh("qemu-img", &["info", p(&path)]);
        assert!(!out.status.success(), "qemu-img opens it too?");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Unsupported subcluster size"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- bug 3: metadata updates lost after an I/O error ----

/// Write `n` chunks of 64 KiB with distinct patterns from offset 0; returns the model.
async fn fill(img: &Image, n: u64, seed: u8) -> Vec<u8> {
    let mut model = vec![0u8; img.size() as usize];
    for i in 0..n {
        let d = pattern(seed.wrapping_add(i as u8), 65536);
        img.write_at(&d, i * 65536).await.unwrap();
        model[(i * 65536) as usize..((i + 1) * 65536) as usize].copy_from_slice(&d);
    }
    model
}

/// Close, reopen read-only, compare with the model; `qemu-img check` must be clean.
async fn verify_closed(img: Image, path: &Path, model: &[u8], what: &str) {
    img.close()
        .await
        .unwrap_or_else(|e| panic!("{what}: close: {e}"));
    let again = open_ro(path).await;
    assert_same(&read_all(&again).await, model, &format!("{what}: reopened"));
    drop(again);
    if have_qemu() {
        assert_clean(path, what);
    }
}

/// A flush writes two dirty refcount blocks at once; the first (held at the gate) had already
/// been marked clean when the second failed with EIO, and `try_join_all` dropped the held
/// write. The next flush skipped the "clean" block: its increments were never written, and
/// the allocator could later hand out clusters in use (qemu-img check: refcount 0 for used
/// clusters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_refblock_write_keeps_sibling_dirty() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(
        &path,
        4 << 20,
        CreateOptions {
            cluster_size: 512,
            ..Default::default()
        },
    )
    .await;
    let (img, hs) = open_hooked(&path).await;
    let model = fill(&img, 16, 1).await;
    let rt: Vec<u64> = img
        .refcount_table()
        .iter()
        .map(|e| e & !511)
        .filter(|&e| e != 0)
        .collect();
    assert!(rt.len() >= 3, "want several refcount blocks: {rt:?}");
    let (held, failed) = (rt[0].min(rt[1]), rt[0].max(rt[1]));
    let gate = hs.hold(Match::op(Op::Write).range(held, 512));
    let fail = hs.fail(Match::op(Op::Write).range(failed, 512), libc::EIO);
    hs.record(true);
    let i2 = img.clone();
    let flush = tokio::spawn(async move { i2.flush().await });
    arrived(&gate, 1, "held refcount block").await;
    // Release the held write only once its sibling has failed.
    until(|| hs.events().iter().any(|e| !e.ok), "the failing write").await;
    gate.release();
    let e = flush
        .await
        .unwrap()
        .expect_err("the flush must report the EIO");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    hs.remove(fail);
    img.flush().await.unwrap();
    verify_closed(img, &path, &model, "refblock EIO").await;
}

/// One, two or three consecutive EIOs at every position of a flush's metadata writes
/// (refcount blocks, L2 slices, L1 entries), then a successful flush and close: the image
/// must be consistent and hold every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_eio_during_flush_then_recovery() {
    for cs in [512u64, 4096] {
        for k in 1..=3u64 {
            for skip in 0..8u64 {
                let what = format!("cs {cs}, {k} EIO after {skip} writes");
                let dir = tmpdir();
                let path = dir.path().join("a.qcow2");
                make(
                    &path,
                    8 << 20,
                    CreateOptions {
                        cluster_size: cs,
                        ..Default::default()
                    },
                )
                .await;
                let (img, hs) = open_hooked(&path).await;
                // Requests complete after a yield, as on a real disk: a write whose future
                // is dropped is never done.
                hs.defer(Match::any().always(), 1);
                let mut model = fill(&img, 24, skip as u8).await;
                // Overwrites and discards too, so that frees are pending.
                img.discard(3 * 65536, 65536).await.unwrap();
                model[3 * 65536..4 * 65536].fill(0);
                let id = hs.fail(Match::op(Op::Write).skip(skip).times(k), libc::EIO);
                let r = img.flush().await;
                hs.remove(id);
                if let Err(e) = &r {
                    assert_eq!(e.errno(), libc::EIO, "{what}: {e}");
                }
                // Writes go on after the error, then everything is flushed.
                let d = pattern(99, 4096);
                img.write_at(&d, 5 << 20).await.unwrap();
                model[5 << 20..(5 << 20) + 4096].copy_from_slice(&d);
                img.flush()
                    .await
                    .unwrap_or_else(|e| panic!("{what}: flush after the fault: {e}"));
                verify_closed(img, &path, &model, &what).await;
            }
        }
    }
}

// ---- bug 4: barriers between tables and the pointers to them ----

/// Every write into `table` that completed before a write into `pointer` must be followed by
/// a completed flush that ended before that pointer write started. Returns how many
/// (table write, pointer write) pairs were checked.
fn assert_barriers(
    ev: &[qcow2_core::io::fault::Event],
    table: (u64, u64),
    pointer: (u64, u64),
    what: &str,
) -> usize {
    let hits = |e: &qcow2_core::io::fault::Event, (off, len): (u64, u64)| {
        e.op == Op::Write && e.ok && e.offset < off + len && off < e.offset + e.len
    };
    let mut pairs = 0;
    for p in ev.iter().filter(|e| hits(e, pointer)) {
        for t in ev.iter().filter(|e| hits(e, table) && e.end < p.start) {
            let fenced = ev
                .iter()
                .any(|f| f.op == Op::Flush && f.ok && f.start > t.end && f.end < p.start);
            assert!(
                fenced,
                "{what}: no flush between the table write {t:?} and the pointer write {p:?}"
            );
            pairs += 1;
        }
    }
    pairs
}

/// `flush_metadata` wrote L2 slices and then the L1 entries pointing at their tables with no
/// sync in between: after a power cut the disk could hold the new L1 entry and not the new
/// (or copied) L2 table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_table_is_synced_before_its_l1_entry() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 64 << 20, CreateOptions::default()).await;
    let (img, hs) = open_hooked(&path).await;
    let cs = img.layout().cluster_size;
    hs.record(true);
    // A new L2 table (and a second one further on).
    img.write_at(&pattern(1, 4096), 0).await.unwrap();
    img.write_at(&pattern(2, 4096), 40 << 20).await.unwrap();
    img.flush().await.unwrap();
    let ev = hs.take_events();
    let l1_off = img.header().l1_table_offset;
    let l1 = img.l1_table();
    let mut pairs = 0;
    for &e in l1.iter().filter(|&&e| e != 0) {
        let t = e & qcow2_core::format::l2::OFFSET_MASK;
        pairs += assert_barriers(&ev, (t, cs), (l1_off, l1.len() as u64 * 8), "new L2");
    }
    assert!(pairs >= 2, "expected L2 and L1 writes: {ev:?}");
    img.close().await.unwrap();

    // An L2 table shared with an internal snapshot is copied on the first write.
    if !have_qemu() {
        return;
    }
    run("qemu-img", &["snapshot", "-c", "s1", p(&path)]);
    let (img, hs) = open_hooked(&path).await;
    let old = img.l1_table()[0];
    hs.record(true);
    img.write_at(&pattern(3, 4096), 8192).await.unwrap();
    img.flush().await.unwrap();
    let ev = hs.take_events();
    let new = img.l1_table()[0];
    assert_ne!(
        old & !(1 << 63),
        new & !(1 << 63),
        "the L2 table was not copied"
    );
    let t = new & qcow2_core::format::l2::OFFSET_MASK;
    let n = assert_barriers(&ev, (t, cs), (l1_off, 8), "copied L2");
    assert!(n >= 1, "expected the copy and the L1 write: {ev:?}");
    img.close().await.unwrap();
    assert_clean(&path, "copied L2");
}

/// The same rule for the other "table, then pointer" pairs: a new refcount block before its
/// refcount table entry, a new refcount table before the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refcount_structures_are_synced_before_their_pointers() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(
        &path,
        8 << 20,
        CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    )
    .await;
    let (img, hs) = open_hooked(&path).await;
    let rt_before = img.header().refcount_table_offset;
    hs.record(true);
    // 64 refcounts per block and 64 blocks per table cluster: 3 MiB of data needs new
    // blocks and a bigger refcount table.
    let model = fill(&img, 48, 7).await;
    img.flush().await.unwrap();
    let ev = hs.take_events();
    let h = img.header();
    assert_ne!(h.refcount_table_offset, rt_before, "the table did not grow");
    let rt_bytes = h.refcount_table_clusters as u64 * 512;
    // Entry updates of the live table are 8-byte writes; a new table is written whole, with
    // its blocks, before the header switches to it (checked below).
    let entry_writes: Vec<_> = ev
        .iter()
        .filter(|e| e.op != Op::Write || e.len <= 8 || e.offset != h.refcount_table_offset)
        .cloned()
        .collect();
    let mut pairs = 0;
    for (i, &b) in img.refcount_table().iter().enumerate() {
        if b != 0 {
            pairs += assert_barriers(
                &entry_writes,
                (b, 512),
                (h.refcount_table_offset + i as u64 * 8, 8),
                "refcount block",
            );
        }
    }
    pairs += assert_barriers(&ev, (h.refcount_table_offset, rt_bytes), (48, 12), "table");
    assert!(pairs > 10, "{pairs} pairs");
    verify_closed(img, &path, &model, "reftable growth").await;
}

// ---- bug 5: header switches that memory does not follow ----

/// An image whose refcount table grows after about 2 MiB of data (512-byte clusters, 64-bit
/// refcounts: 64 refcounts per block, 64 blocks per table cluster).
async fn small_reftable_image(path: &Path) {
    make(
        path,
        8 << 20,
        CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    )
    .await;
}

/// After a poisoning failure: writes, write-zeroes, discards, resizes and flushes fail with
/// a message saying why; reads go on.
async fn assert_poisoned(img: &Image, what: &str) {
    assert!(img.is_poisoned(), "{what}: the handle is not poisoned");
    let e = img.write_at(&[1u8; 512], 0).await.unwrap_err();
    assert!(e.to_string().contains("reopen"), "{what}: {e}");
    img.flush().await.unwrap_err();
    img.discard(0, 512).await.unwrap_err();
    img.resize(img.size() * 2, false).await.unwrap_err();
    let mut b = [0u8; 512];
    img.read_at(&mut b, 0).await.unwrap();
}

/// Reopen after poisoning: no corruption (leaks allowed) and every flushed write intact.
async fn verify_reopened(path: &Path, model: &[u8], flushed: usize, what: &str) {
    let again = open_ro(path).await;
    let got = read_all(&again).await;
    assert_same(&got[..flushed], &model[..flushed], what);
    drop(again);
    if have_qemu() {
        assert_no_corruption(path, what);
    }
}

/// Write 64 KiB chunks, flushing after each, until a write fails; returns the model, the
/// number of flushed bytes and the error.
async fn write_until_error(img: &Image) -> (Vec<u8>, usize, qcow2_core::Error) {
    let mut model = vec![0u8; img.size() as usize];
    let mut flushed = 0;
    for i in 0..64usize {
        let d = pattern(i as u8, 65536);
        let r = img.write_at(&d, (i * 65536) as u64).await;
        let r = match r {
            Ok(()) => img.flush().await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                model[i * 65536..(i + 1) * 65536].copy_from_slice(&d);
                flushed = (i + 1) * 65536;
            }
            Err(e) => return (model, flushed, e),
        }
    }
    panic!("no write failed");
}

/// `grow_reftable` wrote the new table's offset into the header, then a failed sync returned
/// an error before memory followed: the handle went on updating the old table while the file
/// used the new one. The handle is poisoned now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reftable_switch_failure_poisons() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    small_reftable_image(&path).await;
    let (img, hs) = open_hooked(&path).await;
    // The header write happens; the sync after it fails.
    let gate = hs.hold_after(Match::op(Op::Write).range(48, 12));
    let i2 = img.clone();
    let t = tokio::spawn(async move { write_until_error(&i2).await });
    arrived(&gate, 1, "refcount table switch").await;
    hs.fail(Match::op(Op::Flush), libc::EIO);
    gate.release();
    let (model, flushed, e) = t.await.unwrap();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    hs.clear();
    assert_poisoned(&img, "reftable switch").await;
    img.close().await.unwrap_err();
    verify_reopened(&path, &model, flushed, "reftable switch").await;
}

/// The same window, with the future dropped while the header write is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reftable_switch_dropped_future_poisons() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    small_reftable_image(&path).await;
    let (img, hs) = open_hooked(&path).await;
    let gate = hs.hold_after(Match::op(Op::Write).range(48, 12));
    let mut model = vec![0u8; img.size() as usize];
    let mut flushed = 0;
    for i in 0..64usize {
        let d = pattern(i as u8, 65536);
        let w = async {
            img.write_at(&d, (i * 65536) as u64).await?;
            img.flush().await
        };
        tokio::select! {
            r = w => {
                r.unwrap();
                model[i * 65536..(i + 1) * 65536].copy_from_slice(&d);
                flushed = (i + 1) * 65536;
            }
            _ = gate.wait_arrived(1) => break,
        }
    }
    assert_eq!(gate.arrived(), 1, "the refcount table never grew");
    gate.release();
    assert_poisoned(&img, "dropped reftable switch").await;
    verify_reopened(&path, &model, flushed, "dropped reftable switch").await;
}

/// `resize` wrote the new L1 table's offset into the header, then failed (or was dropped)
/// before memory followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_switch_failure_and_drop_poison() {
    for drop_it in [false, true] {
        let what = if drop_it {
            "dropped resize"
        } else {
            "failed resize"
        };
        let dir = tmpdir();
        let path = dir.path().join("a.qcow2");
        make(&path, 1 << 20, CreateOptions::default()).await;
        let (img, hs) = open_hooked(&path).await;
        let model = fill(&img, 4, 3).await;
        img.flush().await.unwrap();
        let gate = hs.hold_after(Match::op(Op::Write).range(36, 12));
        if drop_it {
            tokio::select! {
                r = img.resize(1 << 40, false) => panic!("{what}: resize ended: {r:?}"),
                _ = gate.wait_arrived(1) => {}
            }
        } else {
            let i2 = img.clone();
            let t = tokio::spawn(async move { i2.resize(1 << 40, false).await });
            arrived(&gate, 1, what).await;
            hs.fail(Match::op(Op::Flush), libc::EIO);
            gate.release();
            t.await.unwrap().unwrap_err();
        }
        hs.clear();
        assert_poisoned(&img, what).await;
        drop(img);
        verify_reopened(&path, &model, model.len(), what).await;
    }
}

/// The new virtual size written into the header, then a failed sync: memory kept the old
/// size while the file may have the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_write_failure_poisons() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 1 << 20, CreateOptions::default()).await;
    let (img, hs) = open_hooked(&path).await;
    let model = fill(&img, 4, 5).await;
    img.flush().await.unwrap();
    let gate = hs.hold_after(Match::op(Op::Write).range(24, 8));
    let i2 = img.clone();
    let t = tokio::spawn(async move { i2.resize(2 << 20, false).await });
    arrived(&gate, 1, "size write").await;
    hs.fail(Match::op(Op::Flush), libc::EIO);
    gate.release();
    t.await.unwrap().unwrap_err();
    hs.clear();
    assert_poisoned(&img, "size write").await;
    drop(img);
    verify_reopened(&path, &model, model.len(), "size write").await;
}

/// Before the first write the enabled bitmaps are marked in use (a header switch to a new
/// directory). When that header write fails, the write fails before any data reaches the
/// disk, and the bitmaps on disk stay consistent and clean: nothing was written that they do
/// not record. (Formerly the autoclear bit was cleared here, and a failed header write was
/// forgotten by memory, so the next write changed the disk under valid bitmaps.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_bitmap_in_use_write_keeps_bitmaps_valid() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_create(dir.path(), "b.qcow2", "", "4M");
    run("qemu-img", &["bitmap", "--add", p(&path), "b0"]);
    let (img, hs) = open_hooked(&path).await;
    hs.fail(Match::op(Op::Write).range(88, 8), libc::EIO);
    img.write_at(&[1u8; 512], 0).await.unwrap_err();
    hs.clear();
    // The handle may refuse further changes (memory and disk may disagree); either way
    // no write is recorded nowhere.
    let _ = img.write_at(&[1u8; 512], 0).await;
    drop(img);
    let info = qemu_info(&path);
    let b = &info["format-specific"]["data"]["bitmaps"][0];
    let flags = b["flags"].as_array().unwrap();
    let written = qemu_map(&path).iter().any(|e| e["data"] == true);
    if flags.iter().any(|f| f == "in-use") {
        // The second attempt marked them in use: what it wrote is covered.
    } else {
        assert!(!written, "data written under a consistent bitmap: {info}");
    }
    assert_no_corruption(&path, "bitmap header write failed");
}

// ---- bug 1: lost write on extended L2 ----

/// A 1 MiB image `a.qcow2` made by qemu-img with `opts`, over a base filled with 0x40 when
/// `backing`; with the guest content it starts with (the model the tests update).
fn image_over_optional_base(
    dir: &std::path::Path,
    opts: &str,
    backing: bool,
) -> (std::path::PathBuf, Vec<u8>) {
    let mut model = vec![0u8; 1 << 20];
    let mut opts = opts.to_string();
    if backing {
        let base = qemu_create(dir, "base.qcow2", "", "1M");
        qemu_io(&base, None, &["write -q -P 0x40 0 1M"]);
        model.fill(0x40);
        opts += &format!(",backing_file={},backing_fmt=qcow2", p(&base));
    }
    (qemu_create(dir, "a.qcow2", &opts, "1M"), model)
}

/// Two concurrent 512-byte writes into one 2 KiB subcluster of an extended-L2 cluster; one
/// also spans the unallocated next subcluster. That one read both subclusters whole and
/// rewrote them: when the other (in place, no lock) landed between its read and its write,
/// it was overwritten with stale bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_l2_partial_allocation_keeps_concurrent_in_place_write() {
    // Our writes allocate every subcluster of a new cluster; qemu-io allocates only the
    // subclusters it touches, which gives the partly allocated cluster needed here.
    if !have_qemu() {
        return;
    }
    for backing in [false, true] {
        let what = format!("backing {backing}");
        let dir = tmpdir();
        let (path, mut model) =
            image_over_optional_base(dir.path(), "extended_l2=on,cluster_size=64k", backing);
        qemu_io(&path, None, &["write -q -P 0x11 0 2048"]);
        model[..2048].fill(0x11);
        let (img, hs) = open_hooked(&path).await;
        // W2 crosses from subcluster 0 (allocated) into 1 (not): the allocating path. Hold
        // its data write.
        let gate =
            hs.hold(Match::op(Op::Write).when(|r| r.data.is_some_and(|d| d.contains(&0xb2))));
        let i2 = img.clone();
        let w2 = tokio::spawn(async move { i2.write_at(&[0xb2; 512], 1792).await });
        arrived(&gate, 1, &what).await;
        // W1, in place inside subcluster 0, completes meanwhile.
        img.write_at(&[0xc1; 512], 1024).await.unwrap();
        gate.release();
        w2.await.unwrap().unwrap();
        model[1024..1536].fill(0xc1);
        model[1792..2304].fill(0xb2);
        let mut got = vec![0u8; 8192];
        img.read_at(&mut got, 0).await.unwrap();
        assert_same(&got, &model[..8192], &what);
        verify_closed(img, &path, &model, &what).await;
    }
}

/// The batched allocating write (`engine/batch.rs`) picks its fresh-cluster runs from the L2
/// entries it looks up before taking the in-flight marks. A single-cluster allocating write
/// to a cluster of that run, held at its data write, publishes its cluster between A's
/// look-up and A's marks: A must decide again under the marks and overwrite that cluster in
/// place, not give it a second host cluster (which leaked the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_write_rechecks_clusters_allocated_meanwhile() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 1 << 20, CreateOptions::default()).await;
    let (img, hs) = open_hooked(&path).await;
    let mut model = vec![0u8; 1 << 20];
    // B: 4 KiB into cluster 1, allocating; held at its data write.
    let gate = hs.hold(Match::op(Op::Write).when(|r| r.data.is_some_and(|d| d.contains(&0xb2))));
    let ib = img.clone();
    let wb = tokio::spawn(async move { ib.write_at(&[0xb2; 4096], 65536 + 4096).await });
    arrived(&gate, 1, "B").await;
    // A: four whole clusters from 0 (a batched run); it looks up cluster 1 as unallocated,
    // then waits for B's mark on it.
    let a = pattern(0x21, 4 * 65536);
    let ia = img.clone();
    let a2 = a.clone();
    let wa = tokio::spawn(async move { ia.write_at(&a2, 0).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.release();
    wb.await.unwrap().unwrap();
    wa.await.unwrap().unwrap();
    model[..4 * 65536].copy_from_slice(&a);
    let mut got = vec![0u8; 4 * 65536];
    img.read_at(&mut got, 0).await.unwrap();
    assert_same(&got, &model[..4 * 65536], "after both writes");
    verify_closed(
        img,
        &path,
        &model,
        "batched write over a cluster allocated meanwhile",
    )
    .await;
}

/// Write the model to a raw file next to `path` and compare it with the image (qemu-img).
fn compare_with_mirror(path: &Path, model: &[u8], what: &str) {
    if !have_qemu() {
        return;
    }
    let raw = path.with_extension("mirror.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_compare_raw(&raw, path, what);
}

/// Two 4 KiB writes into one new cluster, the first (W1) held at its data write. Without a
/// backing file the cluster reads as zeros and gets a fresh host cluster: W2 must write its
/// data into that cluster while W1 is held (it joins W1's allocation instead of waiting for
/// it), and must not complete before W1 published the mapping. With a backing file the
/// cluster needs copy-on-write: W2 must wait for W1 (its data write must not reach the
/// storage while W1 is held). Both land either way; the image is clean and equal to a raw
/// mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_write_to_a_cluster_being_allocated() {
    if !have_qemu() {
        return;
    }
    for backing in [false, true] {
        let what = format!("backing {backing}");
        let dir = tmpdir();
        let (path, mut model) = image_over_optional_base(dir.path(), "cluster_size=64k", backing);
        let (img, hs) = open_hooked(&path).await;
        let g1 = hs.hold(Match::op(Op::Write).when(|r| r.data.is_some_and(|d| d.contains(&0xa1))));
        let g2 = hs.hold(Match::op(Op::Write).when(|r| r.data.is_some_and(|d| d.contains(&0xb2))));
        let i1 = img.clone();
        let w1 = tokio::spawn(async move { i1.write_at(&[0xa1; 4096], 65536 + 4096).await });
        arrived(&g1, 1, &what).await;
        let i2 = img.clone();
        let w2 = tokio::spawn(async move { i2.write_at(&[0xb2; 4096], 65536 + 32768).await });
        if backing {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                g2.arrived(),
                0,
                "{what}: W2 wrote before W1's copy-on-write"
            );
            g1.release();
            arrived(&g2, 1, &what).await;
            g2.release();
        } else {
            // W2 joined: its data write reaches the storage while W1 is held ...
            arrived(&g2, 1, &what).await;
            g2.release();
            // ... and it then waits for W1's mapping.
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!w2.is_finished(), "{what}: W2 completed before the mapping");
            g1.release();
        }
        w1.await.unwrap().unwrap();
        w2.await.unwrap().unwrap();
        model[65536 + 4096..65536 + 8192].fill(0xa1);
        model[65536 + 32768..65536 + 36864].fill(0xb2);
        let mut got = vec![0u8; 1 << 20];
        img.read_at(&mut got, 0).await.unwrap();
        assert_same(&got, &model, &what);
        verify_closed(img, &path, &model, &what).await;
        compare_with_mirror(&path, &model, &what);
    }
}

/// W2 joins W1's allocation of a fresh cluster (writes into it), then W1 is dropped before
/// it published the mapping (its data write still held): W2 must not report success for
/// data in a cluster that no mapping will reference. It starts again, allocates on its own
/// and lands. (W1's cluster leaks, as any allocation dropped half-way does; nothing is
/// corrupt.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_write_survives_an_abandoned_allocation() {
    let dir = tmpdir();
    let path = dir.path().join("a.qcow2");
    make(&path, 1 << 20, CreateOptions::default()).await;
    let (img, hs) = open_hooked(&path).await;
    let mut model = vec![0u8; 1 << 20];
    let g1 = hs.hold(Match::op(Op::Write).when(|r| r.data.is_some_and(|d| d.contains(&0xa1))));
    let g2 = hs.hold(
        Match::op(Op::Write)
            .when(|r| r.data.is_some_and(|d| d.contains(&0xb2)))
            .times(1),
    );
    let i1 = img.clone();
    let w1 = tokio::spawn(async move { i1.write_at(&[0xa1; 4096], 0).await });
    arrived(&g1, 1, "W1").await;
    let i2 = img.clone();
    let w2 = tokio::spawn(async move { i2.write_at(&[0xb2; 4096], 8192).await });
    arrived(&g2, 1, "W2 joined").await;
    g2.release();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!w2.is_finished(), "W2 completed before any mapping");
    w1.abort();
    assert!(w1.await.unwrap_err().is_cancelled());
    tokio::time::timeout(Duration::from_secs(10), w2)
        .await
        .expect("W2 hangs after W1 was dropped")
        .unwrap()
        .unwrap();
    model[8192..12288].fill(0xb2);
    let mut got = vec![0u8; 1 << 20];
    img.read_at(&mut got, 0).await.unwrap();
    assert_same(&got, &model, "after the abandoned allocation");
    img.close().await.unwrap();
    let again = open_ro(&path).await;
    assert_same(&read_all(&again).await, &model, "reopened");
    drop(again);
    if have_qemu() {
        assert_no_corruption(&path, "joined write after an abandoned allocation");
        compare_with_mirror(&path, &model, "joined write after an abandoned allocation");
    }
}
