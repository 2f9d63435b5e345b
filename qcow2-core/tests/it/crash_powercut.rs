//! Power cuts (issue 6): random workloads run on an image whose files are
//! [`qcow2_core::io::powercut`] storage, which logs every write, discard, `set_len` and
//! flush. For many cut points of the log, the disk as it could be after a power cut there
//! (everything before the last completed flush, any subset of the later changes, writes torn
//! at 4 KiB boundaries, nothing after the cut) is written to a file and checked:
//!
//! - `qemu-img check` finds no corruption (leaks are allowed);
//! - our reader opens it, and every byte holds the guest content of the last flush the guest
//!   saw complete before the cut, or a value that a request issued after that flush wrote;
//! - on a sample of cuts, our `check -r all` leaves an image `qemu-img check` finds clean,
//!   and the internal snapshot of the image (if any) is intact.
//!
//! Scenarios cover allocating writes, partial-cluster writes over a backing file and over
//! compressed clusters (`qemu-img convert -c`), discards, write-zeroes (keep and unmap),
//! compressed writes, writes to clusters shared with an internal snapshot, refcount-table
//! growth, L1 growth (resize), extended L2, 512 B to 2 MiB clusters, refcount widths 1 to 64
//! and an external data file.
//!
//! Knobs: `QCOW2RS_POWERCUT_CUTS=N` cut points per scenario (default 220, 2,200 in all; the cut points are
//! all log positions, repeated with other survivor seeds when N exceeds them),
//! `QCOW2RS_POWERCUT_ROUNDS=R` makes the workloads R times longer,
//! `QCOW2RS_POWERCUT_REPAIR=K` runs the repair on every K-th cut (default 8),
//! `QCOW2_TEST_SEED` changes the workloads. A failure names the scenario, the workload seed,
//! the cut and the survivor seed.

use crate::common::*;
use qcow2_core::check::{check, CheckOptions, Repair};
use qcow2_core::io::powercut::{PowerCut, Survivors};
use qcow2_core::{Image, OpenOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Base {
    /// `qemu-img create`, then qemu-io writes (some compressed).
    Plain,
    /// Over a qcow2 backing file filled with data.
    Backing,
    /// `qemu-img convert -c` of a raw file full of data: (almost) every cluster compressed.
    Converted,
}

struct Scenario {
    name: &'static str,
    opts: &'static str,
    size: u64,
    base: Base,
    snapshot: bool,
    /// Snapshot operations in the workload: create `s2` a third of the way, delete `s1`
    /// (needs `snapshot`) two thirds of the way.
    snapshot_ops: bool,
    data_file: bool,
    compressed_writes: bool,
    /// Grow the disk to this size halfway.
    resize_to: Option<u64>,
    rounds: usize,
    max_len: u64,
}

impl Scenario {
    fn new(name: &'static str, opts: &'static str, size: u64) -> Scenario {
        Scenario {
            name,
            opts,
            size,
            base: Base::Plain,
            snapshot: false,
            snapshot_ops: false,
            data_file: false,
            compressed_writes: false,
            resize_to: None,
            rounds: 40,
            max_len: 200_000,
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Run a command in `dir`; it must succeed.
fn run_in(dir: &Path, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes that compress well but differ from cluster to cluster.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if (i / 512) % 3 == 0 {
                0
            } else {
                seed.wrapping_add((i / 4096) as u8) ^ ((i / 64) as u8 & 3)
            }
        })
        .collect()
}

/// Make the image of a scenario in `dir` (`img.qcow2`, with `data.raw` if it has an
/// external data file); returns the guest content and, with a snapshot, the snapshot's.
fn make_image(dir: &Path, s: &Scenario) -> (Vec<u8>, Option<Vec<u8>>) {
    let size = s.size.to_string();
    let mut opts = s.opts.to_string();
    let add = |o: &mut String, x: &str| {
        if !o.is_empty() {
            o.push(',');
        }
        o.push_str(x);
    };
    if s.data_file {
        add(&mut opts, "data_file=data.raw");
    }
    match s.base {
        Base::Plain => {
            let mut a = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                a.extend(["-o", opts.as_str()]);
            }
            a.extend(["img.qcow2", size.as_str()]);
            run_in(dir, "qemu-img", &a);
            let mut cmds = vec!["write -P 0x11 0 300k", "write -P 0x22 1M 64k"];
            let small = !s.opts.contains("cluster_size=2M");
            if s.size >= 4 << 20 {
                if !s.data_file && !s.opts.contains("refcount_bits=1") && small {
                    cmds.push("write -c -P 0x33 2M 128k");
                }
                cmds.push("write -z 3M 128k");
            }
            let mut a: Vec<&str> = vec![];
            for c in &cmds {
                a.extend(["-c", c]);
            }
            a.push("img.qcow2");
            run_in(dir, "qemu-io", &a);
        }
        Base::Backing => {
            run_in(
                dir,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "base.qcow2", size.as_str()],
            );
            run_in(
                dir,
                "qemu-io",
                &[
                    "-c",
                    "write -P 0x44 0 3M",
                    "-c",
                    "write -P 0x55 5M 1M",
                    "base.qcow2",
                ],
            );
            let base = dir.join("base.qcow2");
            let b = format!("backing_file={},backing_fmt=qcow2", p(&base));
            add(&mut opts, &b);
            run_in(
                dir,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", &opts, "img.qcow2"],
            );
            run_in(
                dir,
                "qemu-io",
                &["-c", "write -P 0x66 1M 100k", "img.qcow2"],
            );
        }
        Base::Converted => {
            let raw = dir.join("src.raw");
            std::fs::write(&raw, pattern(s.size as usize, 0x70)).unwrap();
            let mut a = vec!["convert", "-c", "-O", "qcow2"];
            if !opts.is_empty() {
                a.extend(["-o", opts.as_str()]);
            }
            a.extend(["src.raw", "img.qcow2"]);
            run_in(dir, "qemu-img", &a);
        }
    }
    let img = dir.join("img.qcow2");
    let snap = if s.snapshot {
        run_in(dir, "qemu-img", &["snapshot", "-c", "s1", "img.qcow2"]);
        Some(qemu_export(&img, Some("s1"), &dir.join("s1.raw")))
    } else {
        None
    };
    (qemu_export(&img, None, &dir.join("start.raw")), snap)
}

/// One guest request of a workload.
#[derive(Debug, Clone)]
enum GOp {
    Io(Op),
    Resize(u64),
}

/// What the workload did, for the cut checks.
struct Record {
    /// (log position when the guest saw the flush complete, guest content then, index of
    /// the first request issued after it).
    flushed: Vec<(usize, Arc<Vec<u8>>, usize)>,
    /// (log position when the request was issued, request).
    issued: Vec<(usize, GOp)>,
    /// The guest content when snapshot `s2` was created (scenarios with snapshot ops).
    s2: Option<Arc<Vec<u8>>>,
}

fn pick_op(rng: &mut StdRng, size: u64, cs: u64, s: &Scenario) -> Op {
    let w = Workload {
        max_len: s.max_len,
        compressed: s.compressed_writes,
        reads: false,
        flushes: false,
        ..Default::default()
    };
    random_op(rng, size, cs, &w)
}

async fn open_pc(
    pc: &PowerCut,
    dir: &Path,
    s: &Scenario,
    image: Vec<u8>,
    data: Option<Vec<u8>>,
) -> Image {
    let f = pc.add_file(image);
    let mut opts = OpenOptions::default();
    opts.writable = true;
    opts.cache_size = cache_size();
    let path = dir.join("img.qcow2");
    let r = match data {
        Some(d) if s.data_file => {
            let df = pc.add_file(d);
            Image::open_storage_with_data(f, &path, df, &dir.join("data.raw"), &opts).await
        }
        _ => Image::open_storage(f, &path, &opts).await,
    };
    r.unwrap_or_else(|e| panic!("{}: open: {e}", s.name))
}

/// Run the workload of a scenario on power-cut storage.
async fn run_workload(
    pc: &PowerCut,
    img: Image,
    start: Vec<u8>,
    s: &Scenario,
    seed: u64,
) -> Record {
    let mut rng = StdRng::seed_from_u64(seed);
    let cs = img.layout().cluster_size;
    let mut model = start;
    let mut rec = Record {
        flushed: vec![(0, Arc::new(model.clone()), 0)],
        issued: Vec::new(),
        s2: None,
    };
    let mut resized = false;
    let rounds = s.rounds * env_usize("QCOW2RS_POWERCUT_ROUNDS", 1).max(1);
    for round in 0..rounds {
        if let (Some(n), false) = (s.resize_to, resized) {
            if round >= rounds / 2 {
                resized = true;
                rec.issued.push((pc.len(), GOp::Resize(n)));
                img.resize(n, false)
                    .await
                    .unwrap_or_else(|e| panic!("{}: resize: {e}", s.name));
                model.resize(n as usize, 0);
                continue;
            }
        }
        if s.snapshot_ops && (round == rounds / 3 || round == 2 * rounds / 3) {
            // Each operation makes everything before it durable, like a flush.
            if round == rounds / 3 {
                img.snapshot_create("s2")
                    .await
                    .unwrap_or_else(|e| panic!("{}: snapshot create: {e}", s.name));
                rec.s2 = Some(Arc::new(model.clone()));
            } else {
                img.snapshot_delete(&"s1".into())
                    .await
                    .unwrap_or_else(|e| panic!("{}: snapshot delete: {e}", s.name));
            }
            rec.flushed
                .push((pc.len(), Arc::new(model.clone()), rec.issued.len()));
            continue;
        }
        if rng.gen_range(0..5) == 0 {
            img.flush()
                .await
                .unwrap_or_else(|e| panic!("{}: flush: {e}", s.name));
            rec.flushed
                .push((pc.len(), Arc::new(model.clone()), rec.issued.len()));
            continue;
        }
        // A few requests at once, on disjoint ranges.
        let size = model.len() as u64;
        let n = rng.gen_range(1..=3);
        let mut ops: Vec<Op> = Vec::new();
        while ops.len() < n {
            let op = pick_op(&mut rng, size, cs, s);
            let (a, b) = op.range().unwrap();
            if ops.iter().any(|o| {
                let (x, y) = o.range().unwrap();
                a < y && x < b
            }) {
                continue;
            }
            ops.push(op);
        }
        let pos = pc.len();
        let handles: Vec<_> = ops
            .iter()
            .cloned()
            .map(|op| {
                rec.issued.push((pos, GOp::Io(op.clone())));
                let img = img.clone();
                tokio::spawn(async move { op.run(&img).await })
            })
            .collect();
        for (h, op) in handles.into_iter().zip(&ops) {
            h.await
                .unwrap()
                .unwrap_or_else(|e| panic!("{}: seed {seed}: {}: {e}", s.name, short(op)));
        }
        for op in &ops {
            op.apply(&mut model);
        }
    }
    img.close()
        .await
        .unwrap_or_else(|e| panic!("{}: close: {e}", s.name));
    rec.flushed
        .push((pc.len(), Arc::new(model), rec.issued.len()));
    rec
}

/// Check the guest content `got` after a cut at `cut`.
fn check_content(got: &[u8], rec: &Record, cut: usize, what: &str) {
    let (_, durable, first) = rec
        .flushed
        .iter()
        .rev()
        .find(|(pos, _, _)| *pos <= cut)
        .unwrap();
    let later: Vec<&GOp> = rec.issued[*first..]
        .iter()
        .filter(|(pos, _)| *pos < cut)
        .map(|(_, op)| op)
        .collect();
    let sizes_ok = got.len() == durable.len()
        || later
            .iter()
            .any(|op| matches!(op, GOp::Resize(n) if *n as usize == got.len()));
    assert!(
        sizes_ok,
        "{what}: disk size {} (flushed size {})",
        got.len(),
        durable.len()
    );
    for (i, &g) in got.iter().enumerate() {
        let d = durable.get(i).copied().unwrap_or(0);
        if g == d {
            continue;
        }
        let ok = later.iter().any(|op| match op {
            GOp::Io(Op::Write { off, data } | Op::Compressed { off, data }) => {
                let off = *off as usize;
                i >= off && i < off + data.len() && data[i - off] == g
            }
            GOp::Io(Op::Zero { off, len, .. } | Op::Discard { off, len }) => {
                i >= *off as usize && i < (*off + *len) as usize && g == 0
            }
            _ => false,
        });
        assert!(
            ok,
            "{what}: guest byte {i} (0x{i:x}) is {g:#04x}; flushed value {d:#04x}, and no request issued after that flush wrote it"
        );
    }
}

/// The cut points: every position near a flush, then an even spread, `n` in all (positions
/// repeat, with other survivor seeds, when `n` exceeds the log).
fn cut_points(total: usize, flushes: &[usize], n: usize) -> Vec<usize> {
    let mut pts: Vec<usize> = Vec::new();
    if n > total {
        let mut k = 0;
        while pts.len() < n {
            pts.push(k % (total + 1));
            k += 1;
        }
        return pts;
    }
    let mut near: Vec<usize> = flushes
        .iter()
        .flat_map(|&f| f.saturating_sub(2)..=(f + 1).min(total))
        .collect();
    near.sort_unstable();
    near.dedup();
    let keep = (near.len() / (n / 2).max(1)).max(1);
    pts.extend(near.into_iter().step_by(keep));
    let rest = n.saturating_sub(pts.len()).max(1);
    let step = (total as f64 / rest as f64).max(1.0);
    let mut x = 0.0;
    while (x as usize) <= total && pts.len() < n * 2 {
        pts.push(x as usize);
        x += step;
    }
    pts.push(total);
    pts.sort_unstable();
    pts.dedup();
    pts
}

struct CutCtx<'a> {
    s: &'a Scenario,
    seed: u64,
    pc: &'a PowerCut,
    rec: &'a Record,
    snap: Option<&'a Vec<u8>>,
    dir: &'a Path,
    repair_every: usize,
}

/// Check one cut point: materialize, qemu-img check, read back, sometimes repair.
async fn check_cut(c: &CutCtx<'_>, k: usize, cut: usize, tdir: &Path) -> bool {
    let survivors = match k % 8 {
        0 => Survivors::None,
        1 => Survivors::All,
        _ => Survivors::Random(c.seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    };
    let what = format!(
        "{}: workload seed {}, cut at {cut} of {} log entries, survivors {survivors:?}",
        c.s.name,
        c.seed,
        c.pc.len()
    );
    let files = c.pc.state_at(cut, survivors);
    let img_path = tdir.join("img.qcow2");
    std::fs::write(&img_path, &files[0]).unwrap();
    if c.s.data_file {
        std::fs::write(tdir.join("data.raw"), &files[1]).unwrap();
    }
    assert_no_corruption(&img_path, &what);
    let img = Image::open(&img_path, &OpenOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    check_content(&read_all(&img).await, c.rec, cut, &what);
    drop(img);
    if c.s.snapshot_ops && k % 4 == 3 {
        // Each snapshot operation happened entirely or not at all.
        let names: Vec<String> = qemu_info(&img_path)["snapshots"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap().into())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            [&["s1"][..], &["s1", "s2"], &["s2"]]
                .iter()
                .any(|w| names == *w),
            "{what}: snapshots {names:?}"
        );
        if names.iter().any(|n| n == "s1") {
            let got = qemu_export(&img_path, Some("s1"), &tdir.join("s1.raw"));
            assert_same(&got, c.snap.unwrap(), &format!("{what}: snapshot s1"));
        }
        if names.iter().any(|n| n == "s2") {
            let got = qemu_export(&img_path, Some("s2"), &tdir.join("s2.raw"));
            assert_same(
                &got,
                c.rec.s2.as_ref().unwrap(),
                &format!("{what}: snapshot s2"),
            );
        }
    } else if let Some(snap) = c.snap {
        if k % 16 == 3 {
            let got = qemu_export(&img_path, Some("s1"), &tdir.join("s1.raw"));
            assert_same(&got, snap, &format!("{what}: snapshot s1"));
        }
    }
    let repaired = k.is_multiple_of(c.repair_every);
    if repaired {
        let mut opts = OpenOptions::default();
        opts.writable = true;
        opts.for_repair = true;
        opts.for_check = true;
        let img = Image::open(&img_path, &opts)
            .await
            .unwrap_or_else(|e| panic!("{what}: open for repair: {e}"));
        check(
            &img,
            &CheckOptions {
                repair: Some(Repair::All),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: check -r all: {e}"));
        img.close()
            .await
            .unwrap_or_else(|e| panic!("{what}: close after repair: {e}"));
        assert_clean(&img_path, &format!("{what}, after our check -r all"));
    }
    let _ = c.dir;
    repaired
}

fn powercut(s: Scenario) {
    if !have_qemu() {
        return;
    }
    let t0 = std::time::Instant::now();
    let dir = tmpdir();
    let (start, snap) = make_image(dir.path(), &s);
    let image = std::fs::read(dir.path().join("img.qcow2")).unwrap();
    let data = if s.data_file {
        Some(std::fs::read(dir.path().join("data.raw")).unwrap())
    } else {
        None
    };
    let seed = {
        let base = seed_of(s.name);
        std::env::var("QCOW2_TEST_SEED")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v ^ base)
            .unwrap_or(base)
    };
    let pc = PowerCut::new();
    let rt = runtime_2_workers();
    let rec = rt.block_on(async {
        let img = open_pc(&pc, dir.path(), &s, image, data).await;
        run_workload(&pc, img, start, &s, seed).await
    });
    drop(rt);
    let total = pc.len();
    let flushes = pc.flush_points();
    let n = env_usize("QCOW2RS_POWERCUT_CUTS", 220);
    let points = cut_points(total, &flushes, n);
    let ctx = CutCtx {
        s: &s,
        seed,
        pc: &pc,
        rec: &rec,
        snap: snap.as_ref(),
        dir: dir.path(),
        repair_every: env_usize("QCOW2RS_POWERCUT_REPAIR", 8).max(1),
    };
    let repairs = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    for_each_on_threads(threads, points.len(), dir.path(), |rt, k, tdir| {
        if rt.block_on(check_cut(&ctx, k, points[k], tdir)) {
            repairs.fetch_add(1, Ordering::Relaxed);
        }
    });
    // The last cut after close keeps everything: it must be the final guest content.
    let last = pc.state_at(total, Survivors::None);
    let img_path = dir.path().join("final.qcow2");
    std::fs::write(&img_path, &last[0]).unwrap();
    if s.data_file {
        // The image names data.raw next to it.
        std::fs::write(dir.path().join("data.raw"), &last[1]).unwrap();
    }
    assert_clean(&img_path, &format!("{}: after close", s.name));
    eprintln!(
        "powercut {}: {} cut points over {total} log entries ({} flushes, {} guest requests), {} repaired with check -r all, {:.1}s",
        s.name,
        points.len(),
        flushes.len(),
        rec.issued.len(),
        repairs.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn powercut_plain_64k() {
    powercut(Scenario {
        compressed_writes: true,
        ..Scenario::new("pc-plain-64k", "", 8 << 20)
    });
}

#[test]
fn powercut_backing_4k_rc4() {
    powercut(Scenario {
        base: Base::Backing,
        max_len: 40_000,
        ..Scenario::new(
            "pc-backing-4k-rc4",
            "cluster_size=4096,refcount_bits=4",
            8 << 20,
        )
    });
}

#[test]
fn powercut_converted_compressed_16k_rc32() {
    powercut(Scenario {
        base: Base::Converted,
        compressed_writes: true,
        max_len: 60_000,
        ..Scenario::new(
            "pc-converted-16k-rc32",
            "cluster_size=16384,refcount_bits=32",
            4 << 20,
        )
    });
}

#[test]
fn powercut_snapshot_16k_rc8() {
    powercut(Scenario {
        snapshot: true,
        compressed_writes: true,
        max_len: 60_000,
        ..Scenario::new(
            "pc-snapshot-16k-rc8",
            "cluster_size=16384,refcount_bits=8",
            4 << 20,
        )
    });
}

/// Snapshot create and delete between guest writes (`jobs/snapshot.rs`: built past the end
/// of the file, one header write switches).
#[test]
fn powercut_snapshot_ops_4k_rc16() {
    powercut(Scenario {
        snapshot: true,
        snapshot_ops: true,
        compressed_writes: true,
        max_len: 40_000,
        ..Scenario::new("pc-snapshot-ops-4k", "cluster_size=4096", 4 << 20)
    });
}

#[test]
fn powercut_extended_l2_backing() {
    powercut(Scenario {
        base: Base::Backing,
        ..Scenario::new("pc-extl2-64k-backing", "extended_l2=on", 8 << 20)
    });
}

#[test]
fn powercut_rc1_512() {
    powercut(Scenario {
        max_len: 20_000,
        ..Scenario::new("pc-rc1-512", "cluster_size=512,refcount_bits=1", 4 << 20)
    });
}

#[test]
fn powercut_reftable_growth_rc64_512() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and a refcount
    // table cluster 2 MiB of file, so the workload grows the table.
    powercut(Scenario {
        max_len: 300_000,
        compressed_writes: true,
        ..Scenario::new("pc-rc64-512", "cluster_size=512,refcount_bits=64", 6 << 20)
    });
}

#[test]
fn powercut_resize_l1_growth_rc2_512() {
    // 512-byte clusters: one L1 cluster maps 2 MiB, so growing 2 MiB -> 6 MiB moves the L1.
    powercut(Scenario {
        resize_to: Some(6 << 20),
        max_len: 30_000,
        ..Scenario::new(
            "pc-resize-512-rc2",
            "cluster_size=512,refcount_bits=2",
            2 << 20,
        )
    });
}

#[test]
fn powercut_2m_clusters() {
    powercut(Scenario {
        rounds: 24,
        max_len: 2_500_000,
        ..Scenario::new("pc-2m-clusters", "cluster_size=2M", 8 << 20)
    });
}

#[test]
fn powercut_data_file() {
    powercut(Scenario {
        ..Scenario::new("pc-data-file", "", 8 << 20)
    });
}

/// An interrupted raw -> qcow2 convert into a fresh image (the batched allocation path,
/// `engine/batch.rs`, with pieces written in plan order): at every cut, `qemu-img check`
/// finds no corruption, and every guest cluster reads either as its source content or as
/// zeros (data is written before the L2 entry that maps it). A small metadata cache makes
/// the engine write metadata back during the copy, so cuts fall between those write-backs
/// too; 512 B clusters make a batch span several L2 tables and refcount blocks.
fn powercut_convert(name: &str, opts: &str) {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let size: u64 = 3 << 20;
    // The source: data runs of many lengths, holes and written zeros.
    let raw = dir.path().join("src.raw");
    let mut src = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(seed_of(name));
    let mut pos = 0usize;
    while pos < src.len() {
        let n = rng.gen_range(1..200_000usize).min(src.len() - pos);
        if rng.gen_range(0..3) != 0 {
            let v = rng.gen_range(1..=255u8);
            src[pos..pos + n].fill(v);
            src[pos] = v.wrapping_add(1).max(1);
        }
        pos += n;
    }
    std::fs::write(&raw, &src).unwrap();
    run_in(
        dir.path(),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "img.qcow2",
            &size.to_string(),
        ],
    );
    let image = std::fs::read(dir.path().join("img.qcow2")).unwrap();
    let pc = PowerCut::new();
    let rt = runtime_2_workers();
    rt.block_on(async {
        let f = pc.add_file(image);
        let mut o = OpenOptions::default();
        o.writable = true;
        o.cache_size = 16 << 10;
        let img = Image::open_storage(f, &dir.path().join("img.qcow2"), &o)
            .await
            .unwrap();
        let source = qcow2_core::Disk::open(&raw, None, &OpenOptions::default())
            .await
            .unwrap();
        qcow2_core::convert::convert_into(&source, &img, false, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("{name}: convert: {e}"));
        img.close().await.unwrap();
    });
    drop(rt);
    let total = pc.len();
    let flushes = pc.flush_points();
    assert!(
        flushes.len() > 2,
        "{name}: no metadata write-back during the copy"
    );
    let points = cut_points(total, &flushes, env_usize("QCOW2RS_POWERCUT_CUTS", 220) / 2);
    let cs = qemu_info(&dir.path().join("img.qcow2"))["cluster-size"]
        .as_u64()
        .unwrap() as usize;
    let rt = runtime_current();
    for (k, &cut) in points.iter().enumerate() {
        let survivors = match k % 4 {
            0 => Survivors::None,
            1 => Survivors::All,
            _ => Survivors::Random(seed_of(name) ^ k as u64),
        };
        let what = format!("{name}: cut at {cut} of {total}, survivors {survivors:?}");
        let path = dir.path().join("cut.qcow2");
        std::fs::write(&path, &pc.state_at(cut, survivors)[0]).unwrap();
        assert_no_corruption(&path, &what);
        let got = rt.block_on(async {
            let img = Image::open(&path, &OpenOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            read_all(&img).await
        });
        for (i, (g, s)) in got.chunks(cs).zip(src.chunks(cs)).enumerate() {
            assert!(
                g == s || g.iter().all(|&b| b == 0),
                "{what}: guest cluster {i} is neither its source content nor zeros"
            );
        }
    }
    let last = dir.path().join("final.qcow2");
    std::fs::write(&last, &pc.state_at(total, Survivors::None)[0]).unwrap();
    assert_clean(&last, &format!("{name}: after close"));
    let got = rt.block_on(async { read_all(&open_ro(&last).await).await });
    assert_same(&got, &src, &format!("{name}: after close"));
    eprintln!(
        "powercut {name}: {} cut points over {total} log entries ({} flushes)",
        points.len(),
        flushes.len()
    );
}

#[test]
fn powercut_convert_512() {
    powercut_convert("pc-convert-512", "cluster_size=512,refcount_bits=16");
}

#[test]
fn powercut_convert_4k_extended_64k() {
    powercut_convert("pc-convert-4k", "cluster_size=4096");
    powercut_convert("pc-convert-extl2", "cluster_size=65536,extended_l2=on");
}
