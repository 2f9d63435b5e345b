//! A disk of either format (qcow2 or raw), as used for sources, targets and backing files.

use crate::engine::image::{Image, OpenOptions};
use crate::io::{FileOptions, IoFuture, Storage};
use crate::{Error, ErrorKind, Result, ResultExt};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

/// An image format we can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2 (versions 2 and 3).
    Qcow2,
    /// A raw disk image.
    Raw,
}

impl Format {
    /// Name as qemu-img prints it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
    /// Parse a format name.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::unsupported(format!(
                "unsupported image format '{other}' (qcow2 and raw are supported)"
            ))),
        }
    }
}

/// Allocation status of a range at one layer, in qemu's terms (`bdrv_block_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStatus {
    /// Length of the run with this status.
    pub len: u64,
    /// Allocated at this layer (data or zero decided here).
    pub allocated: bool,
    /// Guest data is stored (reads may be non-zero).
    pub data: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in this layer's data file, when valid.
    pub offset: Option<u64>,
}

/// One entry of `map`: a run and the chain depth that decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Chain depth (0 = this image) that decided the status.
    pub depth: u32,
    /// Allocated at that depth.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Data is stored.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when valid.
    pub offset: Option<u64>,
}

/// A raw image file.
#[derive(Clone)]
pub struct RawDisk {
    file: Arc<dyn Storage>,
    size: u64,
    path: PathBuf,
    /// QEMU-compatible locks, shared by the clones and released with the last one.
    lock: Option<Arc<parking_lot::Mutex<crate::io::lock::FileLock>>>,
}

impl RawDisk {
    /// Open `path` as raw.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<RawDisk> {
        let fo = opts.file_options();
        if opts.writable && opts.force_share {
            return Err(Error::invalid(
                "force-share=on can only be used with read-only images",
            ))
            .ctx(path.display());
        }
        let file = crate::io::open_file(path, &fo).ctx(path.display())?;
        let lock = crate::io::lock::take(
            &file,
            crate::io::lock::Perms::raw(opts.writable),
            path,
            opts,
        )
        .ctx(path.display())?;
        let size = file.len().ctx(path.display())?;
        Ok(RawDisk {
            file,
            size,
            path: path.to_path_buf(),
            lock: lock.map(|l| Arc::new(parking_lot::Mutex::new(l))),
        })
    }
    /// Wrap an already open storage (not locked).
    pub fn from_storage(file: Arc<dyn Storage>, path: PathBuf) -> Result<RawDisk> {
        let size = file.len().ctx(path.display())?;
        Ok(RawDisk {
            file,
            size,
            path,
            lock: None,
        })
    }
    /// The storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.file
    }
    /// See [`Disk::set_lock_writable`].
    fn set_lock_writable(&self, writable: bool) -> Result<()> {
        match &self.lock {
            Some(l) => l
                .lock()
                .change(crate::io::lock::Perms::raw(writable), &self.path),
            None => Ok(()),
        }
    }
}

/// An open disk of any supported format.
#[derive(Clone)]
pub enum Disk {
    /// A qcow2 image.
    Qcow2(Image),
    /// A raw image.
    Raw(RawDisk),
}

type DiskFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Guess the format from the first bytes: qcow2 magic, else raw.
pub async fn probe(path: &Path) -> Result<Format> {
    let f = crate::io::open_file(path, &FileOptions::default()).ctx(path.display())?;
    let mut magic = [0u8; 4];
    f.read_at(&mut magic, 0).await.ctx(path.display())?;
    Ok(
        if u32::from_be_bytes(magic) == crate::format::header::MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        },
    )
}

impl Disk {
    /// Open `path` in `format` (probed when `None`: qcow2 magic, else raw).
    pub async fn open(path: &Path, format: Option<Format>, opts: &OpenOptions) -> Result<Disk> {
        let format = match format {
            Some(f) => f,
            None => probe(path).await?,
        };
        match format {
            Format::Qcow2 => Ok(Disk::Qcow2(Image::open(path, opts).await?)),
            Format::Raw => Ok(Disk::Raw(RawDisk::open(path, opts)?)),
        }
    }

    /// Change the locks of this disk's handle (not its backing files') to a writable
    /// user's or a read-only user's (see [`Image::set_lock_writable`]).
    pub(crate) fn set_lock_writable(&self, writable: bool) -> Result<()> {
        match self {
            Disk::Qcow2(i) => i.set_lock_writable(writable),
            Disk::Raw(r) => r.set_lock_writable(writable),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.size(),
            Disk::Raw(r) => r.size,
        }
    }

    /// The format.
    pub fn format(&self) -> Format {
        match self {
            Disk::Qcow2(_) => Format::Qcow2,
            Disk::Raw(_) => Format::Raw,
        }
    }

    /// The file name as opened.
    pub fn path(&self) -> &Path {
        match self {
            Disk::Qcow2(i) => i.path(),
            Disk::Raw(r) => &r.path,
        }
    }

    /// Read `buf.len()` bytes at `off`; the range must lie inside the disk.
    pub fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> DiskFuture<'a, ()> {
        Box::pin(async move {
            match self {
                Disk::Qcow2(i) => i.read_at(buf, off).await,
                Disk::Raw(r) => {
                    check_range(off, buf.len() as u64, r.size)?;
                    r.file
                        .read_at(buf, off)
                        .await
                        .map_err(|e| Error::io(e, format!("{}: read", r.path.display())))
                }
            }
        })
    }

    /// Read where the range may extend past the end of the disk: the part past it reads as zeros.
    pub fn read_padded<'a>(&'a self, buf: &'a mut [u8], off: u64) -> DiskFuture<'a, ()> {
        Box::pin(async move {
            let size = self.size();
            if off >= size {
                buf.fill(0);
                return Ok(());
            }
            let n = ((size - off) as usize).min(buf.len());
            let (head, tail) = buf.split_at_mut(n);
            tail.fill(0);
            self.read_at(head, off).await
        })
    }

    /// Status of the run at `off` (at most `len` bytes, at least one) at this layer only.
    /// `off` must lie inside the disk and `len` must not be 0 (else an error).
    pub fn layer_status(&self, off: u64, len: u64) -> DiskFuture<'_, LayerStatus> {
        Box::pin(async move {
            match self {
                Disk::Qcow2(i) => i.layer_status(off, len).await,
                Disk::Raw(r) => {
                    crate::engine::mappings::check_status_range(off, len, r.size)?;
                    let len = len.min(r.size - off);
                    let (n, data) = r.file.data_run(off, len).ctx(r.path.display())?;
                    Ok(LayerStatus {
                        len: n.max(1).min(len),
                        allocated: true,
                        data,
                        zero: !data,
                        compressed: false,
                        offset: Some(off),
                    })
                }
            }
        })
    }

    /// Every file this disk reads, down the chain: each layer's file and external data file.
    pub fn files(&self) -> Vec<&Path> {
        let mut out = Vec::new();
        let mut layer = Some(self);
        while let Some(d) = layer {
            out.push(d.path());
            if let Disk::Qcow2(i) = d {
                out.extend(i.data_file_path());
            }
            layer = d.backing();
        }
        out
    }

    /// The file of this disk's chain that `path` names under another name (same device and
    /// inode), if any: writing `path` would destroy data this disk reads.
    pub fn same_file_in_chain(&self, path: &Path) -> Option<&Path> {
        let id = crate::io::FileId::of(path)?;
        self.files()
            .into_iter()
            .find(|f| crate::io::FileId::of(f) == Some(id))
    }

    /// The backing disk, if any.
    pub fn backing(&self) -> Option<&Disk> {
        match self {
            Disk::Qcow2(i) => i.backing(),
            Disk::Raw(_) => None,
        }
    }

    /// qemu-img map's view of the run at `off`: walks down the chain until a layer decides.
    /// `off` must lie inside the disk and `len` must not be 0 (else an error). A layer below
    /// that is shorter than `off` reads as zeros there.
    pub async fn map_entry(&self, off: u64, len: u64) -> Result<MapEntry> {
        let mut layer = self;
        let mut depth = 0u32;
        let mut len = len;
        loop {
            if depth > 0 && off >= layer.size() {
                // A backing file shorter than the overlay reads as zeros past its end.
                return Ok(MapEntry {
                    start: off,
                    length: len,
                    depth: depth - 1,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                });
            }
            let st = layer.layer_status(off, len).await?;
            len = st.len;
            if st.data || st.zero {
                return Ok(MapEntry {
                    start: off,
                    length: len,
                    depth,
                    present: st.allocated,
                    zero: st.zero,
                    data: st.data,
                    compressed: st.compressed,
                    offset: st.offset,
                });
            }
            match layer.backing() {
                Some(b) => {
                    layer = b;
                    depth += 1;
                }
                None => {
                    return Ok(MapEntry {
                        start: off,
                        length: len,
                        depth,
                        present: false,
                        zero: false,
                        data: false,
                        compressed: false,
                        offset: None,
                    })
                }
            }
        }
    }

    /// The whole map, merged like `qemu-img map`. Collects every entry: for a disk of
    /// any size and fragmentation prefer [`Disk::map_each`], which streams.
    pub async fn map(&self) -> Result<Vec<MapEntry>> {
        let mut out = Vec::new();
        self.map_each(|e| {
            out.push(e);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// The whole map, merged like `qemu-img map`, handed to `f` one entry at a time as
    /// soon as it is complete (memory is constant whatever the disk's size and layout).
    /// An error from `f` stops the walk.
    pub async fn map_each(&self, f: impl FnMut(MapEntry) -> Result<()>) -> Result<()> {
        self.map_range_each(0, self.size(), f).await
    }

    /// [`Disk::map_each`] of the guest bytes `start..end` only (`end` is clipped to the
    /// disk's size), as `qemu-img map --start-offset --max-length`: the first entry starts
    /// at `start`, the last ends at `end`. An empty range gives one entry of length 0 with
    /// every flag clear, as qemu-img prints it.
    pub async fn map_range_each(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(MapEntry) -> Result<()>,
    ) -> Result<()> {
        let size = end.min(self.size());
        if start >= size {
            return f(MapEntry {
                start,
                length: 0,
                depth: 0,
                present: false,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        let mut cur: Option<MapEntry> = None;
        let mut off = start;
        while off < size {
            let e = self.map_entry(off, size - off).await?;
            off += e.length;
            if let Some(last) = cur.as_mut() {
                if last.start + last.length == e.start
                    && last.depth == e.depth
                    && last.present == e.present
                    && last.zero == e.zero
                    && last.data == e.data
                    && last.compressed == e.compressed
                    && last.offset.is_some() == e.offset.is_some()
                    && last
                        .offset
                        .is_none_or(|o| Some(o + last.length) == e.offset)
                {
                    last.length += e.length;
                    continue;
                }
            }
            if let Some(done) = cur.replace(e) {
                f(done)?;
            }
        }
        if let Some(done) = cur {
            f(done)?;
        }
        Ok(())
    }

    /// Flush (durably write) everything written so far.
    pub async fn flush(&self) -> Result<()> {
        match self {
            Disk::Qcow2(i) => i.flush().await,
            Disk::Raw(r) => r
                .file
                .flush()
                .await
                .map_err(|e| Error::io(e, format!("{}: flush", r.path.display()))),
        }
    }

    /// Bytes allocated on the host for the image file.
    pub fn actual_size(&self) -> Result<u64> {
        match self {
            Disk::Qcow2(i) => i.actual_size(),
            Disk::Raw(r) => r.file.allocated_size().ctx(r.path.display()),
        }
    }

    /// The storage of a raw disk (for writers).
    pub fn raw_storage(&self) -> Option<&Arc<dyn Storage>> {
        match self {
            Disk::Raw(r) => Some(&r.file),
            Disk::Qcow2(_) => None,
        }
    }
}

/// Check that `[off, off+len)` lies inside `size`.
pub fn check_range(off: u64, len: u64, size: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "request at offset {off} length {len} is beyond the end of the disk ({size} bytes)"
            ),
        )),
    }
}

#[allow(dead_code)]
fn _assert_send(d: &Disk) -> IoFuture<'_, ()> {
    Box::pin(async move {
        let mut b = [0u8; 1];
        d.read_at(&mut b, 0)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
}
