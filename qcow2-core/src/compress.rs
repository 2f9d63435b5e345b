//! Compressed clusters: raw deflate (zlib type) and zstd.

use crate::format::header::CompressionType;
use crate::{Error, Result};

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
async fn offload<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => match h.spawn_blocking(f).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
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
