//! `rebase` (safe mode) and `commit` under the power-cut model (`qcow2_core::io::powercut`):
//! the job runs on power-cut storage, and at every position of its log the files as they
//! could be after a power cut there (no unflushed change, all of them, a random subset torn
//! at 4 KiB) must be consistent (neither our check nor `qemu-img check` finds corruption;
//! leaks are allowed) and the guest content must be as promised:
//!
//! - rebase: the overlay's guest view is unchanged at every cut, whichever backing file
//!   its header names (the data the new chain lacks is durable before the header switch);
//! - commit: the image's guest view is unchanged at every cut, and each 512-byte sector of
//!   the base holds its old content or the image's (the base's size is the old or the new).

use crate::common::*;
use qcow2_core::check::{check, CheckOptions};
use qcow2_core::commit::{commit_image, CommitOptions};
use qcow2_core::io::powercut::{PowerCut, Survivors};
use qcow2_core::rebase::{rebase_image, RebaseOptions};
use qcow2_core::{Disk, Format, Image, OpenOptions};
use std::path::Path;

fn survivors(cut: usize) -> Survivors {
    match cut % 3 {
        0 => Survivors::None,
        1 => Survivors::All,
        _ => Survivors::Random(0x5eed ^ (cut as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    }
}

/// Our check (no repair) finds no corruption in `path`.
async fn assert_our_check_clean(path: &Path, what: &str) {
    let img = Image::open(path, &{
        let mut o = OpenOptions::default();
        o.for_check = true;
        o.no_backing = true;
        o
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: open for check: {e}"));
    let r = check(&img, &CheckOptions { repair: None })
        .await
        .unwrap_or_else(|e| panic!("{what}: our check: {e}"));
    assert_eq!(r.corruptions, 0, "{what}: our check finds corruption");
}

fn qemu_create_b(dir: &Path, name: &str, opts: &str, backing: &str, size: &str) {
    let mut o = String::from(opts);
    let args: Vec<String> = if backing.is_empty() {
        vec![]
    } else {
        vec!["-b".into(), backing.into(), "-F".into(), "qcow2".into()]
    };
    if o.is_empty() {
        o.push_str("compat=1.1");
    }
    let path = dir.join(name);
    let mut a: Vec<&str> = vec!["create", "-q", "-f", "qcow2", "-o", &o];
    a.extend(args.iter().map(String::as_str));
    a.extend([p(&path), size]);
    run("qemu-img", &a);
}

/// Rebase (safe mode) of an overlay onto another backing file or none, cut everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebase_crash_at_every_write() {
    if !have_qemu() {
        return;
    }
    for (opts, onto) in [
        ("cluster_size=65536", "b2.qcow2"),
        ("extended_l2=on", "b2.qcow2"),
        ("compat=0.10", "b2.qcow2"),
        ("cluster_size=4096", ""),
    ] {
        let dir = tmpdir();
        let d = dir.path();
        qemu_create_b(d, "b1.qcow2", "", "", "4M");
        qemu_io(
            &d.join("b1.qcow2"),
            None,
            &["write -P 1 0 2M", "write -P 5 3M 1M", "write -z 1M 64k"],
        );
        qemu_create_b(d, "b2.qcow2", "cluster_size=4096", "", "4M");
        qemu_io(&d.join("b2.qcow2"), None, &["write -P 2 1M 2M"]);
        qemu_create_b(d, "o.qcow2", opts, "b1.qcow2", "4M");
        let o = d.join("o.qcow2");
        qemu_io(
            &o,
            None,
            &[
                "write -P 3 512k 70k",
                "write -z 3M 64k",
                "write -P 4 1100k 8k",
            ],
        );
        let want = qemu_export(&o, None, &d.join("want.raw"));
        let pc = PowerCut::new();
        let f = pc.add_file(std::fs::read(&o).unwrap());
        let img = Image::open_storage(f, &o, &{
            let mut o = OpenOptions::default();
            o.writable = true;
            o
        })
        .await
        .unwrap();
        let ro = RebaseOptions {
            backing: onto.into(),
            backing_format: (!onto.is_empty()).then_some(Format::Qcow2),
            ..Default::default()
        };
        rebase_image(img, &ro).await.unwrap();
        let total = pc.len();
        let crashed = d.join("c.qcow2");
        let mut switched = 0;
        for cut in 0..=total {
            let sv = survivors(cut);
            let what = format!("rebase {opts} onto {onto:?}: cut at {cut} of {total} ({sv:?})");
            std::fs::write(&crashed, &pc.state_at(cut, sv)[0]).unwrap();
            assert_no_corruption(&crashed, &what);
            assert_our_check_clean(&crashed, &what).await;
            let info = qemu_info(&crashed);
            let bf = info["backing-filename"].as_str().unwrap_or("");
            assert!(bf == "b1.qcow2" || bf == onto, "{what}: backing {bf:?}");
            if bf == onto {
                switched += 1;
            }
            let got = qemu_export(&crashed, None, &d.join("got.raw"));
            assert_same(&got, &want, &format!("{what}: guest view (backing {bf:?})"));
        }
        assert!(switched > 0, "rebase {opts}: the header never switched");
        eprintln!(
            "rebase {opts} onto {onto:?}: {} cuts, {switched} after the switch",
            total + 1
        );
    }
}

/// Commit of an overlay (larger than its base) into the base, cut everywhere; with and
/// without emptying the overlay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_crash_at_every_write() {
    if !have_qemu() {
        return;
    }
    for (bopts, topts, drop) in [
        ("", "", false),
        ("cluster_size=4096,refcount_bits=1", "extended_l2=on", false),
        ("compat=0.10", "cluster_size=16384", true),
    ] {
        let dir = tmpdir();
        let d = dir.path();
        qemu_create_b(d, "base.qcow2", bopts, "", "4M");
        let base = d.join("base.qcow2");
        qemu_io(&base, None, &["write -P 1 0 3M", "write -P 9 3M 1M"]);
        qemu_create_b(d, "top.qcow2", topts, "base.qcow2", "6M");
        let top = d.join("top.qcow2");
        qemu_io(
            &top,
            None,
            &[
                "write -P 5 0 1M",
                "write -z 2M 128k",
                "write -P 6 3M 4k",
                "write -P 7 5M 512k",
            ],
        );
        let want = qemu_export(&top, None, &d.join("want.raw"));
        let mut old_base = qemu_export(&base, None, &d.join("oldbase.raw"));
        old_base.resize(want.len(), 0);
        let pc = PowerCut::new();
        let fb = pc.add_file(std::fs::read(&base).unwrap());
        let ft = pc.add_file(std::fs::read(&top).unwrap());
        let img = Image::open_storage(ft, &top, &{
            let mut o = OpenOptions::default();
            o.writable = !drop;
            o
        })
        .await
        .unwrap();
        let bimg = Image::open_storage(fb, &base, &{
            let mut o = OpenOptions::default();
            o.writable = true;
            o.locking = false;
            o
        })
        .await
        .unwrap();
        let co = CommitOptions {
            drop,
            ..Default::default()
        };
        commit_image(img, &co, Some(Disk::Qcow2(bimg)))
            .await
            .unwrap();
        let total = pc.len();
        let tdir = tmpdir();
        let (cb, ct) = (
            tdir.path().join("base.qcow2"),
            tdir.path().join("top.qcow2"),
        );
        for cut in 0..=total {
            let sv = survivors(cut);
            let what =
                format!("commit {bopts}/{topts} drop={drop}: cut at {cut} of {total} ({sv:?})");
            let files = pc.state_at(cut, sv);
            std::fs::write(&cb, &files[0]).unwrap();
            std::fs::write(&ct, &files[1]).unwrap();
            for f in [&cb, &ct] {
                assert_no_corruption(f, &format!("{what}: {}", f.display()));
                assert_our_check_clean(f, &format!("{what}: {}", f.display())).await;
            }
            let got = qemu_export(&ct, None, &tdir.path().join("got.raw"));
            assert_same(&got, &want, &format!("{what}: the image's guest view"));
            let mut gb = qemu_export(&cb, None, &tdir.path().join("gotbase.raw"));
            assert!(
                gb.len() == 4 << 20 || gb.len() == 6 << 20,
                "{what}: base size {}",
                gb.len()
            );
            gb.resize(want.len(), 0);
            for s in 0..want.len() / 512 {
                let r = s * 512..(s + 1) * 512;
                assert!(
                    gb[r.clone()] == old_base[r.clone()] || gb[r.clone()] == want[r.clone()],
                    "{what}: base sector {s} is neither old nor committed"
                );
            }
        }
        assert_eq!(
            qemu_export(&cb, None, &tdir.path().join("gotbase.raw")),
            want,
            "commit {bopts}: final base"
        );
        eprintln!("commit {bopts}/{topts} drop={drop}: {} cuts", total + 1);
    }
}

/// `amend -o compat=0.10` of an image whose snapshots hold zero clusters (the active state's
/// are expanded through the engine, the snapshots' in one snapshot-state switch, then the v2
/// header), cut everywhere: consistent, the active content and each snapshot's unchanged,
/// and the version is 3 or 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amend_downgrade_crash_at_every_write() {
    if !have_qemu() {
        return;
    }
    for backing in [false, true] {
        let dir = tmpdir();
        let d = dir.path();
        qemu_create_b(d, "b.qcow2", "", "", "4M");
        qemu_io(&d.join("b.qcow2"), None, &["write -P 8 0 4M"]);
        qemu_create_b(
            d,
            "img.qcow2",
            "",
            if backing { "b.qcow2" } else { "" },
            "4M",
        );
        let img = d.join("img.qcow2");
        qemu_io(
            &img,
            None,
            &["write -P 1 0 1M", "write -z 1M 128k", "write -P 2 2M 64k"],
        );
        run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
        qemu_io(&img, None, &["write -z 0 64k", "write -z 2M 64k"]);
        run("qemu-img", &["snapshot", "-c", "s2", p(&img)]);
        qemu_io(&img, None, &["write -P 3 1M 64k", "write -z 3M 128k"]);
        let active = qemu_export(&img, None, &d.join("a.raw"));
        let s1 = qemu_export(&img, Some("s1"), &d.join("s1.raw"));
        let s2 = qemu_export(&img, Some("s2"), &d.join("s2.raw"));
        let pc = PowerCut::new();
        let f = pc.add_file(std::fs::read(&img).unwrap());
        let h = Image::open_storage(f, &img, &{
            let mut o = OpenOptions::default();
            o.writable = true;
            o
        })
        .await
        .unwrap();
        let mut ao = qcow2_core::jobs::amend::AmendOptions::default();
        ao.set("compat", "0.10").unwrap();
        qcow2_core::jobs::amend::amend(h, &ao).await.unwrap();
        let total = pc.len();
        let crashed = d.join("c.qcow2");
        let mut v2 = 0;
        for cut in 0..=total {
            let sv = survivors(cut);
            let what = format!("amend backing={backing}: cut at {cut} of {total} ({sv:?})");
            std::fs::write(&crashed, &pc.state_at(cut, sv)[0]).unwrap();
            assert_no_corruption(&crashed, &what);
            assert_our_check_clean(&crashed, &what).await;
            let compat = qemu_info(&crashed)["format-specific"]["data"]["compat"]
                .as_str()
                .unwrap_or("")
                .to_string();
            assert!(
                compat == "1.1" || compat == "0.10",
                "{what}: compat {compat}"
            );
            v2 += usize::from(compat == "0.10");
            assert_same(
                &qemu_export(&crashed, None, &d.join("g.raw")),
                &active,
                &format!("{what}: active"),
            );
            assert_same(
                &qemu_export(&crashed, Some("s1"), &d.join("g.raw")),
                &s1,
                &format!("{what}: s1"),
            );
            assert_same(
                &qemu_export(&crashed, Some("s2"), &d.join("g.raw")),
                &s2,
                &format!("{what}: s2"),
            );
        }
        assert!(v2 > 0, "amend backing={backing}: never downgraded");
        eprintln!(
            "amend compat=0.10 backing={backing}: {} cuts, {v2} v2",
            total + 1
        );
    }
}
