//! An in-memory [`Storage`] for tests, with fault injection.
//!
//! Faults: fail the Nth and later writes (`fail_writes_after`), which simulates a crash
//! at that point: every write before it is kept, none after.
//!
//! Size: writes that would grow the content past `max_len` (by default 1 TiB; set lower
//! with [`MemStorage::set_max_len`], as the fuzz targets do) fail with `EFBIG`, as a file
//! system does past its largest file, instead of allocating that much memory.

use super::{IoFuture, Storage};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Memory-backed storage.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    reads: AtomicU64,
    fail_after: AtomicU64,
    max_len: AtomicU64,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        MemStorage {
            data: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            fail_after: AtomicU64::new(u64::MAX),
            max_len: AtomicU64::new(1 << 40),
        }
    }
    /// Refuse (`EFBIG`) any change that would make the content longer than `n` bytes.
    pub fn set_max_len(&self, n: u64) {
        self.max_len.store(n, Ordering::SeqCst);
    }
    /// `off + len`, when within the size limit; else `EFBIG`.
    fn end_within_limit(&self, off: u64, len: u64) -> io::Result<usize> {
        match off.checked_add(len) {
            Some(end) if end <= self.max_len.load(Ordering::SeqCst) => Ok(end as usize),
            _ => Err(io::Error::from_raw_os_error(libc::EFBIG)),
        }
    }
    /// Storage holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let s = Self::new();
        *s.data.lock() = bytes;
        s
    }
    /// A copy of the content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().clone()
    }
    /// Let `n` more writes (write, write-zeroes, discard, set_len) succeed, then fail every later one with EIO.
    pub fn fail_writes_after(&self, n: u64) {
        self.fail_after.store(
            self.writes.load(Ordering::SeqCst).saturating_add(n),
            Ordering::SeqCst,
        );
    }
    /// Number of reads so far.
    pub fn read_count(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
    /// Bytes asked for by reads so far.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::SeqCst)
    }
    /// Number of mutating operations so far.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    fn count_write(&self) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_after.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn write_sync(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.count_write()?;
        let end = self.end_within_limit(off, buf.len() as u64)?;
        let mut d = self.data.lock();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
}

impl Storage for MemStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.read_bytes
                .fetch_add(buf.len() as u64, Ordering::SeqCst);
            let d = self.data.lock();
            let start = off.min(d.len() as u64) as usize;
            let end = off.saturating_add(buf.len() as u64).min(d.len() as u64) as usize;
            let n = end - start;
            buf[..n].copy_from_slice(&d[start..end]);
            buf[n..].fill(0);
            Ok(())
        })
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move { self.write_sync(buf, off) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { Ok(()) })
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        Box::pin(async move {
            self.count_write()?;
            let mut d = self.data.lock();
            let end = off.saturating_add(len).min(d.len() as u64) as usize;
            if off < end as u64 {
                d[off as usize..end].fill(0);
            }
            Ok(true)
        })
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.end_within_limit(off, len)?;
            self.write_sync(&vec![0; len as usize], off)
        })
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.count_write()?;
            let end = self.end_within_limit(off, len)?;
            let mut d = self.data.lock();
            if d.len() < end {
                d.resize(end, 0);
            }
            Ok(())
        })
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.count_write()?;
        let len = self.end_within_limit(len, 0)?;
        self.data.lock().resize(len, 0);
        Ok(())
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.len()
    }
    fn alignment(&self) -> usize {
        1
    }
    fn engine_name(&self) -> &'static str {
        "mem"
    }
}
