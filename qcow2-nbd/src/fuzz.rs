//! Entry points for fuzzing the untrusted input paths: request headers, the handshake, and a
//! whole client session against an in-memory qcow2 image. They take arbitrary bytes and must
//! never panic or hang; a bounded run is part of the normal tests (`tests::fuzz_*`), and the
//! cargo-fuzz target `nbd` (`fuzz/fuzz_targets/nbd.rs`) calls them directly.

use crate::conn::{self, Shared};
use crate::export::{DirtyBitmap, Export};
use crate::handshake::{ExportInfo, Handshake, Step};
use crate::proto::{self, Limits};
use qcow2_core::io::mem::MemStorage;
use qcow2_core::io::Storage;
use qcow2_core::{Disk, Image, OpenOptions};
use std::cell::Cell;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Parse `data` as a stream of request headers (compact, then extended) and validate each
/// against a few export states.
pub fn requests(data: &[u8]) {
    for extended in [false, true] {
        let n = if extended {
            proto::EXT_REQUEST_LEN
        } else {
            proto::REQUEST_LEN
        };
        for chunk in data.chunks(n) {
            // Also with the right magic, so the fields past it are exercised.
            let mut fixed = chunk.to_vec();
            if fixed.len() >= 4 {
                let m = if extended {
                    proto::EXT_REQUEST_MAGIC
                } else {
                    proto::REQUEST_MAGIC
                };
                fixed[..4].copy_from_slice(&m.to_be_bytes());
            }
            for buf in [chunk, &fixed[..]] {
                if let Ok(h) = proto::parse_request_header(buf, extended) {
                    assert!(h.payload <= proto::MAX_PAYLOAD as u64);
                    for (size, ro, contexts, min_block) in [
                        (0, false, 0, 1),
                        (1 << 20, true, 1, 512),
                        (u64::MAX, false, 2, 1),
                    ] {
                        let lim = Limits {
                            size,
                            read_only: ro,
                            structured: extended || size == 0,
                            extended,
                            contexts,
                            context_mask: [0, 1 << 1, 1 << 1 | 1 << 2][contexts],
                            min_block,
                        };
                        // The header's bytes double as a payload (the block status form).
                        if let Ok(c) = proto::validate(&h, buf, &lim) {
                            check_command(&c, &lim);
                        }
                    }
                }
            }
        }
    }
}

fn check_command(c: &proto::Command, lim: &Limits) {
    use proto::Command::*;
    let (off, len) = match *c {
        Read { off, len, .. }
        | Write { off, len, .. }
        | Trim { off, len, .. }
        | Cache { off, len }
        | WriteZeroes { off, len, .. }
        | BlockStatus { off, len, .. } => (off, len),
        Disc | Flush => return,
    };
    assert!(off.checked_add(len).is_some_and(|e| e <= lim.size));
    if matches!(c, Write { .. } | Trim { .. } | WriteZeroes { .. }) {
        assert!(!lim.read_only);
    }
}

/// Run a handshake on `data` read as a sequence of options: 4 bytes client flags, then
/// (option u32, length u16, that many bytes) records.
pub fn handshake(data: &[u8]) {
    for tls in [false, true] {
        let mut hs = Handshake::new(ExportInfo {
            name: "disk".into(),
            description: "d".into(),
            size: 1 << 30,
            read_only: false,
            min_block: 1,
            pref_block: 4096,
            tls,
            multi_conn: true,
            bitmaps: vec!["b".into()],
        });
        if data.len() < 4 {
            return;
        }
        let flags = u32::from_be_bytes(data[..4].try_into().unwrap());
        if hs.client_flags(flags).is_err() {
            continue;
        }
        let mut rest = &data[4..];
        while rest.len() >= 6 {
            let opt = u32::from_be_bytes(rest[..4].try_into().unwrap()) % 16;
            let n = (u16::from_be_bytes([rest[4], rest[5]]) as usize).min(rest.len() - 6);
            let body = &rest[6..6 + n];
            rest = &rest[6 + n..];
            match hs.option(opt, body) {
                Step::Reply(r) | Step::StartTls(r) => assert!(r.len() >= 20),
                Step::Transmission(..) | Step::Close(_) => break,
            }
            if tls {
                hs.tls_started();
            }
        }
    }
}

/// Virtual size of the image a [`session`] runs against.
pub const SESSION_DISK: u64 = 1 << 20;
/// A session that takes longer than this (real time) is a hang: it panics.
const SESSION_LIMIT: Duration = Duration::from_secs(20);

/// Canned client handshakes a session input can start with (selected by its first byte):
/// the fuzzer then spends its effort on the transmission phase.
pub const HANDSHAKES: usize = 4;

fn opt(v: &mut Vec<u8>, opt: u32, data: &[u8]) {
    v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
}

/// Client bytes (after the greeting) of canned handshake `k`: 0 none (the input is the whole
/// client stream), 1 `EXPORT_NAME` (simple replies), 2 structured replies with both meta
/// contexts and `GO` asking for block sizes, 3 the same with extended headers.
pub fn canned_handshake(k: usize) -> Vec<u8> {
    let mut v = Vec::new();
    if k == 0 {
        return v;
    }
    v.extend_from_slice(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
    if k == 1 {
        opt(&mut v, proto::OPT_EXPORT_NAME, b"");
        return v;
    }
    opt(
        &mut v,
        if k == 3 {
            proto::OPT_EXTENDED_HEADERS
        } else {
            proto::OPT_STRUCTURED_REPLY
        },
        &[],
    );
    let mut meta = Vec::new();
    meta.extend_from_slice(&0u32.to_be_bytes());
    meta.extend_from_slice(&2u32.to_be_bytes());
    for q in ["base:allocation", "qemu:allocation-depth"] {
        meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
        meta.extend_from_slice(q.as_bytes());
    }
    opt(&mut v, proto::OPT_SET_META_CONTEXT, &meta);
    let mut go = Vec::new();
    go.extend_from_slice(&0u32.to_be_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    opt(&mut v, proto::OPT_GO, &go);
    v
}

/// A small qcow2 image (4 KiB clusters, 1 MiB) with data, a zeroed range and holes.
fn template() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        runtime().block_on(async {
            let dir = std::env::temp_dir().join(format!("qcow2-nbd-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temporary folder");
            let path = dir.join("t.qcow2");
            let co = qcow2_core::create::CreateOptions {
                size: Some(SESSION_DISK),
                cluster_size: 4096,
                ..Default::default()
            };
            qcow2_core::create::create_qcow2(&path, &co)
                .await
                .expect("create the template");
            let bytes = std::fs::read(&path).expect("read the template");
            let _ = std::fs::remove_dir_all(&dir);
            let mem = Arc::new(MemStorage::from_vec(bytes));
            let img = Image::open_storage(mem.clone(), Path::new("fuzz.qcow2"), &img_opts())
                .await
                .expect("open the template");
            let pat: Vec<u8> = (0..20000u32).map(|i| (i * 13 + 1) as u8).collect();
            img.write_at(&pat, 8192).await.unwrap();
            img.write_at(&pat[..4096], 512 << 10).await.unwrap();
            img.write_zeroes(16384, 4096, qcow2_core::ZeroMode::Keep)
                .await
                .unwrap();
            img.close().await.unwrap();
            mem.snapshot()
        })
    })
}

fn img_opts() -> OpenOptions {
    let mut o = OpenOptions::default();
    o.writable = true;
    o.cache_size = 256 << 10;
    o.no_external_files = true;
    o.locking = false;
    o
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

thread_local! {
    /// Set by the panic hook when a panic happens on this thread (a request task that
    /// panics is caught by Tokio and would go unnoticed otherwise).
    static PANICKED: Cell<bool> = const { Cell::new(false) };
}

fn watch_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |i| {
            PANICKED.with(|p| p.set(true));
            prev(i)
        }));
    });
}

/// Run one client session on `data` against a fresh copy of a small writable qcow2 image:
/// the first byte picks a canned handshake ([`canned_handshake`], `data[0] % HANDSHAKES`), the
/// rest is sent after it as the client's bytes; the server's replies are read and dropped.
/// Panics when the server panics (in any task), does not finish within 20 s after the client
/// has sent everything and closed its side, or leaves the image with corruptions (our check).
pub fn session(data: &[u8]) {
    session_replies(data);
}

/// [`session`], returning how many bytes the server sent.
pub fn session_replies(data: &[u8]) -> u64 {
    let Some((&sel, rest)) = data.split_first() else {
        return 0;
    };
    let mut input = canned_handshake(sel as usize % HANDSHAKES);
    input.extend_from_slice(rest);
    watch_panics();
    PANICKED.with(|p| p.set(false));
    let template = template();
    let rt = runtime();
    let got = rt.block_on(async {
        let mem = Arc::new(MemStorage::from_vec(template.to_vec()));
        mem.set_max_len(64 << 20);
        let file: Arc<dyn Storage> = mem.clone();
        let img = Image::open_storage(file, Path::new("fuzz.qcow2"), &img_opts())
            .await
            .expect("open the template");
        let mut export = Export::new(Disk::Qcow2(img), true);
        // A dirty bitmap context (`-B b`) with a few dirty granules.
        let bits = vec![0x5a; (SESSION_DISK / 65536).div_ceil(8) as usize];
        export.bitmaps = vec![DirtyBitmap::new("b".into(), bits, 65536, SESSION_DISK)];
        let export = Arc::new(export);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            export: export.clone(),
            info: ExportInfo {
                name: "disk".into(),
                description: "fuzz".into(),
                size: SESSION_DISK,
                read_only: false,
                min_block: 1,
                pref_block: 4096,
                tls: false,
                multi_conn: true,
                bitmaps: vec!["b".into()],
            },
            tls: None,
            shutdown,
            handshake_limit: Duration::from_secs(5),
        });
        let (client, server) = tokio::io::duplex(64 << 10);
        let (mut rd, mut wr) = tokio::io::split(client);
        let client = async move {
            // The server may stop reading at any point (and drop its end): ignore errors.
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
            drop(wr);
        };
        let drain = async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0u64;
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            got
        };
        let all = async {
            let (_, _, got) = tokio::join!(conn::serve(Box::new(server), shared), client, drain);
            got
        };
        let Ok(got) = tokio::time::timeout(SESSION_LIMIT, all).await else {
            panic!("the session did not end within {SESSION_LIMIT:?}");
        };
        let Ok(export) = Arc::try_unwrap(export) else {
            panic!("the export is still referenced after the session ended");
        };
        // Requests may have failed (EFBIG past 64 MiB...), but the image must stay sound.
        let _ = match export.into_disk() {
            Disk::Qcow2(i) => i.close().await,
            d => d.flush().await,
        };
        let f: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(mem.snapshot()));
        let mut copts = img_opts();
        copts.for_check = true;
        copts.writable = false;
        let img = Image::open_storage(f, Path::new("fuzz.qcow2"), &copts)
            .await
            .expect("the image opens after the session");
        let r = qcow2_core::check::check(&img, &Default::default())
            .await
            .expect("check runs");
        assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "corruptions after the session: {:?}",
            r.messages
        );
        got
    });
    assert!(
        !PANICKED.with(|p| p.get()),
        "a task panicked during the session"
    );
    got
}

/// A small deterministic generator (xorshift64*), so sample sessions need no dependency.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A valid session input for [`session`] (seed of the mutations and of the cargo-fuzz
/// corpus): a handshake (canned, or spelled out in the input for `seed % 5 == 0` so that
/// mutations reach the handshake), then 1 to 24 well-formed requests of every kind, within
/// the disk or just past its end, sometimes ending with `NBD_CMD_DISC`.
pub fn sample_session(seed: u64) -> Vec<u8> {
    let mut g = Gen(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let k = 1 + g.below(3) as usize;
    let mut v = if seed.is_multiple_of(5) {
        let mut v = vec![0u8];
        v.extend(canned_handshake(k));
        v
    } else {
        vec![k as u8]
    };
    let extended = k == 3;
    let n = 1 + g.below(24);
    for cookie in 0..n {
        let typ = g.below(8) as u16;
        let len = match g.below(4) {
            0 => g.below(512),
            1 => 4096 * g.below(5),
            2 => g.below(70000),
            _ => 1 + g.below(16),
        };
        let off = match g.below(4) {
            0 => g.below(SESSION_DISK / 4096) * 4096,
            1 => SESSION_DISK - len.min(SESSION_DISK),
            2 => SESSION_DISK - len.min(SESSION_DISK) + g.below(2),
            _ => g.below(SESSION_DISK),
        };
        let mut flags = 0u16;
        if g.below(4) == 0 {
            flags |= proto::CMD_FLAG_FUA;
        }
        match typ {
            proto::CMD_READ if k > 1 && g.below(3) == 0 => flags |= proto::CMD_FLAG_DF,
            proto::CMD_WRITE_ZEROES => {
                flags |=
                    [0, proto::CMD_FLAG_NO_HOLE, proto::CMD_FLAG_FAST_ZERO][g.below(3) as usize]
            }
            proto::CMD_BLOCK_STATUS if g.below(3) == 0 => flags = proto::CMD_FLAG_REQ_ONE,
            proto::CMD_DISC if cookie + 1 < n => continue,
            _ => {}
        }
        if typ == proto::CMD_BLOCK_STATUS && extended && g.below(2) == 0 {
            // The payload form: effect length, then the context ids wanted.
            let ids: &[u32] = [&[1][..], &[2], &[2, 1], &[3], &[1, 1]][g.below(5) as usize];
            let mut p = len.to_be_bytes().to_vec();
            for id in ids {
                p.extend_from_slice(&id.to_be_bytes());
            }
            flags |= proto::CMD_FLAG_PAYLOAD_LEN;
            v.extend(proto::encode_ext_request(
                flags,
                typ,
                cookie,
                off,
                p.len() as u64,
            ));
            v.extend(p);
            continue;
        }
        if extended {
            if typ == proto::CMD_WRITE {
                flags |= proto::CMD_FLAG_PAYLOAD_LEN;
            }
            v.extend(proto::encode_ext_request(flags, typ, cookie, off, len));
        } else {
            v.extend(proto::encode_request(flags, typ, cookie, off, len as u32));
        }
        if typ == proto::CMD_WRITE {
            v.extend((0..len).map(|i| (i as u8) ^ (cookie as u8)));
        }
    }
    v
}

/// Mutate `v` in place a few times (bit flips, bytes and words set to extremes, truncation,
/// insertions, deletions, duplicated runs), deterministically from `seed`.
pub fn mutate(v: &mut Vec<u8>, seed: u64) {
    let mut g = Gen(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
    for _ in 0..1 + g.below(4) {
        if v.len() < 2 {
            v.push(g.next() as u8);
            continue;
        }
        // Never touch the selector byte: keep the handshake choice.
        let at = 1 + g.below(v.len() as u64 - 1) as usize;
        match g.below(8) {
            0 => v[at] ^= 1 << g.below(8),
            1 => v[at] = g.next() as u8,
            2 | 3 => {
                let w = [2usize, 4, 8][g.below(3) as usize];
                let val: u64 =
                    [0, u64::MAX, 1 << 63, 1 << 32, g.next(), SESSION_DISK][g.below(6) as usize];
                for (i, b) in val.to_be_bytes()[8 - w..].iter().enumerate() {
                    if let Some(x) = v.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            4 => v.truncate(at),
            5 => {
                let n = g.below(40) as usize;
                let ins: Vec<u8> = (0..n).map(|_| g.next() as u8).collect();
                v.splice(at..at, ins);
            }
            6 => {
                let end = (at + g.below(64) as usize).min(v.len());
                v.drain(at..end);
            }
            _ => {
                let end = (at + g.below(64) as usize).min(v.len());
                let dup = v[at..end].to_vec();
                v.splice(at..at, dup);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// The valid sessions run cleanly, and seeded mutations of them neither panic nor hang
    /// nor corrupt the image (a bounded stable run of the `nbd` cargo-fuzz target; a failing
    /// input is saved under `target/tmp/fuzz-failures/nbd-*`).
    #[test]
    fn sessions_and_mutations() {
        let save = |name: String, v: &[u8]| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tmp/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(name), v);
        };
        let run =
            |name: String, v: &[u8]| match std::panic::catch_unwind(|| super::session_replies(v)) {
                Ok(n) => n,
                Err(e) => {
                    save(name, v);
                    std::panic::resume_unwind(e);
                }
            };
        for seed in 0..300u64 {
            let v = super::sample_session(seed);
            let got = run(format!("nbd-valid-{seed}"), &v);
            // At least the greeting and a reply to the handshake.
            assert!(got > 18, "no reply to the valid session {seed}");
            for m in 0..10u64 {
                let mut w = v.clone();
                super::mutate(&mut w, seed * 1000 + m);
                run(format!("nbd-{seed}-{m}"), &w);
            }
        }
    }

    /// Write the sample sessions as a cargo-fuzz seed corpus into `$QCOW2_NBD_SEEDS`.
    #[test]
    #[ignore = "writes the seed corpus of the nbd fuzz target"]
    fn write_seed_corpus() {
        let dir = std::env::var("QCOW2_NBD_SEEDS").expect("QCOW2_NBD_SEEDS=folder");
        std::fs::create_dir_all(&dir).unwrap();
        for seed in 0..64u64 {
            std::fs::write(format!("{dir}/sample-{seed}"), super::sample_session(seed)).unwrap();
        }
    }

    /// Bounded random run (the cargo-fuzz targets go further).
    #[test]
    fn random_inputs_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..200);
            let mut v: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            super::requests(&v);
            // Bias towards meaningful options: small option numbers and plausible lengths.
            if v.len() >= 10 {
                v[..4].copy_from_slice(&1u32.to_be_bytes());
                v[4..8].copy_from_slice(&(rng.gen_range(0..12u32)).to_be_bytes());
            }
            super::handshake(&v);
        }
    }
}
