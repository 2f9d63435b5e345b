//! The integration tests of qcow2-core, one module per area (`<area>_<topic>.rs`), built as one
//! test binary so that the suite links once.

mod check_qemu;
mod check_repair;
mod common;
mod crash_powercut;
mod crash_rebase_commit;
mod engine_inflight;
mod engine_races;
mod engine_schedules;
mod faults_io;
mod hostile_fuzz;
mod hostile_memory;
mod io_engines;
mod jobs_bitmap;
mod jobs_snapshot;
mod safety_locking;
mod stress_concurrency;
mod surgery;
mod write_concurrency;
mod write_convert;
mod write_crash;
mod write_create;
mod write_dirty;
mod write_matrix;
mod write_regressions;
