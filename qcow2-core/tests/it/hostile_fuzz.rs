//! The bounded fuzz run of the normal tests: the cargo-fuzz target bodies of
//! `qcow2_core::fuzzing` over a seed corpus of images made by qemu-img (`fuzz/seeds.sh`),
//! the regression inputs kept in `fuzz/regressions/<target>/`, and a few thousand seeded
//! random mutations of the seeds (bit flips, header and table fields set to extremes,
//! truncation). A panic in a target fails the test and saves the input under
//! `target/tmp/fuzz-failures/` for `cargo +nightly fuzz run <target> <file>`.

use crate::common::{have_qemu, tmpdir};
use qcow2_core::fuzzing;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("header", fuzzing::header),
    ("tables", fuzzing::tables),
    ("snapshot_table", fuzzing::snapshot_table),
    ("open_read", fuzzing::open_read),
    ("open_write", fuzzing::open_write),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Run `f` on `input`; on a panic save the input and fail naming it.
fn run_one(target: &str, f: Target, what: &str, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{target}-{}", what.replace(['/', ' '], "_")));
        std::fs::write(&path, input).unwrap();
        panic!(
            "fuzz target {target} panicked on {what}; input saved as {}",
            path.display()
        );
    }
}

/// Header fields (offset, width) whose extreme values are worth trying.
const FIELDS: [(usize, usize); 16] = [
    (8, 8),   // backing file offset
    (16, 4),  // backing file name size
    (20, 4),  // cluster bits
    (24, 8),  // virtual size
    (32, 4),  // encryption method
    (36, 4),  // L1 size
    (40, 8),  // L1 table offset
    (48, 8),  // refcount table offset
    (56, 4),  // refcount table clusters
    (60, 4),  // snapshot count
    (64, 8),  // snapshot table offset
    (72, 8),  // incompatible features
    (80, 8),  // compatible features
    (88, 8),  // autoclear features
    (96, 4),  // refcount order
    (100, 4), // header length
];

fn extreme(rng: &mut StdRng, len: u64) -> u64 {
    match rng.gen_range(0..10) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX >> 1,
        4 => 1 << rng.gen_range(0..64),
        5 => len,
        6 => len.saturating_sub(rng.gen_range(1..=512)),
        7 => len + rng.gen_range(0..1 << 16),
        8 => rng.gen::<u64>() & 0x00ff_ffff_ffff_fe00, // an offset-shaped value
        _ => rng.gen(),
    }
}

fn put(b: &mut [u8], off: usize, width: usize, v: u64) {
    if off + width <= b.len() {
        b[off..off + width].copy_from_slice(&v.to_be_bytes()[8 - width..]);
    }
}

/// One random mutation of a qcow2 image.
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let len = b.len() as u64;
    for _ in 0..rng.gen_range(1..=3) {
        if b.is_empty() {
            break;
        }
        match rng.gen_range(0..6) {
            // Bit flips, mostly in the metadata at the start.
            0 => {
                let span = b.len().min(if rng.gen() { 512 } else { 64 << 10 });
                for _ in 0..rng.gen_range(1..=8) {
                    let i = rng.gen_range(0..span);
                    b[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            // A header field set to an extreme.
            1 | 2 => {
                let (off, w) = FIELDS[rng.gen_range(0..FIELDS.len())];
                let v = extreme(rng, len);
                put(&mut b, off, w, v);
            }
            // A table-entry-shaped word (L1, L2, refcount table entry) set to an extreme,
            // with random flag bits.
            3 => {
                let words = b.len() / 8;
                let i = rng.gen_range(0..words.max(1)) * 8;
                let flags = [0, 1 << 63, 1 << 62, 1, (1 << 63) | 1][rng.gen_range(0..5)];
                let v = extreme(rng, len) | flags;
                put(&mut b, i, 8, v);
            }
            // Truncation.
            4 => {
                let n = rng.gen_range(0..=b.len());
                b.truncate(n);
            }
            // A run of random bytes.
            _ => {
                let i = rng.gen_range(0..b.len());
                let n = rng.gen_range(1..=64).min(b.len() - i);
                rng.fill(&mut b[i..i + n]);
            }
        }
    }
    b
}

fn seeds(dir: &Path) -> bool {
    if !have_qemu() {
        return false;
    }
    let out = std::process::Command::new("sh")
        .arg(fuzz_dir().join("seeds.sh"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fuzz/seeds.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Seeds, regressions and `n` mutations of the seeds through `target`.
fn bounded_run(target: &str, n: usize) {
    let f = TARGETS.iter().find(|t| t.0 == target).unwrap().1;
    let tmp = tmpdir();
    if !seeds(tmp.path()) {
        return;
    }
    let corpus = files(&tmp.path().join(target));
    assert!(!corpus.is_empty());
    for (name, input) in files(&fuzz_dir().join("regressions").join(target)) {
        run_one(target, f, &format!("regression {name}"), &input);
    }
    for (name, input) in &corpus {
        run_one(target, f, &format!("seed {name}"), input);
    }
    let mut rng = StdRng::seed_from_u64(0x9c02_u64 ^ target.len() as u64);
    for i in 0..n {
        let (name, seed) = &corpus[i % corpus.len()];
        let input = mutate(&mut rng, seed);
        run_one(target, f, &format!("mutation {i} of {name}"), &input);
    }
}

#[test]
fn fuzz_header() {
    bounded_run("header", 4000);
}

#[test]
fn fuzz_tables() {
    bounded_run("tables", 2000);
}

#[test]
fn fuzz_snapshot_table() {
    bounded_run("snapshot_table", 2000);
}

#[test]
fn fuzz_open_read() {
    bounded_run("open_read", 2000);
}

#[test]
fn fuzz_open_write() {
    bounded_run("open_write", 1000);
}

/// Replay one input: `FUZZ_TARGET=open_read FUZZ_INPUT=file cargo test --release -p
/// qcow2-core --test it fuzz_replay -- --ignored --nocapture`.
#[test]
#[ignore]
fn fuzz_replay() {
    let target = std::env::var("FUZZ_TARGET").expect("FUZZ_TARGET");
    let input = std::fs::read(std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT")).unwrap();
    let f = TARGETS
        .iter()
        .find(|t| t.0 == target)
        .expect("a target name")
        .1;
    f(&input);
}
