//! The NBD server on arbitrary client bytes: request header parsing and validation, the
//! handshake state machine, and a whole session (handshake, requests, replies) against an
//! in-memory qcow2 image. Bodies in `qcow2-nbd/src/fuzz.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qcow2_nbd::fuzz::requests(data);
    qcow2_nbd::fuzz::handshake(data);
    qcow2_nbd::fuzz::session(data);
});
