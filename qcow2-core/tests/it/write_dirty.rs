//! Dirty images (lazy refcounts, writer killed): refcounts on disk are stale. A read-only
//! open works; a writable open must rebuild the refcounts before anything is allocated,
//! otherwise new clusters land on top of live data. Needs qemu-img and qemu-io.

use crate::common::*;
use std::path::Path;

/// `qemu-io -c 'write …' -c abort`: the process dies with the dirty bit set.
fn dirty_image(dir: &Path, name: &str, opts: &str, writes: &[&str]) -> std::path::PathBuf {
    let img = qemu_create(dir, name, opts, "64M");
    let mut args: Vec<&str> = vec![];
    for w in writes {
        args.extend(["-c", *w]);
    }
    args.extend(["-c", "abort", p(&img)]);
    let out = sh("qemu-io", &args);
    assert!(!out.status.success(), "qemu-io abort exited normally");
    let h = std::fs::read(&img).unwrap();
    let incompat = u64::from_be_bytes(h[72..80].try_into().unwrap());
    assert_eq!(incompat & 1, 1, "the image is not dirty");
    img
}

async fn repair_then_write(opts: &str, writes: &[&str], name: &str) {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let img = dirty_image(dir.path(), &format!("{name}.qcow2"), opts, writes);
    // Read-only open of a dirty image works.
    let expect = {
        let ro = open_ro(&img).await;
        read_all(&ro).await
    };
    assert!(
        expect[..4 << 20].iter().all(|&b| b == 1),
        "{name}: data before repair"
    );
    // Writable open repairs first; then new allocations must not hit the old data.
    let mut model = expect;
    let image = open_rw(&img).await;
    assert!(!image.header().dirty() || image.header().lazy_refcounts());
    let mut r = rng(seed_of(name));
    let w = Workload {
        rounds: 30,
        compressed: true,
        ..Default::default()
    };
    random_workload(&image, &mut model, &mut r, &w).await;
    // Fill a large untouched area: every new cluster is allocated now.
    let big = vec![0x7eu8; 8 << 20];
    image.write_at(&big, 40 << 20).await.unwrap();
    model[40 << 20..48 << 20].fill(0x7e);
    image.close().await.unwrap();
    let h = std::fs::read(&img).unwrap();
    let incompat = u64::from_be_bytes(h[72..80].try_into().unwrap());
    assert_eq!(incompat & 1, 0, "{name}: still dirty after close");
    assert_clean(&img, name);
    let mpath = dir.path().join("m.raw");
    std::fs::write(&mpath, &model).unwrap();
    qemu_compare_raw(&mpath, &img, name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dirty_lazy_refcounts() {
    repair_then_write("lazy_refcounts=on", &["write -P 1 0 4M"], "dirty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dirty_small_clusters_many_tables() {
    repair_then_write(
        "lazy_refcounts=on,cluster_size=4096,refcount_bits=8",
        &[
            "write -P 1 0 4M",
            "write -c -P 2 8M 64k",
            "write -z 9M 1M",
            "write -P 3 30M 3M",
        ],
        "dirty-4k",
    )
    .await;
}
