//! A power-cut model for tests: storage that records every change and can tell what a disk
//! could hold after the power failed at any point.
//!
//! A [`PowerCut`] is one "machine": it holds one or more files ([`PowerCutFile`], each a
//! [`Storage`] over memory, for example an image and its external data file) and one log of
//! every write, write-zeroes, discard, allocate, `set_len` and completed flush of all of
//! them, in the order they took effect. [`PowerCut::state_at`] then materializes the files
//! as they could be after a power cut at log position `cut` (after the first `cut` entries):
//!
//! - everything a file recorded before the start of the last flush *of that file* that
//!   completed before the cut is there (a flush makes durable what completed before it was
//!   called, as `fdatasync`);
//! - every later change of that file before the cut survives or not, independently (chosen
//!   from a seed), and a write is torn: each of its pieces between 4 KiB boundaries of the
//!   file survives on its own;
//! - nothing after the cut is there.
//!
//! Surviving changes are applied in log order, so where two of them overlap the later one
//! wins, as on a disk whose cache wrote back some sectors and not others.
//!
//! Typical use: open an image with [`crate::Image::open_storage`] on a file of a
//! [`PowerCut`], run a workload, note [`PowerCut::len`] whenever the guest sees a flush
//! complete, then for many cut points write `state_at(cut, seed)` to temporary files and
//! check them (reopen, `qemu-img check`, the flushed data intact).

use super::{IoFuture, Storage};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

/// The unit a write may be torn at: pieces between multiples of this offset survive or not
/// independently.
pub const TEAR_SIZE: u64 = 4096;

/// One change (or completed flush) in the log.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Bytes written at an offset.
    Write {
        /// Index of the file ([`PowerCutFile::index`]).
        file: usize,
        /// Byte offset.
        off: u64,
        /// The bytes.
        data: Arc<[u8]>,
    },
    /// A range made to read as zeros (write-zeroes, or discard: both read as zeros after).
    Zero {
        /// Index of the file.
        file: usize,
        /// Byte offset.
        off: u64,
        /// Length.
        len: u64,
        /// Whether the length of the file grows to the end of the range (write-zeroes and
        /// allocate do, discard does not).
        extend: bool,
    },
    /// The file's length set (truncate or extend).
    SetLen {
        /// Index of the file.
        file: usize,
        /// The new length.
        len: u64,
    },
    /// A flush of a file completed; it made durable the file's entries before `barrier`
    /// (the log length when the flush was called).
    Flush {
        /// Index of the file.
        file: usize,
        /// Log position when the flush started.
        barrier: usize,
    },
}

impl Entry {
    fn file(&self) -> usize {
        match *self {
            Entry::Write { file, .. }
            | Entry::Zero { file, .. }
            | Entry::SetLen { file, .. }
            | Entry::Flush { file, .. } => file,
        }
    }
}

struct State {
    /// Content at creation (the base of the replay).
    base: Vec<Vec<u8>>,
    /// Current content (what reads see).
    live: Vec<Vec<u8>>,
    log: Vec<Entry>,
}

/// A set of files sharing one log of changes (see the module documentation).
#[derive(Clone)]
pub struct PowerCut {
    st: Arc<Mutex<State>>,
}

impl Default for PowerCut {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PowerCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.st.lock();
        f.debug_struct("PowerCut")
            .field("files", &s.live.len())
            .field("log", &s.log.len())
            .finish()
    }
}

/// A small deterministic generator (splitmix64), so that a seed picks the same surviving
/// changes on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Which of the changes after the last flush survive a cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivors {
    /// None: only what was flushed.
    None,
    /// All of them (as if the cache had been written back just before the cut).
    All,
    /// A random subset chosen from this seed, each 4 KiB piece of a write on its own.
    Random(u64),
}

fn apply_zero(d: &mut Vec<u8>, off: u64, len: u64, extend: bool) {
    let end = off.saturating_add(len) as usize;
    if extend && d.len() < end {
        d.resize(end, 0);
    }
    let end = end.min(d.len());
    if (off as usize) < end {
        d[off as usize..end].fill(0);
    }
}

fn apply_write(d: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if d.len() < end {
        d.resize(end, 0);
    }
    d[off as usize..end].copy_from_slice(data);
}

impl PowerCut {
    /// A machine with no files.
    pub fn new() -> PowerCut {
        PowerCut {
            st: Arc::new(Mutex::new(State {
                base: Vec::new(),
                live: Vec::new(),
                log: Vec::new(),
            })),
        }
    }

    /// Add a file holding `bytes` (its durable content when the log starts).
    pub fn add_file(&self, bytes: Vec<u8>) -> Arc<PowerCutFile> {
        let mut s = self.st.lock();
        s.base.push(bytes.clone());
        s.live.push(bytes);
        Arc::new(PowerCutFile {
            pc: self.clone(),
            index: s.live.len() - 1,
        })
    }

    /// The number of log entries so far: a cut at this position keeps everything recorded
    /// until now (subject to flushes).
    pub fn len(&self) -> usize {
        self.st.lock().log.len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the log.
    pub fn log(&self) -> Vec<Entry> {
        self.st.lock().log.clone()
    }

    /// The log positions just after each completed flush (of any file).
    pub fn flush_points(&self) -> Vec<usize> {
        let s = self.st.lock();
        s.log
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Entry::Flush { .. }))
            .map(|(i, _)| i + 1)
            .collect()
    }

    /// The current content of every file (what a reader sees now, not what is durable).
    pub fn live(&self) -> Vec<Vec<u8>> {
        self.st.lock().live.clone()
    }

    /// The content of every file after a power cut at log position `cut` (clamped to the log
    /// length), the changes after each file's last completed flush chosen by `survivors`.
    pub fn state_at(&self, cut: usize, survivors: Survivors) -> Vec<Vec<u8>> {
        let (mut files, log) = {
            let s = self.st.lock();
            let cut = cut.min(s.log.len());
            (s.base.clone(), s.log[..cut].to_vec())
        };
        // Each file's durable prefix: entries before the barrier of its last completed flush.
        let mut durable = vec![0usize; files.len()];
        for e in &log {
            if let Entry::Flush { file, barrier } = *e {
                durable[file] = durable[file].max(barrier);
            }
        }
        let mut rng = SplitMix(match survivors {
            Survivors::Random(s) => s ^ 0x005e_ed0f_c075,
            _ => 0,
        });
        let mut keep = |i: usize, file: usize| -> bool {
            if i < durable[file] {
                return true;
            }
            match survivors {
                Survivors::None => false,
                Survivors::All => true,
                Survivors::Random(_) => rng.next() & 1 == 1,
            }
        };
        for (i, e) in log.iter().enumerate() {
            let f = e.file();
            match e {
                Entry::Write { off, data, .. } => {
                    // Pieces between TEAR_SIZE boundaries of the file.
                    let mut pos = *off;
                    let end = off + data.len() as u64;
                    while pos < end {
                        let next = ((pos / TEAR_SIZE) + 1) * TEAR_SIZE;
                        let piece_end = next.min(end);
                        if keep(i, f) {
                            let a = (pos - off) as usize;
                            let b = (piece_end - off) as usize;
                            apply_write(&mut files[f], pos, &data[a..b]);
                        }
                        pos = piece_end;
                    }
                }
                Entry::Zero {
                    off, len, extend, ..
                } => {
                    if keep(i, f) {
                        apply_zero(&mut files[f], *off, *len, *extend);
                    }
                }
                Entry::SetLen { len, .. } => {
                    if keep(i, f) {
                        files[f].resize(*len as usize, 0);
                    }
                }
                Entry::Flush { .. } => {}
            }
        }
        files
    }

    fn record(&self, e: Entry) {
        let mut s = self.st.lock();
        let State { live, log, .. } = &mut *s;
        match &e {
            Entry::Write { file, off, data } => apply_write(&mut live[*file], *off, data),
            Entry::Zero {
                file,
                off,
                len,
                extend,
            } => apply_zero(&mut live[*file], *off, *len, *extend),
            Entry::SetLen { file, len } => live[*file].resize(*len as usize, 0),
            Entry::Flush { .. } => {}
        }
        log.push(e);
    }
}

/// One file of a [`PowerCut`]: a [`Storage`] over memory whose every change is logged.
pub struct PowerCutFile {
    pc: PowerCut,
    index: usize,
}

impl PowerCutFile {
    /// The machine this file belongs to.
    pub fn machine(&self) -> &PowerCut {
        &self.pc
    }
    /// The index of this file in [`PowerCut::state_at`]'s result.
    pub fn index(&self) -> usize {
        self.index
    }
}

fn check_off(off: u64, len: u64) -> io::Result<()> {
    // Memory storage: refuse absurd sizes instead of trying to allocate them.
    if off.checked_add(len).is_none_or(|e| e > (1u64 << 40)) {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    Ok(())
}

impl Storage for PowerCutFile {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let s = self.pc.st.lock();
            let d = &s.live[self.index];
            let start = (off as usize).min(d.len());
            let end = (off as usize).saturating_add(buf.len()).min(d.len());
            let n = end - start;
            buf[..n].copy_from_slice(&d[start..end]);
            buf[n..].fill(0);
            Ok(())
        })
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            check_off(off, buf.len() as u64)?;
            self.pc.record(Entry::Write {
                file: self.index,
                off,
                data: buf.into(),
            });
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let barrier = self.pc.len();
            // The flush completes later than it starts: let other requests run in between,
            // so that what completes during a flush is not taken as made durable by it.
            tokio::task::yield_now().await;
            self.pc.record(Entry::Flush {
                file: self.index,
                barrier,
            });
            Ok(())
        })
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        Box::pin(async move {
            check_off(off, len)?;
            self.pc.record(Entry::Zero {
                file: self.index,
                off,
                len,
                extend: false,
            });
            Ok(true)
        })
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_off(off, len)?;
            self.pc.record(Entry::Zero {
                file: self.index,
                off,
                len,
                extend: true,
            });
            Ok(())
        })
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_off(off, len)?;
            let cur = self.len()?;
            if off + len > cur {
                self.pc.record(Entry::SetLen {
                    file: self.index,
                    len: off + len,
                });
            }
            Ok(())
        })
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.pc.st.lock().live[self.index].len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        check_off(len, 0)?;
        self.pc.record(Entry::SetLen {
            file: self.index,
            len,
        });
        Ok(())
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.len()
    }
    fn alignment(&self) -> usize {
        1
    }
    fn engine_name(&self) -> &'static str {
        "powercut"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn flush_barrier_tearing_and_cut() {
        block_on(async {
            let pc = PowerCut::new();
            let a = pc.add_file(vec![1; 8192]);
            let b = pc.add_file(Vec::new());
            a.write_at(&[2; 8192], 0).await.unwrap(); // 0
            b.write_at(&[3; 10], 0).await.unwrap(); // 1
            a.flush().await.unwrap(); // 2: makes 0 durable (and not b's write)
            a.write_at(&[4; 100], 4000).await.unwrap(); // 3: crosses 4096
            a.discard(0, 10).await.unwrap(); // 4
            a.set_len(10000).unwrap(); // 5
            assert_eq!(pc.len(), 6);
            assert_eq!(pc.flush_points(), vec![3]);
            // Cut before the flush completed: the base, or the write in pieces.
            let s = pc.state_at(2, Survivors::None);
            assert_eq!(s[0], vec![1; 8192]);
            assert!(s[1].is_empty());
            let s = pc.state_at(2, Survivors::All);
            assert_eq!(s[0], vec![2; 8192]);
            assert_eq!(s[1], vec![3; 10]);
            // After the flush: a's first write is durable, b's is not.
            let s = pc.state_at(3, Survivors::None);
            assert_eq!(s[0], vec![2; 8192]);
            assert!(s[1].is_empty());
            // Everything.
            let s = pc.state_at(6, Survivors::All);
            assert_eq!(s[0].len(), 10000);
            assert_eq!(&s[0][..10], &[0; 10]);
            assert_eq!(&s[0][4000..4100], &[4; 100]);
            assert_eq!(s[0], pc.live()[0]);
            // Random survivors: each 4 KiB piece on its own; over many seeds, every
            // combination of the two pieces of the torn write shows up.
            let mut seen = std::collections::HashSet::new();
            for seed in 0..64 {
                let s = pc.state_at(4, Survivors::Random(seed));
                seen.insert((s[0][4000] == 4, s[0][4096] == 4));
                assert!(s[0][4000] == 4 || s[0][4000] == 2);
            }
            assert_eq!(seen.len(), 4);
        });
    }

    #[test]
    fn flush_covers_only_what_completed_before_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let pc = PowerCut::new();
            let a = pc.add_file(vec![0; 16]);
            // A write completing while the flush is in progress is not covered by it.
            let f = a.flush();
            let w = a.write_at(&[9; 16], 0);
            let (rf, rw) = futures::join!(f, w);
            rf.unwrap();
            rw.unwrap();
            let log = pc.log();
            assert!(matches!(log[0], Entry::Write { .. }));
            assert!(matches!(log[1], Entry::Flush { barrier: 0, .. }));
            assert_eq!(pc.state_at(2, Survivors::None)[0], vec![0; 16]);
        });
    }
}
