//! The integration tests of qcow2-core, one module per area (`<area>_<topic>.rs`), built as one
//! test binary so that the suite links once.

mod check_qemu;
mod check_repair;
mod common;
mod engine_races;
mod io_engines;
mod jobs_snapshot;
mod safety_locking;
mod write_concurrency;
mod write_convert;
mod write_crash;
mod write_create;
mod write_dirty;
mod write_matrix;
mod write_regressions;
