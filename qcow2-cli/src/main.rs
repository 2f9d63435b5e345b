//! The `qcow2rs` binary: everything is in the library (`qcow2_cli::run`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    ExitCode::from(qcow2_cli::run(&argv))
}
