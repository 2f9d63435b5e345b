//! qcow2-core: an async engine for qcow2 disk images.
//!
//! The crate has two kinds of code, one folder each:
//! - [`engine`]: the per-request engine (open, map, read, write, allocate, cache, flush);
//! - [`jobs`]: whole-image jobs built on it (create, check/repair, convert/compare, info,
//!   resize).
//!
//! Beside them, [`format`] decodes and encodes the on-disk structures and [`io`] holds the
//! storage engines (io_uring, a thread pool, in-memory). The entry point is [`Image::open`].

#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod jobs;
pub mod runner;

pub use engine::disk::{self, Disk, Format, MapEntry};
pub use engine::image::{self, BitmapInfo, CacheMode, Image, Layout, OpenOptions};
pub use engine::zero::ZeroMode;
pub use error::{Error, ErrorKind, Result, ResultExt};
pub use jobs::snapshot::SnapshotKey;
pub use jobs::{check, commit, convert, create, dd, info, rebase, resize, snapshot};
