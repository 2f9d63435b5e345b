//! Persistent dirty bitmaps: add, remove, clear, enable, disable and merge, as
//! `qemu-img bitmap`.
//!
//! Crash safety: nothing the header reaches is changed in place. Each operation writes a
//! new bitmap directory (and, for a bitmap whose bits change, a new bitmap table and new
//! data clusters) into freshly allocated clusters, makes those clusters' refcounts and
//! contents durable, then switches to them with one header write (the bitmaps extension,
//! and the "bitmaps consistent" autoclear bit), made durable. Only then are the old
//! directory, tables and data clusters freed. A crash before the header write leaves the
//! old bitmaps and some leaked clusters; after it, the new bitmaps (and leaked old ones if
//! the crash comes before the frees reach the disk).
//!
//! Bitmaps marked in use (inconsistent: a writer was interrupted) can only be removed, as
//! in QEMU. An image whose bitmaps extension is present but not marked consistent has no
//! bitmaps (QEMU ignores them too); adding one replaces that stale extension.
//!
//! Guest changes through this library are recorded in the enabled bitmaps (see
//! `engine/dirty.rs`); every operation here first stores what was recorded.

use crate::engine::image::{BitmapInfo, Image};
use crate::engine::metadata::Meta;
use crate::engine::overlap::Target;
use crate::format::bitmaps::{self as fmt, DirEntry, TableEntry};
use crate::format::header::{BitmapsExt, AUTOCLEAR_BITMAPS};
use crate::{Error, ErrorKind, Result};

/// The metadata state of one change of the bitmaps, with the clusters it has allocated
/// so far (new tables, data and directory). Nothing references them until the header
/// switches to the new directory ([`Image::bitmap_commit`]): an operation that fails
/// before then frees them at once ([`Image::bitmap_abandon`]), and one whose future is
/// dropped gives them back when this is dropped, as frees for the next `flush_metadata`
/// (the handle's next flush or close) to apply. A future dropped during the header write
/// poisons the handle (its flushes are refused from then on), so clusters the header may
/// already reference are never freed: they leak at worst.
pub(crate) struct Allocated<'m> {
    pub(crate) m: &'m mut Meta,
    clusters: Vec<u64>,
}

impl<'m> Allocated<'m> {
    pub(crate) fn new(m: &'m mut Meta) -> Self {
        Allocated {
            m,
            clusters: Vec::new(),
        }
    }
}

impl Drop for Allocated<'_> {
    fn drop(&mut self) {
        self.m.pending_free.append(&mut self.clusters);
    }
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Dirty bitmap '{name}' not found"),
    )
}

fn inconsistent(name: &str) -> Error {
    Error::invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

fn find(dir: &[DirEntry], name: &str) -> Result<usize> {
    dir.iter()
        .position(|e| e.name == name)
        .ok_or_else(|| not_found(name))
}

/// The runs of set bits of `bits` (bit `i` in bit `i % 8` of byte `i / 8` covers the guest
/// bytes from `i * granularity`) as `(start, length)` ranges of guest bytes, clipped to `size`.
pub fn dirty_extents(bits: &[u8], granularity: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |first: u64, end: u64| {
        let start = first.saturating_mul(granularity).min(size);
        let end = end.saturating_mul(granularity).min(size);
        if end > start {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += end - start,
                _ => out.push((start, end - start)),
            }
        }
    };
    // Runs of set bits in bit indices [first, end).
    let mut run: Option<u64> = None;
    for (i, &b) in bits.iter().enumerate() {
        let base = i as u64 * 8;
        match (b, run) {
            (0, None) | (0xff, Some(_)) => continue,
            _ => {}
        }
        for k in 0..8u64 {
            let set = b & (1 << k) != 0;
            match (set, run) {
                (true, None) => run = Some(base + k),
                (false, Some(first)) => {
                    push(first, base + k);
                    run = None;
                }
                _ => {}
            }
        }
    }
    if let Some(first) = run {
        push(first, bits.len() as u64 * 8);
    }
    out
}

/// The granularity bits for a requested granularity in bytes (QEMU's rule: a power of two
/// from 512 to 2 GiB).
pub fn granularity_bits(granularity: u64) -> Result<u8> {
    if !granularity.is_power_of_two()
        || !(1u64 << fmt::MIN_GRANULARITY_BITS..=1u64 << fmt::MAX_GRANULARITY_BITS)
            .contains(&granularity)
    {
        return Err(Error::invalid(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    Ok(granularity.trailing_zeros() as u8)
}

impl Image {
    fn bitmap_preconditions(&self) -> Result<()> {
        self.ws()?;
        self.check_poison()?;
        self.check_usable()?;
        let h = self.inner.header.read();
        if h.corrupt() {
            return Err(Error::read_only(
                "image is marked corrupt; changing bitmaps is refused",
            ));
        }
        if h.version < 3 {
            return Err(Error::unsupported(format!(
                "Can't store persistent bitmaps to '{}': Cannot store dirty bitmaps in qcow2 v2 files",
                self.inner.path.display()
            )));
        }
        Ok(())
    }

    /// The bitmap directory as stored now (validated), empty without consistent bitmaps.
    pub(crate) async fn bitmap_dir(&self) -> Result<Vec<DirEntry>> {
        let (ext, size) = {
            let h = self.inner.header.read();
            match h.bitmaps {
                Some(ext) if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 => (ext, h.size),
                _ => return Ok(Vec::new()),
            }
        };
        let file_len = self.inner.file.len().map_err(Error::from)?;
        crate::engine::image::read_bitmap_directory(
            &*self.inner.file,
            &ext,
            size,
            self.inner.layout.cluster_size,
            file_len,
        )
        .await
    }

    /// Decoded table entries of `e` (all of them, validated).
    pub(crate) async fn bitmap_table(&self, e: &DirEntry) -> Result<Vec<TableEntry>> {
        let cs = self.inner.layout.cluster_size;
        let file_len = self.inner.file.len().map_err(Error::from)?;
        // table_size * cs <= 512 MiB (validated): the table is at most 8 MiB.
        let mut buf = vec![0u8; e.table_size as usize * 8];
        self.inner
            .file
            .read_at(&mut buf, e.table_offset)
            .await
            .map_err(|err| Error::io(err, format!("reading the table of bitmap '{}'", e.name)))?;
        buf.chunks_exact(8)
            .enumerate()
            .map(|(i, c)| {
                fmt::decode_table_entry(crate::format::be64(c, 0), cs, file_len, &e.name, i)
            })
            .collect()
    }

    /// Host clusters (indices) that bitmap `e` owns: its table and data clusters.
    pub(crate) async fn bitmap_owned_clusters(&self, e: &DirEntry) -> Result<Vec<u64>> {
        let cs = self.inner.layout.cluster_size;
        let mut out: Vec<u64> = (e.table_offset / cs
            ..(e.table_offset + e.table_size as u64 * 8).div_ceil(cs))
            .collect();
        for t in self.bitmap_table(e).await? {
            if let TableEntry::Data(off) = t {
                out.push(off / cs);
            }
        }
        Ok(out)
    }

    /// The bits of bitmap `e` (bit i in bit i%8 of byte i/8) over the virtual size.
    pub(crate) async fn bitmap_bits(&self, e: &DirEntry) -> Result<Vec<u8>> {
        let cs = self.inner.layout.cluster_size as usize;
        let size = self.size();
        let nbits = fmt::bit_count(size, e.granularity_bits);
        let nbytes = nbits.div_ceil(8) as usize;
        let mut bits = Vec::new();
        bits.try_reserve_exact(nbytes).map_err(|_| {
            Error::new(
                ErrorKind::TooLarge,
                format!("bitmap '{}': cannot allocate {nbytes} bytes", e.name),
            )
        })?;
        bits.resize(nbytes, 0);
        let table = self.bitmap_table(e).await?;
        for (i, chunk) in bits.chunks_mut(cs).enumerate() {
            match table[i] {
                TableEntry::Zeros => {}
                TableEntry::Ones => chunk.fill(0xff),
                TableEntry::Data(off) => {
                    self.inner.file.read_at(chunk, off).await.map_err(|err| {
                        Error::io(err, format!("reading the data of bitmap '{}'", e.name))
                    })?;
                }
            }
        }
        // Bits past the end of the disk are not part of the bitmap.
        if !nbits.is_multiple_of(8) {
            if let Some(last) = bits.last_mut() {
                *last &= (1u8 << (nbits % 8)) - 1;
            }
        }
        Ok(bits)
    }

    /// The bits of bitmap `name` (bit `i`, in bit `i % 8` of byte `i / 8`, covers the guest
    /// bytes from `i * granularity`), with its granularity in bytes.
    pub async fn bitmap_content(&self, name: &str) -> Result<(Vec<u8>, u64)> {
        let h = self.inner.header.read().clone();
        let dir = match h.bitmaps {
            Some(ext) if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 => {
                let file_len = self.inner.file.len().map_err(Error::from)?;
                crate::engine::image::read_bitmap_directory(
                    &*self.inner.file,
                    &ext,
                    h.size,
                    self.inner.layout.cluster_size,
                    file_len,
                )
                .await?
            }
            _ => Vec::new(),
        };
        let e = &dir[find(&dir, name)?];
        if let Some((bits, gran_bits)) = self.live_bits(name) {
            return Ok((bits, 1u64 << gran_bits));
        }
        if e.flags & fmt::FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        Ok((self.bitmap_bits(e).await?, e.granularity()))
    }

    /// The dirty ranges of bitmap `name` in guest bytes, as `(start, length)` in ascending
    /// order: adjacent dirty granules are one range, and the last range ends at the virtual
    /// size at the latest (what QEMU reports for the bitmap's `qemu:dirty-bitmap:NAME` NBD
    /// context as dirty). `NotFound` when there is no such bitmap, `InvalidInput` when it is
    /// marked in use.
    pub async fn bitmap_extents(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let (bits, granularity) = self.bitmap_content(name).await?;
        Ok(dirty_extents(&bits, granularity, self.size()))
    }

    pub(crate) async fn bitmap_alloc(&self, a: &mut Allocated<'_>, n: u64) -> Result<u64> {
        let off = self.alloc_clusters(a.m, n).await?;
        let ci = off >> self.inner.layout.cluster_bits;
        a.clusters.extend(ci..ci + n);
        Ok(off)
    }

    pub(crate) async fn bitmap_write(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_overlap(off, buf.len() as u64, Target::Data)
            .await?;
        self.meta_write(buf, off).await
    }

    /// Write `bits` as new data clusters and a new table; returns (table offset, size).
    pub(crate) async fn bitmap_store(
        &self,
        a: &mut Allocated<'_>,
        bits: &[u8],
    ) -> Result<(u64, u32)> {
        let cs = self.inner.layout.cluster_size as usize;
        let n = bits.len().div_ceil(cs).max(1);
        let mut table = vec![0u8; (n * 8).div_ceil(cs) * cs];
        let mut cluster = vec![0u8; cs];
        for (i, chunk) in bits.chunks(cs).enumerate() {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            cluster[..chunk.len()].copy_from_slice(chunk);
            cluster[chunk.len()..].fill(0);
            let off = self.bitmap_alloc(a, 1).await?;
            self.bitmap_write(&cluster, off).await?;
            table[i * 8..i * 8 + 8].copy_from_slice(&off.to_be_bytes());
        }
        let toff = self.bitmap_alloc(a, (table.len() / cs) as u64).await?;
        self.bitmap_write(&table, toff).await?;
        Ok((toff, n as u32))
    }

    /// [`Image::bitmap_commit`], then free `old` (`flush_metadata`).
    pub(crate) async fn bitmap_switch(
        &self,
        a: &mut Allocated<'_>,
        dir: &[DirEntry],
        old: Vec<u64>,
    ) -> Result<()> {
        self.bitmap_commit(a, dir, old).await?;
        self.flush_metadata(a.m).await
    }

    /// Write `dir` as the new directory and switch the header to it; `old` (cluster indices
    /// of what the old state owned and the new one does not) is then freed by the next
    /// `flush_metadata`. Once this has returned `Ok` the switch has happened, the
    /// allocated clusters belong to the new state, and memory describes it; on an error
    /// (or a dropped future) nothing has switched, unless the handle is poisoned.
    pub(crate) async fn bitmap_commit(
        &self,
        a: &mut Allocated<'_>,
        dir: &[DirEntry],
        mut old: Vec<u64>,
    ) -> Result<()> {
        let cs = self.inner.layout.cluster_size;
        let mut h = self.inner.header.read().clone();
        // The old directory (if the stored one is in use).
        if let (Some(ext), true) = (h.bitmaps, h.autoclear_features & AUTOCLEAR_BITMAPS != 0) {
            old.extend(
                ext.directory_offset / cs..(ext.directory_offset + ext.directory_size).div_ceil(cs),
            );
        }
        if dir.is_empty() {
            h.bitmaps = None;
            h.autoclear_features &= !AUTOCLEAR_BITMAPS;
        } else {
            let bytes = fmt::directory_bytes(dir);
            if bytes.len() as u64 > fmt::MAX_DIRECTORY_SIZE {
                return Err(Error::invalid("the bitmap directory would be too large"));
            }
            let mut buf = bytes.clone();
            buf.resize((bytes.len() as u64).div_ceil(cs) as usize * cs as usize, 0);
            let off = self.bitmap_alloc(a, buf.len() as u64 / cs).await?;
            self.bitmap_write(&buf, off).await?;
            h.bitmaps = Some(BitmapsExt {
                nb_bitmaps: dir.len() as u32,
                directory_size: bytes.len() as u64,
                directory_offset: off,
            });
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        let hb = h.to_bytes()?;
        // Refcounts of the new clusters, then the new clusters themselves, are durable
        // before the header points at them (flush_metadata ends with a sync).
        self.flush_metadata(a.m).await?;
        let mut guard = self.poison_guard("switching the header to a new bitmap directory");
        self.write_header_bytes(&hb, 0)
            .await
            .map_err(|e| guard.fail(e))?;
        guard.disarm();
        a.clusters.clear();
        *self.inner.header.write() = h;
        *self.inner.bitmaps.write() = dir
            .iter()
            .map(|e| BitmapInfo {
                name: e.name.clone(),
                granularity: e.granularity(),
                flags: e.flags,
                table_offset: e.table_offset,
                table_size: e.table_size,
            })
            .collect();
        old.sort_unstable();
        old.dedup();
        a.m.pending_free.extend(old);
        Ok(())
    }

    /// Free what a failed operation allocated (nothing references it; best effort: what
    /// is not freed now is freed by the next flush).
    pub(crate) async fn bitmap_abandon(&self, a: &mut Allocated<'_>) {
        if !a.clusters.is_empty() {
            a.m.pending_free.append(&mut a.clusters);
            let _ = self.flush_metadata(a.m).await;
        }
    }

    /// Run one change under the image's locks (no request in flight, no allocation in
    /// progress), crash-safely (see the module documentation).
    async fn bitmap_apply(&self, op: Op<'_>) -> Result<()> {
        self.bitmap_preconditions()?;
        let w = self.ws()?;
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.stop_tracking_locked(&mut m).await?;
        self.flush_metadata(&mut m).await?;
        let mut dir = self.bitmap_dir().await?;
        let mut a = Allocated::new(&mut m);
        let r = match self.bitmap_change(&mut a, &mut dir, op).await {
            Ok(None) => Ok(()),
            Ok(Some(old)) => self.bitmap_switch(&mut a, &dir, old).await,
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.bitmap_abandon(&mut a).await;
        }
        r
    }

    /// Change `dir` as `op` says, writing new tables and data; returns the clusters to free
    /// after the switch, or `None` when nothing changes.
    async fn bitmap_change(
        &self,
        a: &mut Allocated<'_>,
        dir: &mut Vec<DirEntry>,
        op: Op<'_>,
    ) -> Result<Option<Vec<u64>>> {
        let size = self.size();
        match op {
            Op::Add { name, gran_bits } => {
                if dir.iter().any(|e| e.name == name) {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("Bitmap already exists: {name}"),
                    ));
                }
                if dir.len() >= fmt::MAX_BITMAPS {
                    return Err(Error::invalid(format!(
                        "Can't make bitmap '{name}' persistent in '{}': Maximum number of persistent bitmaps is already reached",
                        self.inner.path.display()
                    )));
                }
                if size == 0 {
                    return Err(Error::invalid(format!(
                        "Can't make bitmap '{name}' persistent in '{}': the image is empty",
                        self.inner.path.display()
                    )));
                }
                let bits = vec![0u8; fmt::bit_count(size, gran_bits).div_ceil(8) as usize];
                let (table_offset, table_size) = self.bitmap_store(a, &bits).await?;
                dir.push(DirEntry {
                    table_offset,
                    table_size,
                    flags: fmt::FLAG_AUTO,
                    granularity_bits: gran_bits,
                    name: name.to_string(),
                });
                Ok(Some(Vec::new()))
            }
            Op::Remove(name) => {
                let i = find(dir, name)?;
                let old = self.bitmap_owned_clusters(&dir[i]).await?;
                dir.remove(i);
                Ok(Some(old))
            }
            Op::Clear(name) => {
                let i = find(dir, name)?;
                if dir[i].flags & fmt::FLAG_IN_USE != 0 {
                    return Err(inconsistent(name));
                }
                let old = self.bitmap_owned_clusters(&dir[i]).await?;
                let bits =
                    vec![0u8; fmt::bit_count(size, dir[i].granularity_bits).div_ceil(8) as usize];
                let (t, n) = self.bitmap_store(a, &bits).await?;
                dir[i].table_offset = t;
                dir[i].table_size = n;
                Ok(Some(old))
            }
            Op::Enable(name, on) => {
                let i = find(dir, name)?;
                if dir[i].flags & fmt::FLAG_IN_USE != 0 {
                    return Err(inconsistent(name));
                }
                let flags = if on {
                    dir[i].flags | fmt::FLAG_AUTO
                } else {
                    dir[i].flags & !fmt::FLAG_AUTO
                };
                if flags == dir[i].flags {
                    return Ok(None);
                }
                dir[i].flags = flags;
                Ok(Some(Vec::new()))
            }
            Op::Merge { dst, src } => {
                let i = find(dir, dst)?;
                if dir[i].flags & fmt::FLAG_IN_USE != 0 {
                    return Err(inconsistent(dst));
                }
                let (sbits, sgran) = match src {
                    MergeSource::Same(sname) => {
                        let j = find(dir, sname)?;
                        if dir[j].flags & fmt::FLAG_IN_USE != 0 {
                            return Err(inconsistent(sname));
                        }
                        if i == j {
                            return Ok(None);
                        }
                        (self.bitmap_bits(&dir[j]).await?, dir[j].granularity_bits)
                    }
                    MergeSource::Other {
                        bits,
                        gran_bits,
                        size: ssize,
                    } => {
                        if ssize != size {
                            return Err(Error::invalid(format!(
                                "Bitmaps are of different sizes (destination size is {size}, source size is {ssize}) and can't be merged"
                            )));
                        }
                        (bits, gran_bits)
                    }
                };
                let mut bits = self.bitmap_bits(&dir[i]).await?;
                let before = bits.clone();
                fmt::merge_into(&mut bits, dir[i].granularity_bits, &sbits, sgran, size);
                if bits == before {
                    return Ok(None);
                }
                let old = self.bitmap_owned_clusters(&dir[i]).await?;
                let (t, n) = self.bitmap_store(a, &bits).await?;
                dir[i].table_offset = t;
                dir[i].table_size = n;
                Ok(Some(old))
            }
        }
    }

    /// Before a resize: store what tracking recorded, load every bitmap (QEMU refuses a
    /// resize when one is inconsistent) and mark them all in use on disk, so that a crash
    /// before [`Image::bitmaps_release`] leaves them inconsistent rather than wrong.
    /// `None` when the image has no bitmaps.
    pub(crate) async fn bitmaps_hold(&self) -> Result<Option<Vec<(String, Vec<u8>)>>> {
        let w = self.ws()?;
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.stop_tracking_locked(&mut m).await?;
        if self.bitmaps().is_empty() {
            return Ok(None);
        }
        let mut dir = self.bitmap_dir().await?;
        if dir.is_empty() {
            return Ok(None);
        }
        if let Some(e) = dir.iter().find(|e| e.flags & fmt::FLAG_IN_USE != 0) {
            return Err(inconsistent(&e.name));
        }
        let size = self.size();
        let total: u64 = dir
            .iter()
            .map(|e| fmt::bit_count(size, e.granularity_bits).div_ceil(8))
            .sum();
        if total > crate::engine::dirty::MAX_TRACKED_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "the persistent bitmaps would take {total} bytes of memory (limit {})",
                    crate::engine::dirty::MAX_TRACKED_BYTES
                ),
            ));
        }
        let mut held = Vec::with_capacity(dir.len());
        for e in dir.iter_mut() {
            held.push((e.name.clone(), self.bitmap_bits(e).await?));
            e.flags |= fmt::FLAG_IN_USE;
        }
        // The header marks them in use once this returns (durably): the old directory is
        // freed by the next flush (the resize's), and the bits are handed over whatever
        // that flush does.
        let mut a = Allocated::new(&mut m);
        if let Err(e) = self.bitmap_commit(&mut a, &dir, Vec::new()).await {
            self.bitmap_abandon(&mut a).await;
            return Err(e);
        }
        Ok(Some(held))
    }

    /// After a resize (successful or not): store the bitmaps [`Image::bitmaps_hold`] took,
    /// cut or extended (with clean bits) to the virtual size now, without the in-use flag.
    pub(crate) async fn bitmaps_release(&self, held: Vec<(String, Vec<u8>)>) -> Result<()> {
        let w = self.ws()?;
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        // Changes made meanwhile (the discard of a shrink) found the bitmaps in use.
        self.stop_tracking_locked(&mut m).await?;
        let size = self.size();
        let mut dir = self.bitmap_dir().await?;
        let mut a = Allocated::new(&mut m);
        let r = async {
            let mut old = Vec::new();
            for (name, mut bits) in held {
                let Some(i) = dir.iter().position(|e| e.name == name) else {
                    continue;
                };
                let nbits = fmt::bit_count(size, dir[i].granularity_bits);
                bits.resize(nbits.div_ceil(8) as usize, 0);
                if !nbits.is_multiple_of(8) {
                    if let Some(last) = bits.last_mut() {
                        *last &= (1u8 << (nbits % 8)) - 1;
                    }
                }
                old.extend(self.bitmap_owned_clusters(&dir[i]).await?);
                let (t, n) = self.bitmap_store(&mut a, &bits).await?;
                dir[i].table_offset = t;
                dir[i].table_size = n;
                dir[i].flags &= !fmt::FLAG_IN_USE;
            }
            self.bitmap_switch(&mut a, &dir, old).await
        }
        .await;
        if r.is_err() {
            self.bitmap_abandon(&mut a).await;
        }
        r
    }

    /// Remove every bitmap (consistent or not) and free its clusters, crash-safely: for a
    /// downgrade to v2, which cannot keep them.
    pub(crate) async fn bitmaps_remove_all(&self) -> Result<()> {
        let w = self.ws()?;
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.stop_tracking_locked(&mut m).await?;
        if self.inner.header.read().bitmaps.is_none() {
            return Ok(());
        }
        let dir = self.bitmap_dir().await?;
        let mut old = Vec::new();
        for e in &dir {
            old.extend(self.bitmap_owned_clusters(e).await?);
        }
        let mut a = Allocated::new(&mut m);
        self.bitmap_switch(&mut a, &[], old).await
    }

    /// Add an enabled persistent bitmap `name` (`qemu-img bitmap --add [-g GRANULARITY]`);
    /// the granularity defaults to the cluster size, at least 4 KiB, as in QEMU.
    pub async fn bitmap_add(&self, name: &str, granularity: Option<u64>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("Bitmap name cannot be empty"));
        }
        if name.len() > fmt::MAX_NAME_SIZE {
            return Err(Error::invalid(format!(
                "Can't make bitmap '{name}' persistent in '{}': Name length exceeds maximum ({} characters)",
                self.inner.path.display(),
                fmt::MAX_NAME_SIZE
            )));
        }
        let gran = granularity.unwrap_or(self.inner.layout.cluster_size.max(4096));
        let gran_bits = granularity_bits(gran)?;
        self.bitmap_apply(Op::Add { name, gran_bits }).await
    }

    /// Remove bitmap `name` (`--remove`); its clusters are freed. Works on a bitmap in use.
    pub async fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.bitmap_apply(Op::Remove(name)).await
    }

    /// Clear every bit of bitmap `name` (`--clear`).
    pub async fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmap_apply(Op::Clear(name)).await
    }

    /// Enable (`--enable`) or disable (`--disable`) bitmap `name`: its `auto` flag.
    pub async fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_apply(Op::Enable(name, enabled)).await
    }

    /// Merge bitmap `src_name` of `src` (this image when `None`) into bitmap `dst`
    /// (`--merge SRC [-b SRC_FILE]`): every guest range dirty in the source becomes dirty in
    /// the destination (granularities may differ). Both must cover the same virtual size.
    pub async fn bitmap_merge(&self, dst: &str, src: Option<&Image>, src_name: &str) -> Result<()> {
        let src = match src {
            None => MergeSource::Same(src_name),
            Some(img) => {
                let (bits, gran) = img.bitmap_content(src_name).await?;
                MergeSource::Other {
                    bits,
                    gran_bits: gran.trailing_zeros() as u8,
                    size: img.size(),
                }
            }
        };
        self.bitmap_apply(Op::Merge { dst, src }).await
    }
}

enum MergeSource<'a> {
    Same(&'a str),
    Other {
        bits: Vec<u8>,
        gran_bits: u8,
        size: u64,
    },
}

enum Op<'a> {
    Add { name: &'a str, gran_bits: u8 },
    Remove(&'a str),
    Clear(&'a str),
    Enable(&'a str, bool),
    Merge { dst: &'a str, src: MergeSource<'a> },
}

#[cfg(test)]
mod tests {
    use super::dirty_extents;

    #[test]
    fn dirty_extents_merge_runs_and_clip() {
        // Nothing set.
        assert!(dirty_extents(&[0, 0], 512, 8192).is_empty());
        // Bits 0-1, 7-9 (across a byte), 15 (last bit, clipped to the size).
        let bits = [0b1000_0011, 0b1000_0011];
        assert_eq!(
            dirty_extents(&bits, 512, 15 * 512 + 100),
            vec![(0, 1024), (7 * 512, 3 * 512), (15 * 512, 100)]
        );
        // All set: one range, the whole disk.
        assert_eq!(
            dirty_extents(&[0xff, 0xff, 0x01], 4096, 17 * 4096),
            vec![(0, 17 * 4096)]
        );
        // A run ending at a byte boundary, then one starting at the next byte's bit 1.
        assert_eq!(
            dirty_extents(&[0xf0, 0x02], 1 << 16, 1 << 30),
            vec![(4 << 16, 4 << 16), (9 << 16, 1 << 16)]
        );
        // Bits past the size give nothing.
        assert_eq!(dirty_extents(&[0b1000_0001], 512, 512), vec![(0, 512)]);
    }
}
