//! qcow2-nbd: an NBD server over qcow2-core, `qcow2rs serve` (qemu-nbd's job, done with our
//! engine).
//!
//! - [`proto`]: the wire format: constants, request parsing and validation, reply encoding
//!   (plain functions, fuzzable);
//! - [`handshake`]: the fixed newstyle negotiation as an I/O-free state machine;
//! - [`export`]: the exported disk, one handle shared by every connection;
//! - [`conn`]: one connection: handshake driver, concurrent requests, a reply writer;
//! - [`server`]: the listener, the client limit and the clean shutdown;
//! - [`tls`]: rustls from a qemu-style x509 credentials folder;
//! - [`cli`]: `qcow2rs serve` options (qemu-nbd's names) and the server's life cycle.

#![warn(missing_docs)]

pub mod cli;
pub mod conn;
pub mod export;
pub mod fuzz;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;

#[cfg(test)]
mod tests;
