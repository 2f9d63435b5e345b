//! Unit tests of the C API: the header, the version, and the request path's edge cases
//! (panics) that C programs cannot provoke.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// include/qcow2rs.h as cbindgen (the pinned version) generates it from this crate.
fn generate_header() -> String {
    let cfg = cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(cfg)
        .with_src(root().join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

/// The checked-in header must be what cbindgen makes of the current sources. Regenerate it
/// with `make header` (QCOW2RS_UPDATE_HEADER=1 cargo test -p qcow2-capi header_is_current).
#[test]
fn header_is_current() {
    let path = root().join("../include/qcow2rs.h");
    let want = generate_header();
    if std::env::var_os("QCOW2RS_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &want).expect("write include/qcow2rs.h");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "include/qcow2rs.h is stale: run `make header` and commit the result"
    );
}

#[test]
fn version_macros_match_the_package() {
    let v = format!(
        "{}.{}.{}",
        crate::QCOW2RS_VERSION_MAJOR,
        crate::QCOW2RS_VERSION_MINOR,
        crate::QCOW2RS_VERSION_PATCH
    );
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    // SAFETY: qcow2rs_version returns a static NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(crate::qcow2rs_version()) };
    assert_eq!(s.to_str().unwrap(), v);
}

use crate::aio::{qcow2rs_completion, submit};
use crate::image::{qcow2rs_close, qcow2rs_image, qcow2rs_open, QCOW2RS_OPEN_RDWR};
use crate::jobs::qcow2rs_create;
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::{Condvar, Mutex};

/// Tests that open images run one at a time: the runtime is per process.
static SERIAL: Mutex<()> = Mutex::new(());

fn temp_image(name: &str) -> (PathBuf, CString) {
    let dir = std::env::temp_dir().join(format!("qcow2rs-capi-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("img.qcow2");
    let c = CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid path and NULL options.
    assert_eq!(
        unsafe { qcow2rs_create(c.as_ptr(), 1 << 20, std::ptr::null()) },
        0
    );
    (dir, c)
}

fn open(c: &CString) -> *mut qcow2rs_image {
    let mut img = std::ptr::null_mut();
    // SAFETY: valid arguments.
    assert_eq!(
        unsafe { qcow2rs_open(c.as_ptr(), QCOW2RS_OPEN_RDWR, &mut img) },
        0
    );
    img
}

#[derive(Default)]
struct Seen {
    calls: u32,
    ret: c_int,
    msg: String,
    thread: String,
}

struct Waiter {
    seen: Mutex<Seen>,
    cv: Condvar,
}

unsafe extern "C" fn record(ud: *mut c_void, c: *const qcow2rs_completion) {
    // SAFETY: `ud` is the &Waiter passed at submission; `c` is valid during the call.
    let (w, c) = unsafe { (&*(ud as *const Waiter), &*c) };
    let mut s = w.seen.lock().unwrap();
    s.calls += 1;
    s.ret = c.ret;
    s.msg = if c.error_msg.is_null() {
        String::new()
    } else {
        // SAFETY: a NUL-terminated message valid during the callback.
        unsafe { CStr::from_ptr(c.error_msg) }
            .to_string_lossy()
            .into_owned()
    };
    s.thread = std::thread::current().name().unwrap_or("").to_string();
    w.cv.notify_all();
}

/// A panic inside a request becomes -EIO with a message, and the callback still runs, once.
#[test]
fn panicking_request_completes_with_eio() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, path) = temp_image("panic");
    let img = open(&path);
    let w = Waiter {
        seen: Mutex::new(Seen::default()),
        cv: Condvar::new(),
    };
    // SAFETY: `img` is open; the future panics instead of doing I/O.
    let h = unsafe { &*img };
    submit(
        h,
        record,
        &w as *const Waiter as *mut c_void,
        true,
        |_| async {
            panic!("injected test panic");
        },
    );
    let mut s = w.seen.lock().unwrap();
    while s.calls == 0 {
        s = w.cv.wait(s).unwrap();
    }
    assert_eq!(s.ret, -libc::EIO);
    assert!(s.msg.contains("internal error"), "{}", s.msg);
    assert!(s.msg.contains("injected test panic"), "{}", s.msg);
    assert!(s.thread.starts_with("qcow2rs-rt-"), "{}", s.thread);
    drop(s);
    // SAFETY: `img` is open and nothing else uses it.
    assert_eq!(unsafe { qcow2rs_close(img) }, 0);
    assert_eq!(w.seen.lock().unwrap().calls, 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// A panic in an exported function's body becomes -EIO with the message recorded.
#[test]
fn panic_at_the_boundary_is_eio() {
    let r = crate::error::ffi("qcow2rs_test", || panic!("boundary panic"));
    assert_eq!(r, -libc::EIO);
    // SAFETY: qcow2rs_last_error never returns NULL.
    let msg = unsafe { CStr::from_ptr(crate::qcow2rs_last_error()) }.to_string_lossy();
    assert!(
        msg.contains("qcow2rs_test") && msg.contains("boundary panic"),
        "{msg}"
    );
}

fn runtime_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|n| n.starts_with("qcow2rs-rt-"))
        .count()
}

/// Waits (at most 30 s) until `ok(runtime_threads())`, and returns the last count. A joined
/// thread can still be listed in /proc/self/task for a moment (pthread_join returns when the
/// kernel clears the thread id, a little before the task is released), and a new worker names
/// itself only when it first runs: both were seen in CI on a loaded machine.
fn runtime_threads_until(ok: impl Fn(usize) -> bool) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let n = runtime_threads();
        if ok(n) || std::time::Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The runtime starts with the first open image and is gone, its threads joined, after the
/// last close.
#[test]
fn runtime_lives_while_images_are_open() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, path) = temp_image("runtime");
    // A second image: two writable opens of one image exclude each other (image locking).
    let (dir2, path2) = temp_image("runtime2");
    assert!(!crate::runtime::is_running());
    assert_eq!(runtime_threads_until(|n| n == 0), 0);
    let a = open(&path);
    assert!(crate::runtime::is_running());
    assert!(runtime_threads_until(|n| n >= 2) >= 2);
    let b = open(&path2);
    // SAFETY: open handles, closed once.
    assert_eq!(unsafe { qcow2rs_close(a) }, 0);
    assert!(crate::runtime::is_running());
    // SAFETY: as above.
    assert_eq!(unsafe { qcow2rs_close(b) }, 0);
    assert!(!crate::runtime::is_running());
    assert_eq!(runtime_threads_until(|n| n == 0), 0);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(dir2);
}
