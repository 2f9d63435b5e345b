//! Writing an overlay's data into its backing file (`qemu-img commit`).
//!
//! Every run that the image (and, with a base further down the chain, the layers between
//! the image and the base) decides is written into the base: data as read through the
//! image, zeros as zeros. The base is grown first when it is shorter than the image, and
//! flushed at the end. Without a base named (and without `drop`), the image is then emptied:
//! every cluster goes back to unallocated, so that it reads through to its backing file,
//! which now holds the same content.

use crate::engine::disk::{Disk, RawDisk};
use crate::engine::image::{resolve_name, Image, OpenOptions};
use crate::format::l2::{self, ClusterEntry};
use crate::jobs::rebase::Progress;
use crate::{Error, Result, ZeroMode};
use std::path::{Path, PathBuf};

/// What `commit` does.
#[derive(Clone, Default)]
pub struct CommitOptions {
    /// The image of the backing chain to commit into (`-b`), found as qemu-img finds it:
    /// by the name the layer above stores, or by the file it resolves to (relative names
    /// relative to the layer above's directory). `None`: the image's backing file. Naming a
    /// base implies `drop`, as in qemu-img.
    pub base: Option<String>,
    /// Keep the image's content (`-d`); otherwise it is emptied after the commit.
    pub drop: bool,
    /// How to open the image and its chain.
    pub open: OpenOptions,
    /// Progress callback.
    pub progress: Option<Progress>,
}

/// Bytes copied at a time.
const CHUNK: u64 = 1 << 20;

/// Commit the image at `path` into its backing file or `opts.base`.
pub async fn commit(path: &Path, opts: &CommitOptions) -> Result<()> {
    let drop = opts.drop || opts.base.is_some();
    let probed = crate::engine::disk::probe(path)
        .await
        .map_err(|e| e.context(format!("Could not open '{}'", path.display())))?;
    if probed == crate::Format::Raw {
        return Err(Error::invalid("Image does not have a backing file"));
    }
    let mut oo = opts.open.clone();
    oo.writable = !drop;
    oo.no_backing = false;
    oo.snapshot = None;
    oo.for_check = false;
    oo.for_repair = false;
    let img = Image::open(path, &oo)
        .await
        .map_err(|e| e.context(format!("Could not open '{}'", path.display())))?;
    commit_image(img, opts, None).await
}

/// [`commit`] on an image already open with its backing chain (writable unless the image is
/// kept), for tests that run the job on their own storage (the power-cut model): `base`,
/// when given, is the writable handle of the base to write (not locked; it must be the file
/// the chain's base layer is), else the base is opened by name.
#[doc(hidden)]
pub async fn commit_image(img: Image, opts: &CommitOptions, base: Option<Disk>) -> Result<()> {
    let drop = opts.drop || opts.base.is_some();
    let path = img.path().to_path_buf();
    let path = path.as_path();
    let top = Disk::Qcow2(img.clone());
    let mut layers: Vec<&Disk> = vec![&top];
    while let Some(b) = layers.last().and_then(|d| d.backing()) {
        layers.push(b);
    }
    if layers.len() < 2 {
        return Err(Error::invalid("Image does not have a backing file"));
    }
    let base_idx = match &opts.base {
        None => 1,
        Some(name) => find_base(&layers, name).ok_or_else(|| {
            Error::new(
                crate::ErrorKind::NotFound,
                format!(
                    "Did not find '{name}' in the backing chain of '{}'",
                    path.display()
                ),
            )
        })?,
    };
    let base_layer = layers[base_idx];
    // Locks as qemu-img commit holds them: the image and the base as a writer's (qemu-img
    // opens the image read-write even with -d, and reopens the base read-write), so that
    // another process writing or reading either is refused while the commit runs. The locks
    // stay on the chain's handles (one open file description per file, as in QEMU); the
    // base's writable handle below takes none, since it would refuse the chain's.
    top.set_lock_writable(true)
        .map_err(|e| e.context(format!("Could not open '{}'", path.display())))?;
    // qemu-img says only the lock error for the base.
    base_layer.set_lock_writable(true)?;
    // The base gets a writable handle of its own. Only runs decided above the base are read
    // through the chain, so its stale view of the base is never consulted.
    let bo = OpenOptions {
        writable: true,
        locking: false,
        force_share: false,
        data_file: None,
        no_backing: false,
        backing_file: None,
        backing_format: None,
        for_repair: false,
        for_check: false,
        snapshot: None,
        ..opts.open.clone()
    };
    let bpath = base_layer.path().to_path_buf();
    let base = match (base, base_layer) {
        (Some(b), _) => b,
        (None, Disk::Qcow2(_)) => Disk::Qcow2(
            Image::open(&bpath, &bo)
                .await
                .map_err(|e| e.context(format!("Could not open '{}'", bpath.display())))?,
        ),
        (None, Disk::Raw(_)) => Disk::Raw(
            RawDisk::open(&bpath, &bo)
                .map_err(|e| e.context(format!("Could not open '{}'", bpath.display())))?,
        ),
    };
    let size = top.size();
    if base.size() < size {
        grow(&base, size).await?;
    }
    copy_down(&layers[..base_idx], &base, opts.progress.as_ref()).await?;
    base.flush().await?;
    if let Disk::Qcow2(b) = base {
        b.close().await?;
    }
    if !drop {
        img.make_empty().await?;
        img.clone().close().await?;
    }
    Ok(())
}

/// The index in `layers` (below the top) of the layer `name` designates.
fn find_base(layers: &[&Disk], name: &str) -> Option<usize> {
    for i in 1..layers.len() {
        let parent = match layers[i - 1] {
            Disk::Qcow2(p) => p,
            Disk::Raw(_) => return None,
        };
        if parent.header().backing_file.as_deref() == Some(name) {
            return Some(i);
        }
        let cand: PathBuf = resolve_name(parent.path(), name);
        if crate::io::same_file(&cand, layers[i].path()) {
            return Some(i);
        }
    }
    None
}

async fn grow(base: &Disk, size: u64) -> Result<()> {
    match base {
        Disk::Qcow2(b) => b.resize(size, false).await,
        Disk::Raw(r) => r
            .storage()
            .set_len(size)
            .map_err(|e| Error::io(e, format!("{}: resize", base.path().display()))),
    }
}

/// How the layers above the base decide the run at `off`: `Some(true)` zeros, `Some(false)`
/// data, `None` left to the base; and the run's length.
async fn decide(above: &[&Disk], off: u64, len: u64) -> Result<(Option<bool>, u64)> {
    let mut len = len;
    for (d, layer) in above.iter().enumerate() {
        if d > 0 && off >= layer.size() {
            // A layer shorter than the one above reads as zeros past its end.
            return Ok((Some(true), len));
        }
        let st = layer.layer_status(off, len).await?;
        len = st.len.min(len);
        if st.zero {
            return Ok((Some(true), len));
        }
        if st.data {
            return Ok((Some(false), len));
        }
    }
    Ok((None, len))
}

async fn copy_down(above: &[&Disk], base: &Disk, progress: Option<&Progress>) -> Result<()> {
    let top = above[0];
    let size = top.size();
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
    let mut buf = Vec::new();
    while off < size {
        let want = (CHUNK - off % CHUNK).min(size - off);
        let (what, n) = decide(above, off, want).await?;
        match what {
            None => {}
            Some(true) => write_zeroes(base, off, n).await?,
            Some(false) => {
                buf.resize(n as usize, 0);
                top.read_at(&mut buf, off).await?;
                write(base, &buf, off).await?;
            }
        }
        off += n;
        report(off);
    }
    Ok(())
}

async fn write(base: &Disk, buf: &[u8], off: u64) -> Result<()> {
    match base {
        Disk::Qcow2(b) => b.write_at(buf, off).await,
        Disk::Raw(r) => r
            .storage()
            .write_at(buf, off)
            .await
            .map_err(|e| Error::io(e, format!("{}: write", base.path().display()))),
    }
}

async fn write_zeroes(base: &Disk, off: u64, len: u64) -> Result<()> {
    match base {
        Disk::Qcow2(b) => b.write_zeroes(off, len, ZeroMode::Unmap).await,
        Disk::Raw(r) => r
            .storage()
            .write_zeroes(off, len)
            .await
            .map_err(|e| Error::io(e, format!("{}: write zeroes", base.path().display()))),
    }
}

impl Image {
    /// Make every cluster of the active state unallocated (it then reads through to the
    /// backing file, or as zeros without one), freeing what only it referenced: what
    /// `qemu-img commit` leaves in the overlay. Internal snapshots keep their clusters.
    pub async fn make_empty(&self) -> Result<()> {
        self.check_write(0, 0)?;
        let w = self.ws()?;
        self.before_first_write().await?;
        let _ticket = self.ticket();
        let lay = self.inner.layout;
        let cs = lay.cluster_size;
        let clusters = self.size().div_ceil(cs);
        let external = self.inner.data_path.is_some();
        let l1_len = self.inner.l1.read().len() as u64;
        for l1_idx in 0..l1_len {
            if l2::l1_offset(self.inner.l1.read()[l1_idx as usize]) == 0 {
                continue;
            }
            let first = l1_idx * lay.l2_entries;
            let last = (first + lay.l2_entries).min(clusters);
            for gc in first..last {
                let _g = self.acquire(gc).await;
                let mut m = w.meta.lock().await;
                let (e, bm, _) = self.current_entry(gc).await?;
                if e == 0 && bm == 0 {
                    continue;
                }
                let mut frees = Vec::new();
                let mut data_host = None;
                match l2::decode(e, lay.cluster_bits, lay.extended) {
                    ClusterEntry::Normal { host, .. } | ClusterEntry::Zero { host: Some(host) } => {
                        if external {
                            data_host = Some(host);
                        } else {
                            frees.push(host >> lay.cluster_bits);
                        }
                    }
                    ClusterEntry::Compressed(d) => {
                        let (f, l) = d.host_clusters(lay.cluster_bits);
                        frees.extend((f >> lay.cluster_bits)..=(l >> lay.cluster_bits));
                    }
                    _ => {}
                }
                self.set_l2_entry(&mut m, gc, 0, 0).await?;
                m.pending_free.extend(frees);
                drop(m);
                if let Some(h) = data_host {
                    // Data file clusters are not refcounted: give their space back.
                    let _ = self.inner.data.discard(h, cs).await;
                }
            }
            self.maybe_writeback().await?;
        }
        self.flush().await
    }
}
