//! Changing an image's backing file (`qemu-img rebase`).
//!
//! Safe mode (the default) opens the image with its old backing chain and the new backing
//! chain, and writes into the image the old chain's content wherever the image does not
//! decide the content itself and the two chains differ, so that the guest sees the same disk
//! afterwards; only then is the header switched. Unsafe mode (`-u`) only switches the header.

use crate::engine::disk::{Disk, Format};
use crate::engine::image::{resolve_name, Image, OpenOptions};
use crate::{Error, Result, ZeroMode};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Called with the fraction done (0.0 to 1.0).
pub type Progress = Arc<dyn Fn(f64) + Send + Sync>;

/// What `rebase` does.
#[derive(Clone, Default)]
pub struct RebaseOptions {
    /// The new backing file name as stored in the header; empty for none (the image becomes
    /// standalone). A relative name is relative to the image's directory, as qemu-img does.
    pub backing: String,
    /// The new backing file's format. Required when `backing` is not empty (qemu-img refuses
    /// to write a backing file name without its format).
    pub backing_format: Option<Format>,
    /// Only switch the header (`-u`): the guest content changes when the chains differ.
    pub unsafe_mode: bool,
    /// How to open the image (writable is forced; the backing chain follows `unsafe_mode`).
    pub open: OpenOptions,
    /// Progress callback (safe mode).
    pub progress: Option<Progress>,
}

/// Bytes compared and copied at a time.
const CHUNK: u64 = 1 << 20;

/// Rebase the qcow2 image at `path` onto `opts.backing` (see [`RebaseOptions`]).
pub async fn rebase(path: &Path, opts: &RebaseOptions) -> Result<()> {
    let new_name = &opts.backing;
    // The image itself can never be its own backing file (qemu-img's safe mode fails on
    // the lock; its unsafe mode writes the loop: we refuse both).
    if let Some(np) = new_backing_path(path, new_name) {
        if crate::io::same_file(&np, path) {
            return Err(change_err(
                new_name,
                "a backing file cannot be the image itself",
            ));
        }
    }
    let probed = crate::engine::disk::probe(path)
        .await
        .map_err(|e| e.context(format!("Could not open '{}'", path.display())))?;
    if probed == Format::Raw {
        // A raw image has no backing file to change (qemu-img: "Operation not supported").
        return Err(Error::unsupported(format!(
            "Could not change the backing file to '{new_name}': Operation not supported"
        )));
    }
    let mut oo = opts.open.clone();
    oo.writable = true;
    oo.no_backing = opts.unsafe_mode;
    oo.backing_file = None;
    oo.backing_format = None;
    oo.snapshot = None;
    let img = Image::open(path, &oo)
        .await
        .map_err(|e| e.context(format!("Could not open '{}'", path.display())))?;
    rebase_image(img, opts).await
}

/// The error of a rebase onto `new_name` that cannot be done, as qemu-img words it.
fn change_err(new_name: &str, msg: &str) -> Error {
    Error::invalid(format!(
        "Could not change the backing file to '{new_name}': {msg}"
    ))
}

/// Where the new backing file `new_name` is (relative to the image's directory); none
/// for the empty name (the image becomes standalone).
fn new_backing_path(image: &Path, new_name: &str) -> Option<PathBuf> {
    (!new_name.is_empty()).then(|| resolve_name(image, new_name))
}

/// [`rebase`] on an image already open (writable; with its backing chain unless
/// `opts.unsafe_mode`), for tests that run the job on their own storage (the power-cut
/// model). The new backing file is opened by name; the image is closed at the end.
#[doc(hidden)]
pub async fn rebase_image(img: Image, opts: &RebaseOptions) -> Result<()> {
    let path = img.path().to_path_buf();
    let path = path.as_path();
    let new_name = opts.backing.clone();
    let change_err = |msg: &str| change_err(&new_name, msg);
    let new_path = new_backing_path(path, &new_name);
    let new_ref = if new_name.is_empty() {
        None
    } else {
        Some(new_name.as_str())
    };
    // What the header switch would refuse is refused before any data is copied.
    backing_header(&img, new_ref, opts.backing_format)
        .map_err(|e| e.context(format!("Could not change the backing file to '{new_name}'")))?;
    if !opts.unsafe_mode {
        let new_disk = match &new_path {
            None => None,
            Some(np) => {
                let bo = OpenOptions {
                    writable: false,
                    data_file: None,
                    no_backing: false,
                    backing_file: None,
                    backing_format: None,
                    for_repair: false,
                    for_check: false,
                    snapshot: None,
                    ..opts.open.clone()
                };
                let d = Disk::open(np, opts.backing_format, &bo)
                    .await
                    .map_err(|e| {
                        e.context(format!("Could not open new backing file '{new_name}'"))
                    })?;
                if let Some(f) = d.same_file_in_chain(path) {
                    return Err(change_err(&format!(
                        "the new backing chain contains the image itself ('{}')",
                        f.display()
                    )));
                }
                Some(d)
            }
        };
        if new_path.is_some() && opts.backing_format.is_none() {
            return Err(change_err("backing format must be specified"));
        }
        copy_differences(&img, new_disk.as_ref(), opts.progress.as_ref()).await?;
    } else if new_path.is_some() && opts.backing_format.is_none() {
        return Err(change_err("backing format must be specified"));
    }
    set_backing(&img, new_ref, opts.backing_format)
        .await
        .map_err(|e| e.context(format!("Could not change the backing file to '{new_name}'")))?;
    img.close().await
}

/// Write into `img` the old chain's content wherever `img` does not decide the content and
/// the old chain (`img`'s backing) and `new` (none: zeros) differ.
async fn copy_differences(
    img: &Image,
    new: Option<&Disk>,
    progress: Option<&Progress>,
) -> Result<()> {
    let size = img.size();
    let cs = img.layout().cluster_size;
    let old = img.backing();
    let report = |done: u64| {
        if let Some(p) = progress {
            p(if size == 0 {
                1.0
            } else {
                done as f64 / size as f64
            });
        }
    };
    report(0);
    let mut off = 0u64;
    let mut a = Vec::new();
    let mut b = Vec::new();
    while off < size {
        // A run the image leaves to its backing file, at most CHUNK and ending on a cluster
        // boundary when it can.
        let want = (CHUNK - off % CHUNK).min(size - off);
        let st = img.layer_status(off, want).await?;
        let n = st.len.min(want);
        // Allocated here (data or zeros): the image decides. An unallocated run may still
        // read as zeros (no backing file, or past its end): the new chain may differ there.
        if st.allocated {
            off += n;
            report(off);
            continue;
        }
        a.resize(n as usize, 0);
        b.resize(n as usize, 0);
        match old {
            Some(d) => d.read_padded(&mut a, off).await?,
            None => a.fill(0),
        }
        match new {
            Some(d) => d.read_padded(&mut b, off).await?,
            None => b.fill(0),
        }
        // Compare cluster by cluster (of the image) and write what differs.
        let mut pos = 0u64;
        while pos < n {
            let g = off + pos;
            let m = (cs - g % cs).min(n - pos);
            let (x, y) = (
                &a[pos as usize..(pos + m) as usize],
                &b[pos as usize..(pos + m) as usize],
            );
            if x != y {
                if x.iter().all(|&v| v == 0) {
                    img.write_zeroes(g, m, ZeroMode::Unmap).await?;
                } else {
                    img.write_at(x, g).await?;
                }
            }
            pos += m;
        }
        off += n;
        report(off);
    }
    img.flush().await
}

/// Switch the header of `img` to `backing` (format `format`), or to no backing file, and
/// make it durable. The guest data written before must be durable already.
pub(crate) async fn set_backing(
    img: &Image,
    backing: Option<&str>,
    format: Option<Format>,
) -> Result<()> {
    img.ws()?;
    img.check_poison()?;
    img.flush().await?;
    // Built after the flush: the flush may have changed header fields (autoclear bits).
    let bytes = backing_header(img, backing, format)?;
    // One write of the header cluster; the file says the new name from here, memory follows.
    let mut guard = img.poison_guard("switching the backing file in the header");
    img.write_header_bytes(&bytes, 0)
        .await
        .map_err(|e| guard.fail(e))?;
    {
        let mut hw = img.inner.header.write();
        hw.backing_file = backing.map(str::to_string);
        hw.backing_format = backing.and(format).map(|f| f.name().to_string());
        hw.backing_file_offset = crate::format::be64(&bytes, 8);
        hw.backing_file_size = crate::format::be32(&bytes, 16);
    }
    guard.disarm();
    Ok(())
}

/// The header cluster of `img` with `backing` (format `format`) or none; refuses what cannot
/// be written (a corrupt image, a name over 1023 bytes or one that does not fit in the first
/// cluster with the extensions, a backing file for a raw data file).
fn backing_header(img: &Image, backing: Option<&str>, format: Option<Format>) -> Result<Vec<u8>> {
    let mut h = img.header();
    if h.corrupt() {
        return Err(Error::read_only(
            "image is marked corrupt; changing its backing file is refused",
        ));
    }
    if let Some(b) = backing {
        if b.len() > 1023 {
            return Err(Error::invalid(
                "backing file name is too long (over 1023 bytes)",
            ));
        }
        if h.data_file_raw() {
            return Err(Error::unsupported(
                "an image whose data file is raw (data_file_raw) cannot have a backing file",
            ));
        }
    }
    h.backing_file = backing.map(str::to_string);
    h.backing_format = match backing {
        Some(_) => format.map(|f| f.name().to_string()),
        None => None,
    };
    h.to_bytes()
}
