//! The one error type of qcow2-core.
//!
//! Every error carries a [`ErrorKind`] that maps to exactly one errno (see
//! [`ErrorKind::errno`]), a human-readable message and, for I/O failures, the
//! source [`std::io::Error`]. Adding context never loses the errno.

use std::fmt;
use std::io;

/// What went wrong, coarse enough to map to one errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The image's metadata is inconsistent or malformed.
    Corrupt,
    /// The image uses a feature this library does not support (named in the message).
    Unsupported,
    /// A write was attempted on an image opened read-only.
    ReadOnly,
    /// A caller passed a bad argument.
    InvalidArgument,
    /// An offset or length outside the image.
    OutOfRange,
    /// A file named by the caller or the image does not exist.
    NotFound,
    /// Something the caller asked to create (a persistent bitmap name) already exists.
    AlreadyExists,
    /// Permission denied opening a file.
    PermissionDenied,
    /// The underlying storage failed.
    Io,
    /// The image is too large for a configured limit, or memory could not be reserved.
    TooLarge,
    /// No space left on the device.
    NoSpace,
    /// The request would block forever (for example a blocking call from a callback).
    Deadlock,
    /// A backing chain loops or is too deep.
    Loop,
    /// Another process (or another handle) uses the file in a way that conflicts with this
    /// open: QEMU's image locks (see [`crate::io::lock`]). Reported as `EAGAIN`, the errno
    /// QEMU's own lock test returns.
    Locked,
}

impl ErrorKind {
    /// The errno value this kind is reported as (positive).
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Corrupt => libc::EUCLEAN,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::ReadOnly => libc::EBADF,
            ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::OutOfRange => libc::ERANGE,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::AlreadyExists => libc::EEXIST,
            ErrorKind::PermissionDenied => libc::EACCES,
            ErrorKind::Io => libc::EIO,
            ErrorKind::TooLarge => libc::EFBIG,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Deadlock => libc::EDEADLK,
            ErrorKind::Loop => libc::ELOOP,
            ErrorKind::Locked => libc::EAGAIN,
        }
    }

    fn from_io(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            _ => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
                Some(libc::EROFS) | Some(libc::EBADF) => ErrorKind::ReadOnly,
                Some(libc::EFBIG) => ErrorKind::TooLarge,
                Some(libc::ELOOP) => ErrorKind::Loop,
                Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
        }
    }
}

/// The error type of every fallible qcow2-core operation.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    source: Option<io::Error>,
}

/// Result alias used throughout qcow2-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `msg`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }
    /// Corrupt image metadata.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }
    /// Unsupported feature.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }
    /// Invalid argument.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }
    /// Offset or length out of range.
    pub fn out_of_range(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, msg)
    }
    /// Write to a read-only image.
    pub fn read_only(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::ReadOnly, msg)
    }
    /// An I/O error with a message describing what was being done.
    pub fn io(e: io::Error, msg: impl Into<String>) -> Self {
        let kind = ErrorKind::from_io(&e);
        Error {
            kind,
            msg: msg.into(),
            source: Some(e),
        }
    }
    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The errno (positive) this error maps to. For I/O errors with an OS code, that code.
    pub fn errno(&self) -> i32 {
        if self.kind == ErrorKind::Io {
            if let Some(code) = self.source.as_ref().and_then(|e| e.raw_os_error()) {
                return code;
            }
        }
        self.kind.errno()
    }
    /// The message without the source.
    pub fn message(&self) -> &str {
        &self.msg
    }
    /// Prefix the message with context (`"{ctx}: {msg}"`), keeping kind, errno and source.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = if self.msg.is_empty() {
            ctx.to_string()
        } else {
            format!("{ctx}: {}", self.msg)
        };
        self
    }
}

/// The text of an I/O error as the C library's `strerror` gives it: Rust's `" (os error N)"`
/// suffix removed, so messages read as qemu-img's do.
fn io_text(e: &io::Error) -> String {
    let s = e.to_string();
    match e.raw_os_error() {
        Some(code) => {
            let suffix = format!(" (os error {code})");
            s.strip_suffix(&suffix).map(str::to_owned).unwrap_or(s)
        }
        None => s,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(src) if !self.msg.is_empty() => write!(f, "{}: {}", self.msg, io_text(src)),
            Some(src) => f.write_str(&io_text(src)),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::io(e, "")
    }
}

/// Extension to add context to results.
pub trait ResultExt<T> {
    /// Prefix any error with `ctx`.
    fn ctx(self, ctx: impl fmt::Display) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn ctx(self, ctx: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_no_os_error_suffix() {
        let e = Error::io(io::Error::from_raw_os_error(libc::ENOENT), "x.qcow2");
        assert_eq!(e.to_string(), "x.qcow2: No such file or directory");
        let e = Error::from(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.to_string(), "Input/output error");
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn context_keeps_errno() {
        let e = Error::io(io::Error::from_raw_os_error(libc::ENOSPC), "writing");
        let e = e.context("image.qcow2");
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(e.to_string().starts_with("image.qcow2: writing: "));
        let e = Error::corrupt("bad L1").context("x");
        assert_eq!(e.errno(), libc::EUCLEAN);
        assert_eq!(e.to_string(), "x: bad L1");
    }
}
