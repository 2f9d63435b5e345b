//! Recording guest writes in the enabled persistent bitmaps, as QEMU does.
//!
//! Nothing happens until the first guest change (write, write-zeroes, discard) through a
//! writable handle. Then the enabled bitmaps (flag `auto`, not `in-use`) are loaded into
//! memory and marked `in-use` on disk: a new bitmap directory with the flag set is written
//! to new clusters and the header switched to it (crash-safe, see `jobs/bitmap.rs`), before
//! that change reaches the disk. From then on every changed guest range sets, in memory, the
//! bits that cover it in every tracked bitmap (no I/O per request). [`Image::close`] (and
//! every bitmap operation, and resize) stores the bits into new clusters, switches to a
//! directory without the `in-use` flag and frees the old clusters; a later change starts
//! again.
//!
//! An image whose handle was not closed (a crash, a killed process) keeps its bitmaps
//! `in-use`: they are inconsistent, as QEMU judges them, and can only be removed. Such a
//! bitmap found at the start is not tracked and stays `in-use`. Disabled bitmaps are left
//! untouched (QEMU marks them `in-use` too while the image is open, and rewrites them
//! unchanged on close).
//!
//! Memory: a bitmap takes `size / granularity / 8` bytes (2 MiB for 1 TiB at 64 KiB); the
//! tracked bitmaps of one image may take at most [`MAX_TRACKED_BYTES`], beyond which the
//! first change is refused with an error naming the limit.

use crate::engine::image::Image;
use crate::engine::metadata::Meta;
use crate::format::bitmaps::{self as fmt};
use crate::{Error, ErrorKind, Result};
use parking_lot::Mutex as PMutex;
use std::sync::atomic::{AtomicU8, Ordering};

/// Most memory the tracked bitmaps of one image may take (1 GiB: 512 TiB of disk at a
/// 64 KiB granularity).
pub const MAX_TRACKED_BYTES: u64 = 1 << 30;

/// Not known yet whether there is anything to track (the next change finds out).
const UNKNOWN: u8 = 0;
/// Bitmaps are loaded and marked in use on disk.
const ACTIVE: u8 = 1;
/// No enabled consistent bitmap: nothing to do until the bitmaps change.
const IDLE: u8 = 2;

/// One tracked bitmap.
pub(crate) struct LiveBitmap {
    pub name: String,
    pub gran_bits: u8,
    pub bits: Vec<u8>,
}

/// Tracking state of a writable handle.
pub(crate) struct Tracking {
    state: AtomicU8,
    pub(crate) live: PMutex<Vec<LiveBitmap>>,
    /// Serialises starting the tracking.
    start: tokio::sync::Mutex<()>,
}

impl Default for Tracking {
    fn default() -> Self {
        Tracking {
            state: AtomicU8::new(UNKNOWN),
            live: PMutex::new(Vec::new()),
            start: tokio::sync::Mutex::new(()),
        }
    }
}

/// Set bits `first..=last` of `bits` (clamped to its length).
fn set_bits(bits: &mut [u8], first: u64, last: u64) {
    let nbits = bits.len() as u64 * 8;
    if first >= nbits {
        return;
    }
    let last = last.min(nbits - 1);
    let mut i = first;
    while i <= last {
        if i.is_multiple_of(8) && i + 7 <= last {
            let end = ((last + 1) / 8) as usize;
            bits[(i / 8) as usize..end].fill(0xff);
            i = end as u64 * 8;
        } else {
            bits[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
    }
}

impl Image {
    /// Record a change of `len` bytes at guest offset `off` in the enabled bitmaps, starting
    /// the tracking first if needed. Call inside the request (after `enter_request`), before
    /// the change reaches the disk.
    pub(crate) async fn track_change(&self, off: u64, len: u64) -> Result<()> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let mut st = w.dirty.state.load(Ordering::Acquire);
        if st == UNKNOWN {
            self.start_tracking().await?;
            st = w.dirty.state.load(Ordering::Acquire);
        }
        if st == ACTIVE {
            let mut live = w.dirty.live.lock();
            for b in live.iter_mut() {
                set_bits(
                    &mut b.bits,
                    off >> b.gran_bits,
                    (off + len - 1) >> b.gran_bits,
                );
            }
        }
        Ok(())
    }

    /// Load the enabled consistent bitmaps and mark them in use on disk.
    async fn start_tracking(&self) -> Result<()> {
        let w = self.ws()?;
        let _start = w.dirty.start.lock().await;
        if w.dirty.state.load(Ordering::Acquire) != UNKNOWN {
            return Ok(());
        }
        let candidates = self
            .bitmaps()
            .iter()
            .any(|b| b.flags & fmt::FLAG_AUTO != 0 && b.flags & fmt::FLAG_IN_USE == 0);
        if !candidates || self.inner.header.read().version < 3 {
            w.dirty.state.store(IDLE, Ordering::Release);
            return Ok(());
        }
        let _gate = w.alloc_gate.read().await;
        let mut m = w.meta.lock().await;
        let mut dir = self.bitmap_dir().await?;
        let size = self.size();
        let mut total = 0u64;
        for e in &dir {
            if e.flags & fmt::FLAG_AUTO != 0 && e.flags & fmt::FLAG_IN_USE == 0 {
                total += fmt::bit_count(size, e.granularity_bits).div_ceil(8);
            }
        }
        if total > MAX_TRACKED_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "{}: the enabled persistent bitmaps would take {total} bytes of memory \
                     (limit {MAX_TRACKED_BYTES}); disable or remove some before writing",
                    self.inner.path.display()
                ),
            ));
        }
        let mut live = Vec::new();
        for e in dir.iter_mut() {
            if e.flags & fmt::FLAG_AUTO != 0 && e.flags & fmt::FLAG_IN_USE == 0 {
                live.push(LiveBitmap {
                    name: e.name.clone(),
                    gran_bits: e.granularity_bits,
                    bits: self.bitmap_bits(e).await?,
                });
                e.flags |= fmt::FLAG_IN_USE;
            }
        }
        if live.is_empty() {
            w.dirty.state.store(IDLE, Ordering::Release);
            return Ok(());
        }
        let mut a = crate::jobs::bitmap::Allocated::default();
        if let Err(e) = self.bitmap_switch(&mut m, &mut a, &dir, Vec::new()).await {
            self.bitmap_abandon(&mut m, &mut a).await;
            return Err(e.context("marking the persistent bitmaps in use"));
        }
        *w.dirty.live.lock() = live;
        w.dirty.state.store(ACTIVE, Ordering::Release);
        Ok(())
    }

    /// Store the tracked bitmaps and clear their in-use flag (see the module documentation).
    /// The caller holds the drain and allocation gate exclusively and the metadata lock.
    /// Afterwards the next change looks at the bitmaps again.
    pub(crate) async fn stop_tracking_locked(&self, m: &mut Meta) -> Result<()> {
        let w = self.ws()?;
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            w.dirty.state.store(UNKNOWN, Ordering::Release);
            return Ok(());
        }
        let live = std::mem::take(&mut *w.dirty.live.lock());
        let r = self.store_live(m, &live).await;
        match r {
            Ok(()) => {
                w.dirty.state.store(UNKNOWN, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Keep the bits: a later close may succeed.
                *w.dirty.live.lock() = live;
                Err(e.context("storing the persistent bitmaps"))
            }
        }
    }

    async fn store_live(&self, m: &mut Meta, live: &[LiveBitmap]) -> Result<()> {
        let mut dir = self.bitmap_dir().await?;
        let mut a = crate::jobs::bitmap::Allocated::default();
        let r = async {
            let mut old = Vec::new();
            for b in live {
                let Some(i) = dir.iter().position(|e| e.name == b.name) else {
                    continue;
                };
                old.extend(self.bitmap_owned_clusters(&dir[i]).await?);
                let (t, n) = self.bitmap_store(m, &mut a, &b.bits).await?;
                dir[i].table_offset = t;
                dir[i].table_size = n;
                dir[i].flags &= !fmt::FLAG_IN_USE;
            }
            self.bitmap_switch(m, &mut a, &dir, old).await
        }
        .await;
        if r.is_err() {
            self.bitmap_abandon(m, &mut a).await;
        }
        r
    }

    /// Store the tracked bitmaps now (waits for the requests in flight). Called by close.
    pub(crate) async fn stop_tracking(&self) -> Result<()> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(());
        };
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            return Ok(());
        }
        let _drain = w.drain.write().await;
        let _gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        self.stop_tracking_locked(&mut m).await
    }

    /// Calls `f` with the bits of bitmap `name` as this writable handle records them now
    /// (bit `i`, in bit `i % 8` of byte `i / 8`, covers the guest bytes from `i *
    /// granularity`) and its granularity in bytes: a view that shows every change made so
    /// far, such as an NBD export's `qemu:dirty-bitmap:NAME` context of the image it
    /// writes to. `f` runs under the lock that changes take: keep it short.
    ///
    /// Starts the tracking when it is not running, as the first change does (the enabled
    /// bitmaps are loaded and marked in use on disk, as QEMU marks them while it has the
    /// image open for writing). `None` when `name` is not tracked: not an enabled
    /// consistent bitmap, a read-only handle, or a handle that refuses changes (corrupt,
    /// poisoned); its bits then change only by bitmap operations (read them with
    /// `bitmap_content`).
    pub async fn with_live_bitmap<R>(
        &self,
        name: &str,
        f: impl FnOnce(&[u8], u64) -> R,
    ) -> Result<Option<R>> {
        let Some(w) = self.inner.w.as_ref() else {
            return Ok(None);
        };
        // Held, storing the bits (close, bitmap operations) cannot run meanwhile: the bits
        // are either in memory (tracked) or current on disk.
        let _req = self.enter_request().await;
        if w.dirty.state.load(Ordering::Acquire) == UNKNOWN {
            if self.check_write(0, 0).is_err() {
                return Ok(None);
            }
            self.before_first_write().await?;
            self.start_tracking().await?;
        }
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            return Ok(None);
        }
        let live = w.dirty.live.lock();
        Ok(live
            .iter()
            .find(|b| b.name == name)
            .map(|b| f(&b.bits, 1u64 << b.gran_bits)))
    }

    /// The in-memory bits of tracked bitmap `name`, if it is tracked now.
    pub(crate) fn live_bits(&self, name: &str) -> Option<(Vec<u8>, u8)> {
        let w = self.inner.w.as_ref()?;
        if w.dirty.state.load(Ordering::Acquire) != ACTIVE {
            return None;
        }
        let live = w.dirty.live.lock();
        live.iter()
            .find(|b| b.name == name)
            .map(|b| (b.bits.clone(), b.gran_bits))
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn set_bit_ranges() {
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 3, 3);
        assert_eq!(b, [0x08, 0, 0, 0]);
        set_bits(&mut b, 6, 17);
        assert_eq!(b, [0xc8, 0xff, 0x03, 0]);
        set_bits(&mut b, 30, 100);
        assert_eq!(b, [0xc8, 0xff, 0x03, 0xc0]);
        let mut b = vec![0u8; 3];
        set_bits(&mut b, 8, 15);
        assert_eq!(b, [0, 0xff, 0]);
        set_bits(&mut b, 40, 50);
        assert_eq!(b, [0, 0xff, 0]);
    }
}
