//! The file engines (threads and io_uring), buffered and with O_DIRECT, checked
//! against an in-memory model and for cancellation safety, concurrency and the
//! `fallocate`/`SEEK_DATA` based calls.
//!
//! Files live under Cargo's per-target temporary directory (on the same file
//! system as `target/`), not under `/tmp`, which may be a tmpfs. A configuration
//! is skipped, with the reason printed, only when this machine refuses it
//! (io_uring disabled, or O_DIRECT refused by the file system).

use futures::executor::block_on;
use futures::FutureExt;
use qcow2_core::io::uring::is_unavailable;
use qcow2_core::io::{open_file, EngineKind, FileOptions, Storage};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Config {
    engine: EngineKind,
    direct: bool,
}

const CONFIGS: [Config; 4] = [
    Config {
        engine: EngineKind::Threads,
        direct: false,
    },
    Config {
        engine: EngineKind::Threads,
        direct: true,
    },
    Config {
        engine: EngineKind::IoUring,
        direct: false,
    },
    Config {
        engine: EngineKind::IoUring,
        direct: true,
    },
];

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("io_engines")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temporary directory")
}

fn opts(cfg: Config) -> FileOptions {
    let mut o = FileOptions::default();
    o.writable = true;
    o.create = true;
    o.truncate = true;
    o.direct = cfg.direct;
    o.engine = cfg.engine;
    o
}

/// Open a new empty file with `cfg`, or `None` (saying why) if this machine refuses it.
fn open_new(dir: &Path, name: &str, cfg: Config) -> Option<Arc<dyn Storage>> {
    match open_file(&dir.join(name), &opts(cfg)) {
        Ok(f) => {
            let want = match cfg.engine {
                EngineKind::Threads => "threads",
                EngineKind::IoUring => "io_uring",
                EngineKind::Auto => f.engine_name(),
            };
            assert_eq!(f.engine_name(), want);
            Some(f)
        }
        Err(e) if cfg.engine == EngineKind::IoUring && is_unavailable(&e) => {
            eprintln!("skipping {cfg:?}: io_uring is not available here: {e}");
            None
        }
        Err(e) if cfg.direct && e.kind() == io::ErrorKind::InvalidInput => {
            eprintln!("skipping {cfg:?}: {e}");
            None
        }
        Err(e) => panic!("opening a file with {cfg:?}: {e}"),
    }
}

/// A buffer of `len` bytes that starts `skew` bytes into its allocation, so its
/// address is (usually) not aligned.
struct Skewed {
    mem: Vec<u8>,
    skew: usize,
}

impl Skewed {
    fn new(len: usize, skew: usize, fill: u8) -> Self {
        Skewed {
            mem: vec![fill; len + skew],
            skew,
        }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.mem[self.skew..]
    }
}

fn check_eq(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Read `[off, off+len)` of the model (zeros past its end).
fn model_read(model: &[u8], off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    if off < model.len() {
        let n = (model.len() - off).min(len);
        v[..n].copy_from_slice(&model[off..off + n]);
    }
    v
}

/// Random writes, reads, zeroing and discards, compared with a `Vec` model.
/// Runs on `futures`' executor: the engines need no Tokio runtime.
fn model_test(cfg: Config, seed: u64) {
    let dir = scratch();
    let Some(f) = open_new(dir.path(), "model.img", cfg) else {
        return;
    };
    let align = f.alignment() as u64;
    let mut rng = Rng::new(seed);
    let mut model: Vec<u8> = Vec::new();
    block_on(async {
        for step in 0..400 {
            let what = rng.below(10);
            // Offsets and lengths: arbitrary, or aligned, or just off alignment.
            let mut off = rng.below(400_000);
            let mut len = match rng.below(4) {
                0 => 1 + rng.below(16),
                1 => 1 + rng.below(20_000),
                2 => 4096 * (1 + rng.below(8)),
                _ => 1 + rng.below(300_000),
            };
            match rng.below(3) {
                0 => off -= off % align.max(512),
                1 => off = (off - off % 512) + 511,
                _ => {}
            }
            if rng.below(3) == 0 {
                len += 1;
            }
            let (off_u, len_u) = (off as usize, len as usize);
            match what {
                0..=3 => {
                    let mut buf = Skewed::new(len_u, rng.below(8) as usize, 0);
                    rng.fill(buf.get());
                    f.write_at(buf.get(), off).await.expect("write_at");
                    if model.len() < off_u + len_u {
                        model.resize(off_u + len_u, 0);
                    }
                    model[off_u..off_u + len_u].copy_from_slice(buf.get());
                }
                4..=6 => {
                    let off = if model.is_empty() {
                        off
                    } else {
                        rng.below(model.len() as u64 + 50_000)
                    };
                    let mut buf = Skewed::new(len_u, rng.below(8) as usize, 0xEE);
                    f.read_at(buf.get(), off).await.expect("read_at");
                    let want = model_read(&model, off as usize, len_u);
                    check_eq(
                        &format!("{cfg:?} step {step}: read {len} at {off}"),
                        buf.get(),
                        &want,
                    );
                }
                7 => {
                    f.write_zeroes(off, len).await.expect("write_zeroes");
                    if model.len() < off_u + len_u {
                        model.resize(off_u + len_u, 0);
                    }
                    model[off_u..off_u + len_u].fill(0);
                }
                8 => {
                    if f.discard(off, len).await.expect("discard") && off_u < model.len() {
                        let end = (off_u + len_u).min(model.len());
                        model[off_u..end].fill(0);
                    }
                }
                _ => f.flush().await.expect("flush"),
            }
            assert_eq!(
                f.len().expect("len") as usize,
                model.len(),
                "{cfg:?} step {step}: length"
            );
        }
        let mut all = vec![0xEEu8; model.len() + 10_000];
        f.read_at(&mut all, 0).await.expect("read_at");
        check_eq(
            &format!("{cfg:?}: final read"),
            &all,
            &model_read(&model, 0, all.len()),
        );
        f.flush().await.expect("flush");
    });
}

#[test]
fn random_ops_match_model() {
    for (i, cfg) in CONFIGS.into_iter().enumerate() {
        for seed in 0..3 {
            model_test(cfg, 1000 * i as u64 + seed);
        }
    }
}

#[test]
fn large_unaligned_requests() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "large.img", cfg) else {
            continue;
        };
        let mut rng = Rng::new(7);
        let len = 11 * 1024 * 1024 + 333; // several internal pieces
        let off = 4097;
        let mut data = Skewed::new(len, 3, 0);
        rng.fill(data.get());
        block_on(async {
            f.write_at(data.get(), off).await.expect("write_at");
            assert_eq!(f.len().unwrap(), off + len as u64);
            let mut back = Skewed::new(len + 1000, 5, 0xEE);
            f.read_at(back.get(), off).await.expect("read_at");
            check_eq(
                &format!("{cfg:?}"),
                &back.get()[..len],
                &data.mem[3..3 + len],
            );
            assert!(back.get()[len..].iter().all(|&b| b == 0));
        });
    }
}

#[test]
fn concurrent_requests_from_many_threads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "concurrent.img", cfg) else {
            continue;
        };
        // 8 tasks x 16 requests in flight at once; regions of 5000 bytes share
        // O_DIRECT blocks with their neighbours, so read-modify-writes must be
        // serialized for no update to be lost.
        const TASKS: usize = 8;
        const PER_TASK: usize = 16;
        const REGION: usize = 5000;
        let pattern = |i: usize, j: usize| -> Vec<u8> {
            let mut v = vec![0u8; REGION];
            Rng::new((i * PER_TASK + j) as u64 + 1).fill(&mut v);
            v
        };
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..TASKS {
                let f = f.clone();
                tasks.push(tokio::spawn(async move {
                    let bufs: Vec<Vec<u8>> = (0..PER_TASK).map(|j| pattern(i, j)).collect();
                    let writes = bufs.iter().enumerate().map(|(j, b)| {
                        let off = ((j * TASKS + i) * REGION) as u64;
                        f.write_at(b, off)
                    });
                    for r in futures::future::join_all(writes).await {
                        r.expect("write_at");
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        // Read back concurrently from plain threads, each with its own executor.
        let threads: Vec<_> = (0..TASKS)
            .map(|i| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut bufs = vec![vec![0xEEu8; REGION]; PER_TASK];
                    block_on(async {
                        let reads = bufs.iter_mut().enumerate().map(|(j, b)| {
                            let off = ((j * TASKS + i) * REGION) as u64;
                            f.read_at(b, off)
                        });
                        for r in futures::future::join_all(reads).await {
                            r.expect("read_at");
                        }
                    });
                    for (j, b) in bufs.iter().enumerate() {
                        check_eq(&format!("{cfg:?} region {i}/{j}"), b, &pattern(i, j));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(f.len().unwrap(), (TASKS * PER_TASK * REGION) as u64);
        rt.block_on(f.flush()).expect("flush");
    }
}

/// Far more requests at once than an io_uring ring holds (they queue up).
#[test]
fn thousands_of_requests_in_flight() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "many.img", cfg) else {
            continue;
        };
        const N: usize = 2000;
        const LEN: usize = 1000;
        let data: Vec<Vec<u8>> = (0..N).map(|i| vec![(i % 251) as u8 + 1; LEN]).collect();
        block_on(async {
            let writes = data
                .iter()
                .enumerate()
                .map(|(i, d)| f.write_at(d, (i * LEN) as u64));
            for r in futures::future::join_all(writes).await {
                r.expect("write_at");
            }
            let mut back = vec![vec![0u8; LEN]; N];
            let reads = back
                .iter_mut()
                .enumerate()
                .map(|(i, b)| f.read_at(b, (i * LEN) as u64));
            for r in futures::future::join_all(reads).await {
                r.expect("read_at");
            }
            for (i, b) in back.iter().enumerate() {
                check_eq(&format!("{cfg:?} request {i}"), b, &data[i]);
            }
            let flushes = (0..600).map(|_| f.flush());
            for r in futures::future::join_all(flushes).await {
                r.expect("flush");
            }
        });
    }
}

#[test]
fn reads_past_end_are_zeros() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "eof.img", cfg) else {
            continue;
        };
        block_on(async {
            f.write_at(&[0x5A; 100], 10).await.unwrap();
            assert_eq!(f.len().unwrap(), 110);
            let mut buf = vec![0xAAu8; 10_000];
            f.read_at(&mut buf, 0).await.unwrap();
            assert!(buf[..10].iter().all(|&b| b == 0), "{cfg:?}");
            assert!(buf[10..110].iter().all(|&b| b == 0x5A), "{cfg:?}");
            assert!(buf[110..].iter().all(|&b| b == 0), "{cfg:?}");
            let mut far = vec![0xAAu8; 3000];
            f.read_at(&mut far, 1 << 20).await.unwrap();
            assert!(far.iter().all(|&b| b == 0), "{cfg:?}");
            f.read_at(&mut [], 5).await.unwrap();
        });
    }
}

#[test]
fn discard_then_read_zeros() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "discard.img", cfg) else {
            continue;
        };
        block_on(async {
            let len = 256 * 1024;
            f.write_at(&vec![0x55; len], 0).await.unwrap();
            f.flush().await.unwrap();
            let before = f.allocated_size().unwrap();
            if !f.discard(64 * 1024, 128 * 1024).await.unwrap() {
                eprintln!("{cfg:?}: the file system cannot punch holes");
                return;
            }
            // An unaligned range too.
            assert!(f.discard(1000, 3000).await.unwrap());
            assert_eq!(
                f.len().unwrap(),
                len as u64,
                "{cfg:?}: discard keeps the size"
            );
            let mut buf = vec![0xEEu8; len];
            f.read_at(&mut buf, 0).await.unwrap();
            for (i, &b) in buf.iter().enumerate() {
                let zero = (1000..4000).contains(&i) || (64 * 1024..192 * 1024).contains(&i);
                assert_eq!(b, if zero { 0 } else { 0x55 }, "{cfg:?}: byte {i}");
            }
            assert!(
                f.allocated_size().unwrap() < before,
                "{cfg:?}: space released"
            );
            // Past the end: nothing to do, the size stays.
            f.discard(len as u64 + 4096, 4096).await.unwrap();
            assert_eq!(f.len().unwrap(), len as u64);
        });
    }
}

#[test]
fn write_zeroes_zeroes_and_extends() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "zeroes.img", cfg) else {
            continue;
        };
        block_on(async {
            f.write_at(&[0x77; 1000], 0).await.unwrap();
            f.write_zeroes(500, 10_000).await.unwrap();
            assert_eq!(f.len().unwrap(), 10_500, "{cfg:?}");
            f.write_zeroes(20_001, 3).await.unwrap();
            assert_eq!(f.len().unwrap(), 20_004, "{cfg:?}");
            let mut buf = vec![0xEEu8; 20_004];
            f.read_at(&mut buf, 0).await.unwrap();
            assert!(buf[..500].iter().all(|&b| b == 0x77), "{cfg:?}");
            assert!(buf[500..].iter().all(|&b| b == 0), "{cfg:?}");
            // Inside the file: the size does not change.
            f.write_at(&[1; 4096], 4096).await.unwrap();
            f.write_zeroes(4100, 10).await.unwrap();
            assert_eq!(f.len().unwrap(), 20_004);
            let mut blk = [0xEEu8; 4096];
            f.read_at(&mut blk, 4096).await.unwrap();
            for (i, &b) in blk.iter().enumerate() {
                assert_eq!(b, if (4..14).contains(&i) { 0 } else { 1 }, "{cfg:?}");
            }
        });
    }
}

#[test]
fn allocate_and_data_runs() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "alloc.img", cfg) else {
            continue;
        };
        block_on(async {
            f.allocate(0, 1 << 20).await.unwrap();
            assert_eq!(f.len().unwrap(), 1 << 20, "{cfg:?}: allocate extends");
            assert!(f.allocated_size().unwrap() >= 1 << 20, "{cfg:?}");
            let mut buf = vec![0xEEu8; 8192];
            f.read_at(&mut buf, 500_000).await.unwrap();
            assert!(buf.iter().all(|&b| b == 0));
            // Allocating inside the file keeps its size.
            f.allocate(4096, 4096).await.unwrap();
            assert_eq!(f.len().unwrap(), 1 << 20);
        });

        let Some(g) = open_new(dir.path(), "sparse.img", cfg) else {
            continue;
        };
        block_on(async {
            g.write_at(&vec![9u8; 64 * 1024], 0).await.unwrap();
            g.flush().await.unwrap();
        });
        g.set_len(4 << 20).unwrap();
        let (run, data) = g.data_run(0, 4 << 20).unwrap();
        assert!(data, "{cfg:?}: data at 0");
        assert!(run >= 64 * 1024, "{cfg:?}: data run {run}");
        if run < 4 << 20 {
            let (hole, data) = g.data_run(run, (4 << 20) - run).unwrap();
            assert!(!data && hole > 0, "{cfg:?}: hole after the data");
        }
        assert_eq!(g.data_run(5 << 20, 10).unwrap(), (10, false), "past EOF");
        assert_eq!(g.data_run(0, 0).unwrap().0, 0);
    }
}

#[test]
fn alignment_is_reported() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "align.img", cfg) else {
            continue;
        };
        let a = f.alignment();
        eprintln!("{cfg:?}: alignment {a}");
        if cfg.direct {
            assert!(a.is_power_of_two() && a >= 512, "{cfg:?}: alignment {a}");
        } else {
            assert_eq!(a, 1, "{cfg:?}");
        }
    }
}

/// Start requests, poll them once, drop them, and check that the engine never
/// touches the caller's memory afterwards and keeps working.
#[test]
fn dropped_futures_are_harmless() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "drop.img", cfg) else {
            continue;
        };
        const LEN: usize = 1 << 20;
        block_on(f.write_at(&vec![0x11; 8 * LEN], 0)).unwrap();
        let mut kept = Vec::new();
        for i in 0..40 {
            let off = (i % 7) * LEN as u64 + 3;
            let mut buf = vec![0xCCu8; LEN];
            // Started, and most likely not finished after one poll.
            if f.read_at(&mut buf, off).now_or_never().is_some() {
                continue; // it finished: nothing was abandoned
            }
            // The read was abandoned: the buffer is the caller's again.
            assert!(buf.iter().all(|&b| b == 0xCC));
            kept.push(buf);
            // A write abandoned the same way, from memory that is freed at once.
            let data = vec![0x22u8; 100_000];
            let _ = f.write_at(&data, 9 * LEN as u64 + i * 1000).now_or_never();
            drop(data);
        }
        // Let the abandoned operations finish, then check nothing wrote into the buffers.
        std::thread::sleep(Duration::from_millis(200));
        for buf in &kept {
            assert!(buf.iter().all(|&b| b == 0xCC), "{cfg:?}: buffer changed");
        }
        drop(kept);
        // Still works.
        block_on(async {
            let mut back = vec![0u8; 4096];
            f.read_at(&mut back, 5).await.unwrap();
            assert!(back.iter().all(|&b| b == 0x11));
            f.write_at(b"after", 123).await.unwrap();
            f.flush().await.unwrap();
        });
        // Dropped right after abandoning requests: must not hang or crash.
        let mut buf = vec![0u8; LEN];
        let _ = f.read_at(&mut buf, 0).now_or_never();
        drop(f);
    }
}

/// A write whose future is dropped after its first poll (the write is then with the
/// engine) has ended when the drop returns (`RunToEnd`): read back at once through
/// another descriptor, the range holds all of the request's bytes. The image engine
/// relies on it: a dropped request's ticket, in-flight mark and locks go with its future,
/// so a write still running after the drop could land after later requests. Fails when
/// the engine lets the write go on after the drop (the range is then read old or half
/// written).
#[test]
fn a_dropped_write_has_ended_when_its_drop_returns() {
    for cfg in CONFIGS {
        let dir = scratch();
        let Some(f) = open_new(dir.path(), "w.img", cfg) else {
            continue;
        };
        const LEN: usize = 4 << 20;
        block_on(f.write_at(&vec![0x11; LEN], 0)).unwrap();
        let mut dropped = 0;
        for round in 0..64u8 {
            let byte = 0x40 + round;
            if let Some(r) = f.write_at(&vec![byte; LEN], 0).now_or_never() {
                r.unwrap();
                continue;
            }
            dropped += 1;
            let now = std::fs::read(dir.path().join("w.img")).unwrap();
            let stale = now[..LEN].iter().filter(|&&b| b != byte).count();
            assert_eq!(
                stale, 0,
                "{cfg:?}, round {round}: the write was still running after its drop returned"
            );
            if dropped == 8 {
                break;
            }
        }
        // The engine may finish a write at its first poll (then nothing was dropped).
        eprintln!("{cfg:?}: {dropped} writes dropped while running");
    }
}

#[test]
fn flush_and_read_only() {
    for cfg in CONFIGS {
        let dir = scratch();
        let path = dir.path().join("ro.img");
        let Some(f) = open_new(dir.path(), "ro.img", cfg) else {
            continue;
        };
        block_on(async {
            f.write_at(&[3u8; 4096], 0).await.unwrap();
            f.flush().await.unwrap();
        });
        drop(f);
        let mut ro = opts(cfg);
        ro.writable = false;
        ro.create = false;
        ro.truncate = false;
        let f = open_file(&path, &ro).unwrap();
        block_on(async {
            let mut buf = [0u8; 4096];
            f.read_at(&mut buf, 0).await.unwrap();
            assert!(buf.iter().all(|&b| b == 3));
            assert!(
                f.write_at(&[1], 0).await.is_err(),
                "{cfg:?}: write to read-only"
            );
            f.flush().await.unwrap();
        });
        assert!(open_file(&dir.path().join("missing.img"), &ro).is_err());
    }
}

#[test]
fn auto_opens_a_file() {
    let dir = scratch();
    for direct in [false, true] {
        let cfg = Config {
            engine: EngineKind::Auto,
            direct,
        };
        let Some(f) = open_new(dir.path(), "auto.img", cfg) else {
            continue;
        };
        assert!(["io_uring", "threads"].contains(&f.engine_name()));
        block_on(async {
            f.write_at(b"hello", 7).await.unwrap();
            let mut buf = [0u8; 12];
            f.read_at(&mut buf, 0).await.unwrap();
            assert_eq!(&buf, b"\0\0\0\0\0\0\0hello");
        });
    }
}

#[test]
fn unavailable_errors() {
    for errno in [libc::ENOSYS, libc::EPERM, libc::EOPNOTSUPP] {
        assert!(is_unavailable(&io::Error::from_raw_os_error(errno)));
    }
    assert!(!is_unavailable(&io::Error::from_raw_os_error(libc::ENOENT)));
    assert!(!is_unavailable(&io::Error::other("x")));
}

/// O_DIRECT on a tmpfs: either it works (Linux >= 6.6) or the error says what
/// happened; it is never silently dropped.
#[test]
fn direct_io_refusal_is_reported() {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipping: no /dev/shm");
        return;
    };
    for engine in [EngineKind::Threads, EngineKind::IoUring] {
        let cfg = Config {
            engine,
            direct: true,
        };
        match open_file(&dir.path().join("shm.img"), &opts(cfg)) {
            Ok(f) => assert!(f.alignment() > 1, "{cfg:?}"),
            Err(e) if engine == EngineKind::IoUring && is_unavailable(&e) => {}
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
                assert!(e.to_string().contains("O_DIRECT"), "{e}");
            }
        }
    }
}

/// Threads whose name starts with `prefix`. A new thread names itself once
/// running, so this waits a little for at least `min` of them.
fn threads_named_at_least(prefix: &str, min: usize) -> usize {
    let mut n = 0;
    for _ in 0..100 {
        n = threads_named(prefix);
        if n >= min {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    n
}

fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn threads_are_named_and_not_leaked() {
    let dir = scratch();
    let cfg = Config {
        engine: EngineKind::Threads,
        direct: false,
    };
    let f = open_new(dir.path(), "pool.img", cfg).unwrap();
    assert!(threads_named_at_least("qcow2rs-io-", 4) >= 4);
    drop(f);

    let cfg = Config {
        engine: EngineKind::IoUring,
        direct: false,
    };
    for i in 0..40 {
        let Some(f) = open_new(dir.path(), &format!("u{i}.img"), cfg) else {
            return;
        };
        assert!(threads_named_at_least("qcow2rs-uring", 1) >= 1);
        block_on(f.write_at(b"x", 0)).unwrap();
    }
    // Other tests running in parallel hold a few files open at most.
    let n = threads_named("qcow2rs-uring");
    assert!(n <= 12, "{n} io_uring completion threads remain");
}
