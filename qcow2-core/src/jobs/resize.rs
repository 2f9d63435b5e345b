//! Changing the virtual size of an image.

use crate::engine::image::Image;
use crate::{Error, Result};

impl Image {
    /// Change the virtual size to `new_size`, which must be a multiple of 512 (as qemu-img
    /// requires of qcow2 images). Shrinking needs `allow_shrink`; the data past the new end is
    /// discarded.
    pub async fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.ws()?;
        self.check_poison()?;
        if self.inner.header.read().corrupt() {
            return Err(Error::read_only(
                "image is marked corrupt; resizing is refused",
            ));
        }
        if !self.snapshots().is_empty() {
            return Err(Error::unsupported(
                "cannot resize an image that has internal snapshots",
            ));
        }
        if new_size > crate::format::header::MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(format!("size {new_size} is too large")));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        if new_size < old && !allow_shrink {
            return Err(Error::invalid(
                "use the --shrink option to shrink an image (data past the new end is lost)",
            ));
        }
        // Persistent bitmaps follow the new size (the new area clean, as in QEMU); they are
        // in use on disk while the size changes.
        let held = self.bitmaps_hold().await?;
        let r = self.resize_size(new_size).await;
        match held {
            Some(h) => {
                let stored = self.bitmaps_release(h).await;
                r.and(stored)
            }
            None => r,
        }
    }

    async fn resize_size(&self, new_size: u64) -> Result<()> {
        let w = self.ws()?;
        let old = self.size();
        self.before_first_write().await?;
        if new_size < old {
            let cs = self.inner.layout.cluster_size;
            let from = new_size.div_ceil(cs) * cs;
            if from < old {
                self.discard(from, old - from).await?;
            }
            if new_size & (cs - 1) != 0 && new_size < from.min(old) {
                // Zero the tail of the last partial cluster so a later grow reads zeros.
                let end = from.min(old);
                self.write_zeroes(new_size, end - new_size, crate::ZeroMode::Keep)
                    .await?;
            }
        }
        let mut m = w.meta.lock().await;
        self.flush_metadata(&mut m).await?;
        let need = self.inner.header.read().l1_entries_for(new_size);
        let have = self.inner.l1.read().len() as u64;
        if need > have {
            if need * 8 > crate::format::header::MAX_L1_BYTES {
                return Err(Error::invalid(format!(
                    "size {new_size} needs an L1 table larger than 32 MiB"
                )));
            }
            let cs = self.inner.layout.cluster_size;
            let clusters = (need * 8).div_ceil(cs);
            let new_off = self.alloc_clusters(&mut m, clusters).await?;
            let mut buf = vec![0u8; (clusters * cs) as usize];
            for (i, e) in self.inner.l1.read().iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            // Refcounts of the new table first, then the table, then the header switch.
            self.write_dirty_refblocks().await?;
            self.meta_write(&buf, new_off).await?;
            self.inner.file.flush().await.map_err(Error::from)?;
            let mut hb = [0u8; 12];
            hb[..4].copy_from_slice(&(need as u32).to_be_bytes());
            hb[4..].copy_from_slice(&new_off.to_be_bytes());
            // The file may point at the new table from the header write on; memory follows
            // only at the end: a failure or a dropped future in between poisons the handle.
            let mut guard = self.poison_guard("switching the header to a new L1 table");
            self.meta_write(&hb, 36).await.map_err(|e| guard.fail(e))?;
            self.inner
                .file
                .flush()
                .await
                .map_err(|e| guard.fail(Error::from(e)))?;
            let (old_off, old_len) = {
                let mut h = self.inner.header.write();
                let r = (h.l1_table_offset, h.l1_size as u64);
                h.l1_table_offset = new_off;
                h.l1_size = need as u32;
                r
            };
            self.inner.l1.write().resize(need as usize, 0);
            guard.disarm();
            if old_len > 0 {
                let first = old_off / cs;
                for c in 0..(old_len * 8).div_ceil(cs) {
                    m.pending_free.push(first + c);
                }
            }
        }
        let zero_to = match self.backing() {
            Some(b) if new_size > old => b.size().min(new_size),
            _ => 0,
        };
        // Memory announces the new size from here (the zeroing below writes past the old
        // end) until the header says it too; an error or a dropped future before that puts
        // the old size back (the header still has it).
        let restore = RestoreSize {
            img: self,
            old,
            armed: true,
        };
        if zero_to > old {
            // Growing over a longer backing file: like QEMU, make the new area read as zeros
            // rather than as the backing file's data there. The zero entries are made
            // durable before the header announces the new size.
            drop(m);
            self.inner.header.write().size = new_size;
            self.zero_or_discard(old, zero_to - old, Some(crate::ZeroMode::Unmap))
                .await?;
            m = w.meta.lock().await;
            self.flush_metadata(&mut m).await?;
        }
        if self.inner.data_path.is_some() {
            // The data file holds guest data at guest offsets (a raw image of the disk
            // with data_file_raw): it follows the virtual size.
            self.inner.data.set_len(new_size).map_err(Error::from)?;
            self.inner
                .data
                .flush()
                .await
                .map_err(|e| Error::io(e, "flush of the data file"))?;
        }
        let mut guard = self.poison_guard("writing the new virtual size into the header");
        self.meta_write(&new_size.to_be_bytes(), 24)
            .await
            .map_err(|e| guard.fail(e))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| guard.fail(Error::from(e)))?;
        self.inner.header.write().size = new_size;
        guard.disarm();
        restore.disarm();
        self.flush_metadata(&mut m).await
    }
}

/// Puts the old virtual size back into memory unless disarmed.
struct RestoreSize<'a> {
    img: &'a Image,
    old: u64,
    armed: bool,
}

impl RestoreSize<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RestoreSize<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.img.inner.header.write().size = self.old;
        }
    }
}
