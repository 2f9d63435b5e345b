//! Persistent dirty bitmaps (add, remove, clear, enable, disable, merge) checked against
//! qemu-img: the same operations done by qemu-img and by us on copies of one image give the
//! same bitmap list (`qemu-img info`) and the same bits, `qemu-img check` is clean after
//! each, qemu reads the bits we wrote (`qemu-img convert --bitmaps` copies them), hostile
//! directory and table entries are refused, a crash at any write leaves the old or the new
//! bitmaps, guest changes are recorded in the enabled bitmaps as qemu records them, and
//! resize keeps them.

use crate::common::*;
use qcow2_core::io::mem::MemStorage;
use qcow2_core::io::Storage;
use qcow2_core::{ErrorKind, Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;

/// (name, granularity, flags) of every bitmap, as `qemu-img info` lists them.
fn qemu_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = qemu_info(path);
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap().to_string(),
                        b["granularity"].as_u64().unwrap(),
                        b["flags"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every bitmap's bits, through our reader.
async fn our_bits(path: &Path) -> Vec<(String, Vec<u8>, u64)> {
    let img = open_ro(path).await;
    let mut out = Vec::new();
    for b in img.bitmaps() {
        let (bits, g) = img.bitmap_content(&b.name).await.unwrap();
        out.push((b.name.clone(), bits, g));
    }
    out
}

fn set_bits(bits: &[u8]) -> Vec<u64> {
    (0..bits.len() as u64 * 8)
        .filter(|&i| bits[(i / 8) as usize] & (1 << (i % 8)) != 0)
        .collect()
}

/// An image made by qemu with two bitmaps that qemu-io's writes made dirty: `a` (64 KiB,
/// then disabled) and `big` (1 MiB, enabled).
fn qemu_image(dir: &Path, opts: &str) -> std::path::PathBuf {
    let path = qemu_create(dir, "img.qcow2", opts, "16M");
    run("qemu-img", &["bitmap", "--add", "-g", "64k", p(&path), "a"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "1M", p(&path), "big"],
    );
    qemu_io(&path, None, &["write 0 64k", "write 5M 100k"]);
    run("qemu-img", &["bitmap", "--disable", p(&path), "a"]);
    qemu_io(&path, None, &["write 10M 4k"]);
    path
}

/// What the CLI sequence does through the library.
async fn ours(path: &Path, op: &[&str]) -> qcow2_core::Result<()> {
    let img = open_rw(path).await;
    let r = match op {
        ["--add", name] => img.bitmap_add(name, None).await,
        ["--add", "-g", g, name] => {
            img.bitmap_add(name, Some(qcow2_core::create::parse_size(g).unwrap()))
                .await
        }
        ["--remove", name] => img.bitmap_remove(name).await,
        ["--clear", name] => img.bitmap_clear(name).await,
        ["--enable", name] => img.bitmap_set_enabled(name, true).await,
        ["--disable", name] => img.bitmap_set_enabled(name, false).await,
        ["--merge", src, name] => img.bitmap_merge(name, None, src).await,
        _ => panic!("{op:?}"),
    };
    img.close().await.unwrap();
    r
}

fn qemu_op(path: &Path, op: &[&str]) {
    let mut args = vec!["bitmap"];
    match op {
        ["--merge", src, name] => args.extend(["--merge", src, p(path), name]),
        [rest @ .., name] => {
            args.extend(rest);
            args.extend([p(path), name]);
        }
        _ => unreachable!(),
    }
    run("qemu-img", &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_ops_match_qemu() {
    if !have_qemu() {
        return;
    }
    for opts in ["", "cluster_size=512", "extended_l2=on,refcount_bits=1"] {
        let dir = tmpdir();
        let base = qemu_image(dir.path(), opts);
        // qemu's own writes: bits of `a` (64 KiB) and `big` (1 MiB).
        let bits = our_bits(&base).await;
        assert_eq!(set_bits(&bits[0].1), vec![0, 80, 81], "{opts}: a");
        assert_eq!(set_bits(&bits[1].1), vec![0, 5, 10], "{opts}: big");
        let mine = dir.path().join("mine.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        std::fs::copy(&base, &mine).unwrap();
        std::fs::copy(&base, &theirs).unwrap();
        let steps: &[&[&str]] = &[
            &["--merge", "big", "a"],
            &["--add", "-g", "512", "fine"],
            &["--merge", "a", "fine"],
            &["--add", "-g", "2G", "huge"],
            &["--merge", "fine", "huge"],
            &["--enable", "a"],
            &["--disable", "big"],
            &["--clear", "a"],
            &["--remove", "big"],
            &["--add", "big"],
            &["--merge", "fine", "big"],
        ];
        for step in steps {
            let what = format!("{opts:?} {step:?}");
            ours(&mine, step)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            qemu_op(&theirs, step);
            assert_clean(&mine, &what);
            assert_eq!(qemu_bitmaps(&mine), qemu_bitmaps(&theirs), "{what}");
            assert_eq!(our_bits(&mine).await, our_bits(&theirs).await, "{what}");
        }
        // Merge from another file (`-b`): qemu's original bitmap `big` into `a`.
        {
            let src = open_ro(&base).await;
            let img = open_rw(&mine).await;
            img.bitmap_merge("a", Some(&src), "big").await.unwrap();
            img.close().await.unwrap();
            run(
                "qemu-img",
                &[
                    "bitmap",
                    "--merge",
                    "big",
                    "-b",
                    p(&base),
                    "-F",
                    "qcow2",
                    p(&theirs),
                    "a",
                ],
            );
            assert_clean(&mine, "merge -b");
            assert_eq!(
                our_bits(&mine).await,
                our_bits(&theirs).await,
                "{opts:?} merge -b"
            );
        }
        // qemu reads the bits we wrote: it copies them into a new image as they are.
        let copy = dir.path().join("copy.qcow2");
        run(
            "qemu-img",
            &["convert", "--bitmaps", "-O", "qcow2", p(&mine), p(&copy)],
        );
        assert_eq!(
            our_bits(&copy).await,
            our_bits(&mine).await,
            "{opts:?} copy"
        );
        // Removing everything leaves no extension and a clean image, for qemu too.
        for b in ["a", "fine", "huge", "big"] {
            ours(&mine, &["--remove", b]).await.unwrap();
        }
        assert!(qemu_bitmaps(&mine).is_empty());
        assert_clean(&mine, "all removed");
        let hdr = std::fs::read(&mine).unwrap();
        assert_eq!(
            u64::from_be_bytes(hdr[88..96].try_into().unwrap()) & 1,
            0,
            "autoclear bit"
        );
        // And qemu works on what we made.
        run("qemu-img", &["bitmap", "--add", p(&mine), "q"]);
        ours(&mine, &["--add", "r"]).await.unwrap();
        run("qemu-img", &["bitmap", "--remove", p(&mine), "q"]);
        assert_clean(&mine, "qemu after us");
        // The default granularity is the cluster size, at least 4 KiB (as QEMU's).
        let gran = if opts.contains("cluster_size=512") {
            4096
        } else {
            65536
        };
        assert_eq!(
            qemu_bitmaps(&mine),
            vec![("r".to_string(), gran, vec!["auto".to_string()])]
        );
    }
}

/// The dirty ranges of the bitmaps qemu-io's writes made dirty, at each bitmap's granularity
/// (what `qemu-img map` over `qemu-nbd -B` reports, checked by the Python tests), and
/// `NotFound` for a missing bitmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_extents_of_qemu_writes() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_image(dir.path(), "");
    let img = open_ro(&path).await;
    const K: u64 = 1024;
    const M: u64 = 1024 * K;
    // `a`: 64 KiB granules; writes at 0 (64k) and 5M (100k), then disabled.
    assert_eq!(
        img.bitmap_extents("a").await.unwrap(),
        vec![(0, 64 * K), (5 * M, 128 * K)]
    );
    // `big`: 1 MiB granules; also the write at 10M.
    assert_eq!(
        img.bitmap_extents("big").await.unwrap(),
        vec![(0, M), (5 * M, M), (10 * M, M)]
    );
    let e = img.bitmap_extents("x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_errors() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_image(dir.path(), "");
    let before = std::fs::read(&path).unwrap();
    let img = open_rw(&path).await;
    let msg = |r: qcow2_core::Result<()>| r.unwrap_err().message().to_string();
    assert_eq!(
        msg(img.bitmap_add("a", None).await),
        "Bitmap already exists: a"
    );
    let e = img.bitmap_add("a", None).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.errno()),
        (ErrorKind::AlreadyExists, libc::EEXIST)
    );
    assert_eq!(
        msg(img.bitmap_remove("x").await),
        "Dirty bitmap 'x' not found"
    );
    let e = img.bitmap_clear("x").await.unwrap_err();
    assert_eq!((e.kind(), e.errno()), (ErrorKind::NotFound, libc::ENOENT));
    assert_eq!(
        msg(img.bitmap_merge("a", None, "x").await),
        "Dirty bitmap 'x' not found"
    );
    assert_eq!(
        msg(img.bitmap_add("x", Some(256)).await),
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(
        msg(img.bitmap_add("x", Some(3 << 10)).await),
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(
        msg(img.bitmap_add("x", Some(4 << 30)).await),
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(
        msg(img.bitmap_add("", None).await),
        "Bitmap name cannot be empty"
    );
    assert!(msg(img.bitmap_add(&"x".repeat(1024), None).await)
        .contains("Name length exceeds maximum (1023 characters)"));
    img.close().await.unwrap();
    assert!(
        std::fs::read(&path).unwrap() == before,
        "refusals changed the file"
    );
    // A different virtual size cannot be merged.
    let other = qemu_create(dir.path(), "other.qcow2", "", "32M");
    run("qemu-img", &["bitmap", "--add", p(&other), "o"]);
    let src = open_ro(&other).await;
    let img = open_rw(&path).await;
    assert_eq!(
        msg(img.bitmap_merge("a", Some(&src), "o").await),
        "Bitmaps are of different sizes (destination size is 16777216, source size is 33554432) \
         and can't be merged"
    );
    img.close().await.unwrap();
    // v2 images cannot hold bitmaps.
    let v2 = qemu_create(dir.path(), "v2.qcow2", "compat=0.10", "1M");
    let img = open_rw(&v2).await;
    assert!(msg(img.bitmap_add("x", None).await)
        .contains("Cannot store dirty bitmaps in qcow2 v2 files"));
    // A bitmap marked in use can only be removed.
    set_flags(&path, 0, 3);
    let img = open_rw(&path).await;
    for r in [
        img.bitmap_clear("a").await,
        img.bitmap_set_enabled("a", false).await,
        img.bitmap_merge("big", None, "a").await,
        img.bitmap_merge("a", None, "big").await,
    ] {
        assert!(
            msg(r).starts_with("Bitmap 'a' is inconsistent and cannot be used"),
            "in use"
        );
    }
    img.bitmap_remove("a").await.unwrap();
    img.close().await.unwrap();
    assert_clean(&path, "in-use bitmap removed");
    assert_eq!(qemu_bitmaps(&path).len(), 1);
}

/// Our v3 images with 512-byte clusters carry a feature name table that fills the first
/// cluster: adding a bitmap leaves that optional table out of the header (as QEMU does)
/// instead of failing with "do not fit in the first cluster".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_on_512_byte_clusters() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = dir.path().join("c512.qcow2");
    qcow2_core::create::create_qcow2(
        &path,
        &qcow2_core::create::CreateOptions {
            size: Some(16 << 20),
            cluster_size: 512,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let img = open_rw(&path).await;
    img.bitmap_add("x", None).await.unwrap();
    img.bitmap_add("y", Some(512)).await.unwrap();
    img.close().await.unwrap();
    assert_clean(&path, "bitmaps on 512-byte clusters");
    assert_eq!(
        qemu_bitmaps(&path),
        vec![
            ("x".to_string(), 4096, vec!["auto".to_string()]),
            ("y".to_string(), 512, vec!["auto".to_string()]),
        ]
    );
}

/// (offset, size) of the bitmap directory, from the header extension.
fn directory(bytes: &[u8]) -> (usize, usize) {
    let hl = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut o = hl;
    loop {
        let t = u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
        let l = u32::from_be_bytes(bytes[o + 4..o + 8].try_into().unwrap()) as usize;
        assert_ne!(t, 0, "no bitmaps extension");
        if t == 0x2385_2875 {
            let ds = u64::from_be_bytes(bytes[o + 16..o + 24].try_into().unwrap());
            let dof = u64::from_be_bytes(bytes[o + 24..o + 32].try_into().unwrap());
            return (dof as usize, ds as usize);
        }
        o += 8 + l.div_ceil(8) * 8;
    }
}

/// Set the flags of directory entry `idx` (entries in order).
fn set_flags(path: &Path, idx: usize, flags: u32) {
    let mut b = std::fs::read(path).unwrap();
    let (d, _) = directory(&b);
    let mut off = d;
    for _ in 0..idx {
        let ns = u16::from_be_bytes(b[off + 18..off + 20].try_into().unwrap()) as usize;
        off += (24 + ns).div_ceil(8) * 8;
    }
    b[off + 12..off + 16].copy_from_slice(&flags.to_be_bytes());
    std::fs::write(path, b).unwrap();
}

/// Hostile directory and table entries: a clear error naming the bitmap directory or
/// table, never a panic, and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bitmap_entries_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_image(dir.path(), "");
    let good = std::fs::read(&path).unwrap();
    let (d, _) = directory(&good);
    let table = u64::from_be_bytes(good[d..d + 8].try_into().unwrap()) as usize;
    type Edit = fn(&mut Vec<u8>, usize, usize);
    let dir_edits: &[(&str, Edit)] = &[
        ("granularity bits 8", |b, d, _| b[d + 17] = 8),
        ("granularity bits 40", |b, d, _| b[d + 17] = 40),
        ("type 2", |b, d, _| b[d + 16] = 2),
        ("unknown flag", |b, d, _| b[d + 15] |= 0x10),
        ("name size 0", |b, d, _| b[d + 18..d + 20].fill(0)),
        ("name past the directory", |b, d, _| {
            b[d + 18..d + 20].copy_from_slice(&0xfff0u16.to_be_bytes())
        }),
        ("extra data", |b, d, _| {
            b[d + 20..d + 24].copy_from_slice(&8u32.to_be_bytes())
        }),
        ("table offset unaligned", |b, d, _| b[d + 7] |= 0x10),
        ("table offset 0", |b, d, _| b[d..d + 8].fill(0)),
        ("table beyond the file", |b, d, _| {
            b[d..d + 8].copy_from_slice(&(1u64 << 50).to_be_bytes())
        }),
        ("table size 0", |b, d, _| b[d + 8..d + 12].fill(0)),
        ("table size huge", |b, d, _| {
            b[d + 8..d + 12].copy_from_slice(&u32::MAX.to_be_bytes())
        }),
        ("duplicate name", |b, d, _| {
            // Rename "big" (entry 2) to "a": same length is not needed, the size field
            // decides; make it one byte "a".
            let ns = u16::from_be_bytes(b[d + 18..d + 20].try_into().unwrap()) as usize;
            let e2 = d + (24 + ns).div_ceil(8) * 8;
            b[e2 + 18..e2 + 20].copy_from_slice(&1u16.to_be_bytes());
            b[e2 + 24] = b'a';
        }),
    ];
    for (what, edit) in dir_edits {
        let mut b = good.clone();
        edit(&mut b, d, table);
        std::fs::write(&path, &b).unwrap();
        let e = Image::open(&path, &OpenOptions::default())
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.to_string().contains("bitmap directory"), "{what}: {e}");
    }
    let table_edits: &[(&str, Edit)] = &[
        ("reserved bits", |b, _, t| b[t + 7] |= 2),
        ("all-ones with a cluster", |b, _, t| {
            b[t..t + 8].copy_from_slice(&0x10001u64.to_be_bytes())
        }),
        ("data cluster unaligned", |b, _, t| {
            b[t..t + 8].copy_from_slice(&0x10200u64.to_be_bytes())
        }),
        ("data cluster beyond the file", |b, _, t| {
            b[t..t + 8].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }),
    ];
    for (what, edit) in table_edits {
        let mut b = good.clone();
        edit(&mut b, d, table);
        std::fs::write(&path, &b).unwrap();
        let img = open_rw(&path).await;
        let e = img.bitmap_content("a").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.to_string().contains("table entry 0"), "{what}: {e}");
        for r in [
            img.bitmap_clear("a").await,
            img.bitmap_remove("a").await,
            img.bitmap_merge("big", None, "a").await,
        ] {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Corrupt, "{what}");
        }
        img.close().await.unwrap();
        assert!(
            std::fs::read(&path).unwrap() == b,
            "{what}: the file changed"
        );
    }
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

/// Crash (every write after the n-th fails) at every write of each operation: qemu finds no
/// corruption, and the bitmaps are the old or the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_crash_at_every_write() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = qemu_image(dir.path(), "cluster_size=4k");
    let image = std::fs::read(&path).unwrap();
    let old = qemu_bitmaps(&path);
    let old_bits = our_bits(&path).await;
    let ops: &[&[&str]] = &[
        &["--add", "new"],
        &["--remove", "big"],
        &["--merge", "big", "a"],
        &["--clear", "big"],
        &["--enable", "a"],
    ];
    let crashed = dir.path().join("crashed.qcow2");
    for op in ops {
        // The state after the operation.
        std::fs::write(&crashed, &image).unwrap();
        ours(&crashed, op).await.unwrap();
        let new = qemu_bitmaps(&crashed);
        let new_bits = our_bits(&crashed).await;
        let (mem, img) = open_mem(image.clone(), &path).await;
        let before = mem.write_count();
        run_on(&img, op).await.unwrap();
        img.close().await.unwrap();
        let total = mem.write_count() - before;
        for n in 0..=total {
            let (mem, img) = open_mem(image.clone(), &path).await;
            mem.fail_writes_after(n);
            if run_on(&img, op).await.is_ok() {
                let _ = img.close().await;
            } else {
                drop(img);
            }
            std::fs::write(&crashed, mem.snapshot()).unwrap();
            let w = format!("{op:?}: crash after write {n} of {total}");
            assert_no_corruption(&crashed, &w);
            let got = qemu_bitmaps(&crashed);
            let bits = our_bits(&crashed).await;
            assert!(
                (got == old && bits == old_bits) || (got == new && bits == new_bits),
                "{w}: {got:?}"
            );
        }
    }
}

async fn run_on(img: &Image, op: &[&str]) -> qcow2_core::Result<()> {
    match op {
        ["--add", name] => img.bitmap_add(name, None).await,
        ["--remove", name] => img.bitmap_remove(name).await,
        ["--clear", name] => img.bitmap_clear(name).await,
        ["--enable", name] => img.bitmap_set_enabled(name, true).await,
        ["--merge", src, name] => img.bitmap_merge(name, None, src).await,
        _ => panic!("{op:?}"),
    }
}

/// (name, flags) of every bitmap as `qemu-img info -U` lists them (the image may be open).
fn qemu_flags_shared(path: &Path) -> Vec<(String, Vec<String>)> {
    let s = run("qemu-img", &["info", "-U", "--output=json", p(path)]);
    let info: serde_json::Value = serde_json::from_str(&s).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"].as_array().unwrap();
                    (
                        b["name"].as_str().unwrap().to_string(),
                        flags.iter().map(|f| f.as_str().unwrap().into()).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The changes both sides make: (qemu-io command, our call).
const CHANGES: &[(&str, u64, u64)] = &[
    ("write", 3 << 20, 5120),
    ("zero", (7 << 20) + 512, 65536),
    ("discard", 12 << 20, 1 << 20),
    ("write", (16 << 20) - 4096, 4096),
];

async fn our_changes(img: &Image) {
    for &(what, off, len) in CHANGES {
        match what {
            "write" => img.write_at(&vec![7u8; len as usize], off).await.unwrap(),
            "zero" => img
                .write_zeroes(off, len, qcow2_core::ZeroMode::Keep)
                .await
                .unwrap(),
            _ => img.discard(off, len).await.unwrap(),
        }
    }
}

fn qemu_changes(path: &Path) {
    let cmds: Vec<String> = CHANGES
        .iter()
        .map(|&(what, off, len)| match what {
            "write" => format!("write -P 7 {off} {len}"),
            "zero" => format!("write -z {off} {len}"),
            _ => format!("discard {off} {len}"),
        })
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    qemu_io(path, Some("qcow2"), &cmds);
}

/// The image of `qemu_image` plus an enabled bitmap of 512-byte granularity.
fn tracking_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = qemu_image(dir, "");
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", p(&path), "fine"],
    );
    let to = dir.join(name);
    std::fs::rename(&path, &to).unwrap();
    to
}

/// Guest writes, write-zeroes and discards are recorded in the enabled bitmaps, as qemu-io
/// records the same changes: while the image is open they are in use on disk, after close
/// qemu lists the same flags and holds the same bits (read by us and by qemu, which copies
/// them with `convert --bitmaps`), the disabled bitmap is unchanged, and check is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_changes_are_recorded_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let theirs = tracking_image(dir.path(), "theirs.qcow2");
    let mine = dir.path().join("mine.qcow2");
    std::fs::copy(&theirs, &mine).unwrap();
    let before = our_bits(&mine).await;
    qemu_changes(&theirs);

    let img = open_rw(&mine).await;
    // Opening writable changes nothing before the first change.
    assert!(qemu_flags_shared(&mine)
        .iter()
        .all(|(_, f)| !f.contains(&"in-use".into())));
    our_changes(&img).await;
    let open = qemu_flags_shared(&mine);
    for (name, flags) in &open {
        let want: Vec<String> = if name == "a" {
            vec![]
        } else {
            vec!["in-use".into(), "auto".into()]
        };
        assert_eq!(flags, &want, "{name} while open");
    }
    // The handle reads its own bitmaps from memory meanwhile.
    let (live, _) = img.bitmap_content("fine").await.unwrap();
    img.close().await.unwrap();
    assert_clean(&mine, "after our changes");
    assert_eq!(qemu_bitmaps(&mine), qemu_bitmaps(&theirs));
    let got = our_bits(&mine).await;
    let want = our_bits(&theirs).await;
    assert_eq!(got, want, "bits after the same changes");
    assert_eq!(got[0], before[0], "the disabled bitmap changed");
    assert_ne!(got[1], before[1], "nothing recorded");
    assert_eq!(got[2].1, live);
    // qemu reads what we stored: it copies the same bits.
    let copy = dir.path().join("copy.qcow2");
    run(
        "qemu-img",
        &["convert", "-O", "qcow2", "--bitmaps", p(&mine), p(&copy)],
    );
    assert_eq!(our_bits(&copy).await, want, "bits as qemu copied them");

    // A second session adds to the first's bits.
    let img = open_rw(&mine).await;
    img.write_at(&[1u8; 512], 9 << 20).await.unwrap();
    img.close().await.unwrap();
    qemu_io(&theirs, Some("qcow2"), &["write 9M 512"]);
    assert_eq!(our_bits(&mine).await, our_bits(&theirs).await);
    assert_clean(&mine, "after a second session");
}

/// `with_live_bitmap` (the view of an NBD export's `qemu:dirty-bitmap:` context on the image
/// it writes to): the first query starts the tracking as a first change does (enabled
/// bitmaps in use on disk, bits as stored), each change shows at once, the disabled bitmap
/// and a read-only handle give `None`, and the bits stored at close are the ones seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_bitmap_view_shows_changes_at_once() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = tracking_image(dir.path(), "img.qcow2");
    let stored = our_bits(&path).await;
    let ro = open_ro(&path).await;
    assert!(ro
        .with_live_bitmap("fine", |_, _| ())
        .await
        .unwrap()
        .is_none());
    drop(ro);
    let img = open_rw(&path).await;
    let view = |img: &Image, name: &'static str| {
        let img = img.clone();
        async move {
            img.with_live_bitmap(name, |bits, g| (bits.to_vec(), g))
                .await
                .unwrap()
        }
    };
    assert!(
        view(&img, "a").await.is_none(),
        "disabled bitmaps are not live"
    );
    let (bits, g) = view(&img, "fine").await.unwrap();
    assert_eq!(g, 512);
    assert_eq!(bits, stored[2].1, "bits as stored");
    assert!(qemu_flags_shared(&path)
        .iter()
        .all(|(n, f)| n == "a" || f.contains(&"in-use".into())));
    img.write_at(&[9u8; 1000], (5 << 20) + 100).await.unwrap();
    let (after, _) = view(&img, "fine").await.unwrap();
    let new: Vec<u64> = set_bits(&after)
        .into_iter()
        .filter(|i| !set_bits(&bits).contains(i))
        .collect();
    assert_eq!(new, vec![10240, 10241, 10242]);
    img.discard(8 << 20, 1 << 20).await.unwrap();
    let (big, gb) = view(&img, "big").await.unwrap();
    assert_eq!(gb, 1 << 20);
    assert!(set_bits(&big).contains(&8));
    let (last, _) = view(&img, "fine").await.unwrap();
    img.close().await.unwrap();
    assert_clean(&path, "after live views");
    assert_eq!(
        our_bits(&path).await[2].1,
        last,
        "stored bits differ from the view"
    );
}

/// A handle dropped without close (as a killed process) leaves the enabled bitmaps in use:
/// qemu judges them inconsistent as after its own crash, check finds no corruption, later
/// sessions leave them in use and do not record in them, and they can be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclosed_handle_leaves_bitmaps_in_use() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = tracking_image(dir.path(), "img.qcow2");
    let img = open_rw(&path).await;
    img.write_at(&[1u8; 4096], 1 << 20).await.unwrap();
    img.flush().await.unwrap();
    drop(img);
    let want = vec![
        ("a".to_string(), vec![]),
        (
            "big".to_string(),
            vec!["in-use".to_string(), "auto".to_string()],
        ),
        (
            "fine".to_string(),
            vec!["in-use".to_string(), "auto".to_string()],
        ),
    ];
    assert_eq!(qemu_flags_shared(&path), want);
    assert_clean(&path, "after a handle was dropped");
    let img = open_rw(&path).await;
    img.write_at(&[1u8; 4096], 2 << 20).await.unwrap();
    let e = img.bitmap_content("big").await.unwrap_err();
    assert!(e.to_string().contains("inconsistent"), "{e}");
    let e = img.resize(32 << 20, false).await.unwrap_err();
    assert!(
        e.to_string().contains("Bitmap 'big' is inconsistent"),
        "{e}"
    );
    img.close().await.unwrap();
    assert_eq!(qemu_flags_shared(&path), want);
    assert_clean(&path, "after a session on in-use bitmaps");
    ours(&path, &["--remove", "big"]).await.unwrap();
    ours(&path, &["--remove", "fine"]).await.unwrap();
    assert_eq!(qemu_flags_shared(&path), want[..1].to_vec());
    assert_clean(&path, "after removing the in-use bitmaps");
}

/// Resizing keeps the bitmaps, as qemu-img resize does: grown with clean bits, cut when
/// shrunk; same flags and bits as qemu-img gives, check clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_keeps_bitmaps_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let theirs = tracking_image(dir.path(), "theirs.qcow2");
    let mine = dir.path().join("mine.qcow2");
    for (size, shrink) in [
        (40u64 << 20, false),
        (6 << 20, true),
        ((6 << 20) + 512, false),
    ] {
        std::fs::copy(&theirs, &mine).unwrap();
        let mut args = vec!["resize", "-q"];
        if shrink {
            args.push("--shrink");
        }
        let s = size.to_string();
        args.extend([p(&theirs), s.as_str()]);
        run("qemu-img", &args);
        let img = open_rw(&mine).await;
        img.write_at(&[3u8; 512], 1 << 20).await.unwrap();
        img.resize(size, shrink).await.unwrap();
        img.close().await.unwrap();
        qemu_io(&theirs, Some("qcow2"), &["write -P 3 1M 512"]);
        let w = format!("resize to {size}");
        assert_clean(&mine, &w);
        assert_eq!(qemu_bitmaps(&mine), qemu_bitmaps(&theirs), "{w}");
        assert_eq!(our_bits(&mine).await, our_bits(&theirs).await, "{w}");
    }
}

/// Snapshot create/delete, commit and amend keep the bitmaps as qemu-img does (snapshot apply
/// is refused, as by qemu-img): same
/// flags and bits as the same command run by qemu-img on a copy, check clean. Commit's writes
/// into the base are recorded in the base's enabled bitmaps. A downgrade to v2 removes them
/// (qemu-img leaks them): none listed, check clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_keep_bitmaps_like_qemu() {
    if !have_qemu() {
        return;
    }
    use qcow2_core::SnapshotKey;
    let dir = tmpdir();
    let orig = tracking_image(dir.path(), "orig.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    let mine = dir.path().join("mine.qcow2");
    let same = |w: &str| {
        let (mine, theirs) = (mine.clone(), theirs.clone());
        let w = w.to_string();
        async move {
            assert_clean(&mine, &w);
            assert_eq!(qemu_bitmaps(&mine), qemu_bitmaps(&theirs), "{w}");
            assert_eq!(our_bits(&mine).await, our_bits(&theirs).await, "{w}");
        }
    };
    // Snapshots; applying one is refused while the image has bitmaps, as by qemu-img.
    std::fs::copy(&orig, &theirs).unwrap();
    std::fs::copy(&orig, &mine).unwrap();
    run("qemu-img", &["snapshot", "-c", "s1", p(&theirs)]);
    qemu_io(&theirs, Some("qcow2"), &["write 4M 64k"]);
    run("qemu-img", &["snapshot", "-c", "s2", p(&theirs)]);
    run("qemu-img", &["snapshot", "-d", "s1", p(&theirs)]);
    let out = sh("qemu-img", &["snapshot", "-a", "s2", p(&theirs)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Device has active dirty bitmaps"),
        "{out:?}"
    );
    let img = open_rw(&mine).await;
    img.snapshot_create("s1").await.unwrap();
    img.write_at(&[0u8; 65536], 4 << 20).await.unwrap();
    img.close().await.unwrap();
    let img = open_rw(&mine).await;
    let key = |s: &str| SnapshotKey::IdOrName(s.to_string());
    img.snapshot_create("s2").await.unwrap();
    img.snapshot_delete(&key("s1")).await.unwrap();
    let e = img.snapshot_apply(&key("s2")).await.unwrap_err();
    assert_eq!(e.message(), "Device has active dirty bitmaps");
    img.close().await.unwrap();
    same("snapshots").await;

    // Commit: the base's enabled bitmaps record what is committed; the overlay's are kept.
    for (tool, top) in [("qemu", &theirs), ("ours", &mine)] {
        let base = dir.path().join(format!("{tool}-base.qcow2"));
        std::fs::copy(&orig, &base).unwrap();
        qemu_overlay(&base, top);
        run("qemu-img", &["bitmap", "--add", p(top), "t"]);
        qemu_io(top, Some("qcow2"), &["write 2M 128k", "write 14M 4k"]);
        if tool == "qemu" {
            run("qemu-img", &["commit", "-q", p(top)]);
        } else {
            qcow2_core::commit::commit(top, &Default::default())
                .await
                .unwrap();
        }
    }
    same("commit (overlay)").await;
    let (mb, tb) = (
        dir.path().join("ours-base.qcow2"),
        dir.path().join("qemu-base.qcow2"),
    );
    assert_clean(&mb, "commit (base)");
    assert_eq!(qemu_bitmaps(&mb), qemu_bitmaps(&tb));
    assert_eq!(our_bits(&mb).await, our_bits(&tb).await, "commit (base)");
    assert_ne!(
        our_bits(&mb).await,
        our_bits(&orig).await,
        "commit not recorded"
    );

    // Amend.
    for (opt, kept) in [("lazy_refcounts=on", true), ("compat=0.10", false)] {
        std::fs::copy(&orig, &theirs).unwrap();
        std::fs::copy(&orig, &mine).unwrap();
        let img = open_rw(&mine).await;
        let mut ao = qcow2_core::jobs::amend::AmendOptions::default();
        let (k, v) = opt.split_once('=').unwrap();
        ao.set(k, v).unwrap();
        qcow2_core::jobs::amend::amend(img, &ao).await.unwrap();
        if kept {
            run("qemu-img", &["amend", "-o", opt, p(&theirs)]);
            same(opt).await;
        } else {
            assert_clean(&mine, opt);
            assert!(qemu_bitmaps(&mine).is_empty(), "{opt}");
        }
    }
}

/// `tracking_image` made with creation options `opts`.
fn tracking_image_opts(dir: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let path = qemu_image(dir, opts);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", p(&path), "fine"],
    );
    let to = dir.join(name);
    std::fs::rename(&path, &to).unwrap();
    to
}

/// `our_changes` with a flush after each.
async fn our_changes_flushing(img: &Image) {
    for (i, &(what, off, len)) in CHANGES.iter().enumerate() {
        match what {
            "write" => img.write_at(&vec![7u8; len as usize], off).await.unwrap(),
            "zero" => img
                .write_zeroes(off, len, qcow2_core::ZeroMode::Keep)
                .await
                .unwrap(),
            _ => img.discard(off, len).await.unwrap(),
        }
        img.flush()
            .await
            .unwrap_or_else(|e| panic!("flush {i}: {e}"));
    }
}

/// A flush stores what the enabled bitmaps recorded, keeping them in use: after flushes and
/// a dropped handle (as a killed process), qemu finds no corruption and lists them in use,
/// and their stored bits (read once the in-use flag is cleared by hand) are what qemu-io
/// recorded for the same changes; flushed and then closed, they equal qemu's bitmaps.
/// With 512-byte clusters the 512-byte-granularity bitmap spans 8 data clusters, so later
/// flushes both rewrite stored parts and add new ones to the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_stores_bitmaps_in_use() {
    if !have_qemu() {
        return;
    }
    for opts in ["", "cluster_size=512"] {
        let dir = tmpdir();
        let theirs = tracking_image_opts(dir.path(), "theirs.qcow2", opts);
        let mine = dir.path().join("mine.qcow2");
        let closed = dir.path().join("closed.qcow2");
        std::fs::copy(&theirs, &mine).unwrap();
        std::fs::copy(&theirs, &closed).unwrap();
        let before = our_bits(&mine).await;
        qemu_changes(&theirs);
        let want = our_bits(&theirs).await;

        let img = open_rw(&mine).await;
        our_changes_flushing(&img).await;
        drop(img);
        let in_use = vec!["in-use".to_string(), "auto".to_string()];
        assert_eq!(
            qemu_flags_shared(&mine),
            vec![
                ("a".to_string(), vec![]),
                ("big".to_string(), in_use.clone()),
                ("fine".to_string(), in_use.clone()),
            ],
            "{opts}: flags after flushes and no close"
        );
        assert_clean(&mine, &format!("{opts}: flushed, not closed"));
        set_flags(&mine, 1, 2);
        set_flags(&mine, 2, 2);
        let got = our_bits(&mine).await;
        assert_ne!(got[2], before[2], "{opts}: nothing stored");
        assert_eq!(got, want, "{opts}: bits stored by the flushes");

        let img = open_rw(&closed).await;
        our_changes_flushing(&img).await;
        img.close().await.unwrap();
        assert_clean(&closed, &format!("{opts}: flushed, then closed"));
        assert_eq!(qemu_bitmaps(&closed), qemu_bitmaps(&theirs), "{opts}");
        assert_eq!(
            our_bits(&closed).await,
            want,
            "{opts}: flushed, then closed"
        );
    }
}

/// A flush writes only what changed: nothing when no bit is new (a rewrite of recorded
/// ranges), and never the header once the bitmaps are in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_writes_only_new_bits() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = tracking_image_opts(dir.path(), "img.qcow2", "cluster_size=512");
    let (mem, img) = open_mem(std::fs::read(&path).unwrap(), &path).await;
    img.write_at(&[1u8; 4096], 1 << 20).await.unwrap();
    img.flush().await.unwrap();
    let header = mem.snapshot()[..512].to_vec();
    let w0 = mem.write_count();
    img.flush().await.unwrap();
    assert_eq!(mem.write_count(), w0, "a flush with nothing new wrote");
    // Rewriting recorded ranges: the guest data only.
    img.write_at(&[2u8; 512], 1 << 20).await.unwrap();
    img.flush().await.unwrap();
    assert_eq!(mem.write_count(), w0 + 1, "a rewrite stored bitmap bits");
    // New bits: in the part stored already (big, fine) and in a new part (fine).
    for off in [(1 << 20) + 8192, 9 << 20] {
        let w = mem.write_count();
        img.write_at(&[3u8; 512], off).await.unwrap();
        img.flush().await.unwrap();
        let n = mem.write_count() - w;
        assert!(n <= 8, "{n} writes for a 512-byte write at {off}");
        assert_eq!(
            mem.snapshot()[..512],
            header[..],
            "the header was rewritten"
        );
    }
    img.close().await.unwrap();
    std::fs::write(&path, mem.snapshot()).unwrap();
    assert_clean(&path, "after close");
}

/// A crash (every write after the n-th fails, the handle is then dropped) at every write of
/// a session of changes and flushes: qemu finds no corruption, and the tracked bitmaps are
/// either untouched (the crash came before they were marked in use) or in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_crash_at_every_write() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let path = tracking_image_opts(dir.path(), "img.qcow2", "cluster_size=512");
    let image = std::fs::read(&path).unwrap();
    let old = qemu_flags_shared(&path);
    async fn session(img: &Image) -> qcow2_core::Result<()> {
        img.write_at(&[1u8; 4096], 1 << 20).await?;
        img.write_at(&[1u8; 512], 9 << 20).await?;
        img.flush().await?;
        img.write_at(&[2u8; 512], (1 << 20) + 8192).await?;
        img.write_at(&[2u8; 512], 3 << 20).await?;
        img.write_at(&[2u8; 512], 15 << 20).await?;
        img.discard(12 << 20, 65536).await?;
        img.flush().await
    }
    let (mem, img) = open_mem(image.clone(), &path).await;
    session(&img).await.unwrap();
    let total = mem.write_count();
    drop(img);
    let in_use = vec!["in-use".to_string(), "auto".to_string()];
    let new = vec![
        ("a".to_string(), vec![]),
        ("big".to_string(), in_use.clone()),
        ("fine".to_string(), in_use),
    ];
    let crashed = dir.path().join("crashed.qcow2");
    for n in 0..=total {
        let (mem, img) = open_mem(image.clone(), &path).await;
        mem.fail_writes_after(n);
        let _ = session(&img).await;
        drop(img);
        std::fs::write(&crashed, mem.snapshot()).unwrap();
        let w = format!("crash after write {n} of {total}");
        assert_no_corruption(&crashed, &w);
        let got = qemu_flags_shared(&crashed);
        assert!(got == old || got == new, "{w}: {got:?}");
    }
}

/// The bits stored on disk of an image still open for writing (its bitmaps in use): a copy
/// whose directory entries are marked consistent by hand, read by us.
async fn stored_bits_while_open(path: &Path, n: usize) -> Vec<(String, Vec<u8>, u64)> {
    let copy = path.with_extension("copy");
    std::fs::copy(path, &copy).unwrap();
    for i in 0..n {
        set_flags(&copy, i, 2);
    }
    let bits = our_bits(&copy).await;
    std::fs::remove_file(&copy).unwrap();
    bits
}

/// A 4 MiB image made by qemu with every cluster allocated, then an enabled bitmap `b0` of
/// 512-byte granularity (so that guest writes are in place and record new bits), and a
/// copy `theirs.qcow2` on which qemu-io makes `writes` (offset, length): the image, the
/// copy, and the bits qemu recorded in the copy.
async fn allocated_tracking_image(
    dir: &Path,
    opts: &str,
    writes: &[(u64, usize)],
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<(String, Vec<u8>, u64)>,
) {
    let path = qemu_create(dir, "img.qcow2", opts, "4M");
    qemu_io(&path, None, &["write -q -P 0x11 0 4M"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", p(&path), "b0"],
    );
    let theirs = dir.join("theirs.qcow2");
    std::fs::copy(&path, &theirs).unwrap();
    let cmds: Vec<String> = writes
        .iter()
        .map(|&(off, len)| format!("write -q -P 0x22 {off} {len}"))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(&theirs, Some("qcow2"), &cmds);
    let want = our_bits(&theirs).await;
    (path, theirs, want)
}

/// Hold the write of the bitmap part (of `cs` bytes) that holds bits 0..=7 only: a
/// flush's store of the first 4 KiB written.
fn hold_first_part(
    hs: &qcow2_core::io::fault::HookStorage,
    cs: usize,
) -> qcow2_core::io::fault::Gate {
    use qcow2_core::io::fault::{Match, Op};
    hs.hold(Match::op(Op::Write).when(move |r| {
        r.data
            .is_some_and(|d| d.len() == cs && d[0] == 0xff && d[1..].iter().all(|&x| x == 0))
    }))
}

/// A flush copies each changed part (a cluster of bitmap data) of a tracked bitmap, then
/// writes the copy. Guest writes go on meanwhile: one that sets new bits in the part whose
/// copy is being written (and in a part not stored yet) must leave that part marked
/// changed, so that the next flush stores those bits, and close as well. Replayed with
/// the flush's first bitmap-data write held at a gate while the guest writes run to
/// completion. The image's clusters are all allocated beforehand, so these guest writes
/// are in place and need no lock the flush holds. Checked: the bits stored by the held
/// flush, by the next flush (read from a copy while the image is open) and after close
/// are what qemu-io records for the same writes, and `qemu-img check` is clean.
/// With 512-byte clusters the bitmap has two parts (the second write dirties both), with
/// 64 KiB clusters one. Fails when the part's changed mark is cleared after its write
/// instead of before its bits are copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_keeps_bits_set_while_their_part_is_written() {
    use std::time::Duration;
    if !have_qemu() {
        return;
    }
    for (opts, cs) in [("", 65536usize), ("cluster_size=512", 512)] {
        let dir = tmpdir();
        // The writes: A before the flush; B (same part as A) and C (the second part with
        // 512-byte clusters) while the flush's write of A's part is held.
        let a = (0u64, 4096usize);
        let b = (1u64 << 20, 4096usize);
        let c = ((3u64 << 20) + 512, 512usize);
        let (path, theirs, want) = allocated_tracking_image(dir.path(), opts, &[a, b, c]).await;
        let only_a = {
            let mut bits = vec![0u8; want[0].1.len()];
            bits[0] = 0xff;
            vec![("b0".to_string(), bits, 512)]
        };

        let (img, hs) = open_hooked(&path).await;
        img.write_at(&[0x22; 4096], a.0).await.unwrap();
        // The part that holds A's bits only: the flush's bitmap-data write.
        let gate = hold_first_part(&hs, cs);
        let i2 = img.clone();
        let flush = tokio::spawn(async move { i2.flush().await });
        tokio::time::timeout(Duration::from_secs(10), gate.wait_arrived(1))
            .await
            .unwrap_or_else(|_| panic!("{opts}: the flush never wrote A's bitmap part"));
        for (off, len) in [b, c] {
            tokio::time::timeout(Duration::from_secs(10), img.write_at(&vec![0x22; len], off))
                .await
                .unwrap_or_else(|_| panic!("{opts}: the write at {off} waited for the flush"))
                .unwrap();
        }
        assert!(!flush.is_finished(), "{opts}: the flush went past the gate");
        gate.release();
        flush.await.unwrap().unwrap();
        let stored = stored_bits_while_open(&path, 1).await;
        assert_eq!(
            set_bits(&stored[0].1)[..8],
            (0..8).collect::<Vec<u64>>(),
            "{opts}: A's bits after the held flush"
        );
        if cs == 65536 {
            // The copy was taken before B and C.
            assert_eq!(stored, only_a, "{opts}: bits stored by the held flush");
        }
        img.flush().await.unwrap();
        let stored = stored_bits_while_open(&path, 1).await;
        assert_eq!(
            set_bits(&stored[0].1),
            set_bits(&want[0].1),
            "{opts}: bits stored by the next flush"
        );
        assert_eq!(stored, want, "{opts}: bits stored by the next flush");
        img.close().await.unwrap();
        assert_clean(&path, &format!("{opts}: closed"));
        assert_eq!(qemu_bitmaps(&path), qemu_bitmaps(&theirs), "{opts}");
        assert_eq!(our_bits(&path).await, want, "{opts}: bits after close");
    }
}

/// A flush whose future is dropped while it writes a bitmap part (a timeout, a cancelled
/// task, a client gone): the part's changed mark, cleared when its bits were copied, and
/// the bitmap's, cleared when the store began, were lost with it, so the next flush and
/// close stored nothing: the bitmap, consistent after close, missed the write. Now the
/// next flush stores the part, and the new cluster the dropped write had taken is freed
/// (`qemu-img check` finds no leak after close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_flush_leaves_its_part_to_the_next_flush() {
    use std::time::Duration;
    if !have_qemu() {
        return;
    }
    for (opts, cs) in [("", 65536usize), ("cluster_size=512", 512)] {
        let dir = tmpdir();
        let (path, theirs, want) = allocated_tracking_image(dir.path(), opts, &[(0, 4096)]).await;
        let (img, hs) = open_hooked(&path).await;
        img.write_at(&[0x22; 4096], 0).await.unwrap();
        let gate = hold_first_part(&hs, cs);
        let dropped = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                r = img.flush() => panic!("{opts}: the flush went past the gate: {r:?}"),
                _ = gate.wait_arrived(1) => {}
            }
        });
        dropped
            .await
            .unwrap_or_else(|_| panic!("{opts}: the flush never wrote the bitmap part"));
        // The held write was dropped with the flush: it never reached the file.
        gate.release();
        img.flush().await.unwrap();
        assert_eq!(
            stored_bits_while_open(&path, 1).await,
            want,
            "{opts}: bits stored by the flush after the dropped one"
        );
        img.close().await.unwrap();
        assert_clean(&path, &format!("{opts}: closed"));
        assert_eq!(qemu_bitmaps(&path), qemu_bitmaps(&theirs), "{opts}");
        assert_eq!(our_bits(&path).await, want, "{opts}: bits after close");
    }
}

/// The start of the tracking (the first change, here `with_live_bitmap`) or a bitmap
/// operation, cut short at each of its storage requests in turn: its future dropped while
/// the request is held (a timeout, a cancelled task), or the request failed. The clusters
/// it had allocated for new bitmap tables and a new directory are referenced by nothing
/// and must be freed: after a later guest write and close, `qemu-img check` finds no leak,
/// the bitmaps are the old or the new ones and none is left in use (the tracking, when it
/// had switched the header before it was cut short, is running and stops at close). A
/// handle poisoned by a cut inside the header switch may leak, never corrupt. Fails when a
/// dropped operation leaves its clusters allocated, or when the tracking's switch counts as
/// failed (not running) though the header already marks the bitmaps in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_short_bitmap_operations_leak_nothing() {
    use qcow2_core::io::fault::{Match, Op};
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let base = tracking_image(dir.path(), "base.qcow2");
    let image = std::fs::read(&base).unwrap();
    let path = dir.path().join("img.qcow2");
    let ops: &[&[&str]] = &[
        &["start"],
        &["--add", "new"],
        &["--clear", "big"],
        &["--merge", "big", "a"],
        &["--remove", "big"],
        &["--enable", "a"],
    ];
    let old = qemu_bitmaps(&base);
    let (mut poisoned, mut cut) = (0, 0);
    for op in ops {
        std::fs::write(&path, &image).unwrap();
        if op[0] != "start" {
            ours(&path, op).await.unwrap();
        }
        let new = qemu_bitmaps(&path);
        // A bitmap operation on a fresh handle, and on one that tracks changes (the
        // operation first stores them and ends the tracking).
        let modes: &[(bool, bool)] = if op[0] == "start" {
            &[(false, false), (true, false)]
        } else {
            &[(false, false), (true, false), (false, true), (true, true)]
        };
        for &(fail, tracking) in modes {
            for n in 0.. {
                let what = format!(
                    "{op:?} {}{} at request {n}",
                    if tracking { "while tracking, " } else { "" },
                    ["dropped", "failed"][fail as usize]
                );
                std::fs::write(&path, &image).unwrap();
                let (img, hs) = open_hooked(&path).await;
                if tracking {
                    img.write_at(&[1u8; 512], 1 << 20).await.unwrap();
                }
                let m = Match::ops(&[Op::Write, Op::Flush, Op::Allocate, Op::WriteZeroes]).skip(n);
                let run = async {
                    if op[0] == "start" {
                        img.with_live_bitmap("fine", |_, _| ()).await.map(|_| ())
                    } else {
                        run_on(&img, op).await
                    }
                };
                let done = if fail {
                    hs.fail(m, libc::EIO);
                    run.await.is_ok()
                } else {
                    let gate = hs.hold(m);
                    let done = tokio::select! {
                        r = run => {
                            r.unwrap();
                            true
                        }
                        _ = gate.wait_arrived(1) => false,
                    };
                    gate.release();
                    done
                };
                hs.clear();
                if done {
                    img.close().await.unwrap();
                    assert_clean(&path, &what);
                    break;
                }
                assert!(n < 100, "{what}: never completes");
                cut += 1;
                if img.is_poisoned() {
                    poisoned += 1;
                    drop(img);
                    assert_no_corruption(&path, &what);
                    continue;
                }
                img.write_at(&[1u8; 512], 9 << 20)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: write: {e}"));
                img.close()
                    .await
                    .unwrap_or_else(|e| panic!("{what}: close: {e}"));
                assert_clean(&path, &what);
                let got = qemu_bitmaps(&path);
                assert!(got == old || got == new, "{what}: {got:?}");
                let (bits, g) = our_bits(&path)
                    .await
                    .into_iter()
                    .find(|b| b.0 == "fine")
                    .map(|b| (b.1, b.2))
                    .unwrap();
                assert_eq!(g, 512);
                assert!(
                    set_bits(&bits).contains(&((9 << 20) / 512)),
                    "{what}: the later write was not recorded"
                );
            }
        }
    }
    assert!(cut > 20 && poisoned < cut, "{cut} cut, {poisoned} poisoned");
}
