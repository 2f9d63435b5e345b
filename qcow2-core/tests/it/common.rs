//! Helpers shared by the `write_*` integration tests: running qemu-img/qemu-io, checking
//! images with `qemu-img check`, and a random workload (writes, write-zeroes, discards,
//! compressed writes, reads, flushes) run from concurrent tasks against an in-memory mirror.
#![allow(dead_code)]

use qcow2_core::ZeroMode;
use qcow2_core::{Image, OpenOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether qemu-img and qemu-io are installed. Panics in CI (`CI=true`) when they are not;
/// elsewhere prints "skipped: qemu-img not found" and returns false.
pub fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("qemu-img/qemu-io are required in CI");
        }
        eprintln!("skipped: qemu-img not found");
    }
    ok
}

/// A temporary directory on the same file system as `target/` (hole punching works there).
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("write-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Run a program, returning its output (never panics on a non-zero exit).
pub fn sh(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

/// Run a program that must succeed; returns its stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = sh(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qcow2 [-o opts] path size`.
pub fn qemu_create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(&path), size]);
    run("qemu-img", &args);
    path
}

/// `qemu-img create -f qcow2 -b base -F qcow2 top`: an empty qcow2 overlay of `base`.
pub fn qemu_overlay(base: &Path, top: &Path) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(base),
            "-F",
            "qcow2",
            p(top),
        ],
    );
}

/// Run qemu-io commands on an image (format probed unless `fmt` is given).
pub fn qemu_io(path: &Path, fmt: Option<&str>, cmds: &[&str]) {
    let mut args: Vec<&str> = vec![];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    for c in cmds {
        args.extend(["-c", *c]);
    }
    args.push(p(path));
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// The result of `qemu-img check --output=json`.
pub struct QemuCheck {
    pub json: Option<serde_json::Value>,
    pub code: i32,
    pub stderr: String,
}

impl QemuCheck {
    pub fn field(&self, k: &str) -> u64 {
        self.json
            .as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    }
    pub fn describe(&self) -> String {
        format!(
            "exit {} json {} stderr {}",
            self.code,
            self.json
                .as_ref()
                .map(|j| j.to_string())
                .unwrap_or_default(),
            self.stderr
        )
    }
}

pub fn qemu_check(path: &Path) -> QemuCheck {
    let out = sh("qemu-img", &["check", "--output=json", p(path)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).ok();
    QemuCheck {
        json,
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `qemu-img check` exits 0: no corruption, no leak, no check error.
pub fn assert_clean(path: &Path, what: &str) {
    let c = qemu_check(path);
    assert!(
        c.code == 0
            && c.json.is_some()
            && c.field("corruptions") == 0
            && c.field("leaks") == 0
            && c.field("check-errors") == 0,
        "{what}: qemu-img check is not clean: {}",
        c.describe()
    );
}

/// `qemu-img check` finds no corruption (leaks are allowed: exit 0 or 3).
pub fn assert_no_corruption(path: &Path, what: &str) -> QemuCheck {
    let c = qemu_check(path);
    assert!(
        (c.code == 0 || c.code == 3)
            && c.json.is_some()
            && c.field("corruptions") == 0
            && c.field("check-errors") == 0,
        "{what}: qemu-img check finds corruption: {}",
        c.describe()
    );
    c
}

/// Guest content of `img` as qemu sees it (`qemu-img convert -O raw`), optionally of an
/// internal snapshot.
pub fn qemu_export(img: &Path, snapshot: Option<&str>, out: &Path) -> Vec<u8> {
    let mut args = vec!["convert", "-O", "raw"];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.extend(["-l", l.as_str()]);
    }
    args.extend([p(img), p(out)]);
    run("qemu-img", &args);
    std::fs::read(out).unwrap()
}

/// `qemu-img compare -f raw -F qcow2 raw img` reports identical content.
pub fn qemu_compare_raw(raw: &Path, img: &Path, what: &str) {
    let out = sh(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", p(raw), p(img)],
    );
    assert!(
        out.status.code() == Some(0),
        "{what}: qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn qemu_info(path: &Path) -> serde_json::Value {
    let s = run("qemu-img", &["info", "--output=json", p(path)]);
    serde_json::from_str(&s).unwrap()
}

/// `qemu-img map --output=json` of an image.
pub fn qemu_map(path: &Path) -> Vec<serde_json::Value> {
    let s = run("qemu-img", &["map", "--output=json", p(path)]);
    serde_json::from_str::<serde_json::Value>(&s)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Metadata cache size: `QCOW2_TEST_CACHE` (bytes) overrides the default, to explore
/// eviction paths.
pub fn cache_size() -> usize {
    std::env::var("QCOW2_TEST_CACHE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(OpenOptions::default().cache_size)
}

pub async fn open_rw(path: &Path) -> Image {
    Image::open(path, &{
        let mut o = OpenOptions::default();
        o.writable = true;
        o.cache_size = cache_size();
        o
    })
    .await
    .unwrap_or_else(|e| panic!("open {} writable: {e}", path.display()))
}

pub async fn open_ro(path: &Path) -> Image {
    Image::open(path, &OpenOptions::default())
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The whole guest content through our reader.
pub async fn read_all(img: &Image) -> Vec<u8> {
    let size = img.size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < out.len() {
        let n = (1usize << 20).min(out.len() - off);
        img.read_at(&mut out[off..off + n], off as u64)
            .await
            .unwrap_or_else(|e| panic!("read at {off}: {e}"));
        off += n;
    }
    out
}

/// Assert two byte strings are equal, reporting the first difference.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at byte {i} (0x{i:x}): got {:02x?} want {:02x?}",
            &got[i..end],
            &want[i..end]
        );
    }
}

/// A seeded generator; `QCOW2_TEST_SEED` overrides the seed (to explore).
pub fn rng(seed: u64) -> StdRng {
    let s = std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|v| v ^ seed)
        .unwrap_or(seed);
    StdRng::seed_from_u64(s)
}

/// A stable seed from a name.
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// One guest operation.
#[derive(Debug, Clone)]
pub enum Op {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64, mode: ZeroMode },
    Discard { off: u64, len: u64 },
    Compressed { off: u64, data: Vec<u8> },
    Read { off: u64, len: u64 },
    Flush,
}

impl Op {
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { off, data } | Op::Compressed { off, data } => {
                Some((*off, *off + data.len() as u64))
            }
            Op::Zero { off, len, .. } | Op::Discard { off, len } | Op::Read { off, len } => {
                Some((*off, *off + *len))
            }
            Op::Flush => None,
        }
    }
    /// Apply to the mirror (reads and flushes change nothing).
    pub fn apply(&self, mirror: &mut [u8]) {
        match self {
            Op::Write { off, data } | Op::Compressed { off, data } => {
                mirror[*off as usize..*off as usize + data.len()].copy_from_slice(data)
            }
            Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                mirror[*off as usize..(*off + *len) as usize].fill(0)
            }
            _ => {}
        }
    }
    /// Run against the image. Reads return their data.
    pub async fn run(&self, img: &Image) -> qcow2_core::Result<Option<Vec<u8>>> {
        match self {
            Op::Write { off, data } => img.write_at(data, *off).await.map(|_| None),
            Op::Zero { off, len, mode } => img.write_zeroes(*off, *len, *mode).await.map(|_| None),
            Op::Discard { off, len } => img.discard(*off, *len).await.map(|_| None),
            Op::Compressed { off, data } => img.write_compressed(*off, data).await.map(|_| None),
            Op::Read { off, len } => {
                let mut b = vec![0u8; *len as usize];
                img.read_at(&mut b, *off).await.map(|_| Some(b))
            }
            Op::Flush => img.flush().await.map(|_| None),
        }
    }
}

/// What a random workload may do.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Rounds; each round runs `tasks` operations concurrently on disjoint ranges.
    pub rounds: usize,
    pub tasks: usize,
    /// Longest request.
    pub max_len: u64,
    pub zeroes: bool,
    pub discards: bool,
    pub compressed: bool,
    pub reads: bool,
    pub flushes: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            rounds: 40,
            tasks: 6,
            max_len: 4 << 20,
            zeroes: true,
            discards: true,
            compressed: false,
            reads: true,
            flushes: true,
        }
    }
}

/// Random data: noise, or a compressible pattern.
pub fn random_data(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    if rng.gen_bool(0.5) {
        rng.fill(&mut v[..]);
    } else {
        let a: u8 = rng.gen_range(1..=255);
        let b: u8 = rng.gen();
        for (i, x) in v.iter_mut().enumerate() {
            *x = if (i / 7) % 3 == 0 { b } else { a };
        }
    }
    v
}

/// A random range inside `[0, size)`: many small and unaligned, some crossing clusters,
/// some whole clusters.
pub fn random_range(rng: &mut StdRng, size: u64, cs: u64, max_len: u64) -> (u64, u64) {
    let max_len = max_len.min(size).max(1);
    let (off, len) = match rng.gen_range(0..10) {
        0..=2 => {
            let len = rng.gen_range(1..=512u64.min(max_len));
            (rng.gen_range(0..size), len)
        }
        3..=5 => {
            // Around a cluster boundary.
            let ncl = size.div_ceil(cs);
            let b = rng.gen_range(0..ncl) * cs;
            let before = rng.gen_range(0..=cs.min(4096));
            let len = rng.gen_range(1..=(2 * cs).min(max_len));
            (b.saturating_sub(before), len)
        }
        6..=7 => {
            let len = rng.gen_range(1..=(3 * cs).min(max_len));
            (rng.gen_range(0..size), len)
        }
        _ => {
            // Whole clusters.
            let ncl = size.div_ceil(cs);
            let n = rng.gen_range(1..=3u64);
            let c = rng.gen_range(0..ncl);
            (c * cs, (n * cs).min(max_len.max(cs)))
        }
    };
    let off = off.min(size - 1);
    let len = len.min(size - off).max(1);
    (off, len)
}

/// Pick one random operation.
pub fn random_op(rng: &mut StdRng, size: u64, cs: u64, w: &Workload) -> Op {
    loop {
        let kind = rng.gen_range(0..20);
        match kind {
            0..=10 => {
                let (off, len) = random_range(rng, size, cs, w.max_len);
                return Op::Write {
                    off,
                    data: random_data(rng, len as usize),
                };
            }
            11..=12 if w.zeroes => {
                let (off, len) = random_range(rng, size, cs, w.max_len);
                let mode = if rng.gen_bool(0.5) {
                    ZeroMode::Keep
                } else {
                    ZeroMode::Unmap
                };
                return Op::Zero { off, len, mode };
            }
            13..=14 if w.discards => {
                let (off, len) = random_range(rng, size, cs, w.max_len);
                return Op::Discard { off, len };
            }
            15 if w.compressed => {
                let c = rng.gen_range(0..size.div_ceil(cs));
                let off = c * cs;
                let len = cs.min(size - off) as usize;
                let mut data = vec![0u8; len];
                // Compressible: runs of a few values.
                let vals: [u8; 3] = [rng.gen_range(1..=255), rng.gen(), rng.gen()];
                let mut i = 0;
                while i < len {
                    let run = rng.gen_range(1..64).min(len - i);
                    data[i..i + run].fill(vals[rng.gen_range(0..3)]);
                    i += run;
                }
                return Op::Compressed { off, data };
            }
            16..=18 if w.reads => {
                let (off, len) = random_range(rng, size, cs, w.max_len);
                return Op::Read { off, len };
            }
            19 if w.flushes => return Op::Flush,
            _ => {}
        }
    }
}

/// Run `w` against `img` from concurrent tasks, keeping `mirror` equal to the expected
/// guest content. Each round's operations touch disjoint ranges, so their order does not
/// matter; reads are checked against the mirror.
pub async fn random_workload(img: &Image, mirror: &mut [u8], rng: &mut StdRng, w: &Workload) {
    let size = img.size();
    assert_eq!(size as usize, mirror.len());
    let cs = img.layout().cluster_size;
    // QCOW2_TEST_SCALE=n runs n times as many rounds (to explore; the default keeps the
    // suite fast).
    let scale = std::env::var("QCOW2_TEST_SCALE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    for round in 0..w.rounds * scale {
        let mut ops: Vec<Op> = Vec::new();
        let mut used: Vec<(u64, u64)> = Vec::new();
        let mut tries = 0;
        while ops.len() < w.tasks && tries < 200 {
            tries += 1;
            let op = random_op(rng, size, cs, w);
            if let Some((a, b)) = op.range() {
                if used.iter().any(|&(x, y)| a < y && x < b) {
                    continue;
                }
                used.push((a, b));
            }
            ops.push(op);
        }
        let handles: Vec<_> = ops
            .iter()
            .cloned()
            .map(|op| {
                let img = img.clone();
                tokio::spawn(async move {
                    let r = op.run(&img).await;
                    (op, r)
                })
            })
            .collect();
        for h in handles {
            let (op, r) = h.await.unwrap();
            let r = r.unwrap_or_else(|e| panic!("round {round}: {op:?}: {e}", op = short(&op)));
            if let (Op::Read { off, len }, Some(got)) = (&op, r) {
                assert_same(
                    &got,
                    &mirror[*off as usize..(*off + *len) as usize],
                    &format!("round {round}: read at {off} len {len}"),
                );
            }
        }
        for op in &ops {
            op.apply(mirror);
        }
    }
}

/// An operation without its data, for messages.
pub fn short(op: &Op) -> String {
    match op {
        Op::Write { off, data } => format!("Write{{off: {off}, len: {}}}", data.len()),
        Op::Compressed { off, data } => format!("Compressed{{off: {off}, len: {}}}", data.len()),
        o => format!("{o:?}"),
    }
}

/// Open `path` writable through a `HookStorage` over the real file, so a test can hold, delay
/// or fail chosen storage requests while others run.
pub async fn open_hooked(
    path: &Path,
) -> (Image, std::sync::Arc<qcow2_core::io::fault::HookStorage>) {
    open_hooked_opts(path, OpenOptions::default()).await
}

/// `open_hooked` with the given open options (`writable` is forced on).
pub async fn open_hooked_opts(
    path: &Path,
    opts: OpenOptions,
) -> (Image, std::sync::Arc<qcow2_core::io::fault::HookStorage>) {
    use qcow2_core::io::{open_file, FileOptions, Storage};
    let file = open_file(path, &{
        let mut o = FileOptions::default();
        o.writable = true;
        o
    })
    .unwrap();
    let hs = qcow2_core::io::fault::HookStorage::new(file);
    let img = Image::open_storage(hs.clone() as std::sync::Arc<dyn Storage>, path, &{
        let mut o = opts;
        o.writable = true;
        o
    })
    .await
    .unwrap();
    (img, hs)
}

/// A multi-thread tokio runtime with 2 workers and every driver enabled.
pub fn runtime_2_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A current-thread tokio runtime with every driver enabled.
pub fn runtime_current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Calls `f(rt, k, tdir)` for every `k` in `0..n`, in order, from `threads` threads, each
/// with its own current-thread runtime `rt` and scratch directory `tdir` (`dir/t<i>`).
pub fn for_each_on_threads(
    threads: usize,
    n: usize,
    dir: &Path,
    f: impl Fn(&tokio::runtime::Runtime, usize, &Path) + Sync,
) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for t in 0..threads {
            let tdir = dir.join(format!("t{t}"));
            std::fs::create_dir_all(&tdir).unwrap();
            let (next, f) = (&next, &f);
            sc.spawn(move || {
                let rt = runtime_current();
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= n {
                        break;
                    }
                    f(&rt, k, &tdir);
                }
            });
        }
    });
}
