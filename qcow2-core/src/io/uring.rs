//! PLACEHOLDER io_uring engine: currently wraps the threads engine. To be replaced.

use super::{FileOptions, IoFuture, Storage};
use std::io;
use std::path::Path;

/// A file accessed through io_uring.
pub struct UringFile(super::threads::ThreadsFile);

/// Whether an open error means io_uring is not available here (so `Auto` falls back).
pub fn is_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EOPNOTSUPP)
    )
}

impl UringFile {
    /// Open a file.
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<Self> {
        Ok(UringFile(super::threads::ThreadsFile::open(path, opts)?))
    }
}

impl Storage for UringFile {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        self.0.read_at(buf, off)
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        self.0.write_at(buf, off)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.0.flush()
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_, bool> {
        self.0.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        self.0.write_zeroes(off, len)
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        self.0.allocate(off, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.0.allocated_size()
    }
    fn alignment(&self) -> usize {
        self.0.alignment()
    }
    fn engine_name(&self) -> &'static str {
        "io_uring"
    }
}
