//! The `qcow2rs` binary: everything is in the library (`qcow2_cli::run`).

use std::process::ExitCode;

fn main() -> ExitCode {
    // The io_uring rings, once started, stay until the process exits (which closes them
    // and ends their threads): stopping them when the last image closes would join their
    // completion threads, making every command wait for two threads to be scheduled.
    // Images still close (and flush) when the commands drop them.
    let hold = qcow2_core::io::hold_rings();
    let argv: Vec<String> = std::env::args().collect();
    let code = qcow2_cli::run(&argv);
    std::mem::forget(hold);
    ExitCode::from(code)
}
