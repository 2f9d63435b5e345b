//! Image locking compatible with QEMU (its file-posix driver's protocol), so that QEMU refuses
//! an image we are writing and we refuse one QEMU is writing.
//!
//! The protocol, as verified in QEMU's source (block/file-posix.c: `raw_apply_lock_bytes`,
//! `raw_check_lock_bytes`, `raw_handle_perm_lock`; util/osdep.c: `qemu_lock_fd`,
//! `qemu_lock_fd_test`, `qemu_probe_lock_ops`) and by tracing qemu-img / qemu-io 10.0 with
//! `strace -e fcntl` and `/proc/locks`:
//! - Open file description locks (`F_OFD_SETLK`), all shared (`F_RDLCK`), one byte each. A
//!   user of permission `n` holds byte `100 + n`; a user that refuses to share permission `n`
//!   holds byte `200 + n`. Permissions, in bit order: consistent read, write, write
//!   unchanged, resize (QEMU 6.0 dropped the fifth, graph-mod, so bytes 104/204 are unused).
//! - Taking permissions: first lock every byte wanted, then test (`F_OFD_GETLK` with
//!   `F_WRLCK`, which reports any lock of another open file description) that nobody holds
//!   `200 + n` for a permission `n` we use, then that nobody holds `100 + n` for a
//!   permission `n` we unshare. On a conflict the bytes just taken are released and the open
//!   fails with `Failed to get "<perm>" lock` / `Failed to get shared "<perm>" lock` and the
//!   hint `Is another process using the image [<file>]?` (QEMU's errno: `EAGAIN`).
//! - The locks live on the file descriptor the I/O uses (QEMU's `s->fd`) and go away with the
//!   last descriptor of that open file description; OFD locks are not dropped by closing some
//!   other descriptor of the same file, unlike POSIX locks.
//! - Locking is used when the kernel has OFD locks (QEMU probes `F_OFD_GETLK` on /dev/null;
//!   `locking=auto` then silently does without locks when it fails). When taking a lock
//!   fails for another reason (a file system without lock support: `ENOLCK`, `EOPNOTSUPP`,
//!   ...), QEMU fails the open with `Failed to lock byte 100` and the errno; so do we.
//!
//! Which permissions each file gets, as QEMU 10 takes them (block.c
//! `bdrv_default_perms_for_storage`, `bdrv_default_perms_for_cow`, and traces):
//!
//! | file | used | unshared |
//! | --- | --- | --- |
//! | qcow2 image, read-only (check, map, compare, convert source, qemu-io -r) | consistent read | write, resize |
//! | qcow2 image, writable (resize, check -r, qemu-io, a VM) | consistent read, write, resize | write, resize |
//! | external data file, read-only | consistent read | resize |
//! | external data file, writable | consistent read, write, resize | resize |
//! | backing file (qcow2) | as a read-only qcow2 image | |
//! | raw image or raw backing file, read-only | consistent read | none |
//! | raw image, writable (qemu-img resize) | consistent read, write, resize | none |
//! | a file being created (qemu-img create, convert target) | write, resize | resize |
//!
//! With `-U`/`--force-share` (read-only opens only) nothing is unshared. `qemu-img info`
//! opens without guest I/O and so takes no "consistent read"; we take it (the difference
//! shows only against a user that unshares consistent read, such as a QEMU block job's
//! intermediate node).

use crate::{Error, ErrorKind, Result};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use super::Storage;

/// Permission: read a consistent view of the file.
pub const CONSISTENT_READ: u8 = 1 << 0;
/// Permission: change the content.
pub const WRITE: u8 = 1 << 1;
/// Permission: write without changing what a reader sees.
pub const WRITE_UNCHANGED: u8 = 1 << 2;
/// Permission: change the length.
pub const RESIZE: u8 = 1 << 3;
/// Every permission.
pub const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// Names as QEMU prints them (`bdrv_perm_names`), in bit order.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// First byte of the "used" permissions (`RAW_LOCK_PERM_BASE`).
const PERM_BASE: i64 = 100;
/// First byte of the "not shared" permissions (`RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: i64 = 200;

/// The permissions one user takes on one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permissions used (bytes 100 + n).
    pub used: u8,
    /// Permissions other users may not have (bytes 200 + n).
    pub unshared: u8,
}

impl Perms {
    /// A qcow2 image file (also a qcow2 backing file, opened read-only).
    pub fn qcow2(writable: bool, force_share: bool) -> Perms {
        Perms {
            used: if writable {
                CONSISTENT_READ | WRITE | RESIZE
            } else {
                CONSISTENT_READ
            },
            unshared: if force_share { 0 } else { WRITE | RESIZE },
        }
    }
    /// A qcow2 image's external data file.
    pub fn data_file(writable: bool, force_share: bool) -> Perms {
        Perms {
            used: if writable {
                CONSISTENT_READ | WRITE | RESIZE
            } else {
                CONSISTENT_READ
            },
            unshared: if force_share { 0 } else { RESIZE },
        }
    }
    /// A raw image (opened directly, or as a backing file).
    pub fn raw(writable: bool) -> Perms {
        Perms {
            used: if writable {
                CONSISTENT_READ | WRITE | RESIZE
            } else {
                CONSISTENT_READ
            },
            unshared: 0,
        }
    }
    /// A file being created (and truncated): `raw_co_create`'s permissions.
    pub const CREATE: Perms = Perms {
        used: WRITE | RESIZE,
        unshared: RESIZE,
    };
}

/// Whether this kernel has open file description locks (probed once, as QEMU does).
pub fn have_ofd_locks() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(sys::probe)
}

/// Locks held on one file for the lifetime of a handle; released on drop.
pub struct FileLock {
    storage: Arc<dyn Storage>,
    fd: RawFd,
    used: u8,
    unshared: u8,
}

impl std::fmt::Debug for FileLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLock")
            .field("fd", &self.fd)
            .field("used", &self.used)
            .field("unshared", &self.unshared)
            .finish()
    }
}

impl FileLock {
    /// Take `perms` on `storage`'s file (named `name` in messages). `Ok(None)` when the
    /// storage has no file descriptor (memory, test storage) or the kernel has no OFD locks.
    pub fn acquire(
        storage: &Arc<dyn Storage>,
        perms: Perms,
        name: &Path,
    ) -> Result<Option<FileLock>> {
        let Some(fd) = storage.raw_fd() else {
            return Ok(None);
        };
        if !have_ofd_locks() {
            return Ok(None);
        }
        let mut lock = FileLock {
            storage: storage.clone(),
            fd,
            used: 0,
            unshared: 0,
        };
        // Step one: take the bytes (shared locks never conflict with QEMU's, which are
        // shared too; a failure here is the file system's).
        for (base, bits, held) in [
            (PERM_BASE, perms.used, 0u8),
            (SHARED_BASE, perms.unshared, 1u8),
        ] {
            for n in 0..NAMES.len() {
                if bits & (1 << n) == 0 {
                    continue;
                }
                let byte = base + n as i64;
                if let Err(e) = sys::lock(fd, byte) {
                    return Err(lock_error(e, byte));
                }
                if held == 0 {
                    lock.used |= 1 << n;
                } else {
                    lock.unshared |= 1 << n;
                }
            }
        }
        // Step two: nobody else refuses what we use, nobody else uses what we refuse.
        for (n, perm) in NAMES.iter().enumerate() {
            if perms.used & (1 << n) != 0 {
                test(fd, SHARED_BASE + n as i64, &format!("\"{perm}\""), name)?;
            }
        }
        for (n, perm) in NAMES.iter().enumerate() {
            if perms.unshared & (1 << n) != 0 {
                test(
                    fd,
                    PERM_BASE + n as i64,
                    &format!("shared \"{perm}\""),
                    name,
                )?;
            }
        }
        Ok(Some(lock))
        // On an error, `lock` is dropped here and releases what it took.
    }

    /// Change the permissions held to `perms` on the same open file description, as QEMU
    /// does when it reopens a node read-write (`raw_handle_perm_lock`): the new bytes are
    /// taken and tested first, then the bytes no longer wanted are released. On a conflict
    /// the lock is left as it was.
    pub fn change(&mut self, perms: Perms, name: &Path) -> Result<()> {
        let mut added = (0u8, 0u8);
        let undo = |added: (u8, u8), fd: RawFd| {
            for n in 0..NAMES.len() {
                if added.0 & (1 << n) != 0 {
                    let _ = sys::unlock(fd, PERM_BASE + n as i64);
                }
                if added.1 & (1 << n) != 0 {
                    let _ = sys::unlock(fd, SHARED_BASE + n as i64);
                }
            }
        };
        for n in 0..NAMES.len() {
            let bit = 1u8 << n;
            if perms.used & bit != 0 && self.used & bit == 0 {
                let byte = PERM_BASE + n as i64;
                if let Err(e) = sys::lock(self.fd, byte) {
                    undo(added, self.fd);
                    return Err(lock_error(e, byte));
                }
                added.0 |= bit;
            }
            if perms.unshared & bit != 0 && self.unshared & bit == 0 {
                let byte = SHARED_BASE + n as i64;
                if let Err(e) = sys::lock(self.fd, byte) {
                    undo(added, self.fd);
                    return Err(lock_error(e, byte));
                }
                added.1 |= bit;
            }
        }
        let mut tests = Vec::new();
        for (n, perm) in NAMES.iter().enumerate() {
            if added.0 & (1 << n) != 0 {
                tests.push((SHARED_BASE + n as i64, format!("\"{perm}\"")));
            }
        }
        for (n, perm) in NAMES.iter().enumerate() {
            if added.1 & (1 << n) != 0 {
                tests.push((PERM_BASE + n as i64, format!("shared \"{perm}\"")));
            }
        }
        for (byte, what) in tests {
            if let Err(e) = test(self.fd, byte, &what, name) {
                undo(added, self.fd);
                return Err(e);
            }
        }
        for n in 0..NAMES.len() {
            let bit = 1u8 << n;
            if self.used & bit != 0 && perms.used & bit == 0 {
                let _ = sys::unlock(self.fd, PERM_BASE + n as i64);
            }
            if self.unshared & bit != 0 && perms.unshared & bit == 0 {
                let _ = sys::unlock(self.fd, SHARED_BASE + n as i64);
            }
        }
        self.used = perms.used;
        self.unshared = perms.unshared;
        Ok(())
    }
}

/// Take `perms` on `storage` as `opts` says (nothing with `locking: false`).
pub(crate) fn take(
    storage: &Arc<dyn Storage>,
    perms: Perms,
    name: &Path,
    opts: &crate::engine::image::OpenOptions,
) -> Result<Option<FileLock>> {
    if !opts.locking {
        return Ok(None);
    }
    FileLock::acquire(storage, perms, name)
}

fn lock_error(e: std::io::Error, byte: i64) -> Error {
    Error::io(e, format!("Failed to lock byte {byte}"))
}

fn test(fd: RawFd, byte: i64, what: &str, name: &Path) -> Result<()> {
    match sys::held_by_other(fd, byte) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::new(
            ErrorKind::Locked,
            format!(
                "Failed to get {what} lock (is another process using the image [{}]?)",
                name.display()
            ),
        )),
        Err(e) => Err(Error::io(e, format!("Failed to test lock byte {byte}"))),
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // The storage (and so the descriptor) is alive: `self.storage` holds it.
        debug_assert_eq!(self.storage.raw_fd(), Some(self.fd));
        for n in 0..NAMES.len() {
            if self.used & (1 << n) != 0 {
                let _ = sys::unlock(self.fd, PERM_BASE + n as i64);
            }
            if self.unshared & (1 << n) != 0 {
                let _ = sys::unlock(self.fd, SHARED_BASE + n as i64);
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::os::fd::RawFd;

    fn flock(ty: libc::c_int, byte: i64) -> libc::flock {
        // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value
        // (and `l_pid` must be 0 for OFD requests).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        fl
    }

    fn fcntl(fd: RawFd, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
        loop {
            // SAFETY: `fl` is a valid, exclusively borrowed `struct flock` for the call;
            // `fd` is a descriptor the caller keeps open.
            let r = unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) };
            if r != -1 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    pub(super) fn lock(fd: RawFd, byte: i64) -> io::Result<()> {
        fcntl(fd, libc::F_OFD_SETLK, &mut flock(libc::F_RDLCK, byte))
    }

    pub(super) fn unlock(fd: RawFd, byte: i64) -> io::Result<()> {
        fcntl(fd, libc::F_OFD_SETLK, &mut flock(libc::F_UNLCK, byte))
    }

    /// Whether another open file description holds any lock on `byte`.
    pub(super) fn held_by_other(fd: RawFd, byte: i64) -> io::Result<bool> {
        let mut fl = flock(libc::F_WRLCK, byte);
        fcntl(fd, libc::F_OFD_GETLK, &mut fl)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    pub(super) fn probe() -> bool {
        use std::os::fd::AsRawFd;
        let Ok(f) = std::fs::File::open("/dev/null") else {
            return false;
        };
        let mut fl = flock(libc::F_WRLCK, 0);
        fl.l_len = 0;
        fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl).is_ok()
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::os::fd::RawFd;

    pub(super) fn lock(_fd: RawFd, _byte: i64) -> io::Result<()> {
        Ok(())
    }
    pub(super) fn unlock(_fd: RawFd, _byte: i64) -> io::Result<()> {
        Ok(())
    }
    pub(super) fn held_by_other(_fd: RawFd, _byte: i64) -> io::Result<bool> {
        Ok(false)
    }
    pub(super) fn probe() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{open_file, EngineKind, FileOptions};

    fn open(path: &Path, writable: bool) -> Arc<dyn Storage> {
        let fo = FileOptions {
            writable,
            engine: EngineKind::Threads,
            ..Default::default()
        };
        open_file(path, &fo).unwrap()
    }

    #[test]
    fn protocol_between_two_open_file_descriptions() {
        if !have_ofd_locks() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let (a, b) = (open(&p, true), open(&p, false));
        // Two readers that both refuse writers coexist.
        let ra = FileLock::acquire(&a, Perms::qcow2(false, false), &p)
            .unwrap()
            .unwrap();
        let rb = FileLock::acquire(&b, Perms::qcow2(false, false), &p)
            .unwrap()
            .unwrap();
        drop(ra);
        // A writer is refused while a reader unshares write...
        let e = FileLock::acquire(&a, Perms::qcow2(true, false), &p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert_eq!(e.errno(), libc::EAGAIN);
        assert!(
            e.message().starts_with("Failed to get \"write\" lock"),
            "{e}"
        );
        // ...and the failed attempt left nothing behind.
        drop(rb);
        let w = FileLock::acquire(&a, Perms::qcow2(true, false), &p)
            .unwrap()
            .unwrap();
        // A reader refusing writers is refused while a writer is there; force-share is not.
        let e = FileLock::acquire(&b, Perms::qcow2(false, false), &p).unwrap_err();
        assert!(
            e.message()
                .starts_with("Failed to get shared \"write\" lock"),
            "{e}"
        );
        assert!(FileLock::acquire(&b, Perms::qcow2(false, true), &p)
            .unwrap()
            .is_some());
        drop(w);
    }
}
