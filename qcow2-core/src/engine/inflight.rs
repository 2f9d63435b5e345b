//! In-flight marks on guest clusters: one allocating or copying request per guest cluster at a time.

use crate::engine::image::Image;
use crate::engine::write::WriteState;
use std::sync::Arc;
use tokio::sync::Notify;

/// Releases a guest cluster's in-flight mark on drop and wakes waiters.
pub(crate) struct InflightGuard<'a> {
    w: &'a WriteState,
    gc: u64,
    notify: Arc<Notify>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.w.inflight.lock().remove(&self.gc);
        self.notify.notify_waiters();
    }
}
impl Image {
    pub(crate) async fn acquire(&self, gc: u64) -> Option<InflightGuard<'_>> {
        let w = self.inner.w.as_ref()?;
        loop {
            let wait = {
                let mut map = w.inflight.lock();
                match map.get(&gc) {
                    Some(n) => {
                        // Register as a waiter before the map lock is released, so the
                        // owner's notify_waiters() cannot be missed.
                        let mut fut = Box::pin(n.clone().notified_owned());
                        fut.as_mut().enable();
                        fut
                    }
                    None => {
                        let n = Arc::new(Notify::new());
                        map.insert(gc, n.clone());
                        return Some(InflightGuard { w, gc, notify: n });
                    }
                }
            };
            wait.await;
        }
    }
}
