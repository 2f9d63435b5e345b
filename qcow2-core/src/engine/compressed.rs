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

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let before_out = d.total_out();
        let status = d
            .decompress(
                &input[d.total_in() as usize..],
                &mut out[d.total_out() as usize..],
                FlushDecompress::Finish,
            )
            .map_err(|e| Error::corrupt(format!("compressed cluster: deflate error: {e}")))?;
        if d.total_out() as usize == out.len() {
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
        "compressed cluster decompresses to {} bytes, expected {}",
        d.total_out(),
        out.len()
    )))
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| Error::io(e, "zstd decoder"))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| Error::corrupt(format!("compressed cluster: zstd error: {e}")))?;
        if outb.pos() == outb.capacity() {
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
        "compressed cluster decompresses to {got} bytes, expected {}",
        out.len()
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

/// [`decompress`] of `input` into a new buffer of `out_len` bytes, on a worker thread.
pub async fn decompress_owned(
    ty: CompressionType,
    input: Vec<u8>,
    out_len: usize,
) -> Result<Vec<u8>> {
    offload(move || {
        let mut out = vec![0u8; out_len];
        decompress(ty, &input, &mut out).map(|_| out)
    })
    .await
}

impl Image {
    /// The decompressed content of a compressed cluster (cached).
    pub(crate) async fn decompressed(&self, d: l2::CompressedDesc) -> Result<Arc<Vec<u8>>> {
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
        let out = decompress_owned(ty, input, cs).await.map_err(|e| {
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
        let host = {
            let mut m = w.meta.lock().await;
            let cur = m.comp_cursor;
            // Share the cursor's host cluster while it has room and its refcount can take
            // one more reference (1-bit refcounts never can).
            let max = crate::format::refcount::max(lay.refcount_order);
            if cur != 0
                && cur % cs != 0
                && cs - cur % cs >= len
                && self.refcount(cur / cs).await? < max
            {
                self.rc_add(cur / cs, 1).await?;
                m.comp_cursor = cur + len;
                cur
            } else {
                let k = len.div_ceil(cs);
                let h = self.alloc_clusters(&mut m, k).await?;
                m.comp_cursor = h + len;
                h
            }
        };
        self.inner.file.write_at(&comp, host).await.map_err(|e| {
            Error::io(
                e,
                format!("{}: writing compressed data", self.inner.path.display()),
            )
        })?;
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
        self.maybe_writeback().await
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
        }
    }
}
