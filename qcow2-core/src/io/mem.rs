//! An in-memory [`Storage`] for tests, with fault injection.
//!
//! Faults: fail the Nth and later writes (`fail_writes_after`), which simulates a crash
//! at that point: every write before it is kept, none after.

use super::{IoFuture, Storage};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Memory-backed storage.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    writes: AtomicU64,
    fail_after: AtomicU64,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        MemStorage {
            data: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            fail_after: AtomicU64::new(u64::MAX),
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
        let mut d = self.data.lock();
        let end = off as usize + buf.len();
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
            let d = self.data.lock();
            let start = (off as usize).min(d.len());
            let end = (off as usize).saturating_add(buf.len()).min(d.len());
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
            let end = ((off + len) as usize).min(d.len());
            if (off as usize) < end {
                d[off as usize..end].fill(0);
            }
            Ok(true)
        })
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.write_sync(&vec![0; len as usize], off) })
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.count_write()?;
            let mut d = self.data.lock();
            if (d.len() as u64) < off + len {
                d.resize((off + len) as usize, 0);
            }
            Ok(())
        })
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.count_write()?;
        self.data.lock().resize(len as usize, 0);
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
