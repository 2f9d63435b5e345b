#![no_main]
//! cargo-fuzz target: see `qcow2_core::fuzzing::open_write`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_core::fuzzing::open_write(data));
