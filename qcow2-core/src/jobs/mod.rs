//! Whole-image jobs built on the engine: create, check and repair, convert and compare,
//! info, resize, snapshot, measure, amend.

pub mod amend;
pub mod check;
pub mod convert;
pub mod create;
pub mod info;
pub mod measure;
pub mod repair;
pub mod resize;
pub mod snapshot;
