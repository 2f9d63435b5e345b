//! Regression tests for the engine's race, ordering and panic bugs (issue 6). Every race is
//! replayed deterministically with `HookStorage`: hold request X at a gate, run Y and Z to
//! completion, release X, then check. Each test names the bug it covers; each fails with the
//! fix reverted.

use crate::common::*;
use qcow2_core::create::{create_qcow2, CreateOptions};
use qcow2_core::io::fault::{HookStorage, Match, Op};
use qcow2_core::io::{open_file, FileOptions, Storage};
use qcow2_core::{Disk, ErrorKind, Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;
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

/// Open `path` writable through a `HookStorage` over the real file.
async fn open_hooked(path: &Path) -> (Image, Arc<HookStorage>) {
    open_hooked_opts(path, OpenOptions::default()).await
}

async fn open_hooked_opts(path: &Path, opts: OpenOptions) -> (Image, Arc<HookStorage>) {
    let file = open_file(
        path,
        &FileOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let hs = HookStorage::new(file);
    let img = Image::open_storage(
        hs.clone() as Arc<dyn Storage>,
        path,
        &OpenOptions {
            writable: true,
            ..opts
        },
    )
    .await
    .unwrap();
    (img, hs)
}

/// Wait (bounded) for a gate, so that a test that goes wrong fails instead of hanging.
async fn arrived(g: &qcow2_core::io::fault::Gate, n: u64, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), g.wait_arrived(n))
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
/// an error now.
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
        img.write_compressed(0, &compressible(3, cs)).await.unwrap();
        img.close().await.unwrap();
        open_ro(&path).await
    });
    let handle = rt.handle().clone();
    rt.shutdown_background();
    let r = std::thread::spawn(move || {
        let _g = handle.enter();
        let mut b = vec![0u8; 4096];
        futures::executor::block_on(img.read_at(&mut b, 0))
    })
    .join()
    .expect("the read panicked");
    let e = r.expect_err("a read needing a cancelled task cannot succeed");
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
    img.write_compressed(u64::MAX & !(cs - 1), &[1u8; 100])
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
