//! libqcow2rs: the C library of qcow2rs.
//!
//! A thin layer over qcow2-core: it converts arguments, runs requests on an internal tokio
//! runtime (threads named `qcow2rs-rt-N`) and translates errors to negative errno values.
//! The C user's manual is the generated header `include/qcow2rs.h` (from the doc comments
//! here and the overview in `cbindgen.toml`).
//!
//! Modules: [`runtime`] (the runtime's lifetime, library-thread and callback detection,
//! fork), [`error`] (errno translation, `qcow2rs_last_error`, the panic boundary),
//! [`image`] (open, close, information), [`aio`] (completion callbacks and the event-loop
//! mode), [`blocking`] (blocking I/O calls), [`jobs`] (create, check, convert, rebase, commit, amend, measure), [`snapshot`] (internal snapshots), [`bitmap`] (persistent dirty bitmaps).
//!
//! Every exported function is `unsafe extern "C"` and starts with `qcow2rs_`: their
//! pointer arguments must be valid as the header describes.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

// The header lists items module by module, in this order (kept apart so that rustfmt does
// not sort them).
pub mod image;

pub mod aio;

pub mod blocking;

pub mod jobs;

pub mod snapshot;

pub mod bitmap;

pub mod error;

pub mod runtime;

pub use aio::*;
pub use bitmap::*;
pub use blocking::*;
pub use error::*;
pub use image::*;
pub use jobs::*;
pub use snapshot::*;

use std::ffi::c_char;

/// Major version of the library (the `X` of `X.Y.Z`).
pub const QCOW2RS_VERSION_MAJOR: u32 = 0;
/// Minor version of the library.
pub const QCOW2RS_VERSION_MINOR: u32 = 1;
/// Patch version of the library.
pub const QCOW2RS_VERSION_PATCH: u32 = 0;
/// The version as one number, `MAJOR * 10000 + MINOR * 100 + PATCH`, for `#if` tests.
pub const QCOW2RS_VERSION_NUMBER: u32 =
    QCOW2RS_VERSION_MAJOR * 10000 + QCOW2RS_VERSION_MINOR * 100 + QCOW2RS_VERSION_PATCH;

/// The library's version, `"MAJOR.MINOR.PATCH"` (a static string, never NULL). Compare with
/// the `QCOW2RS_VERSION_*` macros to tell the library a program runs with from the header
/// it was compiled with.
#[no_mangle]
pub extern "C" fn qcow2rs_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests;
