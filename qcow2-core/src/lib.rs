//! qcow2-core: an async engine for qcow2 disk images.
//!
//! The entry point is [`Image::open`]; see the crate README for an overview.

#![warn(missing_docs)]

pub mod error;
pub mod io;

pub use error::{Error, ErrorKind, Result, ResultExt};
pub mod cache;
pub mod check;
pub mod compress;
pub mod disk;
pub mod format;
pub mod image;

pub use disk::{Disk, Format, MapEntry};
pub use image::{Image, OpenOptions};
pub mod alloc;
pub mod convert;
pub mod create;
pub mod info;
pub mod overlap;
pub mod repair;
pub mod resize;
pub mod write;
