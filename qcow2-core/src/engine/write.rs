//! Guest writes: the in-place fast path and the entry into copy-on-write.
//!
//! Concurrency: metadata changes take one async mutex (`Meta`), held only for cache
//! updates, never across guest data I/O. Writes into clusters that are already allocated
//! with refcount 1 take no lock at all. Writes that must allocate or copy a cluster first
//! register the guest cluster as in flight; a second request for the same cluster waits for
//! the first to publish its mapping and then re-evaluates, except when the first is
//! allocating a fresh host cluster for a cluster that reads as zeros: then the second writes
//! into that host cluster alongside and waits only for the mapping (`inflight.rs`,
//! [`crate::engine::inflight::Inflight`]).
//!
//! A write whose future is dropped holds its ticket, mark and gates until its data write
//! has ended (the storage's write futures run to their end when dropped): see the in-flight
//! rule in `inflight.rs`.

use crate::engine::image::Image;
use crate::engine::inflight::Acquired;
use crate::engine::metadata::Meta;
use crate::format::header::{AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW};
use crate::format::l2::{self, ClusterEntry};
use crate::{Error, Result};
use parking_lot::Mutex as PMutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::{Mutex, OnceCell};

/// Write state of an image opened writable.
pub struct WriteState {
    pub(crate) meta: Mutex<Meta>,
    pub(crate) inflight: PMutex<HashMap<u64, Arc<crate::engine::inflight::Inflight>>>,
    pub(crate) first_write: OnceCell<()>,
    /// Request tickets (see `engine/inflight.rs`).
    pub(crate) epochs: crate::engine::inflight::Epochs,
    /// Held shared by a request from the allocation of a host cluster until the mapping
    /// that references it is published (the cluster is counted but not referenced in
    /// between); held exclusively by `check` so that it sees no such cluster. Taken before
    /// the metadata lock, never while holding it.
    pub(crate) alloc_gate: tokio::sync::RwLock<()>,
    /// Held shared by every guest request from its start to its end (see
    /// [`Image::enter_request`]); held exclusively by an operation that must see no request
    /// in flight (internal snapshots). Taken before `alloc_gate` and the metadata lock.
    pub(crate) drain: tokio::sync::RwLock<()>,
    /// The enabled persistent bitmaps, while they record changes (see `engine/dirty.rs`).
    pub(crate) dirty: crate::engine::dirty::Tracking,
}

impl WriteState {
    pub(crate) fn new(high_water: u64) -> Self {
        WriteState {
            meta: Mutex::new(Meta {
                free_hint: 0,
                pending_free: Vec::new(),
                l1_dirty: BTreeSet::new(),
                reftable_dirty: BTreeSet::new(),
                high_water,
                comp_cursor: 0,
                comp_written_back: 0,
                reserved_end: 0,
                quarantine: Default::default(),
            }),
            inflight: PMutex::new(HashMap::new()),
            first_write: OnceCell::new(),
            epochs: Default::default(),
            alloc_gate: tokio::sync::RwLock::new(()),
            drain: tokio::sync::RwLock::new(()),
            dirty: Default::default(),
        }
    }
}
impl Image {
    pub(crate) fn ws(&self) -> Result<&WriteState> {
        self.inner.w.as_ref().ok_or_else(|| {
            Error::read_only(format!(
                "{}: image is opened read-only",
                self.inner.path.display()
            ))
        })
    }

    /// Write header bytes at `off` and make them durable.
    pub(crate) async fn write_header_bytes(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner
            .file
            .write_at(buf, off)
            .await
            .map_err(|e| Error::io(e, "writing the header"))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| Error::io(e, "flush"))
    }

    /// Whether the image was opened writable.
    pub fn is_writable(&self) -> bool {
        self.inner.w.is_some()
    }

    /// Before the first change: clear autoclear bits we do not maintain (unknown ones).
    /// Persistent bitmaps are kept: changes are recorded in them (see `engine/dirty.rs`).
    pub(crate) async fn before_first_write(&self) -> Result<()> {
        let w = self.ws()?;
        // Every write calls this: after the first, one atomic load (entering
        // `get_or_try_init` costs about 80 instructions per request).
        if w.first_write.initialized() {
            return Ok(());
        }
        w.first_write
            .get_or_try_init(|| async {
                let (ver, clear, bits) = {
                    let h = self.inner.header.read();
                    let keep = AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS;
                    let clear = h.autoclear_features & !keep;
                    (h.version, clear, h.autoclear_features & !clear)
                };
                if ver >= 3 && clear != 0 {
                    // The file first, then memory: a failure or a dropped future before the
                    // end leaves memory with the bits set, and the next write tries again.
                    self.write_header_bytes(&bits.to_be_bytes(), 88).await?;
                    self.inner.header.write().autoclear_features &= !clear;
                }
                Ok::<(), Error>(())
            })
            .await?;
        Ok(())
    }

    pub(crate) fn check_write(&self, off: u64, len: u64) -> Result<()> {
        self.ws()?;
        self.check_poison()?;
        self.check_usable()?;
        if self.inner.header.read().corrupt() {
            return Err(Error::read_only(format!(
                "{}: image is marked corrupt; writes are refused",
                self.inner.path.display()
            )));
        }
        crate::engine::disk::check_range(off, len, self.size())
    }

    /// Write `buf` at guest offset `off`.
    pub async fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_write(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.before_first_write().await?;
        let _req = self.enter_request().await;
        self.track_change(off, buf.len() as u64).await?;
        let _ticket = self.ticket();
        let cs = self.inner.layout.cluster_size;
        // Inside one cluster (most requests): awaited in place. Through the vector of
        // futures below, the cluster write's future (a few KiB of state) was copied three
        // times per request, and with the vector and the join that cost about 1 200
        // instructions per 4 KiB write (callgrind, see docs/PERFORMANCE.md).
        if off / cs == (off + buf.len() as u64 - 1) / cs {
            self.write_cluster(off, Some(buf), buf.len() as u64).await?;
            return self.finish_write((_req, _ticket)).await;
        }
        // Runs of at least two whole clusters that need fresh host clusters are written in
        // batches (`batch.rs`); everything else cluster by cluster.
        let (wa, wb) = (off.div_ceil(cs), (off + buf.len() as u64) / cs);
        let mut fresh = vec![false; if wb >= wa + 2 { (wb - wa) as usize } else { 0 }];
        for (i, f) in fresh.iter_mut().enumerate() {
            let (e, _, _) = self.current_entry(wa + i as u64).await?;
            *f = self.fresh_candidate(e);
        }
        let mut futs = Vec::new();
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = off + pos as u64;
            let n = ((cs - g % cs) as usize).min(buf.len() - pos);
            let i = (g / cs).wrapping_sub(wa) as usize;
            if g.is_multiple_of(cs) && fresh.get(i) == Some(&true) {
                let k = fresh[i..].iter().take_while(|&&f| f).count();
                if k >= 2 {
                    let len = k * cs as usize;
                    futs.push(futures::future::Either::Left(
                        self.write_fresh_run(g / cs, &buf[pos..pos + len]),
                    ));
                    pos += len;
                    continue;
                }
            }
            futs.push(futures::future::Either::Right(self.write_cluster(
                g,
                Some(&buf[pos..pos + n]),
                n as u64,
            )));
            pos += n;
        }
        if futs.len() == 1 {
            futs.pop().unwrap().await?;
        } else {
            futures::future::try_join_all(futs).await?;
        }
        self.finish_write((_req, _ticket)).await
    }

    /// The end of a completed write request (write, write-zeroes, discard, compressed
    /// write): write back the metadata evicted meanwhile, then with
    /// [`OpenOptions::write_through`](crate::OpenOptions::write_through) flush the image as
    /// [`Image::flush`] does, after dropping `held`, the request's guards (the flush takes
    /// locks that their holders may wait behind).
    pub(crate) async fn finish_write<G>(&self, held: G) -> Result<()> {
        self.maybe_writeback().await?;
        drop(held);
        if self.inner.opts.write_through {
            // Boxed: the flush's future would otherwise grow every write's.
            return Box::pin(self.flush()).await;
        }
        Ok(())
    }

    /// Write back metadata if evicted dirty slices are waiting.
    pub(crate) async fn maybe_writeback(&self) -> Result<()> {
        if self.inner.l2_cache.has_evicted_dirty() || self.inner.rc_cache.has_evicted_dirty() {
            let w = self.ws()?;
            let mut m = w.meta.lock().await;
            self.flush_metadata(&mut m).await?;
        }
        Ok(())
    }

    /// Write (or zero, when `data` is None) `len` bytes inside one guest cluster at `g`.
    pub(crate) async fn write_cluster(&self, g: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        let lay = self.inner.layout;
        let gc = g >> lay.cluster_bits;
        let within = g & (lay.cluster_size - 1);
        // Fast path: allocated, refcount 1, in place.
        if let Some(host) = self.in_place_target(gc, within, len).await? {
            return self.write_data(host + within, data, len).await;
        }
        loop {
            match self.acquire_or_join(gc, true).await {
                Acquired::Mark(_guard) => return self.write_cluster_guarded(g, data, len).await,
                Acquired::Join(slot, host) => {
                    // The first write to the cluster is allocating fresh host cluster `host`:
                    // write into it alongside, then wait for its mapping. The ticket this
                    // request holds keeps `host` from being reused meanwhile if that
                    // allocation fails and frees it; then start again.
                    self.write_data(host + within, data, len).await?;
                    if slot.published().await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// `write_cluster` for a caller that holds the cluster's in-flight mark.
    pub(crate) async fn write_cluster_guarded(
        &self,
        g: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<()> {
        let lay = self.inner.layout;
        let gc = g >> lay.cluster_bits;
        let within = g & (lay.cluster_size - 1);
        if let Some(host) = self.in_place_target(gc, within, len).await? {
            return self.write_data(host + within, data, len).await;
        }
        self.allocating_write(gc, within, data, len).await
    }

    /// Host cluster offset when the range can be written in place.
    pub(crate) async fn in_place_target(
        &self,
        gc: u64,
        within: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        let lay = self.inner.layout;
        let (e, bm, l2_copied) = self.current_entry(gc).await?;
        if !l2_copied {
            return Ok(None);
        }
        match l2::decode(e, lay.cluster_bits, lay.extended) {
            ClusterEntry::Normal { host, copied: true } => {
                if lay.extended {
                    let first = (within >> lay.sc_bits) as u32;
                    let last = ((within + len - 1) >> lay.sc_bits) as u32;
                    let mask = subcluster_mask(first, last);
                    if bm & mask != mask {
                        return Ok(None);
                    }
                }
                self.check_host(gc, host)?;
                Ok(Some(host))
            }
            _ => Ok(None),
        }
    }

    pub(crate) fn check_host(&self, gc: u64, host: u64) -> Result<()> {
        if host & (self.inner.layout.cluster_size - 1) != 0
            || (host == 0 && self.inner.data_path.is_none())
        {
            return Err(Error::corrupt(format!(
                "{}: L2 entry for guest cluster {gc} has an invalid host offset 0x{host:x}",
                self.inner.path.display()
            )));
        }
        Ok(())
    }

    pub(crate) async fn write_data(&self, host: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        let r = match data {
            Some(d) => self.inner.data.write_at(d, host).await,
            None => self.inner.data.write_zeroes(host, len).await,
        };
        r.map_err(|e| self.data_write_error(e, host))
    }

    /// The error of a failed guest data write at host offset `host`.
    pub(crate) fn data_write_error(&self, e: std::io::Error, host: u64) -> Error {
        Error::io(
            e,
            format!(
                "{}: writing data at host offset 0x{host:x}",
                self.inner.path.display()
            ),
        )
    }
}

/// Mask of subcluster bits `first..=last`.
pub(crate) fn subcluster_mask(first: u32, last: u32) -> u64 {
    let n = last - first + 1;
    (if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }) << first
}

/// The span `[first non-zero byte, end of last non-zero 4 KiB)` of `b`, if any.
pub(crate) fn nonzero_span(b: &[u8]) -> Option<(usize, usize)> {
    let g = 512usize.min(b.len());
    let chunks = b.len() / g;
    let first = (0..chunks).find(|&i| !crate::jobs::convert::is_zero(&b[i * g..(i + 1) * g]))?;
    let last = (0..chunks)
        .rev()
        .find(|&i| !crate::jobs::convert::is_zero(&b[i * g..(i + 1) * g]))?;
    Some((first * g, (last + 1) * g))
}

/// The range `[a, b)` of `d` that holds every non-zero byte, with `a` and `b` multiples of
/// 512 or `b` its end (unlike [`nonzero_span`], a partial last 512 bytes count), if any.
pub(crate) fn nonzero_range(d: &[u8]) -> Option<(usize, usize)> {
    let chunk = |i: usize| &d[i * 512..((i + 1) * 512).min(d.len())];
    let n = d.len().div_ceil(512);
    let first = (0..n).find(|&i| !crate::jobs::convert::is_zero(chunk(i)))?;
    let last = (0..n)
        .rev()
        .find(|&i| !crate::jobs::convert::is_zero(chunk(i)))?;
    Some((first * 512, ((last + 1) * 512).min(d.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::threads::{worker_hold, ThreadsFile};
    use crate::io::{FileOptions, Storage};
    use futures::executor::block_on;
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    #[derive(Clone, Copy, Debug)]
    enum Then {
        /// An overlapping write.
        Overwrite,
        /// A flush.
        Flush,
        /// A discard of the cluster, flushes, and an allocating write that reuses it.
        Reuse,
    }

    /// A guest write whose future is dropped while its data write is in the I/O engine
    /// (held in a worker of the threads engine, as by a slow disk): when the drop returns,
    /// the write has ended, so the requests issued after the drop are ordered after it. An
    /// overlapping write is not overwritten by it, a flush does not return before it is in
    /// the file, and its host cluster, discarded and freed after the drop, is not written by
    /// it once reused for another guest cluster. Fails when a dropped write's storage
    /// request goes on in the engine after the drop (its ticket, in-flight mark and locks
    /// are gone with the future): the held write then lands last.
    #[test]
    fn a_dropped_write_ends_before_the_requests_issued_after_its_drop() {
        for then in [Then::Overwrite, Then::Flush, Then::Reuse] {
            dropped_write_then(then);
        }
    }

    fn dropped_write_then(then: Then) {
        // On disk with O_DIRECT: on tmpfs, and for buffered writes up to 1 MiB anywhere
        // (`FileCore::write_inline`), the engine writes on the calling thread, and nothing
        // is held in a worker.
        let tmp = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let dir = tempfile::tempdir_in(&tmp).unwrap();
        let path = dir.path().join("t.qcow2");
        let cs = 65536u64;
        let opts = crate::create::CreateOptions {
            size: Some(16 << 20),
            cluster_size: cs,
            ..Default::default()
        };
        block_on(crate::create::create_qcow2(&path, &opts)).unwrap();
        let fo = FileOptions {
            writable: true,
            direct: true,
            ..Default::default()
        };
        let file = Arc::new(ThreadsFile::open(&path, &fo).unwrap());
        assert!(!file.in_memory(), "{then:?}: needs a file on disk");
        let oo = crate::OpenOptions {
            writable: true,
            ..Default::default()
        };
        let img = block_on(Image::open_storage(file, &path, &oo)).unwrap();
        block_on(img.write_at(&vec![0x11; cs as usize], 0)).unwrap();
        block_on(img.flush()).unwrap();
        let host = block_on(img.layer_status(0, cs)).unwrap().offset.unwrap();

        // The dropped write: 4 KiB at guest 0, in place; its bytes are unique to this test.
        let held: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let hold = worker_hold::hold(held.clone());
        let done = Arc::new(AtomicBool::new(false));
        let (i2, h2, d2, data) = (img.clone(), hold.clone(), done.clone(), held.clone());
        let t = std::thread::spawn(move || {
            let mut fut = Box::pin(i2.write_at(&data, 0));
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            while !h2.arrived() {
                if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                    panic!("{then:?}: the held write completed: {r:?}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(fut);
            let landed_before = h2.landed();
            let reused = block_on(async {
                match then {
                    Then::Overwrite => i2.write_at(&[0x22; 4096], 0).await.map(|_| None),
                    Then::Flush => i2.flush().await.map(|_| None),
                    Then::Reuse => {
                        i2.discard(0, cs).await?;
                        i2.flush().await?;
                        i2.flush().await?;
                        i2.write_at(&vec![0x33; cs as usize], 1 << 20).await?;
                        Ok(i2.layer_status(1 << 20, cs).await?.offset)
                    }
                }
            })
            .unwrap();
            d2.store(true, Ordering::SeqCst);
            (landed_before, h2.landed(), reused)
        });
        assert!(
            hold.wait_arrived(Duration::from_secs(10)),
            "{then:?}: the write never reached the worker"
        );
        // Time for the requests after the drop to complete if the drop does not wait.
        std::thread::sleep(Duration::from_millis(300));
        let done_while_held = done.load(Ordering::SeqCst);
        hold.release();
        let (landed_at_drop, landed_at_end, reused) = t.join().unwrap();
        assert!(
            !done_while_held && landed_at_drop && landed_at_end,
            "{then:?}: the requests issued after the dropped write's drop completed while \
             its data write was still in the engine (done while held: {done_while_held}, \
             landed when the drop returned: {landed_at_drop})"
        );
        let mut back = vec![0u8; 4096];
        match then {
            Then::Overwrite => {
                block_on(img.read_at(&mut back, 0)).unwrap();
                assert!(
                    back.iter().all(|&b| b == 0x22),
                    "{then:?}: the dropped write landed over the later one"
                );
            }
            Then::Flush => {}
            Then::Reuse => {
                assert_eq!(
                    reused,
                    Some(host),
                    "{then:?}: the freed cluster was not reused"
                );
                block_on(img.read_at(&mut back, 1 << 20)).unwrap();
                assert!(
                    back.iter().all(|&b| b == 0x33),
                    "{then:?}: the dropped write landed in its cluster after its reuse"
                );
            }
        }
        block_on(img.close()).unwrap();
    }

    /// With `write_through` (`-t writethrough`/`directsync`), each completed write request
    /// is durable: on a power-cut model, the image as a power cut right after the request
    /// leaves it (only what flushes made durable) reads as the guest wrote it, and no L2 or
    /// refcount slice is left dirty in memory. For every request kind (allocating,
    /// multi-cluster, in place, write-zeroes whole and partial, discard, compressed), with
    /// and without an external data file. Without `write_through` the first write is not
    /// durable so (the check can fail).
    #[test]
    fn write_through_makes_each_completed_request_durable() {
        for data_file in [false, true] {
            assert!(
                !write_through_case(data_file, false),
                "data file {data_file}: without write-through the first write was durable"
            );
            assert!(write_through_case(data_file, true));
        }
    }

    /// Runs the requests; with `write_through` asserts each is durable when it completes.
    /// Returns whether the first write was.
    fn write_through_case(data_file: bool, write_through: bool) -> bool {
        use crate::io::mem::MemStorage;
        use crate::io::powercut::{PowerCut, Survivors};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("w.qcow2");
            let dpath = dir.path().join("w.data");
            let (cs, size) = (65536u64, 1u64 << 20);
            let co = crate::create::CreateOptions {
                size: Some(size),
                cluster_size: cs,
                data_file: data_file.then(|| "w.data".to_string()),
                ..Default::default()
            };
            crate::create::create_qcow2(&path, &co).await.unwrap();
            let pc = PowerCut::new();
            let file = pc.add_file(std::fs::read(&path).unwrap());
            let oo = crate::OpenOptions {
                writable: true,
                write_through,
                ..Default::default()
            };
            let img = if data_file {
                let data = pc.add_file(std::fs::read(&dpath).unwrap());
                Image::open_storage_with_data(file, &path, data, &dpath, &oo).await
            } else {
                Image::open_storage(file, &path, &oo).await
            }
            .unwrap();
            // What the guest wrote, and whether the files after a power cut now read so.
            let mut guest = vec![0u8; size as usize];
            let durable = |guest: Vec<u8>| {
                let ok = img.inner.l2_cache.dirty_slices().is_empty()
                    && img.inner.rc_cache.dirty_slices().is_empty();
                let mut files = pc.state_at(pc.len(), Survivors::None).into_iter();
                let f = Arc::new(MemStorage::from_vec(files.next().unwrap()));
                let ro = crate::OpenOptions::default();
                let d = files.next().map(|d| Arc::new(MemStorage::from_vec(d)));
                let (path, dpath) = (&path, &dpath);
                async move {
                    let after = match d {
                        Some(d) => Image::open_storage_with_data(f, path, d, dpath, &ro).await,
                        None => Image::open_storage(f, path, &ro).await,
                    }
                    .unwrap();
                    let mut back = vec![0u8; size as usize];
                    after.read_at(&mut back, 0).await.unwrap();
                    ok && back == guest
                }
            };
            let check = |what: &str, ok: bool| {
                assert!(
                    ok || !write_through,
                    "data file {data_file}: {what} completed but is not durable"
                );
                ok
            };
            img.write_at(&[0x5a; 4096], 4096).await.unwrap();
            guest[4096..8192].fill(0x5a);
            let first = check("an allocating write", durable(guest.clone()).await);
            if !write_through {
                return first;
            }
            let n = 3 * cs as usize + 512;
            img.write_at(&vec![0x6b; n], cs).await.unwrap();
            guest[cs as usize..][..n].fill(0x6b);
            check("a multi-cluster write", durable(guest.clone()).await);
            img.write_at(&[0x7c; 512], 4096).await.unwrap();
            guest[4096..4608].fill(0x7c);
            check("an in-place write", durable(guest.clone()).await);
            img.write_zeroes(cs, 2 * cs, crate::ZeroMode::Unmap)
                .await
                .unwrap();
            guest[cs as usize..3 * cs as usize].fill(0);
            check(
                "a write-zeroes of whole clusters",
                durable(guest.clone()).await,
            );
            img.write_zeroes(3 * cs + 100, 300, crate::ZeroMode::Keep)
                .await
                .unwrap();
            guest[3 * cs as usize + 100..][..300].fill(0);
            check("a partial write-zeroes", durable(guest.clone()).await);
            img.discard(3 * cs, cs).await.unwrap();
            guest[3 * cs as usize..4 * cs as usize].fill(0);
            check("a discard", durable(guest.clone()).await);
            if !data_file {
                let c: Vec<u8> = (0..cs as usize).map(|i| (i / 1000) as u8).collect();
                img.write_compressed(8 * cs, &c).await.unwrap();
                guest[8 * cs as usize..9 * cs as usize].copy_from_slice(&c);
                check("a compressed write", durable(guest.clone()).await);
            }
            img.close().await.unwrap();
            first
        })
    }

    #[test]
    fn nonzero_range_counts_a_partial_last_chunk() {
        let mut d = vec![0u8; 4826];
        assert_eq!(nonzero_range(&d), None);
        d[4825] = 1;
        assert_eq!(nonzero_range(&d), Some((4608, 4826)));
        d[600] = 1;
        assert_eq!(nonzero_range(&d), Some((512, 4826)));
        assert_eq!(nonzero_range(&[0, 0, 7]), Some((0, 3)));
        let mut e = vec![0u8; 2048];
        e[1024] = 9;
        assert_eq!(nonzero_range(&e), Some((1024, 1536)));
    }
}
