//! Random concurrent writes, write-zeroes, discards (and compressed writes where allowed)
//! on every kind of image qemu-img makes (and on images we create), checked afterwards
//! with `qemu-img check`, `qemu-img compare` against a raw mirror, and our own reader.
//! Needs qemu-img and qemu-io.

use crate::common::*;
use qcow2_core::create::{create_qcow2, CreateOptions, Preallocation};
use qcow2_core::format::header::CompressionType;
use qcow2_core::{Image, OpenOptions};
use std::path::Path;

/// Data qemu-io puts in every image before the test (offsets within 12 MiB).
const FILL: &[&str] = &[
    "write -P 0x11 0 1M",
    "write -P 0x22 3M 100k",
    "write -P 0x33 5000 3000",
    "write -z 6M 512k",
    "write -P 0x44 8M 70k",
    "write -P 0x55 11M 1M",
    "discard 11M 64k",
];

#[derive(Clone, Default)]
struct Opts {
    compressed: bool,
    snapshot: bool,
    bitmap: bool,
    rounds: Option<usize>,
    max_len: Option<u64>,
}

fn fill(img: &Path) {
    qemu_io(img, None, FILL);
}

/// The common part: export, random workload, close, check, compare, re-read.
async fn exercise(dir: &Path, img: &Path, o: Opts) {
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let mut mirror = qemu_export(img, None, &dir.join("before.raw"));
    let snap_before = if o.snapshot {
        Some(qemu_export(img, Some("s1"), &dir.join("snap-before.raw")))
    } else {
        None
    };
    let mut rng = rng(seed_of(&name));
    let image = open_rw(img).await;
    let cs = image.layout().cluster_size;
    if o.bitmap {
        // The first write marks the enabled bitmaps in use on disk before anything else;
        // the "bitmaps consistent" autoclear bit stays set.
        let data = vec![0x5au8; 4096];
        image.write_at(&data, 12345).await.unwrap();
        mirror[12345..12345 + 4096].copy_from_slice(&data);
        let hdr = std::fs::read(img).unwrap();
        let autoclear = u64::from_be_bytes(hdr[88..96].try_into().unwrap());
        assert_eq!(autoclear & 1, 1, "bitmaps autoclear bit cleared by a write");
        let s = run("qemu-img", &["info", "-U", "--output=json", p(img)]);
        assert!(
            s.contains("in-use"),
            "bitmaps not in use after the first write: {s}"
        );
    }
    let w = Workload {
        rounds: o.rounds.unwrap_or(80),
        tasks: 6,
        max_len: o.max_len.unwrap_or((3 * cs).clamp(4096, 1 << 20)),
        compressed: o.compressed,
        ..Default::default()
    };
    random_workload(&image, &mut mirror, &mut rng, &w).await;
    image.close().await.unwrap();

    assert_clean(img, &name);
    let mirror_path = dir.join("mirror.raw");
    std::fs::write(&mirror_path, &mirror).unwrap();
    qemu_compare_raw(&mirror_path, img, &name);
    let again = open_ro(img).await;
    assert_same(
        &read_all(&again).await,
        &mirror,
        &format!("{name}: our re-read"),
    );
    drop(again);
    if let Some(before) = snap_before {
        let after = qemu_export(img, Some("s1"), &dir.join("snap-after.raw"));
        assert_same(&after, &before, &format!("{name}: snapshot s1 content"));
    }
    if o.bitmap {
        // Closed: consistent again, and the first write is recorded.
        let info = qemu_info(img);
        let list = info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!list.is_empty(), "bitmaps dropped: {info}");
        let again = open_ro(img).await;
        for b in list {
            let flags = b["flags"].as_array().unwrap();
            assert!(
                !flags.iter().any(|f| f == "in-use"),
                "bitmap still in use after close: {info}"
            );
            let (bits, g) = again
                .bitmap_content(b["name"].as_str().unwrap())
                .await
                .unwrap();
            for off in [12345u64, 12345 + 4095] {
                let i = off / g;
                assert!(
                    bits[(i / 8) as usize] & (1 << (i % 8)) != 0,
                    "{name}: write at {off} not recorded in {}",
                    b["name"]
                );
            }
        }
    }
    // A second session on the same image, after a close: writes still work and stay clean.
    let image = open_rw(img).await;
    let w2 = Workload {
        rounds: 8,
        ..w.clone()
    };
    random_workload(&image, &mut mirror, &mut rng, &w2).await;
    image.close().await.unwrap();
    assert_clean(img, &format!("{name} (second session)"));
    std::fs::write(&mirror_path, &mirror).unwrap();
    qemu_compare_raw(&mirror_path, img, &format!("{name} (second session)"));
}

/// qemu-img create + qemu-io fill + exercise.
async fn qemu_variant(name: &str, opts: &str, size: &str, o: Opts) {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let img = qemu_create(dir.path(), &format!("{name}.qcow2"), opts, size);
    fill(&img);
    exercise(dir.path(), &img, o).await;
}

fn compressed() -> Opts {
    Opts {
        compressed: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v2_compat_0_10() {
    qemu_variant("v2", "compat=0.10", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v3_cluster_512() {
    qemu_variant("cs512", "cluster_size=512", "16M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v3_cluster_4k() {
    qemu_variant("cs4k", "cluster_size=4096", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v3_cluster_64k() {
    qemu_variant("cs64k", "cluster_size=65536", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v3_cluster_2m() {
    qemu_variant(
        "cs2m",
        "cluster_size=2M",
        "64M",
        Opts {
            compressed: true,
            rounds: Some(25),
            max_len: Some(5 << 20),
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refcount_bits_1() {
    qemu_variant(
        "rc1",
        "refcount_bits=1,cluster_size=4096",
        "32M",
        compressed(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refcount_bits_8() {
    qemu_variant("rc8", "refcount_bits=8", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refcount_bits_64() {
    qemu_variant(
        "rc64",
        "refcount_bits=64,cluster_size=512",
        "16M",
        compressed(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extended_l2() {
    qemu_variant("extl2", "extended_l2=on", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extended_l2_over_backing() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let base = qemu_create(dir.path(), "base.qcow2", "", "32M");
    qemu_io(
        &base,
        None,
        &[
            "write -P 0x61 0 20M",
            "write -P 0x62 25M 3M",
            "write -z 1M 64k",
        ],
    );
    let top = qemu_create(
        dir.path(),
        "extl2-top.qcow2",
        "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2",
        "32M",
    );
    fill(&top);
    exercise(dir.path(), &top, compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_refcounts() {
    qemu_variant("lazy", "lazy_refcounts=on", "32M", compressed()).await;
}

async fn compressed_variant(name: &str, ctype: &str) {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let raw = dir.path().join("src.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "32M"]);
    qemu_io(
        &raw,
        Some("raw"),
        &[
            "write -P 0x11 0 4M",
            "write -P 0x22 6M 1M",
            "write -P 0x33 12345 77777",
            "write -P 0x44 20M 3M",
        ],
    );
    let img = dir.path().join(format!("{name}.qcow2"));
    let o = format!("compression_type={ctype}");
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "-o", &o, p(&raw), p(&img)],
    );
    assert!(qemu_map(&img).iter().any(|e| e["compressed"] == true));
    exercise(dir.path(), &img, compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_zlib() {
    compressed_variant("zlib", "zlib").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_zstd() {
    compressed_variant("zstd", "zstd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chain_raw_base_larger_top() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&base), "10M"]);
    qemu_io(
        &base,
        Some("raw"),
        &["write -P 0x71 0 10M", "write -P 0x72 9M 1M"],
    );
    let top = qemu_create(
        dir.path(),
        "chain-top.qcow2",
        "backing_file=base.raw,backing_fmt=raw",
        "32M",
    );
    fill(&top);
    exercise(dir.path(), &top, compressed()).await;
}

/// qemu-img resolves a relative data_file name against its working directory: give an
/// absolute one.
async fn data_file_variant(name: &str, raw: bool) {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let df = dir.path().join(format!("{name}.data"));
    let mut opts = format!("data_file={}", p(&df));
    if raw {
        opts += ",data_file_raw=on";
    }
    let img = qemu_create(dir.path(), &format!("{name}.qcow2"), &opts, "32M");
    fill(&img);
    exercise(dir.path(), &img, Opts::default()).await;
    if raw {
        // The data file is the guest content.
        let mirror = qemu_export(&img, None, &dir.path().join("final.raw"));
        let data = std::fs::read(&df).unwrap();
        assert_same(&data[..mirror.len()], &mirror, "raw data file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_file_raw() {
    data_file_variant("dfraw", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_file_not_raw() {
    data_file_variant("df", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prealloc_metadata() {
    qemu_variant("pmeta", "preallocation=metadata", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prealloc_falloc() {
    qemu_variant("pfalloc", "preallocation=falloc", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prealloc_full() {
    qemu_variant("pfull", "preallocation=full", "32M", compressed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_snapshot() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let img = qemu_create(dir.path(), "snap.qcow2", "", "32M");
    fill(&img);
    qemu_io(&img, None, &["write -c -P 0x66 16M 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    qemu_io(&img, None, &["write -P 0x77 2M 64k"]);
    exercise(
        dir.path(),
        &img,
        Opts {
            compressed: true,
            snapshot: true,
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bitmap() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let img = qemu_create(dir.path(), "bitmap.qcow2", "", "32M");
    run("qemu-img", &["bitmap", "--add", p(&img), "b0"]);
    fill(&img);
    let info = qemu_info(&img);
    assert!(
        info["format-specific"]["data"]["bitmaps"].is_array(),
        "qemu did not make a bitmap: {info}"
    );
    exercise(
        dir.path(),
        &img,
        Opts {
            compressed: true,
            bitmap: true,
            ..Default::default()
        },
    )
    .await;
}

/// The header is rewritten (bitmaps marked in use, then stored): the backing file name and
/// format must survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bitmap_over_backing() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let base = qemu_create(dir.path(), "bbase.qcow2", "", "32M");
    qemu_io(&base, None, &["write -P 0x61 0 32M"]);
    let img = qemu_create(
        dir.path(),
        "bitmap-top.qcow2",
        "backing_file=bbase.qcow2,backing_fmt=qcow2,cluster_size=4096",
        "32M",
    );
    run("qemu-img", &["bitmap", "--add", p(&img), "b0"]);
    run("qemu-img", &["bitmap", "--add", "-g", "512", p(&img), "b1"]);
    fill(&img);
    exercise(
        dir.path(),
        &img,
        Opts {
            compressed: true,
            bitmap: true,
            ..Default::default()
        },
    )
    .await;
    let info = qemu_info(&img);
    assert_eq!(info["backing-filename"], "bbase.qcow2", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn size_not_cluster_multiple() {
    // 32 MiB + 1.5 KiB.
    qemu_variant("odd", "", "33555968", compressed()).await;
}

async fn our_variant(name: &str, co: CreateOptions, size: u64) {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let img = dir.path().join(format!("{name}.qcow2"));
    let co = CreateOptions {
        size: Some(size),
        // Absolute: qemu resolves a relative data file name against its working directory.
        data_file: co.data_file.map(|d| p(&dir.path().join(d)).to_string()),
        ..co
    };
    let no_compress = co.data_file.is_some();
    create_qcow2(&img, &co).await.unwrap();
    assert_clean(&img, &format!("{name}: fresh"));
    fill(&img);
    exercise(
        dir.path(),
        &img,
        Opts {
            compressed: !no_compress,
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ours_default() {
    our_variant("ours-default", CreateOptions::default(), 32 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ours_v2() {
    let co = CreateOptions {
        version: 2,
        ..Default::default()
    };
    our_variant("ours-v2", co, 32 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ours_small_clusters_rc1() {
    let co = CreateOptions {
        cluster_size: 512,
        refcount_bits: 1,
        ..Default::default()
    };
    our_variant("ours-512-rc1", co, 16 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ours_extended_zstd() {
    let co = CreateOptions {
        extended_l2: true,
        compression_type: CompressionType::Zstd,
        cluster_size: 32768,
        ..Default::default()
    };
    our_variant("ours-extl2-zstd", co, 32 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ours_data_file_raw() {
    let co = CreateOptions {
        data_file: Some("ours-df.data".into()),
        data_file_raw: true,
        ..Default::default()
    };
    our_variant("ours-dfraw", co, 32 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ours_data_file_raw_extended() {
    let co = CreateOptions {
        data_file: Some("ours-dfx.data".into()),
        data_file_raw: true,
        extended_l2: true,
        ..Default::default()
    };
    our_variant("ours-dfraw-ext", co, 32 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ours_prealloc_metadata_rc64() {
    let co = CreateOptions {
        preallocation: Preallocation::Metadata,
        refcount_bits: 64,
        cluster_size: 4096,
        ..Default::default()
    };
    our_variant("ours-pmeta", co, 32 << 20).await;
}

/// The corrupt bit: writable open is refused with a clear error, read-only open works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_bit_refuses_writes() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let img = qemu_create(dir.path(), "corrupt.qcow2", "", "16M");
    qemu_io(&img, None, &["write -P 0x42 0 64k"]);
    let mut b = std::fs::read(&img).unwrap();
    let inc = u64::from_be_bytes(b[72..80].try_into().unwrap()) | 2;
    b[72..80].copy_from_slice(&inc.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let err = Image::open(&img, &{
        let mut o = OpenOptions::default();
        o.writable = true;
        o
    })
    .await
    .err()
    .expect("writable open of a corrupt image must fail");
    assert!(
        err.to_string().contains("corrupt"),
        "error does not say why: {err}"
    );
    let ro = open_ro(&img).await;
    let mut buf = vec![0u8; 65536];
    ro.read_at(&mut buf, 0).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0x42));
    assert!(ro.write_at(&[1], 0).await.is_err());
}
