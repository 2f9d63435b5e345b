//! Compressed clusters: the codecs (raw deflate for the zlib type, and zstd), reading them
//! through the decompressed-cluster cache, and writing them.

use crate::engine::image::Image;
use crate::format::header::CompressionType;
use crate::format::l2::{self, ClusterEntry};
use crate::{Error, Result};
use std::sync::Arc;

/// Decompress `input` into exactly `out.len()` bytes. Trailing input is ignored.
pub fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match ty {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

/// [`decompress`] into a new buffer of `out_len` bytes, written by the decoder without being
/// zeroed first.
pub fn decompress_vec(ty: CompressionType, input: &[u8], out_len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(out_len);
    if out.capacity() != out_len {
        // Not expected (`Vec` keeps the capacity asked for), but the decoders fill the
        // capacity exactly: a zeroed buffer of the right length then.
        out = vec![0u8; out_len];
        decompress(ty, input, &mut out)?;
        return Ok(out);
    }
    match ty {
        CompressionType::Zlib => inflate(input, &mut out)?,
        CompressionType::Zstd => unzstd(input, &mut out)?,
    }
    Ok(out)
}

/// Where a decoder writes: a slice (its length is wanted), or the spare capacity of an
/// empty `Vec` (its capacity is wanted, and its length grows as bytes are written).
trait DecodeOut: zstd::zstd_safe::WriteBuf {
    /// Bytes wanted.
    fn want(&self) -> usize;
    /// One call of the inflater from `d.total_out()` on.
    fn inflate(
        &mut self,
        d: &mut flate2::Decompress,
        input: &[u8],
    ) -> std::result::Result<flate2::Status, flate2::DecompressError>;
}

impl DecodeOut for [u8] {
    fn want(&self) -> usize {
        self.len()
    }
    fn inflate(
        &mut self,
        d: &mut flate2::Decompress,
        input: &[u8],
    ) -> std::result::Result<flate2::Status, flate2::DecompressError> {
        let at = d.total_out() as usize;
        d.decompress(input, &mut self[at..], flate2::FlushDecompress::Finish)
    }
}

impl DecodeOut for Vec<u8> {
    fn want(&self) -> usize {
        self.capacity()
    }
    fn inflate(
        &mut self,
        d: &mut flate2::Decompress,
        input: &[u8],
    ) -> std::result::Result<flate2::Status, flate2::DecompressError> {
        d.decompress_vec(input, self, flate2::FlushDecompress::Finish)
    }
}

/// Each thread keeps its decoders (zlib-rs and zstd states cost an allocation and clearing
/// per cluster otherwise: 6% and 18% of the CPU of a compressed read, docs/PERFORMANCE.md) and
/// resets one before every cluster, so a cluster that ended in an error or in the middle of
/// its stream leaves nothing behind. A re-entrant use (not expected) gets a decoder of its own.
fn inflate<O: DecodeOut + ?Sized>(input: &[u8], out: &mut O) -> Result<()> {
    use flate2::Decompress;
    use std::cell::RefCell;
    thread_local! {
        static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    }
    INFLATE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            let d = slot.get_or_insert_with(|| Decompress::new(false));
            d.reset(false);
            inflate_with(d, input, out)
        }
        Err(_) => inflate_with(&mut Decompress::new(false), input, out),
    })
}

fn inflate_with<O: DecodeOut + ?Sized>(
    d: &mut flate2::Decompress,
    input: &[u8],
    out: &mut O,
) -> Result<()> {
    use flate2::Status;
    let want = out.want();
    loop {
        let before_out = d.total_out();
        let status = out
            .inflate(d, &input[d.total_in() as usize..])
            .map_err(|e| Error::corrupt(format!("compressed cluster: deflate error: {e}")))?;
        if d.total_out() as usize == want {
            return Ok(());
        }
        match status {
            Status::StreamEnd => break,
            _ if d.total_out() == before_out && d.total_in() as usize >= input.len() => break,
            Status::BufError if d.total_out() == before_out => break,
            _ => {}
        }
    }
    Err(Error::corrupt(format!(
        "compressed cluster decompresses to {} bytes, expected {want}",
        d.total_out(),
    )))
}

fn unzstd<O: DecodeOut + ?Sized>(input: &[u8], out: &mut O) -> Result<()> {
    use std::cell::RefCell;
    use zstd::stream::raw::{Decoder, Operation};
    thread_local! {
        static UNZSTD: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
    }
    UNZSTD.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            let dec = match slot.as_mut() {
                Some(d) => {
                    d.reinit().map_err(|e| Error::io(e, "zstd decoder"))?;
                    d
                }
                None => slot.insert(Decoder::new().map_err(|e| Error::io(e, "zstd decoder"))?),
            };
            unzstd_with(dec, input, out)
        }
        Err(_) => unzstd_with(
            &mut Decoder::new().map_err(|e| Error::io(e, "zstd decoder"))?,
            input,
            out,
        ),
    })
}

fn unzstd_with<O: DecodeOut + ?Sized>(
    dec: &mut zstd::stream::raw::Decoder<'_>,
    input: &[u8],
    out: &mut O,
) -> Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let want = out.want();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| Error::corrupt(format!("compressed cluster: zstd error: {e}")))?;
        if outb.pos() == want {
            return Ok(());
        }
        if hint == 0 {
            // Frame finished; another frame may follow.
            if inb.pos() >= input.len() {
                break;
            }
            continue;
        }
        if (inb.pos(), outb.pos()) == before {
            break;
        }
    }
    let got = outb.pos();
    Err(Error::corrupt(format!(
        "compressed cluster decompresses to {got} bytes, expected {want}",
    )))
}

/// Compress one cluster. Returns `None` when the result would not be smaller than the
/// cluster (the caller then writes it uncompressed).
pub fn compress(ty: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    if input.is_empty() {
        return Ok(None);
    }
    let limit = input.len() - 1;
    match ty {
        CompressionType::Zlib => {
            use flate2::{Compress, Compression, FlushCompress, Status};
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = vec![0u8; limit];
            let st = c
                .compress(input, &mut out, FlushCompress::Finish)
                .map_err(|e| Error::invalid(format!("deflate: {e}")))?;
            if st != Status::StreamEnd {
                return Ok(None);
            }
            out.truncate(c.total_out() as usize);
            Ok(Some(out))
        }
        CompressionType::Zstd => {
            let mut out = vec![0u8; limit];
            match zstd::bulk::compress_to_buffer(input, &mut out, 0) {
                Ok(n) => {
                    out.truncate(n);
                    Ok(Some(out))
                }
                Err(_) => Ok(None),
            }
        }
    }
}

/// Run CPU-heavy work on the runtime's blocking pool when there is a tokio runtime (so that
/// many clusters are (de)compressed on all cores at once), else inline.
///
/// The blocking task can end without a result: the runtime cancels queued blocking tasks when
/// it shuts down, and a panic in `f` is caught by the pool. Both become an error here, never a
/// panic in the caller (across a C boundary a panic is an abort).
async fn offload<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => match h.spawn_blocking(f).await {
            Ok(v) => v,
            Err(e) if e.is_cancelled() => Err(Error::io(
                std::io::Error::from_raw_os_error(libc::ECANCELED),
                "compression task cancelled (the runtime is shutting down)",
            )),
            Err(_) => Err(Error::io(
                std::io::Error::from_raw_os_error(libc::EIO),
                "compression task failed (internal error)",
            )),
        },
        Err(_) => f(),
    }
}

/// [`compress`] on a worker thread.
pub async fn compress_owned(ty: CompressionType, input: Vec<u8>) -> Result<Option<Vec<u8>>> {
    offload(move || compress(ty, &input)).await
}

/// [`decompress_vec`] of `input` into a new buffer of `out_len` bytes, on a worker thread
/// unless `alone` (see below).
pub async fn decompress_owned(
    ty: CompressionType,
    input: Vec<u8>,
    out_len: usize,
    alone: bool,
) -> Result<Vec<u8>> {
    // zstd decodes a cluster in less time than a hand-off to the blocking pool and back costs
    // (measured: a third of the CPU of reading a zstd image inline, docs/PERFORMANCE.md): it
    // runs in the calling task. Inflating takes several times longer: the clusters of one
    // large request go to the pool, so that they inflate on all cores at once; a cluster
    // that is its request's only work (`alone`) inflates right here: the hand-off would buy
    // no parallelism and costs about 20 us of CPU (the zlib row of bench.sh: 0.79 of
    // qemu-img's time with the hand-off, docs/PERFORMANCE.md has the figures without).
    if ty == CompressionType::Zstd || alone {
        return decompress_vec(ty, &input, out_len);
    }
    offload(move || decompress_vec(ty, &input, out_len)).await
}

/// How much compressed data [`Image::write_compressed`] lets pile up before it starts its
/// write-back ([`crate::io::Storage::start_writeback`]), and how far behind the cursor that
/// stops.
const WRITEBACK_CHUNK: u64 = 8 << 20;
const WRITEBACK_LAG: u64 = 1 << 20;

impl Image {
    /// The decompressed content of a compressed cluster (cached).
    /// `alone`: the cluster is all its request reads (see [`decompress_owned`]).
    pub(crate) async fn decompressed(
        &self,
        d: l2::CompressedDesc,
        alone: bool,
    ) -> Result<Arc<Vec<u8>>> {
        let gen = {
            let mut z = self.inner.zcache.lock();
            if let Some(c) = z.get(&(self.inner.zdepth, d.offset)) {
                return Ok(c.clone());
            }
            self.inner
                .zcache_gen
                .load(std::sync::atomic::Ordering::Acquire)
        };
        let cs = self.inner.layout.cluster_size as usize;
        let mut input = vec![0u8; d.len as usize];
        self.inner
            .file
            .read_at(&mut input, d.offset)
            .await
            .map_err(|e| {
                Error::io(
                    e,
                    format!(
                        "{}: reading compressed cluster at 0x{:x}",
                        self.inner.path.display(),
                        d.offset
                    ),
                )
            })?;
        let ty = self.inner.header.read().compression_type();
        let out = decompress_owned(ty, input, cs, alone).await.map_err(|e| {
            e.context(format!(
                "{}: host offset 0x{:x}",
                self.inner.path.display(),
                d.offset
            ))
        })?;
        let out = Arc::new(out);
        let mut z = self.inner.zcache.lock();
        // Not if a free happened meanwhile: the cluster read may be one that was freed.
        if self
            .inner
            .zcache_gen
            .load(std::sync::atomic::Ordering::Acquire)
            == gen
        {
            z.put((self.inner.zdepth, d.offset), out.clone());
        }
        Ok(out)
    }

    /// Write one whole guest cluster (`data.len()` == cluster size, or the tail of the disk)
    /// compressed with the image's compression type. Falls back to a normal write when the
    /// data does not compress. Compressed clusters share host clusters byte-wise.
    pub async fn write_compressed(&self, off: u64, data: &[u8]) -> Result<()> {
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        self.check_write(off, data.len() as u64)?;
        if off & (cs - 1) != 0
            || data.is_empty()
            || (data.len() as u64 != cs && off + data.len() as u64 != self.size())
        {
            return Err(Error::invalid(
                "compressed writes must cover one whole cluster",
            ));
        }
        if self.inner.data_path.is_some() {
            return Err(Error::unsupported(
                "compressed clusters are not supported with an external data file",
            ));
        }
        self.before_first_write().await?;
        let ty = self.inner.header.read().compression_type();
        let mut input = vec![0u8; cs as usize];
        input[..data.len()].copy_from_slice(data);
        let comp = match crate::engine::compressed::compress_owned(ty, input).await? {
            Some(c) if (c.len() as u64) < cs - 512 => c,
            _ => return self.write_at(data, off).await,
        };
        let _req = self.enter_request().await;
        self.track_change(off, data.len() as u64).await?;
        let gc = off / cs;
        let w = self.ws()?;
        let _g = self.acquire(gc).await;
        // Allocated but not referenced until published below (see `WriteState::alloc_gate`).
        let _gate = w.alloc_gate.read().await;
        let len = comp.len() as u64;
        let mut writeback = None;
        let host = {
            let mut m = w.meta.lock().await;
            let cur = m.comp_cursor;
            // The data goes at the cursor, in the cursor's host cluster, while that has bytes
            // left and its refcount can take one more reference (1-bit refcounts never can).
            let max = crate::format::refcount::max(lay.refcount_order);
            let shared = cur != 0 && cur % cs != 0 && self.refcount(cur / cs).await? < max;
            let host = if shared && cs - cur % cs >= len {
                self.rc_add(cur / cs, 1).await?;
                m.comp_cursor = cur + len;
                cur
            } else {
                // Too little room left: a new cluster. When it is the one right after the
                // cursor's, the data still starts at the cursor and runs on into it, as QEMU
                // packs compressed data: the rest of the cursor's cluster is not left empty
                // (which made images half as large again, and on a file system with
                // reserved space every cluster a written extent and an unwritten one).
                let h = self.alloc_clusters(&mut m, len.div_ceil(cs)).await?;
                if shared && h == (cur / cs + 1) * cs {
                    self.rc_add(cur / cs, 1).await?;
                    m.comp_cursor = cur + len;
                    cur
                } else {
                    m.comp_cursor = h + len;
                    h
                }
            };
            // Compressed data is written one cluster after the other at the cursor: start
            // its write-back every WRITEBACK_CHUNK, WRITEBACK_LAG behind the cursor (the
            // writes of the clusters before are done by then, or nearly).
            let end = m.comp_cursor.saturating_sub(WRITEBACK_LAG) / 4096 * 4096;
            if end < m.comp_written_back {
                m.comp_written_back = end;
            } else if end - m.comp_written_back >= WRITEBACK_CHUNK {
                writeback = Some((m.comp_written_back, end));
                m.comp_written_back = end;
            }
            host
        };
        self.inner.file.write_at(&comp, host).await.map_err(|e| {
            Error::io(
                e,
                format!("{}: writing compressed data", self.inner.path.display()),
            )
        })?;
        if let Some((a, b)) = writeback {
            // A hint: an error changes nothing (the flush writes everything anyway).
            let _ = self.inner.file.start_writeback(a, b - a);
        }
        // A compressed cluster freed earlier may have lived at this very offset: its
        // decompressed copy must not be served for the new one.
        self.inner.zcache.lock().pop(&(self.inner.zdepth, host));
        let mut m = w.meta.lock().await;
        let (e, _, _) = self.current_entry(gc).await?;
        let old: Vec<u64> = match l2::decode(e, lay.cluster_bits, lay.extended) {
            ClusterEntry::Normal { host, .. } | ClusterEntry::Zero { host: Some(host) } => {
                vec![host / cs]
            }
            ClusterEntry::Compressed(d) => {
                let (a, b) = d.host_clusters(lay.cluster_bits);
                ((a / cs)..=(b / cs)).collect()
            }
            _ => Vec::new(),
        };
        let entry = l2::CompressedDesc::encode(host, len, lay.cluster_bits);
        self.set_l2_entry(&mut m, gc, entry, 0).await?;
        m.pending_free.extend(old);
        drop(m);
        self.finish_write((_req, _g, _gate)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(ty, &data).unwrap().unwrap();
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![0u8; 65536];
            decompress(ty, &padded, &mut out).unwrap();
            assert_eq!(out, data);
            assert!(decompress(ty, &c[..c.len() / 2], &mut out).is_err());
            assert!(decompress_vec(ty, &padded, 65536).unwrap() == data);
            assert!(decompress_vec(ty, &c[..c.len() / 2], 65536).is_err());
        }
    }

    /// Mixed data (random and text, like a real disk) of `len` bytes.
    fn mixed(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 1024) % 2 == 0 {
                    x as u8
                } else {
                    b"the quick brown fox "[i % 20]
                }
            })
            .collect()
    }

    /// The same decoding with a decoder made for this one call (the code before the
    /// decoders were kept per thread).
    fn fresh(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
        match ty {
            CompressionType::Zlib => inflate_with(&mut flate2::Decompress::new(false), input, out),
            CompressionType::Zstd => {
                unzstd_with(&mut zstd::stream::raw::Decoder::new().unwrap(), input, out)
            }
        }
    }

    /// A stream that fills the cluster before its end is accepted (QEMU accepts zlib's
    /// Z_BUF_ERROR with the output full), and the decoder kept for the thread, left in the
    /// middle of that stream, decodes the next cluster correctly.
    #[test]
    fn overlong_stream_then_next_cluster() {
        let long = mixed(1, 3 * 65536);
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress_unbounded(ty, &long);
            let mut out = vec![0u8; 65536];
            decompress(ty, &c, &mut out).unwrap();
            assert_eq!(out, long[..65536]);
            assert!(decompress_vec(ty, &c, 65536).unwrap() == long[..65536]);
            let next = mixed(2, 65536);
            let c2 = compress(ty, &next).unwrap().unwrap();
            decompress(ty, &c2, &mut out).unwrap();
            assert_eq!(out, next, "{ty:?}");
        }
    }

    fn compress_unbounded(ty: CompressionType, input: &[u8]) -> Vec<u8> {
        match ty {
            CompressionType::Zlib => {
                use flate2::{Compress, Compression, FlushCompress};
                let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
                let mut out = vec![0u8; input.len() + 1024];
                c.compress(input, &mut out, FlushCompress::Finish).unwrap();
                out.truncate(c.total_out() as usize);
                out
            }
            CompressionType::Zstd => zstd::bulk::compress(input, 0).unwrap(),
        }
    }

    /// Truncated, corrupted and garbage-followed streams give the same result (same bytes,
    /// or an error of the same kind) as a decoder made for the call, errors are errors (no
    /// panic), and an error leaves the thread's decoder fit for the next cluster.
    #[test]
    fn damaged_streams_match_a_fresh_decoder() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let data = mixed(3, 65536);
            let good = compress(ty, &data).unwrap().unwrap();
            for round in 0..300 {
                let mut bad = good.clone();
                match round % 4 {
                    0 => bad.truncate(next() as usize % good.len()),
                    1 => {
                        for _ in 0..1 + next() % 4 {
                            let i = next() as usize % bad.len();
                            bad[i] ^= 1 << (next() % 8);
                        }
                    }
                    2 => bad.extend((0..next() % 600).map(|_| next() as u8)),
                    _ => {
                        let i = next() as usize % bad.len();
                        bad[i..].iter_mut().for_each(|b| *b = next() as u8);
                    }
                }
                let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
                let ra = decompress(ty, &bad, &mut a);
                let rb = fresh(ty, &bad, &mut b);
                match (&ra, &rb) {
                    (Ok(()), Ok(())) => assert_eq!(a, b),
                    (Err(x), Err(y)) => assert_eq!(x.kind(), y.kind()),
                    _ => panic!("{ty:?} round {round}: {ra:?} vs {rb:?}"),
                }
                // Into a new buffer, written without zeroing it first: the same.
                match (decompress_vec(ty, &bad, 65536), &ra) {
                    (Ok(v), Ok(())) => assert!(v == a, "{ty:?} round {round}"),
                    (Err(x), Err(y)) => assert_eq!(x.kind(), y.kind()),
                    (r, _) => panic!("{ty:?} round {round}: {r:?} vs {ra:?}"),
                }
                if round % 4 == 0 {
                    assert!(ra.is_err(), "{ty:?}: truncated stream accepted");
                }
                if round % 4 == 2 {
                    assert_eq!(a, data, "{ty:?}: trailing input not ignored");
                }
                // The thread's decoder after that: still right.
                decompress(ty, &good, &mut a).unwrap();
                assert_eq!(a, data);
            }
        }
    }

    /// In-memory storage that records the ranges it is asked to write back.
    struct Recording {
        mem: crate::io::mem::MemStorage,
        writeback: parking_lot::Mutex<Vec<(u64, u64)>>,
    }

    impl crate::io::Storage for Recording {
        fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> crate::io::IoFuture<'a, ()> {
            self.mem.read_at(buf, off)
        }
        fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> crate::io::IoFuture<'a, ()> {
            self.mem.write_at(buf, off)
        }
        fn flush(&self) -> crate::io::IoFuture<'_, ()> {
            self.mem.flush()
        }
        fn discard(&self, off: u64, len: u64) -> crate::io::IoFuture<'_, bool> {
            self.mem.discard(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64) -> crate::io::IoFuture<'_, ()> {
            self.mem.write_zeroes(off, len)
        }
        fn allocate(&self, off: u64, len: u64) -> crate::io::IoFuture<'_, ()> {
            self.mem.allocate(off, len)
        }
        fn start_writeback(&self, off: u64, len: u64) -> std::io::Result<()> {
            self.writeback.lock().push((off, len));
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            self.mem.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.mem.set_len(len)
        }
        fn allocated_size(&self) -> std::io::Result<u64> {
            self.mem.allocated_size()
        }
        fn alignment(&self) -> usize {
            1
        }
        fn engine_name(&self) -> &'static str {
            "recording"
        }
    }

    /// A new 64 MiB image (64 KiB clusters) on [`Recording`] storage.
    async fn recording_image() -> (Image, Arc<Recording>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.qcow2");
        let co = crate::create::CreateOptions {
            size: Some(64 << 20),
            cluster_size: 65536,
            ..Default::default()
        };
        crate::create::create_qcow2(&path, &co).await.unwrap();
        let file = Arc::new(Recording {
            mem: crate::io::mem::MemStorage::from_vec(std::fs::read(&path).unwrap()),
            writeback: Default::default(),
        });
        let oo = crate::OpenOptions {
            writable: true,
            ..Default::default()
        };
        let img = Image::open_storage(file.clone(), &path, &oo).await.unwrap();
        (img, file)
    }

    /// A read that is one compressed cluster inflates in its own task: it completes while
    /// the blocking pool's only thread is taken. A read of two clusters still inflates them
    /// on the pool (both at once on a machine with the cores): it waits for that thread.
    #[test]
    fn a_one_cluster_read_inflates_without_the_blocking_pool() {
        use std::time::Duration;
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (img, _file) = recording_image().await;
            let cs = 65536usize;
            for i in 0..2u64 {
                img.write_compressed(i * cs as u64, &mixed(7 + i, cs))
                    .await
                    .unwrap();
            }
            let (release, held) = std::sync::mpsc::channel::<()>();
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let blocker = tokio::task::spawn_blocking(move || {
                let _ = started_tx.send(());
                let _ = held.recv_timeout(Duration::from_secs(60));
            });
            started.await.unwrap();
            let mut buf = vec![0u8; cs];
            tokio::time::timeout(Duration::from_secs(20), img.read_at(&mut buf, 0))
                .await
                .expect("a one-cluster read waited for the blocking pool")
                .unwrap();
            assert!(buf == mixed(7, cs));
            let mut two = vec![0u8; 2 * cs];
            {
                let read = img.read_at(&mut two, 0);
                tokio::pin!(read);
                assert!(
                    tokio::time::timeout(Duration::from_millis(200), &mut read)
                        .await
                        .is_err(),
                    "a two-cluster read did not use the blocking pool"
                );
                release.send(()).unwrap();
                read.await.unwrap();
            }
            assert!(two[cs..] == mixed(8, cs)[..]);
            blocker.await.unwrap();
        });
    }

    /// Compressed clusters are packed one after the other, running on from one host
    /// cluster into the next, as QEMU writes them: clusters that compress to a little more
    /// than half a cluster each took a whole host cluster each.
    #[tokio::test]
    async fn compressed_clusters_are_packed() {
        let (img, file) = recording_image().await;
        let cs = 65536u64;
        let n = 64u64;
        let mut total = 0;
        for i in 0..n {
            let data = mixed(100 + i, cs as usize);
            total += compress(CompressionType::Zlib, &data)
                .unwrap()
                .unwrap()
                .len() as u64;
            img.write_compressed(i * cs, &data).await.unwrap();
        }
        img.close().await.unwrap();
        assert!(
            total > n * cs / 2,
            "the data compresses to more than half a cluster"
        );
        let len = crate::io::Storage::len(&*file).unwrap();
        // The data, with its last host cluster, and the header, tables and refcounts.
        assert!(
            len <= total.div_ceil(cs) * cs + 8 * cs,
            "{len} bytes for {total} bytes of compressed data"
        );
        let img = Image::open_storage(file, std::path::Path::new("c.qcow2"), &Default::default())
            .await
            .unwrap();
        let mut buf = vec![0u8; cs as usize];
        for i in 0..n {
            img.read_at(&mut buf, i * cs).await.unwrap();
            assert!(buf == mixed(100 + i, cs as usize), "cluster {i}");
        }
        let r = crate::check::check(&img, &Default::default())
            .await
            .unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
        assert_eq!(r.compressed_clusters, n);
    }

    /// Compressed writes start the write-back of the data behind them, in order, every
    /// WRITEBACK_CHUNK, so that the final flush does not write it all.
    #[tokio::test]
    async fn compressed_writes_start_their_writeback() {
        let (img, file) = recording_image().await;
        let cs = 65536u64;
        let n = 48 << 20 >> 16;
        for i in 0..n {
            img.write_compressed(i * cs, &mixed(i, cs as usize))
                .await
                .unwrap();
        }
        let end = crate::io::Storage::len(&*file).unwrap();
        img.close().await.unwrap();
        let wb = file.writeback.lock().clone();
        assert!(!wb.is_empty(), "no write-back started");
        let mut pos = 0;
        for &(off, len) in &wb {
            assert_eq!(off, pos, "{wb:?}");
            assert!(len >= WRITEBACK_CHUNK, "{wb:?}");
            pos = off + len;
        }
        let data_end = crate::io::Storage::len(&*file).unwrap();
        assert!(
            pos <= data_end && pos + WRITEBACK_CHUNK + WRITEBACK_LAG + 2 * cs >= data_end,
            "{wb:?} {data_end} {end}"
        );
    }

    /// Deflate bits, least significant first; Huffman codes most significant bit first.
    struct Bits(Vec<u8>, u32);
    impl Bits {
        fn put(&mut self, v: u32, n: u32) {
            for i in 0..n {
                if self.1.is_multiple_of(8) {
                    self.0.push(0);
                }
                *self.0.last_mut().unwrap() |= (((v >> i) & 1) as u8) << (self.1 % 8);
                self.1 += 1;
            }
        }
        fn code(&mut self, c: u32, n: u32) {
            for i in (0..n).rev() {
                self.put((c >> i) & 1, 1);
            }
        }
    }

    /// zlib (and QEMU) reject the two unused length symbols 286 and 287 of the fixed
    /// Huffman code; so do we. (libdeflate decodes them as length 258: it was measured as an
    /// inflater and dropped, see docs/PERFORMANCE.md.)
    #[test]
    fn fixed_code_length_symbol_286_is_an_error() {
        for sym in [285u32, 286, 287] {
            let mut b = Bits(Vec::new(), 0);
            b.put(1, 1); // BFINAL
            b.put(1, 2); // fixed Huffman codes
            b.code(0x30 + u32::from(b'A'), 8); // literal 'A'
            b.code(0xc0 + (sym - 280), 8); // length 258 (285), or invalid
            b.code(0, 5); // distance 1
            b.code(0, 7); // end of block
            let mut out = vec![0u8; 259];
            let r = decompress(CompressionType::Zlib, &b.0, &mut out);
            if sym == 285 {
                r.unwrap();
                assert!(out.iter().all(|&x| x == b'A'));
            } else {
                assert_eq!(r.unwrap_err().kind(), crate::ErrorKind::Corrupt);
            }
        }
    }
}
