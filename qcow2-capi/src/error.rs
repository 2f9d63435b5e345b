//! Errors at the C boundary: negative errno values, the thread-local message, panics.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failure: the errno (positive) and the message for `qcow2rs_last_error`.
#[derive(Debug)]
pub(crate) struct Fail {
    pub errno: c_int,
    pub msg: String,
}

impl Fail {
    pub(crate) fn new(errno: c_int, msg: impl Into<String>) -> Fail {
        Fail {
            errno,
            msg: msg.into(),
        }
    }
    #[cold]
    pub(crate) fn fault(what: &str) -> Fail {
        Fail::new(libc::EFAULT, format!("{what} is NULL"))
    }
    pub(crate) fn inval(msg: impl Into<String>) -> Fail {
        Fail::new(libc::EINVAL, msg)
    }
    pub(crate) fn deadlock(call: &str) -> Fail {
        Fail::new(
            libc::EDEADLK,
            format!(
                "{call}: blocking call from a library thread or from inside a callback \
                 (it would wait for itself); use the qcow2rs_aio_* calls there"
            ),
        )
    }
    #[cold]
    pub(crate) fn forked(call: &str) -> Fail {
        Fail::new(
            libc::ECHILD,
            format!(
                "{call}: the image was opened in the parent process before fork(); \
                 it cannot be used in the child (open it again there)"
            ),
        )
    }
}

/// The errno (positive) of a core error. The one place where core errors are translated:
/// the core's own mapping, except that a request outside the image is `EINVAL` in the C API.
pub(crate) fn errno_of(e: &qcow2_core::Error) -> c_int {
    match e.kind() {
        qcow2_core::ErrorKind::OutOfRange => libc::EINVAL,
        _ => match e.errno() {
            n if n > 0 => n,
            _ => libc::EIO,
        },
    }
}

impl From<qcow2_core::Error> for Fail {
    fn from(e: qcow2_core::Error) -> Fail {
        Fail::new(errno_of(&e), e.to_string())
    }
}

/// `s` as a C string; interior NUL bytes become spaces.
pub(crate) fn cstring(s: impl Into<Vec<u8>>) -> CString {
    let mut v: Vec<u8> = s.into();
    for b in v.iter_mut().filter(|b| **b == 0) {
        *b = b' ';
    }
    CString::new(v).expect("no NUL bytes left")
}

pub(crate) fn set_last_error(msg: &str) {
    let c = cstring(msg);
    // try_with: a call made while the thread's locals are being destroyed keeps no message.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// The text of a panic payload.
pub(crate) fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// The message of a panic turned into `-EIO`.
pub(crate) fn panic_fail(call: &str, p: &(dyn Any + Send)) -> Fail {
    Fail::new(
        libc::EIO,
        format!(
            "{call}: internal error (a bug in qcow2rs, please report it): {}",
            panic_message(p)
        ),
    )
}

/// Run the body of an exported function: its result as a C return value, errors recorded
/// for `qcow2rs_last_error`, panics caught and turned into `-EIO`. Inlined, so that the
/// success path of a hot call (`qcow2rs_aio_read`, ...) costs no call or closure set-up;
/// the failure path is out of line.
#[inline(always)]
pub(crate) fn ffi(call: &str, f: impl FnOnce() -> Result<c_int, Fail>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => fail(e),
        Err(p) => fail(panic_fail(call, &*p)),
    }
}

/// Record a failure for `qcow2rs_last_error`; returns its negative errno.
#[cold]
#[inline(never)]
fn fail(fail: Fail) -> c_int {
    set_last_error(&fail.msg);
    -fail.errno
}

/// The message of the last call that failed on the calling thread: a one-line, NUL-terminated
/// string, never NULL (`""` if no call has failed on this thread yet). Successful calls leave
/// it unchanged, as they leave `errno`. The string belongs to the library and stays valid until
/// the next `qcow2rs_*` call on the same thread; copy it to keep it.
///
/// Errors of asynchronous requests are not recorded here: they are in the completion's
/// `error_msg`.
#[no_mangle]
pub extern "C" fn qcow2rs_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}
