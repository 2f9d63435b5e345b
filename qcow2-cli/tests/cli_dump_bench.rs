//! `qcow2rs dump` and `qcow2rs bench` against images made by qemu-img/qemu-io.
//!
//! Needs `qemu-img` and `qemu-io`: without them the tests print a skip notice and pass,
//! except in CI (`CI=true`), where they fail.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2rs");

fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("qemu-img and qemu-io are required for this test in CI");
        }
        eprintln!("skipping: qemu-img/qemu-io not found (install qemu-utils)");
    }
    ok
}

/// A fresh directory for one test under Cargo's per-target temporary directory.
fn test_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli_dump_bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn must(prog: &str, args: &[&str]) {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qcow2rs(args: &[&str]) -> Output {
    run(BIN, args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit non-zero with exactly one line on stderr, and no panic.
fn assert_fails_one_line(args: &[&str]) {
    let o = qcow2rs(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    assert_ne!(o.status.code(), Some(101), "{args:?} panicked: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: stderr is not one line: {err:?}"
    );
    assert!(err.starts_with("qcow2rs: "), "{args:?}: {err:?}");
}

/// 64 MiB, 64 KiB clusters: 1 MiB of data at 0 and at 8 MiB (32 clusters), one zero
/// cluster at 16 MiB.
fn make_plain(dir: &Path) -> String {
    let img = dir.join("plain.qcow2").display().to_string();
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            &img,
            "64M",
        ],
    );
    must(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -q -P 0x11 0 1M",
            "-c",
            "write -q -P 0x22 8M 1M",
            "-c",
            "write -q -z 16M 64k",
            &img,
        ],
    );
    img
}

fn dump_json(img: &str) -> Value {
    let o = qcow2rs(&["dump", "--output=json", img]);
    assert!(
        o.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("dump --output=json prints JSON")
}

#[test]
fn dump_plain_image() {
    if !have_qemu() {
        return;
    }
    let dir = test_dir("plain");
    let img = make_plain(&dir);

    let j = dump_json(&img);
    assert_eq!(j["header"]["cluster-size"], 65536);
    assert_eq!(j["header"]["cluster-bits"], 16);
    assert_eq!(j["header"]["virtual-size"], 64 << 20);
    assert_eq!(j["header"]["version"], 3);
    let st = &j["statistics"];
    assert_eq!(st["virtual-clusters"], 1024);
    assert_eq!(st["allocated-clusters"], 32);
    assert_eq!(st["zero-clusters"], 1);
    assert_eq!(st["compressed-clusters"], 0);
    assert_eq!(st["unallocated-clusters"], 1024 - 33);
    assert_eq!(st["shared-clusters"], 0);
    assert_eq!(j["l2"]["tables"], 1);
    assert!(j["metadata"]["clusters"].as_u64().unwrap() >= 5);
    // qemu-img writes a feature name table.
    assert!(j["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "0x6803f857"));

    let o = qcow2rs(&["dump", &img]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("cluster size: 65536"), "{out}");
    assert!(out.contains("allocated: 32\n"), "{out}");
    assert!(out.contains("zero: 1 (1 plain, 0 preallocated)"), "{out}");
    assert!(out.contains("feature name table"), "{out}");

    // A snapshot, then a write: the rewritten cluster moves, the others become shared.
    must("qemu-img", &["snapshot", "-c", "s1", &img]);
    must(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -q -P 0x33 0 64k", &img],
    );
    let j = dump_json(&img);
    assert_eq!(j["snapshots"][0]["name"], "s1");
    assert_eq!(j["statistics"]["shared-clusters"], 31);
    assert_eq!(j["statistics"]["fragmented-clusters"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dump_compressed_image() {
    if !have_qemu() {
        return;
    }
    let dir = test_dir("compressed");
    let plain = make_plain(&dir);
    let comp = dir.join("comp.qcow2").display().to_string();
    must(
        "qemu-img",
        &["convert", "-c", "-f", "qcow2", "-O", "qcow2", &plain, &comp],
    );
    let j = dump_json(&comp);
    let st = &j["statistics"];
    assert_eq!(st["compressed-clusters"], 32);
    assert_eq!(st["allocated-clusters"], 0);
    // Pattern-filled clusters compress very well.
    assert!(st["compression-ratio"].as_f64().unwrap() > 10.0, "{st}");
    let o = qcow2rs(&["dump", &comp]);
    assert!(stdout(&o).contains("compressed: 32 ("), "{}", stdout(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_reads() {
    if !have_qemu() {
        return;
    }
    let dir = test_dir("bench");
    let img = make_plain(&dir);
    let o = qcow2rs(&["bench", "-c", "1000", "-d", "8", &img]);
    assert!(
        o.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "Sending 1000 read requests, 4096 bytes each, 8 in parallel (starting at offset 0, step size 4096)"
    );
    assert!(
        lines.last().unwrap().starts_with("Run completed in "),
        "{out}"
    );
    assert!(out.ends_with(" seconds.\n"), "{out}");

    // O_DIRECT, another engine, a step that wraps around the end of the image.
    for engine in ["threads", "io_uring"] {
        let o = qcow2rs(&[
            "bench", "-c", "300", "-d", "4", "-t", "none", "-i", engine, "-s", "64k", "-S", "7M",
            "-o", "1M", &img,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || err.contains("io_uring"),
            "bench -i {engine} failed: {err}"
        );
        if o.status.success() {
            assert!(stdout(&o).starts_with(
                "Sending 300 read requests, 65536 bytes each, 4 in parallel (starting at offset 1048576, step size 7340032)"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_writes() {
    if !have_qemu() {
        return;
    }
    let dir = test_dir("write");
    let img = dir.join("w.qcow2").display().to_string();
    must("qemu-img", &["create", "-q", "-f", "qcow2", &img, "16M"]);
    for extra in [
        &[][..],
        &["--flush-interval=64"],
        &["--flush-interval=64", "--no-drain"],
    ] {
        let mut args = vec![
            "bench",
            "-w",
            "-c",
            "512",
            "-d",
            "8",
            "-s",
            "8k",
            "--pattern=0x5a",
        ];
        args.extend_from_slice(extra);
        args.push(&img);
        let o = qcow2rs(&args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = stdout(&o);
        assert!(out.starts_with("Sending 512 write requests, 8192 bytes each, 8 in parallel"));
        assert!(
            out.lines().last().unwrap().starts_with("Run completed in "),
            "{out}"
        );
        // 512 * 8 KiB = 4 MiB written from offset 0; the image stays consistent.
        must("qemu-img", &["check", "-q", &img]);
        must(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -q -P 0x5a 0 4M",
                "-c",
                "read -q -P 0 4M 12M",
                &img,
            ],
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments() {
    if !have_qemu() {
        return;
    }
    let dir = test_dir("bad");
    let img = make_plain(&dir);
    let garbage = dir.join("garbage.qcow2");
    let mut g = b"QFI\xfb\0\0\0\x03".to_vec();
    g.resize(4096, 0xff);
    std::fs::write(&garbage, &g).unwrap();
    let garbage = garbage.display().to_string();
    let missing = dir.join("missing.qcow2").display().to_string();

    assert_fails_one_line(&["dump"]);
    assert_fails_one_line(&["dump", &img, &img]);
    assert_fails_one_line(&["dump", "--output=xml", &img]);
    assert_fails_one_line(&["dump", "-f", "raw", &img]);
    assert_fails_one_line(&["dump", &missing]);
    assert_fails_one_line(&["dump", &garbage]);
    assert_fails_one_line(&["bench"]);
    assert_fails_one_line(&["bench", "-c", "abc", &img]);
    assert_fails_one_line(&["bench", "-d", "0", &img]);
    assert_fails_one_line(&["bench", "-s", "1x", &img]);
    assert_fails_one_line(&["bench", "-t", "bogus", &img]);
    assert_fails_one_line(&["bench", "-i", "bogus", &img]);
    assert_fails_one_line(&["bench", "--flush-interval=8", &img]);
    assert_fails_one_line(&["bench", "-w", "-d", "16", "--flush-interval=8", &img]);
    assert_fails_one_line(&["bench", "-w", "--pattern=256", &img]);
    assert_fails_one_line(&["bench", "--bogus", &img]);
    assert_fails_one_line(&["bench", &missing]);
    // Starting past the end: the first request fails, as in qemu-img.
    assert_fails_one_line(&["bench", "-c", "10", "-o", "64M", &img]);
    let _ = std::fs::remove_dir_all(&dir);
}
