//! Translation of qcow2-core errors into Python exceptions.
//!
//! - a corrupt image: `qcow2rs.CorruptImageError` (errno `EUCLEAN`);
//! - an unsupported feature: `qcow2rs.UnsupportedFeatureError` (errno `ENOTSUP`);
//! - other problems with an image (not a qcow2 image, refused external files, ...):
//!   `qcow2rs.Error` (an `OSError`) with the kind's errno;
//! - everything else: `OSError(errno, strerror, filename)`, which Python turns into its
//!   subclass for that errno (`FileNotFoundError`, `PermissionError`, ...). A write to a
//!   read-only image is `OSError` with `EBADF`.
//!
//! Requests outside the image and use after close are `ValueError`s raised by the binding
//! before anything reaches the core.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use qcow2_core::ErrorKind;

type CoreError = qcow2_core::Error;

pyo3::create_exception!(
    qcow2rs,
    Error,
    PyOSError,
    "A problem with an image's format (an OSError with errno, strerror and filename)."
);
pyo3::create_exception!(
    qcow2rs,
    CorruptImageError,
    Error,
    "The image's metadata is inconsistent or malformed (errno EUCLEAN)."
);
pyo3::create_exception!(
    qcow2rs,
    UnsupportedFeatureError,
    Error,
    "The image uses a feature qcow2rs does not support (errno ENOTSUP)."
);

/// The message without the file name prefix and the "(os error N)" suffix, for `strerror`.
fn strerror(e: &CoreError, filename: Option<&str>) -> String {
    let mut m = e.to_string();
    if let Some(f) = filename {
        while let Some(rest) = m.strip_prefix(f).and_then(|r| r.strip_prefix(": ")) {
            m = rest.to_string();
        }
    }
    if let Some(i) = m.rfind(" (os error ") {
        if m.ends_with(')') {
            m.truncate(i);
        }
    }
    if m.is_empty() {
        m = std::io::Error::from_raw_os_error(e.errno()).to_string();
    }
    m
}

/// The Python exception for `e`, naming `filename`.
pub fn to_pyerr(e: &CoreError, filename: Option<&str>) -> PyErr {
    let errno = e.errno();
    let msg = strerror(e, filename);
    let fname = filename.map(str::to_string);
    match e.kind() {
        ErrorKind::Corrupt => CorruptImageError::new_err((errno, msg, fname)),
        ErrorKind::Unsupported => UnsupportedFeatureError::new_err((errno, msg, fname)),
        ErrorKind::InvalidArgument => Error::new_err((errno, msg, fname)),
        ErrorKind::OutOfRange => PyValueError::new_err(msg),
        _ => PyOSError::new_err((errno, msg, fname)),
    }
}

/// `ValueError` for a call on a closed image, worded as `io` does.
pub fn closed() -> PyErr {
    PyValueError::new_err("I/O operation on closed image")
}
