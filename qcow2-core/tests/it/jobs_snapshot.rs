//! Internal snapshots (create, apply, delete) checked against qemu-img: after every operation
//! `qemu-img check` is clean, `qemu-img snapshot -l` lists what we expect, and `qemu-img
//! convert -l` of every snapshot equals the guest content at the time it was taken. Images
//! made by qemu-img are changed by us and ours by qemu-img. Crash at every write of each
//! operation: no corruption, and the snapshot list and every content either before or after.

use crate::common::*;
use qcow2_core::io::mem::MemStorage;
use qcow2_core::io::Storage;
use qcow2_core::{Image, OpenOptions, SnapshotKey};
use std::path::Path;
use std::sync::Arc;

fn names(path: &Path) -> Vec<String> {
    let info = qemu_info(path);
    info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn export(path: &Path, snap: Option<&str>) -> Vec<u8> {
    let dir = tmpdir();
    qemu_export(path, snap, &dir.path().join("out.raw"))
}

fn key(s: &str) -> SnapshotKey {
    SnapshotKey::IdOrName(s.to_string())
}

/// One variant of the image: create options, an optional backing file, compressed writes.
struct Variant {
    name: &'static str,
    opts: &'static str,
    backing: bool,
    compressed: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v3",
        opts: "",
        backing: false,
        compressed: true,
    },
    Variant {
        name: "v2",
        opts: "compat=0.10",
        backing: false,
        compressed: true,
    },
    Variant {
        name: "extended-l2",
        opts: "extended_l2=on",
        backing: false,
        compressed: true,
    },
    Variant {
        name: "refcount-bits-4",
        opts: "refcount_bits=4",
        backing: false,
        compressed: false,
    },
    Variant {
        name: "refcount-bits-64",
        opts: "refcount_bits=64",
        backing: false,
        compressed: true,
    },
    Variant {
        name: "small-clusters",
        opts: "cluster_size=4096",
        backing: false,
        compressed: true,
    },
    Variant {
        name: "backing",
        opts: "",
        backing: true,
        compressed: false,
    },
];

fn make(dir: &Path, v: &Variant) -> std::path::PathBuf {
    let mut opts = v.opts.to_string();
    if v.backing {
        let base = qemu_create(dir, "base.qcow2", "", "4M");
        qemu_io(&base, None, &["write -P 0x33 0 4M"]);
        if !opts.is_empty() {
            opts.push(',');
        }
        opts += &format!("backing_file={},backing_fmt=qcow2", p(&base));
    }
    let img = qemu_create(dir, "img.qcow2", &opts, "4M");
    qemu_io(&img, None, &["write -P 1 0 1M", "write -z 1M 64k"]);
    if v.compressed {
        qemu_io(&img, None, &["write -c -P 5 2M 128k"]);
    }
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_create_apply_delete_variants() {
    if !have_qemu() {
        return;
    }
    for v in VARIANTS {
        let dir = tmpdir();
        let path = make(dir.path(), v);
        let what = v.name;
        let c0 = export(&path, None);
        // Create s1, write, create s2 (ours), then write more.
        let img = open_rw(&path).await;
        let s1 = img.snapshot_create("s1").await.unwrap();
        assert_eq!(s1.id, "1");
        img.write_at(&[9u8; 70000], 4096).await.unwrap();
        img.write_at(&[8u8; 5000], (2 << 20) + 100).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: after create s1 + writes"));
        let c1 = export(&path, None);
        assert_same(&export(&path, Some("s1")), &c0, &format!("{what}: s1"));
        let img = open_rw(&path).await;
        img.snapshot_create("s2").await.unwrap();
        img.write_at(&[7u8; 100000], 3 << 20).await.unwrap();
        img.write_zeroes(0, 65536, qcow2_core::ZeroMode::Unmap)
            .await
            .unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: after create s2 + writes"));
        assert_eq!(names(&path), ["s1", "s2"], "{what}");
        let c2 = export(&path, None);
        assert_same(&export(&path, Some("s1")), &c0, &format!("{what}: s1"));
        assert_same(&export(&path, Some("s2")), &c1, &format!("{what}: s2"));
        // Our reader of a snapshot (the open option) agrees.
        let ro = Image::open(&path, &{
            let mut o = OpenOptions::default();
            o.snapshot = Some(key("s1"));
            o
        })
        .await
        .unwrap();
        assert_same(&read_all(&ro).await, &c0, &format!("{what}: open s1"));
        drop(ro);
        // Apply s1 (by name), then s2 (by id).
        let img = open_rw(&path).await;
        img.snapshot_apply(&key("s1")).await.unwrap();
        assert_same(&read_all(&img).await, &c0, &format!("{what}: applied s1"));
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: after apply s1"));
        assert_same(&export(&path, None), &c0, &format!("{what}: applied s1"));
        let img = open_rw(&path).await;
        img.snapshot_apply(&key("2")).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: after apply 2"));
        assert_same(&export(&path, None), &c1, &format!("{what}: applied s2"));
        // Writes after apply leave both snapshots unchanged.
        let img = open_rw(&path).await;
        img.write_at(&[6u8; 200000], 0).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: writes after apply"));
        assert_same(&export(&path, Some("s1")), &c0, &format!("{what}: s1"));
        assert_same(&export(&path, Some("s2")), &c1, &format!("{what}: s2"));
        // Delete both.
        let img = open_rw(&path).await;
        img.snapshot_delete(&key("s1")).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: after delete s1"));
        assert_eq!(names(&path), ["s2"], "{what}");
        assert_same(&export(&path, Some("s2")), &c1, &format!("{what}: s2"));
        let img = open_rw(&path).await;
        img.snapshot_delete(&key("s2")).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: after delete s2"));
        assert!(names(&path).is_empty(), "{what}");
        let _ = c2;
    }
}

/// Snapshots qemu-img made are applied and deleted by us; ours by qemu-img.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_interop_both_ways() {
    if !have_qemu() {
        return;
    }
    for v in [&VARIANTS[0], &VARIANTS[1], &VARIANTS[2]] {
        let dir = tmpdir();
        let path = make(dir.path(), v);
        let what = v.name;
        let c0 = export(&path, None);
        run("qemu-img", &["snapshot", "-c", "q1", p(&path)]);
        qemu_io(
            &path,
            None,
            &["write -P 0x44 0 300k", "write -c -P 6 3M 64k"],
        );
        let c1 = export(&path, None);
        run("qemu-img", &["snapshot", "-c", "q2", p(&path)]);
        qemu_io(&path, None, &["write -P 0x45 100k 300k"]);
        let img = open_rw(&path).await;
        img.snapshot_apply(&key("q1")).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: we applied qemu's q1"));
        assert_same(&export(&path, None), &c0, &format!("{what}: q1 applied"));
        let img = open_rw(&path).await;
        img.snapshot_delete(&key("q1")).await.unwrap();
        img.snapshot_create("ours").await.unwrap();
        img.write_at(&[3u8; 150000], 500000).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: deleted q1, created ours"));
        assert_eq!(names(&path), ["q2", "ours"], "{what}");
        // qemu-img applies and deletes ours.
        run("qemu-img", &["snapshot", "-a", "ours", p(&path)]);
        assert_clean(&path, &format!("{what}: qemu applied ours"));
        assert_same(&export(&path, None), &c0, &format!("{what}: ours applied"));
        run("qemu-img", &["snapshot", "-d", "ours", p(&path)]);
        assert_clean(&path, &format!("{what}: qemu deleted ours"));
        assert_same(&export(&path, Some("q2")), &c1, &format!("{what}: q2"));
        let img = open_rw(&path).await;
        img.snapshot_delete(&key("q2")).await.unwrap();
        img.close().await.unwrap();
        assert_clean(&path, &format!("{what}: deleted q2"));
        assert_same(&export(&path, None), &c0, &format!("{what}: final"));
    }
}

/// The table entry we write is the one qemu-img writes (but for the date and the L1 offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_entry_bytes_match_qemu() {
    if !have_qemu() {
        return;
    }
    for opts in ["", "compat=0.10"] {
        let dir = tmpdir();
        let a = qemu_create(dir.path(), "a.qcow2", opts, "3M");
        let b = qemu_create(dir.path(), "b.qcow2", opts, "3M");
        for f in [&a, &b] {
            qemu_io(f, None, &["write -P 1 0 100k"]);
        }
        run("qemu-img", &["snapshot", "-c", "name one", p(&a)]);
        let img = open_rw(&b).await;
        img.snapshot_create("name one").await.unwrap();
        img.close().await.unwrap();
        let entry = |path: &Path| {
            let d = std::fs::read(path).unwrap();
            let off = u64::from_be_bytes(d[64..72].try_into().unwrap()) as usize;
            let mut e = d[off..off + 40 + 24 + 1 + 8].to_vec();
            e[..8].fill(0); // L1 offset
            e[16..24].fill(0); // date
            e
        };
        assert_eq!(entry(&a), entry(&b), "compat {opts}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_errors() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    // 1-bit refcounts cannot share: refused before anything changes.
    let path = qemu_create(dir.path(), "r1.qcow2", "refcount_bits=1", "1M");
    qemu_io(&path, None, &["write -P 1 0 64k"]);
    let img = open_rw(&path).await;
    let e = img.snapshot_create("x").await.unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.to_string().contains("refcount overflow"), "{e}");
    img.close().await.unwrap();
    assert_clean(&path, "refcount_bits=1");
    assert!(names(&path).is_empty());
    // Unknown snapshot.
    let img = open_rw(&path).await;
    let e = img.snapshot_apply(&key("nope")).await.unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    let e = img.snapshot_delete(&key("nope")).await.unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    drop(img);
    // Read-only handle.
    let img = open_ro(&path).await;
    assert!(img.snapshot_create("x").await.is_err());
    // A snapshot cannot be opened writable.
    let e = Image::open(&path, &{
        let mut o = OpenOptions::default();
        o.writable = true;
        o.snapshot = Some(key("1"));
        o
    })
    .await
    .err()
    .unwrap();
    assert_eq!(e.errno(), libc::EINVAL);
}

async fn open_mem(bytes: Vec<u8>, path: &Path) -> (Arc<MemStorage>, Image) {
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let st: Arc<dyn Storage> = mem.clone();
    let img = Image::open_storage(st, path, &{
        let mut o = OpenOptions::default();
        o.writable = true;
        o
    })
    .await
    .unwrap();
    (mem, img)
}

#[derive(Clone, Copy, Debug)]
enum SnapOp {
    Create,
    Apply,
    Delete,
}

async fn run_op(img: &Image, op: SnapOp) -> qcow2_core::Result<()> {
    match op {
        SnapOp::Create => img.snapshot_create("new").await.map(|_| ()),
        SnapOp::Apply => img.snapshot_apply(&key("a")).await,
        SnapOp::Delete => img.snapshot_delete(&key("a")).await,
    }
}

/// Crash (every write after the n-th fails) at every write point of create, apply and
/// delete: `qemu-img check` finds neither corruption nor leak, the snapshot list is the old
/// or the new one, and every snapshot and the active disk hold their old or new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_crash_at_every_write() {
    if !have_qemu() {
        return;
    }
    for opts in ["", "compat=0.10", "extended_l2=on,refcount_bits=64"] {
        let dir = tmpdir();
        let path = qemu_create(dir.path(), "img.qcow2", opts, "4M");
        qemu_io(
            &path,
            None,
            &[
                "write -P 1 0 1M",
                "write -c -P 2 2M 128k",
                "write -z 1M 64k",
            ],
        );
        let ca = export(&path, None);
        run("qemu-img", &["snapshot", "-c", "a", p(&path)]);
        qemu_io(&path, None, &["write -P 3 64k 200k", "write -P 4 3M 64k"]);
        let cur = export(&path, None);
        let image = std::fs::read(&path).unwrap();
        for op in [SnapOp::Create, SnapOp::Apply, SnapOp::Delete] {
            let what = format!("{opts:?} {op:?}");
            let (mem, img) = open_mem(image.clone(), &path).await;
            let before = mem.write_count();
            run_op(&img, op).await.unwrap();
            img.close().await.unwrap();
            let total = mem.write_count() - before;
            let (old_names, new_names): (Vec<&str>, Vec<&str>) = match op {
                SnapOp::Create => (vec!["a"], vec!["a", "new"]),
                SnapOp::Apply => (vec!["a"], vec!["a"]),
                SnapOp::Delete => (vec!["a"], vec![]),
            };
            let crashed = dir.path().join("crashed.qcow2");
            for n in 0..=total {
                let (mem, img) = open_mem(image.clone(), &path).await;
                mem.fail_writes_after(n);
                let r = run_op(&img, op).await;
                if r.is_ok() {
                    let _ = img.close().await;
                } else {
                    drop(img);
                }
                std::fs::write(&crashed, mem.snapshot()).unwrap();
                let w = format!("{what}: crash after write {n} of {total}");
                // Atomic: not even a leak (the new state is built past the end of the
                // file and one header write switches to it).
                assert_clean(&crashed, &w);
                let got = names(&crashed);
                assert!(
                    got == old_names || got == new_names,
                    "{w}: snapshots {got:?}"
                );
                if got.iter().any(|s| s == "a") {
                    assert_same(&export(&crashed, Some("a")), &ca, &format!("{w}: a"));
                }
                let active = export(&crashed, None);
                match op {
                    SnapOp::Apply => assert!(active == cur || active == ca, "{w}: active"),
                    _ => assert_same(&active, &cur, &format!("{w}: active")),
                }
                if got.iter().any(|s| s == "new") {
                    assert_same(&export(&crashed, Some("new")), &cur, &format!("{w}: new"));
                }
            }
        }
    }
}

/// The guest content of snapshot `name` as our read-only open (sharing the file with the
/// writer) reads it now.
async fn our_snapshot(path: &Path, name: &str) -> Vec<u8> {
    let img = Image::open(path, &{
        let mut o = OpenOptions::default();
        o.force_share = true;
        o.snapshot = Some(SnapshotKey::Name(name.to_string()));
        o
    })
    .await
    .unwrap();
    read_all(&img).await
}

/// A guest write into an allocated cluster (refcount 1: the in-place path, no lock) that
/// looked its mapping up before a `snapshot_create` and is held at its data write must not
/// land in the snapshot after the create returns (the cluster is shared then): the create
/// drains the handle first, so it waits for the write, and the snapshot's content never
/// changes once the create has returned. Requests arriving during the create wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_create_drains_inflight_writes() {
    use qcow2_core::io::fault::{Match, Op};
    use std::time::Duration;
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_create(dir.path(), "img.qcow2", "", "1M");
    qemu_io(&path, None, &["write -P 1 0 1M"]);
    let host0 = qemu_map(&path)
        .iter()
        .find(|e| e["start"] == 0)
        .and_then(|e| e["offset"].as_u64())
        .expect("guest cluster 0 is allocated");
    let (img, hs) = open_hooked(&path).await;
    let gate = hs.hold(Match::op(Op::Write).range(host0, 4096));
    let w = {
        let img = img.clone();
        tokio::spawn(async move { img.write_at(&[9u8; 4096], 0).await })
    };
    tokio::time::timeout(Duration::from_secs(10), gate.wait_arrived(1))
        .await
        .expect("the write never reached its data write");
    let c = {
        let img = img.clone();
        tokio::spawn(async move { img.snapshot_create("snap").await })
    };
    // A request arriving while the create waits for the drain waits too.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late = {
        let img = img.clone();
        tokio::spawn(async move { img.write_at(&[7u8; 512], 8192).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let early = if c.is_finished() {
        // Without the drain: the snapshot exists while the write is still pending.
        Some(our_snapshot(&path, "snap").await)
    } else {
        None
    };
    gate.release();
    w.await.unwrap().unwrap();
    c.await.unwrap().unwrap();
    late.await.unwrap().unwrap();
    let snap = our_snapshot(&path, "snap").await;
    if let Some(early) = &early {
        assert_same(
            &snap,
            early,
            "snapshot content changed after the create returned",
        );
    }
    assert!(
        early.is_none(),
        "snapshot_create did not wait for the write in flight"
    );
    // The held write came first, the late one after the snapshot.
    let mut want = vec![1u8; 1 << 20];
    want[..4096].fill(9);
    assert_same(&snap, &want, "snapshot");
    want[8192..8192 + 512].fill(7);
    assert_same(&read_all(&img).await, &want, "active");
    img.close().await.unwrap();
    assert_clean(&path, "after the raced create");
    assert_same(
        &export(&path, Some("snap"))[..4096],
        &[9u8; 4096],
        "qemu: snapshot",
    );
}

/// Near the refcount limit (2-bit refcounts hold at most 3): a third snapshot of the same
/// clusters needs a refcount of 4. The create fails naming the overflow and the file is
/// left byte for byte as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_refcount_overflow_is_refused_before_any_change() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_create(dir.path(), "img.qcow2", "refcount_bits=2", "1M");
    qemu_io(&path, None, &["write -P 1 0 256k"]);
    let img = open_rw(&path).await;
    img.snapshot_create("a").await.unwrap();
    img.snapshot_create("b").await.unwrap();
    img.close().await.unwrap();
    assert_clean(&path, "two snapshots");
    let before = std::fs::read(&path).unwrap();
    let img = open_rw(&path).await;
    let e = img.snapshot_create("c").await.unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    // qemu-img says "Invalid argument" (and leaks a cluster); ours names the overflow.
    assert!(
        e.to_string()
            .starts_with("Invalid argument: refcount overflow: cluster 0x"),
        "{e}"
    );
    img.close().await.unwrap();
    assert!(
        std::fs::read(&path).unwrap() == before,
        "the file changed although the create was refused"
    );
    assert_clean(&path, "after the refusal");
    assert_eq!(names(&path), ["a", "b"]);
}

/// A disk of 0 bytes has an empty L1 table: the snapshot's has offset 0, as QEMU writes it,
/// and create, apply and delete leave a clean image qemu-img reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_an_empty_disk() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_create(dir.path(), "z.qcow2", "", "0");
    let img = open_rw(&path).await;
    let sn = img.snapshot_create("s").await.unwrap();
    assert_eq!((sn.l1_size, sn.l1_table_offset), (0, 0));
    img.close().await.unwrap();
    assert_clean(&path, "after create");
    assert_eq!(names(&path), ["s"]);
    let img = open_rw(&path).await;
    img.snapshot_apply(&key("s")).await.unwrap();
    img.snapshot_delete(&key("s")).await.unwrap();
    img.close().await.unwrap();
    assert_clean(&path, "after apply and delete");
    assert!(names(&path).is_empty());
}
