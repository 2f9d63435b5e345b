//! `bench`: `qemu-img bench` (options, request pattern and output as qemu-img's).
//!
//! Request `k` goes to offset `o(k)`: `o(0)` is the starting offset (`-o`) and
//! `o(k+1) = (o(k) + step) mod (image_size - buffer_size)`, or 0 when the image is not larger
//! than the buffer (qemu-img's `bench_cb` since commit ff2ab634; the starting offset itself
//! is not wrapped). The step defaults to the buffer size, and `-S 0` also means the buffer
//! size, as in qemu-img. `-d DEPTH` requests are in flight at any time: DEPTH loops each
//! take the next request number when their previous request completes, so the sequence of
//! submitted offsets is qemu-img's. Every task reads into its own 4 KiB-aligned buffer.

use crate::cli::{operands, BenchArgs};
use crate::Fail;
use futures::stream::{FuturesUnordered, StreamExt};
use qcow2_core::convert;
use qcow2_core::disk::{check_range, Disk};
use qcow2_core::io::EngineKind;
use qcow2_core::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Alignment of the request buffers (enough for O_DIRECT on any common device).
const BUF_ALIGN: usize = 4096;
/// qemu-img's limits on counts and sizes (`INT_MAX`).
const INT_MAX: u64 = i32::MAX as u64;

/// qemu's `qemu_strtoul(s, NULL, 0, ..)`: decimal, `0x` hex or leading-0 octal.
fn parse_ulong(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let s = s.strip_prefix('+').unwrap_or(s);
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// qemu's `cvtnum`: a byte count with an optional binary suffix (B, k/K, M, G, T, P, E) and
/// an optional fraction ("1.5M").
pub fn parse_size(s: &str) -> Option<u64> {
    qcow2_core::create::parse_size(s).ok()
}

/// Offset of request number `k` (see the module documentation).
pub fn request_offset(k: u64, start: u64, step: u64, image_size: u64, bufsize: u64) -> u64 {
    if k == 0 {
        return start;
    }
    if image_size <= bufsize {
        return 0;
    }
    let m = (image_size - bufsize) as u128;
    // Equal to applying `(o + step) % m` k times, since the first wrap already reduces `o`.
    ((start as u128 + k as u128 * step as u128) % m) as u64
}

/// The benchmark parameters after parsing.
#[derive(Debug, Clone)]
struct Params {
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
    engine: EngineKind,
    cache: qcow2_core::CacheMode,
}

fn num_opt(value: &Option<String>, max: u64, what: &str, size: bool) -> Result<Option<u64>, Fail> {
    match value.as_deref() {
        None => Ok(None),
        Some(v) => {
            let n = if size { parse_size(v) } else { parse_ulong(v) };
            match n {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(Fail::new(format!("Invalid {what} specified"))),
            }
        }
    }
}

fn params(p: &BenchArgs) -> Result<Params, Fail> {
    let count = num_opt(&p.count, INT_MAX, "request count", false)?.unwrap_or(75000);
    let depth = num_opt(&p.depth, INT_MAX, "queue depth", false)?.unwrap_or(64);
    if depth == 0 {
        // qemu-img would wait forever with no request in flight.
        return Err(Fail::new("Invalid queue depth specified"));
    }
    let offset = num_opt(&p.offset, i64::MAX as u64, "offset", true)?.unwrap_or(0);
    let bufsize = num_opt(&p.size, INT_MAX, "buffer size", true)?.unwrap_or(4096);
    let step = num_opt(&p.step, INT_MAX, "step size", true)?.unwrap_or(0);
    let pattern = num_opt(&p.pattern, 0xff, "pattern byte", false)?.unwrap_or(0) as u8;
    let flush_interval = num_opt(&p.flush_interval, INT_MAX, "flush interval", false)?.unwrap_or(0);
    let cache = (p.cache.as_deref())
        .map_or(
            Some(qcow2_core::CacheMode::default()),
            qcow2_core::CacheMode::parse,
        )
        .ok_or_else(|| Fail::new("Invalid cache mode"))?;
    let engine = match p.aio.as_deref() {
        None if p.native => EngineKind::IoUring,
        None => EngineKind::Auto,
        // qemu's "native" is Linux AIO; io_uring is our kernel-native engine.
        Some("native") | Some("io_uring") => EngineKind::IoUring,
        Some("threads") => EngineKind::Threads,
        Some(_) => return Err(Fail::new("Invalid aio option provided")),
    };
    let write = p.write;
    if !write && flush_interval != 0 {
        return Err(Fail::new(
            "--flush-interval is only available in write tests",
        ));
    }
    if flush_interval != 0 && flush_interval < depth {
        return Err(Fail::new("Flush interval can't be smaller than depth"));
    }
    Ok(Params {
        count,
        depth,
        offset,
        bufsize,
        step: if step == 0 { bufsize } else { step },
        write,
        pattern,
        flush_interval,
        drain: !p.no_drain,
        engine,
        cache,
    })
}

/// `qcow2rs bench [-c COUNT] [-d DEPTH] [-f FMT] [-i AIO] [-n] [-o OFFSET] [-q] [-s SIZE]
/// [-S STEP] [-t CACHE] [-w [--pattern=N] [--flush-interval=N] [--no-drain]] FILE`.
pub async fn cmd_bench(p: BenchArgs) -> Result<u8, Fail> {
    // -q is accepted: qemu-img prints the header and the result even with it.
    let file = match operands(&[&p.file], &p.extra).as_slice() {
        [f] => f.clone(),
        _ => return Err(Fail::new("Expecting one image file name")),
    };
    if p.common.image_opts {
        return Err(Fail::new("bench: --image-opts is not supported"));
    }
    let prm = params(&p)?;
    // Our own option (qemu-img bench takes `l2-cache-size` through --image-opts): the
    // metadata cache of the image and its chain (OpenOptions::cache_size).
    let cache_size = match p.cache_size.as_deref() {
        None => qcow2_core::image::DEFAULT_CACHE_SIZE,
        Some(v) => match parse_size(v) {
            Some(n) if n <= usize::MAX as u64 => n as usize,
            _ => return Err(Fail::new("Invalid cache size specified")),
        },
    };
    let mut opts = OpenOptions::default();
    opts.cache_size = cache_size;
    opts.writable = prm.write;
    opts.engine = prm.engine;
    opts.no_external_files = p.common.untrusted;
    opts.force_share = p.force_share;
    prm.cache.apply(&mut opts);
    let buffers = if prm.write && prm.flush_interval != 0 {
        1
    } else {
        prm.depth.min(prm.count)
    };
    check_memory(
        prm.bufsize
            .saturating_add(BUF_ALIGN as u64)
            .saturating_mul(buffers),
    )
    .map_err(|e| Fail::new(e.to_string()))?;
    let disk = convert::open_disk(Path::new(&file), p.format.as_deref(), &opts)
        .await
        .map_err(|e| {
            let m = e.to_string();
            if m.starts_with(file.as_str()) {
                Fail::new(m)
            } else {
                Fail::new(format!("{file}: {m}"))
            }
        })?;
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        prm.count,
        if prm.write { "write" } else { "read" },
        prm.bufsize,
        prm.depth,
        prm.offset,
        prm.step
    );
    if prm.flush_interval != 0 {
        println!("Sending flush every {} requests", prm.flush_interval);
    }
    let _ = std::io::stdout().flush();
    let elapsed = run(disk, &prm).await?;
    println!("Run completed in {:.3} seconds.", elapsed);
    Ok(0)
}

/// Run the requests; returns the wall-clock seconds from the first submission to the last
/// completion. Writes are flushed after the clock stops (qemu-img flushes when it closes the
/// image).
async fn run(disk: Disk, prm: &Params) -> Result<f64, Fail> {
    let failed = |e: qcow2_core::Error| Fail::new(format!("Failed request: {e}"));
    let elapsed = if prm.write && prm.flush_interval != 0 {
        run_with_flushes(&disk, prm).await.map_err(failed)?
    } else {
        run_workers(&disk, prm).await.map_err(failed)?
    };
    if prm.write {
        disk.flush()
            .await
            .map_err(|e| Fail::new(format!("Failed to flush the image: {e}")))?;
    }
    Ok(elapsed)
}

/// A buffer of `len` bytes filled with `fill`, starting at a `BUF_ALIGN`-aligned address:
/// the storage and the offset of the aligned part.
/// Fails (instead of aborting) when the memory cannot be reserved.
fn aligned_buf(len: usize, fill: u8) -> qcow2_core::Result<(Vec<u8>, usize)> {
    let mut raw = Vec::new();
    raw.try_reserve_exact(len + BUF_ALIGN).map_err(|_| {
        qcow2_core::Error::new(
            qcow2_core::ErrorKind::TooLarge,
            format!("cannot allocate a request buffer of {len} bytes"),
        )
    })?;
    raw.resize(len + BUF_ALIGN, fill);
    let start = raw.as_ptr().align_offset(BUF_ALIGN).min(BUF_ALIGN);
    Ok((raw, start))
}

/// Refuse buffers larger than the memory available (Linux `MemAvailable`), which would end
/// in the OOM killer rather than an error.
fn check_memory(total: u64) -> qcow2_core::Result<()> {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    match avail {
        Some(a) if total > a => Err(qcow2_core::Error::new(
            qcow2_core::ErrorKind::TooLarge,
            format!(
                "request buffers need {total} bytes, more than the {a} bytes of memory available"
            ),
        )),
        _ => Ok(()),
    }
}

/// Write `buf` at guest offset `off` of either kind of disk.
async fn write_req(disk: &Disk, buf: &[u8], off: u64) -> qcow2_core::Result<()> {
    match disk {
        Disk::Qcow2(img) => img.write_at(buf, off).await,
        Disk::Raw(_) => {
            check_range(off, buf.len() as u64, disk.size())?;
            match disk.raw_storage() {
                Some(st) => st.write_at(buf, off).await.map_err(|e| {
                    qcow2_core::Error::io(e, format!("{}: write", disk.path().display()))
                }),
                None => Ok(()),
            }
        }
    }
}

/// Smallest O_DIRECT request that [`request_threads`] runs on one thread.
const ONE_THREAD_MIN_REQUEST: u64 = 64 << 10;

/// How many threads run the request loops ([`run_workers`]): one per CPU, at most one per
/// loop; one for O_DIRECT requests of 64 KiB and more through io_uring, where the device
/// is the limit, not the CPU: each thread waits in its own ring, so two threads wait (and
/// are woken) twice as often as one, each with half the completions, and submit half as
/// many requests per system call (one doorbell of the device each) as qemu-img's one event
/// loop. (Smaller O_DIRECT requests keep a thread per CPU: with one, 4 KiB allocating
/// writes took 1.5x the time; see docs/PERFORMANCE.md, twelfth session.)
fn request_threads(prm: &Params, cpus: usize, workers: u64) -> usize {
    let threads = if prm.cache.direct
        && prm.engine != EngineKind::Threads
        && prm.bufsize >= ONE_THREAD_MIN_REQUEST
    {
        1
    } else {
        cpus
    };
    threads.clamp(1, workers.max(1) as usize)
}

/// Without flushes: DEPTH request loops, each taking the next request number as its
/// previous request completes (the same offsets, in the same order, as qemu-img's
/// submissions). The loops run on one thread per CPU (at most one per loop; one for large O_DIRECT
/// requests, see [`request_threads`]), each in
/// [`qcow2_core::io::block_on`]: a thread waits in its own io_uring ring and reaps its
/// requests' completions itself, as qemu-img's event loop does, so a request that waits for
/// the device costs one wake-up (on a runtime worker it would cost two: the ring's
/// completion thread, then the worker).
async fn run_workers(disk: &Disk, prm: &Params) -> qcow2_core::Result<f64> {
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let size = disk.size();
    let workers = prm.depth.min(prm.count);
    // Allocate every buffer before the clock starts, as qemu-img does.
    check_memory(
        prm.bufsize
            .saturating_add(BUF_ALIGN as u64)
            .saturating_mul(workers),
    )?;
    let mut bufs: Vec<(Vec<u8>, usize)> = (0..workers)
        .map(|_| aligned_buf(prm.bufsize as usize, prm.pattern))
        .collect::<qcow2_core::Result<_>>()?;
    let threads = request_threads(
        prm,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        workers,
    );
    let mut groups: Vec<Vec<&mut [u8]>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, (raw, start)) in bufs.iter_mut().enumerate() {
        let start = *start;
        groups[i % threads].push(&mut raw[start..start + prm.bufsize as usize]);
    }
    let handle = tokio::runtime::Handle::current();
    let started = Instant::now();
    let results: Vec<qcow2_core::Result<()>> = std::thread::scope(|s| {
        let spawned: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(i, group)| {
                let handle = &handle;
                let (next, failed) = (&next, &failed);
                std::thread::Builder::new()
                    .name(format!("qcow2rs-bench-{i}"))
                    .spawn_scoped(s, move || {
                        let _rt = handle.enter();
                        let mut loops: FuturesUnordered<_> = group
                            .into_iter()
                            .map(|buf| request_loop(disk, prm, size, next, failed, buf))
                            .collect();
                        qcow2_core::io::block_on(async move {
                            while let Some(r) = loops.next().await {
                                r?;
                            }
                            Ok(())
                        })
                    })
            })
            .collect();
        spawned
            .into_iter()
            .map(|t| match t {
                Ok(t) => t.join().unwrap_or_else(|_| {
                    Err(qcow2_core::Error::new(
                        qcow2_core::ErrorKind::Io,
                        "a request thread panicked",
                    ))
                }),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    Err(qcow2_core::Error::new(
                        qcow2_core::ErrorKind::Io,
                        format!("cannot start a request thread: {e}"),
                    ))
                }
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    results
        .into_iter()
        .collect::<qcow2_core::Result<Vec<()>>>()?;
    Ok(elapsed)
}

/// One request loop of [`run_workers`]: requests until the count is reached or a request
/// failed.
async fn request_loop(
    disk: &Disk,
    prm: &Params,
    size: u64,
    next: &AtomicU64,
    failed: &AtomicBool,
    buf: &mut [u8],
) -> qcow2_core::Result<()> {
    loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= prm.count || failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let off = request_offset(k, prm.offset, prm.step, size, prm.bufsize);
        let r = if prm.write {
            write_req(disk, buf, off).await
        } else {
            disk.read_at(buf, off).await
        };
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
            return r;
        }
    }
}

/// What a finished task was.
enum Done {
    Request,
    /// A flush; `drained` if submissions wait for it.
    Flush {
        drained: bool,
    },
}

/// Writes with `--flush-interval`: qemu-img's `bench_cb` state machine. When the number of
/// requests not yet submitted is a multiple of the interval, a flush is sent; by default
/// the queue is drained first and submissions wait for the flush (`--no-drain`: the flush
/// runs alongside the writes).
async fn run_with_flushes(disk: &Disk, prm: &Params) -> qcow2_core::Result<f64> {
    let size = disk.size();
    // Writes only read their buffer: one pattern buffer serves every request.
    let (raw, start) = aligned_buf(prm.bufsize as usize, prm.pattern)?;
    let data = Arc::new(raw);
    let mut set: tokio::task::JoinSet<qcow2_core::Result<Done>> = tokio::task::JoinSet::new();
    let (mut n, mut in_flight, mut next_k, mut in_flush) = (prm.count, 0u64, 0u64, false);
    let started = Instant::now();
    let submit = |set: &mut tokio::task::JoinSet<qcow2_core::Result<Done>>,
                  n: u64,
                  in_flight: &mut u64,
                  next_k: &mut u64| {
        while n > *in_flight && *in_flight < prm.depth {
            let off = request_offset(*next_k, prm.offset, prm.step, size, prm.bufsize);
            *next_k += 1;
            *in_flight += 1;
            let (disk, data, len) = (disk.clone(), data.clone(), prm.bufsize as usize);
            set.spawn(async move {
                write_req(&disk, &data[start..start + len], off).await?;
                Ok(Done::Request)
            });
        }
    };
    submit(&mut set, n, &mut in_flight, &mut next_k);
    while n > 0 {
        let done = match set.join_next().await {
            None => break,
            Some(Ok(Ok(d))) => d,
            Some(Ok(Err(e))) => {
                set.abort_all();
                return Err(e);
            }
            Some(Err(e)) => {
                set.abort_all();
                return Err(qcow2_core::Error::new(
                    qcow2_core::ErrorKind::Io,
                    format!("request task failed: {e}"),
                ));
            }
        };
        match done {
            Done::Flush { drained: false } => continue,
            Done::Flush { drained: true } => in_flush = false,
            Done::Request => {
                let remaining = n - in_flight;
                n -= 1;
                in_flight -= 1;
                if remaining % prm.flush_interval == 0 {
                    if !in_flush && (in_flight == 0 || !prm.drain) {
                        let disk = disk.clone();
                        let drained = prm.drain;
                        in_flush = drained;
                        set.spawn(async move {
                            disk.flush().await?;
                            Ok(Done::Flush { drained })
                        });
                    }
                    if prm.drain {
                        continue;
                    }
                }
            }
        }
        if !in_flush {
            submit(&mut set, n, &mut in_flight, &mut next_k);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Flushes still running when the last write completed finish outside the clock.
    while let Some(r) = set.join_next().await {
        if let Ok(Err(e)) = r {
            return Err(e);
        }
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// O_DIRECT requests of 64 KiB through io_uring run every loop on one thread; smaller
    /// ones, the page cache and the threads engine use a thread per CPU (at most one per
    /// loop).
    #[test]
    fn request_threads_by_cache_and_engine() {
        let prm = |direct, engine| Params {
            count: 1000,
            depth: 32,
            offset: 0,
            bufsize: 65536,
            step: 4096,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: false,
            engine,
            cache: qcow2_core::CacheMode {
                direct,
                ..Default::default()
            },
        };
        assert_eq!(request_threads(&prm(true, EngineKind::IoUring), 2, 32), 1);
        assert_eq!(request_threads(&prm(true, EngineKind::Auto), 4, 32), 1);
        assert_eq!(request_threads(&prm(false, EngineKind::IoUring), 2, 32), 2);
        assert_eq!(request_threads(&prm(true, EngineKind::Threads), 2, 32), 2);
        assert_eq!(request_threads(&prm(false, EngineKind::Auto), 8, 3), 3);
        let small = Params {
            bufsize: 4096,
            ..prm(true, EngineKind::IoUring)
        };
        assert_eq!(request_threads(&small, 2, 32), 2);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512B"), Some(512));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("4x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("99999999999E"), None);
    }

    #[test]
    fn ulong() {
        assert_eq!(parse_ulong("75000"), Some(75000));
        assert_eq!(parse_ulong("0x10"), Some(16));
        assert_eq!(parse_ulong("010"), Some(8));
        assert_eq!(parse_ulong("0"), Some(0));
        assert_eq!(parse_ulong("x"), None);
    }

    #[test]
    fn offsets_follow_qemu() {
        // Step by step with qemu-img's rule.
        let (size, bs, step, start) = (1u64 << 20, 4096u64, 12345u64, 777u64);
        let mut o = start;
        for k in 0..1000 {
            assert_eq!(request_offset(k, start, step, size, bs), o, "request {k}");
            o = (o + step) % (size - bs);
        }
        // Image not larger than the buffer: everything after the first at 0.
        assert_eq!(request_offset(0, 5, 4096, 4096, 4096), 5);
        assert_eq!(request_offset(3, 5, 4096, 4096, 4096), 0);
        // Huge values do not overflow.
        let big = request_offset(u32::MAX as u64, i64::MAX as u64, INT_MAX, 1 << 62, 4096);
        assert!(big < (1 << 62) - 4096);
    }
}
