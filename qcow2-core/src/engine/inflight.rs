//! In-flight requests: per-guest-cluster marks for allocating requests, and the epochs that
//! keep a freed host cluster from being reused while a request that looked it up runs.
//!
//! # The in-flight rule
//!
//! A host cluster is not handed out again while any request that may have looked it up
//! before it was freed is still in flight. Reads and in-place writes look a mapping up
//! (L1 entry, L2 slice, compressed descriptor) and then do their I/O with no lock held, so a
//! discard, a write-zeroes that unmaps, a copy-on-write away from a compressed or shared
//! cluster, or an L2 table copy can drop the mapping in between, and the next flush can
//! bring the cluster's refcount to 0. Without this rule the late request would then read
//! or write a cluster that now holds other guest data, an L2 table or a refcount block.
//!
//! How it is kept (an epoch scheme, lock-free for requests):
//! - Every guest request on a writable handle (read, write, write-zeroes, discard,
//!   compressed write) takes a [`Ticket`] before its first lookup and drops it when its
//!   I/O is done (an RAII guard: an error or a dropped future releases it too). A ticket
//!   is one atomic increment in one of two counters, chosen by the parity of the current
//!   epoch it read.
//! - A dropped request releases its ticket (and its in-flight mark, allocation gate and
//!   drain gate) only once its storage I/O has ended: a future drops its innermost part
//!   first, the storage request it awaits, and a storage request that changes the file
//!   ends before the drop of its future returns (the [`crate::io::Storage`] contract; the
//!   file engines wait for a write, write-zeroes, discard or reservation already handed
//!   to the kernel or a worker, `RunToEnd` in `io/threads.rs`). So a write dropped mid-flight
//!   is ordered before every request issued after the drop: an overlapping write is not
//!   overwritten by it, a flush covers it, and its host cluster, freed later, is not
//!   written by it once reused. Nothing on the request path pays for this.
//! - A free that brings a refcount to 0 (`flush_metadata`, after the tables that dropped
//!   the reference are durable) writes the refcount 0 as before, but puts the cluster in
//!   [`Quarantine`] with the current epoch `q`, instead of making it allocatable (its hole
//!   is punched only at release, so a late reader still finds the old bytes). The
//!   allocator never hands out a quarantined cluster; when no free cluster is left it
//!   grows the file, so nothing ever waits for a request to drain (no deadlock with a
//!   request that itself waits for an allocation).
//! - The epoch advances from `e` to `e + 1` (under the metadata lock, like every
//!   quarantine) only when the counter of parity `e - 1` is 0. A cluster quarantined in
//!   epoch `q` becomes allocatable once the epoch is `q + 2`: the two advances after its
//!   free each found one of the two counters empty, and a request that looked the cluster
//!   up took its ticket (in one of the two counters) before the free and holds it until
//!   done. See the exhaustive model test at the end of this file.
//! - When a cluster enters or leaves quarantine, cached L2 slices at its offset and cached
//!   decompressed clusters stored in it are dropped. At release no request that could
//!   have seen the old mapping remains, so nothing can put a stale entry back.
//! - On disk a quarantined cluster already has refcount 0: a crash leaks nothing and
//!   corrupts nothing. `close` and drop need not wait for anything: the quarantine is
//!   memory only.
//!
//! The metadata lock is never held while waiting for tickets; tickets are never waited for
//! at all.

use crate::engine::image::Image;
use crate::engine::metadata::Meta;
use crate::engine::write::WriteState;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// The in-flight state of one guest cluster whose mark is held (see [`Image::acquire`]).
///
/// An allocating write into a cluster that reads as zeros and gets a fresh host cluster
/// (past everything ever allocated, so its bytes read as zeros already) *announces* the host
/// cluster as soon as it is chosen: later writes to the same guest cluster then write their
/// data into it in parallel with the first one's data write (they *join* it) and only wait
/// for the mapping to be published, instead of waiting for the whole allocation and then
/// writing in place. Nothing else of the cluster has to be written by anyone: its unwritten
/// parts read as zeros, which is what the guest cluster read as before.
pub(crate) struct Inflight {
    notify: Arc<Notify>,
    /// Host offset + 1 of the announced fresh host cluster; 0 while none is.
    host: AtomicU64,
    /// `RUNNING`, `PUBLISHED` or `ABANDONED`.
    state: AtomicU8,
}

const RUNNING: u8 = 0;
/// The mapping to the announced host cluster is published (in the L2 cache).
const PUBLISHED: u8 = 1;
/// The mark was released without publishing a mapping to the announced cluster (an error
/// or a dropped future): writes that joined must start again.
const ABANDONED: u8 = 2;

impl Inflight {
    fn new() -> Self {
        Inflight {
            notify: Arc::new(Notify::new()),
            host: AtomicU64::new(0),
            state: AtomicU8::new(RUNNING),
        }
    }

    /// Wait until the holder of the mark published the mapping (`true`) or released the
    /// mark without doing so (`false`).
    pub(crate) async fn published(&self) -> bool {
        loop {
            let fut = self.notify.notified();
            tokio::pin!(fut);
            // Registered before the state is read: a change after the read wakes us.
            fut.as_mut().enable();
            match self.state.load(Ordering::Acquire) {
                PUBLISHED => return true,
                ABANDONED => return false,
                _ => fut.await,
            }
        }
    }
}

/// Releases a guest cluster's in-flight mark on drop and wakes waiters.
pub(crate) struct InflightGuard<'a> {
    w: &'a WriteState,
    gc: u64,
    slot: Arc<Inflight>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let _ = self.slot.state.compare_exchange(
            RUNNING,
            ABANDONED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.w.inflight.lock().remove(&self.gc);
        self.slot.notify.notify_waiters();
    }
}

/// What [`Image::acquire_or_join`] got.
pub(crate) enum Acquired<'a> {
    /// The mark (or `None` on a read-only handle, as [`Image::acquire`]).
    Mark(Option<InflightGuard<'a>>),
    /// The mark's holder is allocating host cluster `.1` (fresh, reading as zeros) for the
    /// guest cluster: write into it, then wait for [`Inflight::published`].
    Join(Arc<Inflight>, u64),
}

/// A handle whose metadata does not change while this is held (see [`Image::quiesce`]).
pub(crate) struct Quiesced<'a> {
    _gate: Option<tokio::sync::RwLockWriteGuard<'a, ()>>,
    _meta: Option<tokio::sync::MutexGuard<'a, Meta>>,
}

/// The request epochs of a writable handle (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct Epochs {
    /// The current epoch. Changed only under the metadata lock.
    epoch: AtomicU64,
    /// Tickets held, by parity of the epoch read when they were taken.
    tickets: [AtomicU64; 2],
}

/// A request's ticket: while it is held, no host cluster freed after it was taken is
/// handed out again.
pub(crate) struct Ticket<'a> {
    epochs: &'a Epochs,
    slot: usize,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.epochs.tickets[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

impl Epochs {
    /// Take a ticket (before the request's first lookup).
    pub(crate) fn enter(&self) -> Ticket<'_> {
        let slot = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
        self.tickets[slot].fetch_add(1, Ordering::SeqCst);
        // The increment is visible before any lookup of this request reads a mapping.
        fence(Ordering::SeqCst);
        Ticket { epochs: self, slot }
    }

    /// The current epoch.
    pub(crate) fn current(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Advance the epoch by one if every ticket of the previous epoch is gone. Call only
    /// under the metadata lock (advances and quarantines must not interleave). Returns the
    /// (possibly new) current epoch.
    pub(crate) fn try_advance(&self) -> u64 {
        let e = self.epoch.load(Ordering::SeqCst);
        // Every mapping change (and quarantine) made before is visible to a request whose
        // ticket this check does not see.
        fence(Ordering::SeqCst);
        if self.tickets[((e + 1) & 1) as usize].load(Ordering::SeqCst) == 0 {
            self.epoch.store(e + 1, Ordering::SeqCst);
            e + 1
        } else {
            e
        }
    }

    /// Tickets held now (both epochs).
    pub(crate) fn held(&self) -> u64 {
        self.tickets[0].load(Ordering::SeqCst) + self.tickets[1].load(Ordering::SeqCst)
    }
}

/// Host clusters freed (refcount 0 on disk) that may not be handed out yet.
#[derive(Debug, Default)]
pub(crate) struct Quarantine {
    set: HashSet<u64>,
    /// Clusters by the epoch of their free, oldest first.
    batches: VecDeque<(u64, Vec<u64>)>,
}

impl Quarantine {
    /// Whether cluster `c` is quarantined.
    pub(crate) fn contains(&self, c: u64) -> bool {
        !self.set.is_empty() && self.set.contains(&c)
    }

    /// Quarantine cluster `c`, freed in epoch `epoch`.
    pub(crate) fn add(&mut self, c: u64, epoch: u64) {
        if !self.set.insert(c) {
            return;
        }
        match self.batches.back_mut() {
            Some((e, v)) if *e == epoch => v.push(c),
            _ => self.batches.push_back((epoch, vec![c])),
        }
    }

    /// Take out every cluster that may be handed out in epoch `current`.
    pub(crate) fn release(&mut self, current: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some((e, _)) = self.batches.front() {
            if e + 2 > current {
                break;
            }
            let (_, v) = self.batches.pop_front().unwrap_or_default();
            for c in &v {
                self.set.remove(c);
            }
            out.extend(v);
        }
        out
    }

    /// The quarantined clusters.
    pub(crate) fn clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.set.iter().copied()
    }

    /// How many clusters are quarantined.
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}

impl Image {
    /// Take guest cluster `gc`'s in-flight mark, waiting while another request holds it.
    pub(crate) async fn acquire(&self, gc: u64) -> Option<InflightGuard<'_>> {
        match self.acquire_or_join(gc, false).await {
            Acquired::Mark(g) => g,
            Acquired::Join(..) => unreachable!("joining was not asked for"),
        }
    }

    /// Like [`Image::acquire`], but with `join`, return as soon as the holder of the mark
    /// has announced a fresh host cluster (see [`Inflight`]) instead of waiting for the mark.
    pub(crate) async fn acquire_or_join(&self, gc: u64, join: bool) -> Acquired<'_> {
        let Some(w) = self.inner.w.as_ref() else {
            return Acquired::Mark(None);
        };
        loop {
            let wait = {
                let mut map = w.inflight.lock();
                match map.get(&gc) {
                    Some(n) => {
                        let host = n.host.load(Ordering::Acquire);
                        if join && host != 0 && n.state.load(Ordering::Acquire) == RUNNING {
                            return Acquired::Join(n.clone(), host - 1);
                        }
                        // Register as a waiter before the map lock is released, so the
                        // owner's notify_waiters() cannot be missed.
                        let mut fut = Box::pin(n.notify.clone().notified_owned());
                        fut.as_mut().enable();
                        fut
                    }
                    None => {
                        let n = Arc::new(Inflight::new());
                        map.insert(gc, n.clone());
                        return Acquired::Mark(Some(InflightGuard { w, gc, slot: n }));
                    }
                }
            };
            wait.await;
        }
    }

    /// The holder of guest cluster `gc`'s mark chose fresh host cluster `host` for it, and
    /// nothing of that cluster remains to be written but the holder's own range: let later
    /// writes to the cluster join (see [`Inflight`]). Returns the slot to report the
    /// publication on.
    pub(crate) fn announce_fresh(&self, gc: u64, host: u64) -> Option<Arc<Inflight>> {
        let w = self.inner.w.as_ref()?;
        let slot = w.inflight.lock().get(&gc).cloned()?;
        slot.host.store(host + 1, Ordering::Release);
        slot.notify.notify_waiters();
        Some(slot)
    }

    /// The mapping of an announced cluster is published: wake the writes that joined.
    pub(crate) fn publish_fresh(&self, slot: &Inflight) {
        slot.state.store(PUBLISHED, Ordering::Release);
        slot.notify.notify_waiters();
    }

    /// Enter a guest request: `None` on a read-only handle, else a guard to hold until the
    /// request is done, which waits while an operation drains the handle (`WriteState::
    /// drain`). Only public entry points take it, once per request: a request never waits
    /// for it while holding it (a drain waiting in between would deadlock).
    pub(crate) async fn enter_request(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        match &self.inner.w {
            Some(w) => Some(w.drain.read().await),
            None => None,
        }
    }

    /// A ticket for a guest request (`None` on a read-only handle, where nothing is
    /// freed). Take it before the first mapping lookup; hold it until the I/O is done.
    pub(crate) fn ticket(&self) -> Option<Ticket<'_>> {
        self.inner.w.as_ref().map(|w| w.epochs.enter())
    }

    /// Tickets held now by requests on this handle (0 on a read-only handle).
    pub fn requests_in_flight(&self) -> u64 {
        self.inner.w.as_ref().map_or(0, |w| w.epochs.held())
    }

    /// Host clusters freed but not yet allocatable because requests that started before the
    /// free may still use them (0 on a read-only handle).
    pub async fn quarantined_clusters(&self) -> usize {
        match &self.inner.w {
            Some(w) => w.meta.lock().await.quarantine.len(),
            None => 0,
        }
    }

    /// Hold off every change of the image's metadata and wait until no allocated cluster
    /// is waiting to be published, then write back the metadata: the file is then a
    /// consistent image until the returned guard is dropped (in-place writes and reads go on
    /// meanwhile; they change no metadata). Used by `check` on a live handle. A poisoned
    /// handle is not flushed (its memory may not match the file): the file is checked as is.
    pub(crate) async fn quiesce(&self) -> crate::Result<Quiesced<'_>> {
        let Some(w) = &self.inner.w else {
            return Ok(Quiesced {
                _gate: None,
                _meta: None,
            });
        };
        let gate = w.alloc_gate.write().await;
        let mut m = w.meta.lock().await;
        if !self.is_poisoned() {
            self.flush_metadata(&mut m).await?;
        }
        Ok(Quiesced {
            _gate: Some(gate),
            _meta: Some(m),
        })
    }

    /// Cluster `c`'s refcount just reached 0: quarantine it (metadata lock held).
    pub(crate) fn quarantine(&self, m: &mut Meta, c: u64) {
        let Some(w) = &self.inner.w else {
            return;
        };
        m.quarantine.add(c, w.epochs.current());
        self.forget_cached(&[c]);
    }

    /// Advance the epoch as far as the tickets allow and make the clusters whose requests
    /// have drained allocatable, punching holes in the file for them (metadata lock held).
    pub(crate) async fn release_quarantine(&self, m: &mut Meta) {
        let Some(w) = &self.inner.w else {
            return;
        };
        if m.quarantine.len() == 0 {
            return;
        }
        w.epochs.try_advance();
        let cur = w.epochs.try_advance();
        let out = m.quarantine.release(cur);
        if out.is_empty() {
            return;
        }
        self.forget_cached(&out);
        if let Some(&min) = out.iter().min() {
            m.free_hint = m.free_hint.min(min);
        }
        let bits = self.inner.layout.cluster_bits;
        for c in out {
            // Best effort: the cluster is free either way.
            let _ = self.inner.file.discard(c << bits, 1 << bits).await;
        }
    }

    /// Drop cached L2 slices at, and decompressed clusters stored in, host clusters `cs`.
    fn forget_cached(&self, clusters: &[u64]) {
        let bits = self.inner.layout.cluster_bits;
        for &c in clusters {
            self.inner
                .l2_cache
                .invalidate_range(c << bits, (c + 1) << bits);
        }
        let mut z = self.inner.zcache.lock();
        self.inner.zcache_gen.fetch_add(1, Ordering::AcqRel);
        if z.is_empty() {
            return;
        }
        let set: HashSet<u64> = clusters.iter().copied().collect();
        let depth = self.inner.zdepth;
        let stale: Vec<(usize, u64)> = z
            .iter()
            .map(|(&k, _)| k)
            .filter(|&(d, off)| d == depth && set.contains(&(off >> bits)))
            .collect();
        for k in stale {
            z.pop(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    //! An exhaustive check of the epoch protocol: every interleaving of two requests (each
    //! takes a ticket, looks the mapping up, does its I/O on the cluster it found, drops
    //! the ticket) with a metadata-side sequence (unmap the cluster, quarantine it, then try
    //! to advance and release repeatedly, and reuse it once released). The property: no
    //! request does I/O on the cluster after it was reused. The model uses the real
    //! `Epochs` and `Quarantine` step by step (each step one atomic action of the real
    //! code: the ticket's epoch read and its increment are separate steps).
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    enum R {
        Start,
        ReadEpoch(u64),
        Ticketed(usize),
        Looked(usize, bool),
        Done,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    struct State {
        epoch: u64,
        tickets: [u64; 2],
        reqs: Vec<R>,
        /// Metadata side: 0 mapped, 1 unmapped, 2 quarantined, then advance attempts.
        meta_pc: u32,
        mapped: bool,
        q: Option<u64>,
        reused: bool,
        /// A request ran an advance step before the free (earlier epochs).
        pre_advances: u32,
    }

    fn to_real(s: &State) -> Epochs {
        let e = Epochs::default();
        e.epoch.store(s.epoch, Ordering::SeqCst);
        e.tickets[0].store(s.tickets[0], Ordering::SeqCst);
        e.tickets[1].store(s.tickets[1], Ordering::SeqCst);
        e
    }

    fn from_real(s: &mut State, e: &Epochs) {
        s.epoch = e.epoch.load(Ordering::SeqCst);
        s.tickets = [
            e.tickets[0].load(Ordering::SeqCst),
            e.tickets[1].load(Ordering::SeqCst),
        ];
    }

    /// Successor states; panics if a request does I/O on a reused cluster.
    fn steps(s: &State) -> Vec<State> {
        let mut out = Vec::new();
        for i in 0..s.reqs.len() {
            let mut n = s.clone();
            match s.reqs[i] {
                R::Start => n.reqs[i] = R::ReadEpoch(s.epoch),
                R::ReadEpoch(e) => {
                    let slot = (e & 1) as usize;
                    n.tickets[slot] += 1;
                    n.reqs[i] = R::Ticketed(slot);
                }
                R::Ticketed(slot) => n.reqs[i] = R::Looked(slot, s.mapped),
                R::Looked(slot, saw) => {
                    assert!(
                        !(saw && s.reused),
                        "a request that looked the cluster up did I/O after its reuse: {s:?}"
                    );
                    n.tickets[slot] -= 1;
                    n.reqs[i] = R::Done;
                }
                R::Done => continue,
            }
            out.push(n);
        }
        // Advances before the free (other frees' traffic), a bounded number.
        if s.meta_pc == 0 && s.pre_advances < 3 {
            let mut n = s.clone();
            let e = to_real(&n);
            e.try_advance();
            from_real(&mut n, &e);
            n.pre_advances += 1;
            out.push(n);
        }
        let mut n = s.clone();
        match s.meta_pc {
            0 => {
                n.mapped = false;
                n.meta_pc = 1;
            }
            1 => {
                n.q = Some(s.epoch);
                n.meta_pc = 2;
            }
            2..=7 if !s.reused => {
                let e = to_real(&n);
                let cur = e.try_advance();
                from_real(&mut n, &e);
                let mut q = Quarantine::default();
                q.add(7, s.q.unwrap());
                if q.release(cur) == vec![7] {
                    n.reused = true;
                }
                n.meta_pc += 1;
            }
            _ => return out,
        }
        out.push(n);
        out
    }

    #[test]
    fn epochs_never_release_a_cluster_in_use() {
        for start_epoch in 0..2u64 {
            let init = State {
                epoch: start_epoch,
                tickets: [0, 0],
                reqs: vec![R::Start, R::Start],
                meta_pc: 0,
                mapped: true,
                q: None,
                reused: false,
                pre_advances: 0,
            };
            let mut seen = std::collections::HashSet::new();
            let mut stack = vec![init];
            let mut released = 0u64;
            while let Some(s) = stack.pop() {
                if !seen.insert(s.clone()) {
                    continue;
                }
                if s.reused {
                    released += 1;
                }
                stack.extend(steps(&s));
            }
            assert!(seen.len() > 1000, "{} states", seen.len());
            assert!(released > 0, "the cluster was never released");
        }
    }

    #[test]
    fn quarantine_releases_after_two_epochs() {
        let mut q = Quarantine::default();
        q.add(5, 3);
        q.add(6, 3);
        q.add(9, 4);
        assert!(q.contains(5) && q.contains(9) && !q.contains(7));
        assert!(q.release(4).is_empty());
        let mut r = q.release(5);
        r.sort_unstable();
        assert_eq!(r, vec![5, 6]);
        assert!(!q.contains(5) && q.contains(9));
        assert_eq!(q.release(6), vec![9]);
        assert_eq!(q.len(), 0);
    }
}
