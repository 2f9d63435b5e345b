//! Taking the GIL back after a short blocking call without sleeping on it, when another
//! thread that came back from one of our calls holds it and is about to let it go.
//!
//! A 4 KiB read from the page cache takes a microsecond or two without the GIL. When several
//! threads read at once, a thread coming back often finds the GIL held by another that came
//! back just before and is running its few lines of Python before its next call, which will
//! release the GIL again. CPython then puts the returning thread to sleep on the GIL's
//! condition variable and the holder wakes it when it lets go: `futex` calls and context
//! switches that cost more than the read itself. Here a thread coming back first waits,
//! spinning for a short bounded time, while [`HELD_AFTER_CALL`] says that such a thread
//! holds the GIL (until that thread has released it in its next call); it then claims the
//! flag for itself and takes the GIL, which is then most often free. The flag is only a
//! hint: whoever holds the GIL and whatever the flag says, `PyEval_RestoreThread` is what
//! takes it, so a wrong hint costs at most the bounded spin. Threads that never make such
//! calls take the GIL as before (CPython's switch interval still hands it to them).

use std::sync::atomic::{AtomicBool, Ordering};

/// Set from the moment a thread coming back from a blocking call claims the GIL until it
/// releases the GIL in its next blocking call (or forever, if it never makes another:
/// then every later spin runs to its bound, a few microseconds, and stops).
static HELD_AFTER_CALL: AtomicBool = AtomicBool::new(false);

/// How many times a returning thread looks at the flag before it takes the GIL anyway
/// (with a `pause` between looks: 2 µs on the test machine, 10 ns per `pause`, up to about
/// 10 µs where a `pause` takes 140 cycles; a few times the Python code a tight loop runs
/// between two reads, and less than a sleep and a wake-up).
const SPINS: u32 = 200;

/// Call first thing after releasing the GIL for a blocking call (not before: a thread
/// that saw the flag clear while the GIL is still held would go to sleep on it).
#[inline]
pub fn released() {
    // A plain load first: the line is not written when the flag is already clear.
    if HELD_AFTER_CALL.load(Ordering::Relaxed) {
        HELD_AFTER_CALL.store(false, Ordering::Release);
    }
}

/// Call without the GIL, at the end of a blocking call, just before taking the GIL back.
#[inline]
pub fn before_taking() {
    for _ in 0..SPINS {
        if !HELD_AFTER_CALL.load(Ordering::Relaxed)
            && HELD_AFTER_CALL
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
        std::hint::spin_loop();
    }
    // Taken anyway: the flag stays set for the thread that holds it.
    HELD_AFTER_CALL.store(true, Ordering::Relaxed);
}
