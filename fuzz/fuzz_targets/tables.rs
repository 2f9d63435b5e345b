#![no_main]
//! cargo-fuzz target: see `qcow2_core::fuzzing::tables`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_core::fuzzing::tables(data));
