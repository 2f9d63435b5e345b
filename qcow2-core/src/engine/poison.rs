//! Poisoning: a handle whose in-memory state may no longer match the file refuses every
//! later change.
//!
//! Some operations switch the header to a new table (a grown refcount table, a grown L1
//! table, a rewritten snapshot table) or change the virtual size in the header, and only
//! then update the handle's memory. If the header write or the sync after it fails, or the
//! future is dropped in between, nobody knows whether the file already points at the new
//! table: the handle could go on writing to a table the file no longer uses. Such a window is
//! covered by a [`PoisonGuard`]: unless the operation reaches its end (and disarms the
//! guard), dropping the guard poisons the handle. From then on every write, write-zeroes,
//! discard, resize and flush fails with an I/O error naming the cause, until the image is
//! reopened; reads go on. The file itself is consistent either way (both the old and the new
//! table are complete when the header switches), so reopening is safe.

use crate::engine::image::Image;
use crate::{Error, Result};

impl Image {
    /// Refuse to go on if the handle is poisoned.
    pub(crate) fn check_poison(&self) -> Result<()> {
        match &*self.inner.poisoned.lock() {
            None => Ok(()),
            Some(why) => Err(Error::io(
                std::io::Error::from_raw_os_error(libc::EIO),
                format!(
                    "{}: the image handle is unusable after an earlier failure ({why}); \
                     reopen the image",
                    self.inner.path.display()
                ),
            )),
        }
    }

    /// Poison the handle (the first reason is kept).
    pub(crate) fn poison(&self, why: String) {
        let mut p = self.inner.poisoned.lock();
        if p.is_none() {
            *p = Some(why);
        }
    }

    /// Whether the handle is poisoned (every later change fails until the image is
    /// reopened; see [`crate::engine::poison`]).
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.lock().is_some()
    }

    /// A guard that poisons the handle unless disarmed: wrap a window in which the file and
    /// the memory may disagree.
    pub(crate) fn poison_guard(&self, what: &'static str) -> PoisonGuard<'_> {
        PoisonGuard {
            img: self,
            what,
            armed: true,
        }
    }
}

/// Poisons the handle when dropped armed (an error return or a dropped future inside the
/// window).
pub(crate) struct PoisonGuard<'a> {
    img: &'a Image,
    what: &'static str,
    armed: bool,
}

impl PoisonGuard<'_> {
    /// Poison now, naming the error, and return it.
    pub(crate) fn fail(&mut self, e: Error) -> Error {
        self.img.poison(format!("{} failed: {e}", self.what));
        e
    }
    /// The window ended with file and memory in agreement.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PoisonGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.img.poison(format!("{} was interrupted", self.what));
        }
    }
}
