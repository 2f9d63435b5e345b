//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` (nightly) and by the
//! bounded run in the normal tests (`tests/it/hostile_fuzz.rs`, stable).
//!
//! Each function takes arbitrary bytes and must return without panicking, hanging or
//! allocating without bound, whatever the bytes. Errors are the expected outcome for most
//! inputs; only panics (and the checked invariant of [`open_write`]) are findings.

use crate::check::{check, CheckOptions};
use crate::engine::image::{Image, OpenOptions};
use crate::format::header::Header;
use crate::format::{l2, refcount, snapshot};
use crate::io::mem::MemStorage;
use crate::io::Storage;
use crate::ZeroMode;
use std::path::Path;
use std::sync::Arc;

/// Largest image (bytes) the open targets accept; larger inputs are ignored.
pub const MAX_IMAGE: usize = 4 << 20;
/// Metadata cache size of the images the targets open.
pub const CACHE_SIZE: usize = 256 << 10;
/// Largest file the write target may grow the image to (writes past it fail with EFBIG).
pub const MAX_GROWN: u64 = 64 << 20;
/// Bytes of the virtual disk read by [`open_read`] at each end.
const READ_SPAN: u64 = 256 << 10;
/// Map entries walked by [`open_read`].
const MAP_ENTRIES: usize = 64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn opts(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        cache_size: CACHE_SIZE,
        no_external_files: true,
        locking: false,
        ..Default::default()
    }
}

/// Header and header-extension parsing: both parsers, and the encoder on what parses.
pub fn header(data: &[u8]) {
    let file_len = data.len() as u64;
    for h in [
        Header::parse(data, file_len),
        Header::parse_for_check(data, file_len),
        // A file claimed to be much longer than the bytes given: offsets past the buffer.
        Header::parse(data, 1 << 40),
    ]
    .into_iter()
    .flatten()
    {
        let _ = h.cluster_size();
        let _ = h.l2_coverage();
        let _ = h.l1_entries_for(h.size);
        let _ = crate::engine::image::Layout::new(&h);
        if let Ok(b) = h.to_bytes() {
            // What we encode parses back.
            let _ = Header::parse(&b, file_len.max(b.len() as u64));
        }
    }
}

/// L2 entry and refcount block decoding, for every cluster size and refcount width.
pub fn tables(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let cluster_bits = 9 + (sel as u32 % 13);
    let extended = sel & 0x80 != 0 && cluster_bits >= 14;
    let sc_size = if extended {
        1u64 << (cluster_bits - 5)
    } else {
        1 << cluster_bits
    };
    let step = if extended { 16 } else { 8 };
    for c in rest.chunks_exact(step) {
        let e = u64::from_be_bytes(c[..8].try_into().unwrap());
        let _ = l2::l1_offset(e);
        let ce = l2::decode(e, cluster_bits, extended);
        if let l2::ClusterEntry::Compressed(d) = ce {
            let _ = d.host_clusters(cluster_bits);
        }
        let bitmap = if extended {
            u64::from_be_bytes(c[8..16].try_into().unwrap())
        } else {
            0
        };
        for sc in [0u32, 1, 31] {
            let _ = l2::substate(ce, bitmap, sc, sc_size);
        }
    }
    for order in 0..=6u32 {
        let n = (rest.len() * 8) >> order;
        for idx in 0..n.min(4096) {
            let v = refcount::get(rest, order, idx);
            assert!(v <= refcount::max(order));
        }
        if n > 0 {
            let mut b = rest.to_vec();
            refcount::set(&mut b, order, n - 1, refcount::max(order));
            assert_eq!(refcount::get(&b, order, n - 1), refcount::max(order));
        }
    }
}

/// Snapshot table parsing (strict and as stored), with the count from the first bytes.
pub fn snapshot_table(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let count = u16::from_be_bytes([data[0], data[1]]) as u32;
    let cluster_size = 1u64 << (9 + data[2] as u32 % 13);
    let buf = &data[3..];
    let _ = snapshot::parse_table(buf, count, cluster_size);
    if let Ok(snaps) = snapshot::parse_table_unchecked(buf, count) {
        let _ = snapshot::validate(&snaps, cluster_size);
        let _ = snapshot::table_len(&snaps);
        for s in &snaps {
            let _ = s.to_bytes();
        }
    }
}

async fn read_some(img: &Image) {
    let size = img.size();
    let mut buf = vec![0u8; READ_SPAN.min(size) as usize];
    let _ = img.read_at(&mut buf, 0).await;
    let tail = READ_SPAN.min(size);
    let _ = img.read_at(&mut buf[..tail as usize], size - tail).await;
    // Unaligned small reads in the middle.
    let mut small = [0u8; 1000];
    if size > 1000 {
        let _ = img.read_at(&mut small, size / 2 - 77).await;
    }
    let disk = crate::Disk::Qcow2(img.clone());
    let mut off = 0;
    for _ in 0..MAP_ENTRIES {
        if off >= size {
            break;
        }
        match disk.map_entry(off, size - off).await {
            Ok(e) if e.length > 0 => off += e.length,
            _ => break,
        }
    }
}

/// Open an arbitrary image read-only on in-memory storage and read from it; also open it
/// for check and check it.
pub fn open_read(data: &[u8]) {
    if data.len() > MAX_IMAGE {
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data.to_vec()));
        if let Ok(img) =
            Image::open_storage(file.clone(), Path::new("fuzz.qcow2"), &opts(false)).await
        {
            read_some(&img).await;
            let disk = crate::Disk::Qcow2(img);
            let _ = crate::info::info_json(&disk);
            let _ = crate::info::info_human(&disk);
        }
        let copts = OpenOptions {
            for_check: true,
            ..opts(false)
        };
        if let Ok(img) = Image::open_storage(file, Path::new("fuzz.qcow2"), &copts).await {
            let _ = check(&img, &CheckOptions::default()).await;
        }
    });
}

/// Open an arbitrary image writable on in-memory storage, write, write zeroes, discard,
/// flush, close, then check the result. Invariant: when the image checked clean (no
/// corruptions) before and every request succeeded, it checks without corruptions after.
pub fn open_write(data: &[u8]) {
    if data.len() > MAX_IMAGE {
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let before = {
            let f: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data.to_vec()));
            match Image::open_storage(f, Path::new("fuzz.qcow2"), &opts(false)).await {
                Ok(img) => check(&img, &CheckOptions::default()).await.ok(),
                Err(_) => None,
            }
        };
        let mem = Arc::new(MemStorage::from_vec(data.to_vec()));
        mem.set_max_len(MAX_GROWN);
        let file: Arc<dyn Storage> = mem.clone();
        let Ok(img) = Image::open_storage(file, Path::new("fuzz.qcow2"), &opts(true)).await else {
            return;
        };
        let size = img.size();
        let cs = img.layout().cluster_size;
        let pat: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut ok = true;
        let mut w = |r: crate::Result<()>| ok &= r.is_ok();
        for off in [0, cs / 2 + 5, size / 2, size.saturating_sub(3000)] {
            let len = (pat.len() as u64).min(size.saturating_sub(off)) as usize;
            if len > 0 {
                w(img.write_at(&pat[..len], off).await);
            }
        }
        read_some(&img).await;
        if size >= 2 * cs {
            w(img.write_zeroes(0, cs, ZeroMode::Unmap).await);
            w(img.write_zeroes(cs, cs, ZeroMode::Keep).await);
            w(img.discard(size / 2 / cs * cs, cs).await);
        }
        w(img.flush().await);
        w(img.close().await);
        let after = {
            let f: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(mem.snapshot()));
            let copts = OpenOptions {
                for_check: true,
                ..opts(false)
            };
            match Image::open_storage(f, Path::new("fuzz.qcow2"), &copts).await {
                Ok(img) => check(&img, &CheckOptions::default()).await,
                Err(e) => Err(e),
            }
        };
        if let Some(b) = before {
            if ok && b.corruptions == 0 && b.check_errors == 0 {
                match after {
                    Ok(a) => assert!(
                        a.corruptions == 0 && a.check_errors == 0,
                        "a clean image has corruptions after writes: {:?}",
                        a.messages
                    ),
                    Err(e) => panic!("a clean image cannot be checked after writes: {e}"),
                }
            }
        }
    });
}
