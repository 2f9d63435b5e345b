//! qcow2-core: an async engine for qcow2 disk images.
//!
//! The entry point is [`Image::open`]; see the crate README for an overview.

#![warn(missing_docs)]

pub mod error;
pub mod io;

pub use error::{Error, ErrorKind, Result};
