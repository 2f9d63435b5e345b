//! `check -r leaks|all` and the refcount rebuild of dirty images, against `qemu-img check -r`
//! on identical copies of images made by qemu-img/qemu-io and damaged by byte surgery.
//!
//! For every case and mode: our report (JSON, diagnostic lines, human text, exit status)
//! equals qemu-img's; afterwards `qemu-img check` says the same about our copy as about
//! qemu's, and the guest data still equals a raw export taken before the damage.
//! Needs qemu-img and qemu-io: skipped (with a message) when they are missing, and failing in
//! CI (`CI=true`).

use crate::common::{have_qemu, p, qemu_create, run, sh};
use crate::surgery::{io, rich_image, Raw, Rng};
use qcow2_core::check::{check, CheckOptions, CheckReport, Repair};
use qcow2_core::{Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

macro_rules! need_qemu {
    () => {
        if !have_qemu() {
            return;
        }
    };
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// qemu-io commands ending in `abort`: the image is left dirty (lazy refcounts).
fn io_crash(path: &Path, cmds: &[&str]) {
    let mut args = vec![];
    for c in cmds.iter().chain(&["abort"]) {
        args.extend(["-c", *c]);
    }
    args.push(p(path));
    let out = sh("qemu-io", &args);
    assert!(!out.status.success(), "qemu-io abort did not abort");
    assert_eq!(Raw::load(path).u64(72) & 1, 1, "dirty bit not set");
}

/// The guest data as a raw file, next to the image.
fn export(path: &Path) -> PathBuf {
    let raw = path.with_extension("raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(path), p(&raw)],
    );
    raw
}

fn copy(src: &Path, suffix: &str) -> PathBuf {
    let dst = src.with_extension(format!("{suffix}.qcow2"));
    std::fs::copy(src, &dst).unwrap();
    dst
}

fn mode_arg(m: Repair) -> &'static str {
    match m {
        Repair::Leaks => "leaks",
        Repair::All => "all",
    }
}

/// The diagnostic lines of qemu-img (stderr without its own "qemu-img:" lines).
fn diag_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.starts_with("qemu-img:") && !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// `qemu-img check --output=json` (plus `-r mode`): JSON, diagnostic lines, exit status.
fn qemu_check(path: &Path, mode: Option<Repair>) -> (Option<serde_json::Value>, Vec<String>, i32) {
    let mut args = vec!["check", "--output=json"];
    if let Some(m) = mode {
        args.extend(["-r", mode_arg(m)]);
    }
    args.push(p(path));
    let out = sh("qemu-img", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = (!stdout.trim().is_empty()).then(|| serde_json::from_str(&stdout).unwrap());
    (json, diag_lines(&out.stderr), out.status.code().unwrap())
}

/// qemu-img's human stdout of `check -r mode`.
fn qemu_human(path: &Path, mode: Repair) -> String {
    let out = sh("qemu-img", &["check", "-r", mode_arg(mode), p(path)]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON without the file name (copies have different names).
fn anon(mut v: serde_json::Value) -> serde_json::Value {
    v.as_object_mut().unwrap().remove("filename");
    v
}

/// Our `check -r mode` on a writable open, then flush and close (as the CLI does).
async fn ours_repair(path: &Path, mode: Repair) -> qcow2_core::Result<CheckReport> {
    let mut opts = OpenOptions::default();
    opts.writable = true;
    opts.for_repair = true;
    opts.for_check = true;
    let img = Image::open(path, &opts).await?;
    let r = check(&img, &CheckOptions { repair: Some(mode) }).await;
    img.flush().await?;
    img.close().await?;
    r
}

/// Our human text without the diagnostic lines (qemu-img prints those on stderr).
fn human_stdout(r: &CheckReport) -> String {
    let mut r = r.clone();
    r.messages.clear();
    r.repair_messages = 0;
    r.human()
}

/// `qemu-img check --output=json` of a repaired image.
fn after(path: &Path) -> (serde_json::Value, i32) {
    let (json, msgs, rc) = qemu_check(path, None);
    let json =
        json.unwrap_or_else(|| panic!("qemu-img check failed on {}: {msgs:?}", path.display()));
    (anon(json), rc)
}

fn assert_clean(path: &Path) {
    let (json, rc) = after(path);
    assert_eq!(
        rc,
        0,
        "{} is not clean after repair: {json}",
        path.display()
    );
    assert!(json.get("corruptions").is_none() && json.get("leaks").is_none());
}

fn assert_same_data(raw: &Path, img: &Path) {
    let out = sh(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", p(raw), p(img)],
    );
    assert!(
        out.status.success(),
        "guest data of {} changed: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a repair case produced on our copy.
struct Outcome {
    ours: qcow2_core::Result<CheckReport>,
    /// Our repaired copy.
    path: PathBuf,
    /// qemu's repaired copy.
    qemu: PathBuf,
}

/// Repair copies of `img` with qemu-img and with us and require the same outcome: the same
/// report where qemu-img reports, a failure where it fails, and the same state afterwards.
async fn compare_repair(img: &Path, raw: &Path, mode: Repair) -> Outcome {
    let tag = mode_arg(mode);
    let q = copy(img, &format!("q-{tag}"));
    let qh = copy(img, &format!("qh-{tag}"));
    let o = copy(img, &format!("o-{tag}"));
    let (qjson, qmsgs, qrc) = qemu_check(&q, Some(mode));
    let qhuman = qemu_human(&qh, mode);
    let ours = ours_repair(&o, mode).await;
    if std::env::var("CHECK_DEBUG").is_ok() {
        eprintln!(
            "== {} -r {tag}: qemu rc {qrc} {qjson:?}\n{qmsgs:#?}",
            img.display()
        );
        match &ours {
            Ok(r) => eprintln!("ours:\n{}", r.human()),
            Err(e) => eprintln!("ours: {e}"),
        }
    }
    match (&qjson, &ours) {
        (Some(j), Ok(r)) => {
            assert_eq!(
                anon(r.to_json()),
                anon(j.clone()),
                "JSON differs for -r {tag} on {}\nour messages: {:#?}\nqemu's: {qmsgs:#?}",
                img.display(),
                r.messages
            );
            assert_eq!(
                r.messages,
                qmsgs,
                "messages differ for -r {tag} on {}",
                img.display()
            );
            assert_eq!(r.exit_code(), qrc, "exit status differs for -r {tag}");
            assert_eq!(human_stdout(r), qhuman, "human output differs for -r {tag}");
            // Key order as qemu prints it.
            let ok: Vec<_> = r.to_json().as_object().unwrap().keys().cloned().collect();
            let qk: Vec<_> = j.as_object().unwrap().keys().cloned().collect();
            assert_eq!(ok, qk);
            // Both copies are in the same state now, as qemu-img sees them.
            assert_eq!(after(&o), after(&q), "state after -r {tag} differs");
        }
        (None, Err(_)) => assert_eq!(qrc, 1, "qemu-img failed without exit status 1"),
        (None, Ok(r)) => panic!(
            "qemu-img check -r {tag} failed (exit {qrc}: {qmsgs:?}) where ours reported:\n{}",
            r.human()
        ),
        (Some(j), Err(e)) => panic!("our repair failed ({e}) where qemu-img reported {j}"),
    }
    // Guest data is unchanged (where the image is readable: corruptions may remain).
    if after(&o).1 != 2 {
        assert_same_data(raw, &o);
    }
    Outcome {
        ours,
        path: o,
        qemu: q,
    }
}

// ---- byte surgery ----

const MODES: [Repair; 2] = [Repair::Leaks, Repair::All];

fn ok(o: &Outcome) -> &CheckReport {
    o.ours.as_ref().unwrap()
}

// ---- (a) dirty images (lazy refcounts, crash) ----

#[tokio::test(flavor = "multi_thread")]
async fn dirty_crashed_image() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "dirty.qcow2", "lazy_refcounts=on", "64M");
    io_crash(&img, &["write -P 1 0 4M", "write -P 2 8M 1M"]);
    let raw = export(&img);
    // -r leaks: qemu-img cannot rebuild and fails; ours fails the same way, but the writable
    // open has rebuilt the refcounts already.
    let o = compare_repair(&img, &raw, Repair::Leaks).await;
    assert!(o.ours.is_err());
    assert_clean(&o.path);
    assert_eq!(Raw::load(&o.path).u64(72) & 1, 0, "dirty bit still set");
    // -r all: rebuild, exactly as qemu-img does it.
    let o = compare_repair(&img, &raw, Repair::All).await;
    let r = ok(&o);
    assert!(r.corruptions_fixed > 0);
    assert!(r
        .messages
        .contains(&"Rebuilding refcount structure".to_string()));
    assert_eq!(r.exit_code(), 0);
    assert_clean(&o.path);
    assert_eq!(
        std::fs::read(&o.path).unwrap(),
        std::fs::read(&o.qemu).unwrap(),
        "the rebuilt image differs from qemu-img's"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dirty_crashed_small_clusters() {
    need_qemu!();
    // Many refcount blocks and a refcount table of several clusters.
    for (name, opts, writes) in [
        (
            "dirty512.qcow2",
            "lazy_refcounts=on,cluster_size=512",
            &["write -P 1 0 9M", "write -P 2 20M 64k"][..],
        ),
        (
            "dirty4k-rc8.qcow2",
            "lazy_refcounts=on,cluster_size=4k,refcount_bits=8",
            &["write -P 3 0 3M", "write -P 4 40M 1M"][..],
        ),
    ] {
        let d = tmp();
        let img = qemu_create(d.path(), name, opts, "64M");
        io_crash(&img, writes);
        let raw = export(&img);
        let o = compare_repair(&img, &raw, Repair::All).await;
        assert_eq!(ok(&o).exit_code(), 0);
        assert_clean(&o.path);
        assert_eq!(
            std::fs::read(&o.path).unwrap(),
            std::fs::read(&o.qemu).unwrap(),
            "the rebuilt image differs from qemu-img's ({name})"
        );
    }
}

/// Opening a dirty image writable rebuilds its refcounts first; writes afterwards are safe.
#[tokio::test(flavor = "multi_thread")]
async fn dirty_image_opened_writable() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "x.qcow2", "lazy_refcounts=on", "64M");
    io_crash(&img, &["write -P 1 0 4M", "write -P 2 8M 1M"]);
    let raw = export(&img);
    let ours = copy(&img, "ours");
    let theirs = copy(&img, "theirs");

    // Open and close only.
    let mut opts = OpenOptions::default();
    opts.writable = true;
    let i = Image::open(&ours, &opts).await.unwrap();
    assert!(!i.header().dirty());
    i.close().await.unwrap();
    assert_eq!(Raw::load(&ours).u64(72) & 1, 0, "dirty bit still set");
    assert_clean(&ours);
    assert_same_data(&raw, &ours);

    // Open, write, close: the same guest data as qemu-io doing the same.
    let ours2 = copy(&img, "ours2");
    let i = Image::open(&ours2, &opts).await.unwrap();
    i.write_at(&[3u8; 65536], 12 << 20).await.unwrap();
    i.write_at(&[4u8; 4096], 1 << 20).await.unwrap();
    i.close().await.unwrap();
    io(&theirs, &["write -P 3 12M 64k", "write -P 4 1M 4k"]);
    assert_clean(&ours2);
    let out = sh("qemu-img", &["compare", p(&theirs), p(&ours2)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Read-only opens leave the image alone.
    let before = std::fs::read(&img).unwrap();
    let i = Image::open(&img, &OpenOptions::default()).await.unwrap();
    assert!(i.header().dirty());
    drop(i);
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

// ---- (b) byte surgery ----

#[tokio::test(flavor = "multi_thread")]
async fn leaked_clusters() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "leak.qcow2", "", "64M");
    io(
        &img,
        &["write -P 1 0 256k", "write -P 2 1M 64k", "discard 64k 64k"],
    );
    let raw = export(&img);
    let mut r = Raw::load(&img);
    let cs = r.cs();
    let nb = r.clusters();
    // A free cluster inside the file, a data cluster counted twice, and a cluster appended
    // past the end with refcount 3.
    let free = (1..nb).find(|&c| r.refcount(c) == 0).unwrap();
    r.set_refcount(free, 1);
    let data = r.host_cluster(2);
    r.set_refcount(data, 2);
    r.b.resize(((nb + 1) * cs) as usize, 0);
    r.set_refcount(nb, 3);
    r.save();
    for mode in MODES {
        let o = compare_repair(&img, &raw, mode).await;
        let rep = ok(&o);
        assert_eq!(rep.leaks_fixed, 3);
        assert!(rep
            .messages
            .contains(&format!("Repairing cluster {free} refcount=1 reference=0")));
        assert_eq!(rep.exit_code(), 0);
        assert_clean(&o.path);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refcount_too_low() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "low.qcow2", "", "64M");
    io(&img, &["write -P 1 0 256k"]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    io(&img, &["write -P 5 128k 64k"]);
    let raw = export(&img);
    let mut r = Raw::load(&img);
    // A cluster shared with the snapshot loses one reference.
    let ci = r.host_cluster(0);
    assert_eq!(r.refcount(ci), 2);
    r.set_refcount(ci, 1);
    r.save();
    let o = compare_repair(&img, &raw, Repair::Leaks).await;
    assert_eq!(ok(&o).exit_code(), 2, "-r leaks does not fix corruptions");
    let o = compare_repair(&img, &raw, Repair::All).await;
    assert_eq!(ok(&o).corruptions_fixed, 1);
    assert_clean(&o.path);
}

#[tokio::test(flavor = "multi_thread")]
async fn refcount_zero_needs_rebuild() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "zero.qcow2", "", "64M");
    io(&img, &["write -P 1 0 256k", "write -P 2 5M 128k"]);
    let raw = export(&img);
    let mut r = Raw::load(&img);
    let ci = r.host_cluster(1);
    r.set_refcount(ci, 0);
    r.save();
    let o = compare_repair(&img, &raw, Repair::Leaks).await;
    assert!(o.ours.is_err(), "-r leaks cannot rebuild");
    let o = compare_repair(&img, &raw, Repair::All).await;
    assert!(ok(&o)
        .messages
        .contains(&"Rebuilding refcount structure".to_string()));
    assert_clean(&o.path);
}

#[tokio::test(flavor = "multi_thread")]
async fn copied_flag_cleared() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "copied.qcow2", "", "64M");
    io(&img, &["write -P 1 0 256k"]);
    let raw = export(&img);
    let mut r = Raw::load(&img);
    let pos = r.l2_entry_pos(2);
    let e = r.u64(pos);
    r.put64(pos, e & !(1 << 63));
    let l1 = r.u64(40) as usize;
    let l1e = r.u64(l1);
    r.put64(l1, l1e & !(1 << 63));
    r.save();
    for mode in MODES {
        let o = compare_repair(&img, &raw, mode).await;
        let rep = ok(&o);
        assert_eq!(rep.corruptions_fixed, 2);
        assert_clean(&o.path);
        let after = Raw::load(&o.path);
        assert_eq!(after.u64(pos), e, "copied flag not set again");
        assert_eq!(after.u64(l1), l1e);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refcount_table_entry_zeroed() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "rt0.qcow2", "", "64M");
    io(&img, &["write -P 1 0 1M", "write -P 2 30M 64k"]);
    let raw = export(&img);
    let mut r = Raw::load(&img);
    let rt = r.u64(48) as usize;
    r.put64(rt, 0);
    r.save();
    let o = compare_repair(&img, &raw, Repair::Leaks).await;
    assert!(o.ours.is_err());
    let o = compare_repair(&img, &raw, Repair::All).await;
    assert!(ok(&o).corruptions_fixed > 0);
    assert_clean(&o.path);
    assert_eq!(
        std::fs::read(&o.path).unwrap(),
        std::fs::read(&o.qemu).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refcount_block_outside_image() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "rbout.qcow2", "cluster_size=4k", "64M");
    io(&img, &["write -P 1 0 512k"]);
    let raw = export(&img);
    let mut r = Raw::load(&img);
    let cs = r.cs();
    let rt = r.u64(48) as usize;
    r.put64(rt + 8, cs * 1000);
    r.save();
    for mode in MODES {
        compare_repair(&img, &raw, mode).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn misaligned_preallocated_zero_cluster() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "prez.qcow2", "", "64M");
    io(&img, &["write -P 1 0 512k"]);
    let raw = export(&img);
    let mut r = Raw::load(&img);
    let cs = r.cs();
    let pos = r.l2_entry_pos(20);
    r.put64(pos, (3 * cs + 0x400) | 1);
    r.save();
    let o = compare_repair(&img, &raw, Repair::Leaks).await;
    assert_eq!(ok(&o).exit_code(), 2);
    let o = compare_repair(&img, &raw, Repair::All).await;
    assert_eq!(Raw::load(&o.path).u64(pos), 1, "not a plain zero cluster");
    assert_clean(&o.path);
}

#[tokio::test(flavor = "multi_thread")]
async fn incomplete_snapshot_entry() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "snap-short.qcow2", "", "64M");
    io(&img, &["write -P 1 0 128k"]);
    run("qemu-img", &["snapshot", "-c", "short", p(&img)]);
    let raw = export(&img);
    // Rewrite the only snapshot entry with 8 bytes of extra data (v3 requires 16).
    let mut r = Raw::load(&img);
    let off = r.u64(64) as usize;
    let extra = r.u32(off + 36) as usize;
    let id_len = u16::from_be_bytes([r.b[off + 12], r.b[off + 13]]) as usize;
    let name_len = u16::from_be_bytes([r.b[off + 14], r.b[off + 15]]) as usize;
    let names = r.b[off + 40 + extra..off + 40 + extra + id_len + name_len].to_vec();
    let mut e = r.b[off..off + 48].to_vec();
    e[36..40].copy_from_slice(&8u32.to_be_bytes());
    e.extend_from_slice(&names);
    let end = off + 40 + extra + id_len + name_len;
    r.b[off..end].fill(0);
    r.b[off..off + e.len()].copy_from_slice(&e);
    r.save();
    let o = compare_repair(&img, &raw, Repair::Leaks).await;
    assert_eq!(ok(&o).exit_code(), 2);
    let o = compare_repair(&img, &raw, Repair::All).await;
    assert_eq!(ok(&o).corruptions_fixed, 1);
    assert_clean(&o.path);
    let out = sh("qemu-img", &["snapshot", "-l", p(&o.path)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("short"));
}

// ---- (c) clean images ----

#[tokio::test(flavor = "multi_thread")]
async fn clean_image_is_left_alone() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "clean.qcow2", "", "64M");
    io(&img, &["write -P 1 0 1M", "write -c -P 2 4M 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    io(&img, &["write -P 3 0 64k"]);
    let raw = export(&img);
    let before = std::fs::read(&img).unwrap();
    for mode in MODES {
        let o = compare_repair(&img, &raw, mode).await;
        let rep = ok(&o);
        assert_eq!(rep.exit_code(), 0);
        assert_eq!(rep.leaks_fixed + rep.corruptions_fixed, 0);
        assert_eq!(
            std::fs::read(&o.path).unwrap(),
            before,
            "a no-op repair wrote"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_needs_a_writable_image() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "ro.qcow2", "", "1M");
    let i = Image::open(&img, &OpenOptions::default()).await.unwrap();
    let e = check(
        &i,
        &CheckOptions {
            repair: Some(Repair::All),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), qcow2_core::ErrorKind::ReadOnly);
}

// ---- random damage ----

/// Whether two files have the same bytes (huge sparse files, grown by a repair over a
/// refcount block far beyond the end, compare by length only).
fn same_file(a: &Path, b: &Path) -> bool {
    let (la, lb) = (
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len(),
    );
    la == lb && (la > 256 << 20 || std::fs::read(a).unwrap() == std::fs::read(b).unwrap())
}

/// Damage random metadata words and repair copies with qemu-img and with us: wherever both
/// open the image, the reports and the repaired images (as qemu-img checks them) must agree.
async fn fuzz_repair(cluster_size: &str, bitmap: bool, rounds: u64, seed: u64) -> u64 {
    let d = tmp();
    let dir = d.path().to_path_buf();
    if std::env::var("CHECK_KEEP").is_ok() {
        eprintln!("keeping {}", dir.display());
        std::mem::forget(d);
    }
    // Not a snapshot and a bitmap together: `qemu-img check -r` opens the image writable in
    // check mode, where QEMU forgets the snapshot table, and marking the bitmaps in use then
    // rewrites the header without the snapshots. That is not something to mirror.
    let img = rich_image(&dir, cluster_size, !bitmap, bitmap);
    let pristine = std::fs::read(&img).unwrap();
    let raw = Raw {
        path: img.clone(),
        b: pristine.clone(),
    };
    let cs = raw.cs();
    // Metadata clusters: L1, refcount table, its first block, snapshot table, L2 tables.
    let mut meta = vec![raw.u64(40), raw.u64(48)];
    if raw.u64(64) != 0 {
        meta.push(raw.u64(64));
    }
    let rt = raw.u64(48) as usize;
    meta.push(raw.u64(rt) & !511);
    let l1 = raw.u64(40) as usize;
    for i in 0..2 {
        let e = raw.u64(l1 + i * 8) & 0x00ff_ffff_ffff_fe00;
        if e != 0 {
            meta.push(e);
        }
    }
    let mut rng = Rng(seed);
    let mut compared = 0;
    for round in 0..rounds {
        let mut b = pristine.clone();
        for _ in 0..1 + rng.below(3) {
            let base = meta[rng.below(meta.len() as u64) as usize];
            let off = (base + rng.below(cs.min(4096)) / 8 * 8) as usize;
            if off + 8 > b.len() {
                continue;
            }
            let v = u64::from_be_bytes(b[off..off + 8].try_into().unwrap());
            let nv = match rng.below(6) {
                0 => v ^ (1 << rng.below(64)),
                1 => v.wrapping_add(cs),
                2 => v | (1 << 63),
                3 => rng.next(),
                4 => 0,
                _ => v & !(1 << 63),
            };
            b[off..off + 8].copy_from_slice(&nv.to_be_bytes());
        }
        let src = dir.join(format!("round{round}.qcow2"));
        std::fs::write(&src, &b).unwrap();
        let q = copy(&src, "q");
        let o = copy(&src, "o");
        let (qjson, qmsgs, qrc) = qemu_check(&q, Some(Repair::All));
        let qemu_opened = !qmsgs.is_empty() || qjson.is_some();
        let ours = ours_repair(&o, Repair::All).await;
        if std::env::var("CHECK_DEBUG").is_ok() {
            eprintln!(
                "round {round}: qemu exit {qrc} {:?}; ours {:?}",
                qmsgs.first(),
                ours.as_ref()
                    .map(|r| r.exit_code())
                    .map_err(|e| e.to_string())
            );
        }
        match (qjson, ours) {
            (Some(j), Ok(r)) => {
                assert_eq!(
                    anon(r.to_json()),
                    anon(j),
                    "round {round}: JSON differs; ours: {:#?} qemu: {qmsgs:#?}",
                    r.messages
                );
                assert_eq!(r.messages, qmsgs, "round {round}: messages differ");
                assert_eq!(r.exit_code(), qrc);
                // (With a bitmap, QEMU's writable open and close store the bitmap anew: the
                // files differ in where that went.)
                if !bitmap {
                    assert_eq!(after(&o), after(&q), "round {round}: repaired images differ");
                }
                let identical = same_file(&q, &o);
                if r.exit_code() == 0 && !identical {
                    let out = sh("qemu-img", &["compare", p(&q), p(&o)]);
                    // (Damaged compressed clusters may be unreadable in both.)
                    let readable = sh("qemu-img", &["compare", p(&q), p(&q)]).status.success();
                    assert!(
                        out.status.success() || !readable,
                        "round {round}: guest data differs: {}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
                compared += 1;
            }
            (None, Ok(r)) if qemu_opened => panic!(
                "round {round}: qemu-img check -r all failed ({qrc}, {qmsgs:?}) but ours reported {}",
                r.human()
            ),
            // Opened as `check -r` opens it, whatever qemu-img repairs we repair.
            (Some(j), Err(e)) => {
                panic!("round {round}: our repair failed ({e}) where qemu-img reported {j}")
            }
            _ => {}
        }
    }
    compared
}

#[tokio::test(flavor = "multi_thread")]
async fn random_damage_repair() {
    need_qemu!();
    let rounds = std::env::var("CHECK_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let salt: u64 = std::env::var("CHECK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for (cs, bitmap, seed) in [("64k", false, 7), ("4k", false, 91), ("64k", true, 33)] {
        let compared = fuzz_repair(cs, bitmap, rounds, seed ^ salt).await;
        eprintln!("cluster size {cs} (bitmap: {bitmap}): {compared} of {rounds} compared");
        assert!(compared > 0);
    }
}

// ---- the CLI ----

/// `qcow2rs check -r` (the release binary, when built) against `qemu-img check -r`: JSON and
/// exit status.
#[tokio::test(flavor = "multi_thread")]
async fn cli_check_repair() {
    need_qemu!();
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/qcow2rs");
    if !bin.exists() {
        eprintln!(
            "SKIP: {} not built (cargo build --release -p qcow2-cli)",
            bin.display()
        );
        return;
    }
    let d = tmp();
    let dirty = qemu_create(d.path(), "cli-dirty.qcow2", "lazy_refcounts=on", "64M");
    io_crash(&dirty, &["write -P 1 0 2M", "write -P 2 8M 64k"]);
    let leaky = qemu_create(d.path(), "cli-leak.qcow2", "", "64M");
    io(&leaky, &["write -P 1 0 256k", "discard 64k 64k"]);
    let mut r = Raw::load(&leaky);
    let free = (1..r.clusters()).find(|&c| r.refcount(c) == 0).unwrap();
    r.set_refcount(free, 2);
    r.save();
    for img in [&dirty, &leaky] {
        for mode in MODES {
            let q = copy(img, "cli-q");
            let o = copy(img, "cli-o");
            let (qjson, _, qrc) = qemu_check(&q, Some(mode));
            let out = Command::new(&bin)
                .args(["check", "-r", mode_arg(mode), "--output=json", p(&o)])
                .output()
                .unwrap();
            let rc = out.status.code().unwrap();
            assert_eq!(
                rc,
                qrc,
                "exit status of check -r {} on {}",
                mode_arg(mode),
                img.display()
            );
            if let Some(j) = qjson {
                let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(anon(ours), anon(j));
            }
            assert_clean(&o);
        }
    }
}

/// The handle stays usable after a repair (caches and allocator state follow the new
/// metadata), and a repair after writes of the same session sees those writes.
#[tokio::test(flavor = "multi_thread")]
async fn writes_before_and_after_repair() {
    need_qemu!();
    let d = tmp();
    let img = qemu_create(d.path(), "rw.qcow2", "cluster_size=4k", "64M");
    io(
        &img,
        &["write -P 1 0 1M", "write -P 2 5M 128k", "discard 256k 64k"],
    );
    // A data cluster loses its refcount: -r all rebuilds the refcount structure.
    let mut r = Raw::load(&img);
    let ci = r.host_cluster(3);
    r.set_refcount(ci, 0);
    let free = (1..r.clusters())
        .find(|&c| r.refcount(c) == 0 && c != ci)
        .unwrap();
    r.set_refcount(free, 1);
    r.save();
    let theirs = copy(&img, "theirs");
    let mut opts = OpenOptions::default();
    opts.writable = true;
    let i = Image::open(&img, &opts).await.unwrap();
    let rep = check(
        &i,
        &CheckOptions {
            repair: Some(Repair::All),
        },
    )
    .await
    .unwrap();
    assert_eq!(rep.exit_code(), 0, "{}", rep.human());
    assert!(rep
        .messages
        .contains(&"Rebuilding refcount structure".to_string()));
    // Writes after the repair allocate from the new refcount structure.
    let pattern: Vec<u8> = (0..3 << 20).map(|k| (k % 251) as u8).collect();
    i.write_at(&pattern, 20 << 20).await.unwrap();
    i.write_at(&[9u8; 8192], 4096).await.unwrap();
    i.discard(5 << 20, 64 << 10).await.unwrap();
    // A repair in the same session sees those writes (nothing to fix).
    let rep = check(
        &i,
        &CheckOptions {
            repair: Some(Repair::Leaks),
        },
    )
    .await
    .unwrap();
    assert_eq!(rep.exit_code(), 0, "{}", rep.human());
    assert_eq!(
        rep.leaks_fixed + rep.corruptions_fixed,
        0,
        "{}",
        rep.human()
    );
    i.write_at(&[7u8; 65536], 40 << 20).await.unwrap();
    i.close().await.unwrap();
    assert_clean(&img);

    // The same guest data as qemu repairing and writing the same.
    run("qemu-img", &["check", "-q", "-r", "all", p(&theirs)]);
    io(
        &theirs,
        &["write -P 9 4k 8k", "discard 5M 64k", "write -P 7 40M 64k"],
    );
    let ours_raw = export(&img);
    let theirs_raw = export(&theirs);
    let a = std::fs::read(&ours_raw).unwrap();
    let b = std::fs::read(&theirs_raw).unwrap();
    assert_eq!(&a[20 << 20..23 << 20], &pattern[..]);
    assert_eq!(a[..20 << 20], b[..20 << 20]);
    assert_eq!(a[23 << 20..], b[23 << 20..]);
}
