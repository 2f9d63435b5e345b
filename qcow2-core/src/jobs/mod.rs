//! Whole-image jobs built on the engine: create, check and repair, convert and compare,
//! info, resize, snapshot, bitmap, rebase, commit, measure, amend, dd.

pub mod amend;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod measure;
pub mod rebase;
pub mod repair;
pub mod resize;
pub mod snapshot;
