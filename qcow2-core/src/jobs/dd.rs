//! `dd`: copy a part of an image into a new one, as `qemu-img dd` does.
//!
//! The input is read from byte `skip * bs`; without `count` up to its end, with `count` up
//! to byte `count * bs` of the input (qemu-img's reading: `count` bounds the end, not the
//! length, when `skip` is given too). The output is created with that length rounded up to
//! 512 bytes, and every byte copied is written (the output is fully allocated, as qemu-img
//! writes each block).

use crate::engine::disk::{Disk, Format};
use crate::io::FileOptions;
use crate::{Error, Result, ResultExt};
use std::path::Path;

/// What `dd` copies.
#[derive(Debug, Clone)]
pub struct DdOptions {
    /// Block size in bytes (`bs=`, 1 to 2^31 - 1; default 512).
    pub bs: u64,
    /// Blocks of input to stop at (`count=`).
    pub count: Option<u64>,
    /// Blocks of input to skip (`skip=`).
    pub skip: u64,
    /// Output format (`-O`, default raw).
    pub format: Format,
    /// Options for the file created.
    pub file: FileOptions,
}

impl Default for DdOptions {
    fn default() -> Self {
        DdOptions {
            bs: 512,
            count: None,
            skip: 0,
            format: Format::Raw,
            file: FileOptions::default(),
        }
    }
}

/// How a `dd` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdOutcome {
    /// The range was copied.
    Copied,
    /// `skip` lies past the end of the range: an empty output was created (qemu-img prints
    /// "cannot skip to specified offset" and succeeds).
    SkipPastEnd,
}

/// Bytes copied at a time.
const CHUNK: u64 = 1 << 20;

/// Copy the range of `src` that `opts` selects into a new image at `dst`.
pub async fn dd(src: &Disk, dst: &Path, opts: &DdOptions) -> Result<DdOutcome> {
    if opts.bs == 0 || opts.bs > i32::MAX as u64 {
        return Err(Error::invalid(
            "Invalid bs specified. Must be between 1 and 2147483647.",
        ));
    }
    crate::jobs::convert::refuse_source_as_target(src, dst)?;
    let mut end = src.size();
    if let Some(c) = opts.count {
        if let Some(l) = c.checked_mul(opts.bs) {
            end = end.min(l);
        }
    }
    let start = opts.skip.saturating_mul(opts.bs);
    let (outcome, len) = if start > end {
        (DdOutcome::SkipPastEnd, 0)
    } else {
        (DdOutcome::Copied, end - start)
    };
    let out_size = len.div_ceil(512) * 512;
    match opts.format {
        Format::Raw => {
            let new = crate::jobs::create::create_file(dst, &opts.file)?;
            let out = new.file.clone();
            out.set_len(out_size).ctx(dst.display())?;
            copy(src, start, len, |buf, off| {
                let out = out.clone();
                async move { out.write_at(&buf, off).await.ctx(dst.display()) }
            })
            .await?;
            out.flush().await.ctx(dst.display())?;
        }
        Format::Qcow2 => {
            let co = crate::jobs::create::CreateOptions {
                size: Some(out_size),
                ..Default::default()
            };
            crate::jobs::create::create_qcow2(dst, &co).await?;
            let oo = crate::engine::image::OpenOptions::writable_target(&opts.file);
            let img = crate::engine::image::Image::open(dst, &oo).await?;
            let res = copy(src, start, len, |buf, off| {
                let img = img.clone();
                async move { img.write_at(&buf, off).await }
            })
            .await;
            let closed = img.close().await;
            res?;
            closed?;
        }
    }
    Ok(outcome)
}

/// Read `len` bytes of `src` from `start` and hand them to `write` (with the output offset).
async fn copy<W, F>(src: &Disk, start: u64, len: u64, write: W) -> Result<()>
where
    W: Fn(Vec<u8>, u64) -> F,
    F: std::future::Future<Output = Result<()>>,
{
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(CHUNK);
        let mut buf = vec![0u8; n as usize];
        src.read_at(&mut buf, start + pos).await?;
        write(buf, pos).await?;
        pos += n;
    }
    Ok(())
}
