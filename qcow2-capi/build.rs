//! Link settings of libqcow2rs.so and the `libqcow2rs.so.0` symlink next to it.
//!
//! - SONAME `libqcow2rs.so.0`: programs linked with `-lqcow2rs` record that name and find it
//!   through the symlink made here (in `target/<profile>/`) or the ones `make install` makes.
//! - `-z nodelete`: the library is never unmapped, even after `dlclose`, because its worker
//!   threads' thread-local destructors and the `pthread_atfork` handler point into it.
//!
//! No version script: rustc links every cdylib with its own, which exports exactly the
//! `#[no_mangle]` functions (all named `qcow2rs_*`) and hides everything else; a second
//! script cannot change that list (its explicit globals win). `tests/c/run.sh` checks the
//! exported symbols with `nm -D --defined-only`.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libqcow2rs.so.0");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");

    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out: the library lands in
    // target/<profile>/. The symlink may dangle until the library is linked.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    if let Some(profile_dir) = out.ancestors().nth(3) {
        link_soname(profile_dir);
    }
}

fn link_soname(profile_dir: &Path) {
    let link = profile_dir.join("libqcow2rs.so.0");
    match std::fs::read_link(&link) {
        Ok(t) if t == Path::new("libqcow2rs.so") => {}
        _ => {
            let _ = std::fs::remove_file(&link);
            if let Err(e) = std::os::unix::fs::symlink("libqcow2rs.so", &link) {
                println!(
                    "cargo:warning=cannot create {}: {e} (programs linked by SONAME will not start from the build folder)",
                    link.display()
                );
            }
        }
    }
}
