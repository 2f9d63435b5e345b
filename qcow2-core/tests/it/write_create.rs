//! Images made by `create_qcow2` with every option: `qemu-img check` is clean, `qemu-img
//! info` reports the options asked for, and qemu-io reads back what we wrote with
//! `write_at`. Invalid combinations are refused. Needs qemu-img and qemu-io.

use crate::common::*;
use qcow2_core::create::{create_qcow2, CreateOptions, Preallocation};
use qcow2_core::format::header::CompressionType;
use std::path::Path;

/// Patterns written at a few places: the start, across a cluster boundary, the middle, the
/// tail of the disk.
fn spots(size: u64, cs: u64) -> Vec<(u64, u64, u8)> {
    let mut v = vec![(0, 4096.min(size), 0x11)];
    let boundary = cs.max(8192);
    if size > 2 * boundary {
        v.push((boundary - 100, 300, 0x22));
    }
    if size >= 1 << 20 {
        v.push((size / 2, 65536.min(size / 4), 0x33));
        v.push((size - 1000, 1000, 0x44));
    }
    v
}

async fn create_and_verify(dir: &Path, name: &str, co: CreateOptions) -> serde_json::Value {
    let path = dir.join(format!("{name}.qcow2"));
    let size = create_qcow2(&path, &co)
        .await
        .unwrap_or_else(|e| panic!("{name}: create: {e}"));
    assert_clean(&path, &format!("{name}: fresh"));
    let img = open_rw(&path).await;
    assert_eq!(img.size(), size);
    let cs = img.layout().cluster_size;
    let spots = spots(size, cs);
    for &(off, len, pat) in &spots {
        img.write_at(&vec![pat; len as usize], off).await.unwrap();
    }
    img.close().await.unwrap();
    assert_clean(&path, &format!("{name}: after writes"));
    let cmds: Vec<String> = spots
        .iter()
        .map(|&(off, len, pat)| format!("read -P 0x{pat:02x} {off} {len}"))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(&path, None, &cmds);
    qemu_info(&path)
}

fn fs(info: &serde_json::Value) -> &serde_json::Value {
    &info["format-specific"]["data"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_sizes_and_compat() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    for cs in [512u64, 1024, 4096, 65536, 2 << 20] {
        for version in [2u32, 3] {
            let co = CreateOptions {
                size: Some(32 << 20),
                cluster_size: cs,
                version,
                ..Default::default()
            };
            let info = create_and_verify(dir.path(), &format!("cs{cs}-v{version}"), co).await;
            assert_eq!(info["cluster-size"], cs);
            assert_eq!(info["virtual-size"], 32u64 << 20);
            let compat = if version == 2 { "0.10" } else { "1.1" };
            assert_eq!(fs(&info)["compat"], compat, "{info}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refcount_widths_lazy_zstd() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        for cs in [512u64, 65536] {
            let co = CreateOptions {
                size: Some(16 << 20),
                cluster_size: cs,
                refcount_bits: bits,
                lazy_refcounts: bits == 8,
                compression_type: if bits == 4 {
                    CompressionType::Zstd
                } else {
                    CompressionType::Zlib
                },
                ..Default::default()
            };
            let info = create_and_verify(dir.path(), &format!("rc{bits}-{cs}"), co).await;
            let d = fs(&info);
            assert_eq!(d["refcount-bits"], bits, "{info}");
            assert_eq!(d["lazy-refcounts"], bits == 8, "{info}");
            let ct = if bits == 4 { "zstd" } else { "zlib" };
            assert_eq!(d["compression-type"], ct, "{info}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extended_l2() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    for cs in [16384u64, 65536, 2 << 20] {
        let co = CreateOptions {
            size: Some(32 << 20),
            cluster_size: cs,
            extended_l2: true,
            ..Default::default()
        };
        let info = create_and_verify(dir.path(), &format!("extl2-{cs}"), co).await;
        assert_eq!(fs(&info)["extended-l2"], true, "{info}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_files() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    for (raw, ext, prealloc) in [
        (false, false, Preallocation::Off),
        (true, false, Preallocation::Off),
        (true, true, Preallocation::Off),
        (false, true, Preallocation::Metadata),
        (true, false, Preallocation::Full),
        (false, false, Preallocation::Falloc),
    ] {
        let name = format!("df-raw{raw}-ext{ext}-{prealloc:?}");
        let df = dir.path().join(format!("{name}.data"));
        let co = CreateOptions {
            size: Some(16 << 20),
            // Absolute: qemu resolves a relative data file name against its working directory.
            data_file: Some(p(&df).to_string()),
            data_file_raw: raw,
            extended_l2: ext,
            preallocation: prealloc,
            ..Default::default()
        };
        let info = create_and_verify(dir.path(), &name, co).await;
        let d = fs(&info);
        assert_eq!(d["data-file"], p(&df), "{info}");
        assert_eq!(d["data-file-raw"], raw, "{info}");
        if raw {
            // The data file alone is the disk.
            let img = dir.path().join(format!("{name}.qcow2"));
            let content = qemu_export(&img, None, &dir.path().join("x.raw"));
            let data = std::fs::read(&df).unwrap();
            assert_same(
                &data[..content.len()],
                &content,
                &format!("{name}: data file"),
            );
            assert!(
                qemu_map(&img).iter().all(|e| e["present"] == true),
                "{name}: a raw data file maps every cluster"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preallocation_modes() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    for mode in [
        Preallocation::Off,
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        for (cs, bits, ext) in [
            (65536u64, 16u32, false),
            (512, 1, false),
            (4096, 64, false),
            (65536, 16, true),
        ] {
            let name = format!("prealloc-{mode:?}-{cs}-{bits}-{ext}");
            let size = 8u64 << 20;
            let co = CreateOptions {
                size: Some(size),
                cluster_size: cs,
                refcount_bits: bits,
                extended_l2: ext,
                preallocation: mode,
                ..Default::default()
            };
            let info = create_and_verify(dir.path(), &name, co).await;
            let img = dir.path().join(format!("{name}.qcow2"));
            let map = qemu_map(&img);
            if mode == Preallocation::Off {
                continue;
            }
            assert!(
                map.iter().all(|e| e["present"] == true),
                "{name}: every cluster is mapped: {map:?}"
            );
            if mode != Preallocation::Metadata {
                let actual = info["actual-size"].as_u64().unwrap();
                assert!(actual >= size, "{name}: actual size {actual} < {size}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backing_files() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let base_q = qemu_create(dir.path(), "base.qcow2", "", "16M");
    qemu_io(&base_q, None, &["write -P 0x77 0 16M"]);
    let base_r = dir.path().join("base.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&base_r), "12M"],
    );
    qemu_io(&base_r, Some("raw"), &["write -P 0x77 0 12M"]);
    for (base, fmt, size) in [
        ("base.qcow2", Some("qcow2"), None),
        ("base.qcow2", Some("qcow2"), Some(32u64 << 20)),
        ("base.raw", Some("raw"), Some(16 << 20)),
        ("base.raw", None, None),
    ] {
        for ext in [false, true] {
            let name = format!("top-{base}-{fmt:?}-{size:?}-{ext}");
            let co = CreateOptions {
                size,
                backing_file: Some(base.into()),
                backing_format: fmt.map(|f| f.into()),
                extended_l2: ext,
                ..Default::default()
            };
            let info = create_and_verify(dir.path(), &name, co).await;
            assert_eq!(info["backing-filename"], base, "{info}");
            if let Some(f) = fmt {
                assert_eq!(info["backing-filename-format"], f, "{info}");
            }
            let want = size.unwrap_or(if base.ends_with("raw") {
                12 << 20
            } else {
                16 << 20
            });
            assert_eq!(info["virtual-size"], want);
            // Unwritten parts read the backing file.
            let img = dir.path().join(format!("{name}.qcow2"));
            qemu_io(
                &img,
                None,
                &["read -P 0x77 4096 2000", "read -P 0x77 1M 1M"],
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_sizes() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    for (i, size) in [0u64, 512, 1000, 65536 + 512, (1 << 20) + 7]
        .into_iter()
        .enumerate()
    {
        let name = format!("odd-{i}");
        let path = dir.path().join(format!("{name}.qcow2"));
        let co = CreateOptions {
            size: Some(size),
            ..Default::default()
        };
        let got = create_qcow2(&path, &co).await.unwrap();
        assert_eq!(got, size.div_ceil(512) * 512);
        assert_clean(&path, &name);
        let info = qemu_info(&path);
        assert_eq!(info["virtual-size"], got);
        if got > 0 {
            let img = open_rw(&path).await;
            img.write_at(&vec![0x5a; got as usize], 0).await.unwrap();
            img.close().await.unwrap();
            assert_clean(&path, &format!("{name}: written"));
            let l = format!("read -P 0x5a 0 {got}");
            qemu_io(&path, None, &[&l]);
        }
    }
}

#[tokio::test]
async fn invalid_combinations() {
    let dir = tmpdir();
    let path = dir.path().join("bad.qcow2");
    let base = CreateOptions {
        size: Some(1 << 20),
        ..Default::default()
    };
    let cases: Vec<(&str, CreateOptions)> = vec![
        (
            "cluster size 1000",
            CreateOptions {
                cluster_size: 1000,
                ..base.clone()
            },
        ),
        (
            "cluster size 256",
            CreateOptions {
                cluster_size: 256,
                ..base.clone()
            },
        ),
        (
            "cluster size 4M",
            CreateOptions {
                cluster_size: 4 << 20,
                ..base.clone()
            },
        ),
        (
            "extended_l2 with 4K clusters",
            CreateOptions {
                extended_l2: true,
                cluster_size: 4096,
                ..base.clone()
            },
        ),
        (
            "data_file_raw without data_file",
            CreateOptions {
                data_file_raw: true,
                ..base.clone()
            },
        ),
        (
            "refcount_bits 3",
            CreateOptions {
                refcount_bits: 3,
                ..base.clone()
            },
        ),
        (
            "refcount_bits 128",
            CreateOptions {
                refcount_bits: 128,
                ..base.clone()
            },
        ),
        (
            "refcount_bits 0",
            CreateOptions {
                refcount_bits: 0,
                ..base.clone()
            },
        ),
        (
            "v2 with refcount_bits 8",
            CreateOptions {
                version: 2,
                refcount_bits: 8,
                ..base.clone()
            },
        ),
        (
            "v2 with lazy refcounts",
            CreateOptions {
                version: 2,
                lazy_refcounts: true,
                ..base.clone()
            },
        ),
        (
            "v2 with extended_l2",
            CreateOptions {
                version: 2,
                extended_l2: true,
                ..base.clone()
            },
        ),
        (
            "v2 with zstd",
            CreateOptions {
                version: 2,
                compression_type: CompressionType::Zstd,
                ..base.clone()
            },
        ),
        (
            "v2 with a data file",
            CreateOptions {
                version: 2,
                data_file: Some("x.data".into()),
                ..base.clone()
            },
        ),
        (
            "version 4",
            CreateOptions {
                version: 4,
                ..base.clone()
            },
        ),
        (
            "backing file with data_file_raw",
            CreateOptions {
                data_file: Some("x.data".into()),
                data_file_raw: true,
                backing_file: Some("b.qcow2".into()),
                ..base.clone()
            },
        ),
        (
            "backing_fmt without backing file",
            CreateOptions {
                backing_format: Some("raw".into()),
                ..base.clone()
            },
        ),
        (
            "no size and no backing file",
            CreateOptions {
                size: None,
                ..base.clone()
            },
        ),
        (
            "missing backing file",
            CreateOptions {
                backing_file: Some("nonexistent.qcow2".into()),
                ..base.clone()
            },
        ),
        (
            "unknown backing format",
            CreateOptions {
                backing_file: Some("bad.qcow2".into()),
                backing_format: Some("vmdk".into()),
                ..base.clone()
            },
        ),
        (
            "size too large",
            CreateOptions {
                size: Some(1 << 62),
                ..base.clone()
            },
        ),
    ];
    for (what, co) in cases {
        let r = create_qcow2(&path, &co).await;
        assert!(r.is_err(), "{what}: accepted");
        let msg = r.unwrap_err().to_string();
        assert!(!msg.is_empty(), "{what}: empty message");
    }
}
