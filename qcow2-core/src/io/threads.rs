//! PLACEHOLDER thread-pool engine: currently does blocking I/O inline. To be replaced.

use super::{FileOptions, IoFuture, Storage};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// A file accessed with blocking system calls.
pub struct ThreadsFile {
    file: File,
}

impl ThreadsFile {
    /// Open a file.
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(opts.writable)
            .create(opts.create)
            .truncate(opts.truncate);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        Ok(ThreadsFile {
            file: o.open(path)?,
        })
    }
}

impl Storage for ThreadsFile {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let mut done = 0;
            while done < buf.len() {
                let n = self.file.read_at(&mut buf[done..], off + done as u64)?;
                if n == 0 {
                    buf[done..].fill(0);
                    break;
                }
                done += n;
            }
            Ok(())
        })
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], off: u64) -> IoFuture<'a, ()> {
        Box::pin(async move { self.file.write_all_at(buf, off) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file.sync_data() })
    }
    fn discard(&self, _off: u64, _len: u64) -> IoFuture<'_, bool> {
        Box::pin(async move { Ok(false) })
    }
    fn write_zeroes(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let z = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(z.len() as u64) as usize;
                self.file.write_all_at(&z[..n], off + done)?;
                done += n as u64;
            }
            Ok(())
        })
    }
    fn allocate(&self, off: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.file.metadata()?.len() < off + len {
                self.file.set_len(off + len)?;
            }
            Ok(())
        })
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
    fn alignment(&self) -> usize {
        1
    }
    fn engine_name(&self) -> &'static str {
        "threads"
    }
}
