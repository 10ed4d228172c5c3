//! Running code when a thread exits, without calling back into the Rust allocator.
//!
//! The obvious tool, a `thread_local!` with a destructor, cannot be touched from inside a global
//! allocator everywhere: where std keeps thread-local destructors in a list that grows through
//! the global allocator (musl; and std before ~1.93 on every target without glibc's
//! `__cxa_thread_atexit_impl`), registering one from an allocation re-enters std's registration
//! and std aborts ("the global allocator may not use TLS with destructors"; with rustc 1.85 on
//! musl, every `thread::spawn`). POSIX thread-specific data has a destructor per key and
//! allocates nothing through Rust's allocator (glibc grows its key table with its own `calloc`,
//! musl not at all); jemalloc cleans up its thread caches the same way.
//!
//! Elsewhere (not unix) the `thread_local!` destructor remains, with that caveat.

use std::ffi::c_void;
use std::ptr::NonNull;

/// Runs `hook(value)` when the calling thread exits. One hook per process (the first one
/// registered; the tracker has one). `false` if it cannot be arranged; the caller then does
/// without.
#[cfg(unix)]
pub(crate) fn call_on_exit(
    hook: unsafe extern "C" fn(*mut c_void),
    value: NonNull<c_void>,
) -> bool {
    let Some(key) = key(hook) else {
        return false;
    };
    // SAFETY: `key` was created by `pthread_key_create` and is never deleted; a non-null value
    // makes the destructor run at thread exit.
    unsafe { libc::pthread_setspecific(key, value.as_ptr()) == 0 }
}

#[cfg(unix)]
fn key(hook: unsafe extern "C" fn(*mut c_void)) -> Option<libc::pthread_key_t> {
    use std::sync::atomic::{AtomicU64, Ordering};
    const NO_KEY: u64 = u64::MAX;
    static KEY: AtomicU64 = AtomicU64::new(NO_KEY);
    match KEY.load(Ordering::Acquire) {
        NO_KEY => {}
        key => return Some(key as libc::pthread_key_t),
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; `hook` lives for the whole program.
    if unsafe { libc::pthread_key_create(&mut key, Some(hook)) } != 0 {
        return None;
    }
    // Two threads may race to create it: one key wins, the other is deleted before any use.
    match KEY.compare_exchange(NO_KEY, key as u64, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(winner) => {
            // SAFETY: `key` was just created and no thread has set a value for it.
            unsafe { libc::pthread_key_delete(key) };
            Some(winner as libc::pthread_key_t)
        }
    }
}

#[cfg(not(unix))]
pub(crate) fn call_on_exit(
    hook: unsafe extern "C" fn(*mut c_void),
    value: NonNull<c_void>,
) -> bool {
    use std::cell::Cell;

    struct OnExit(Cell<Option<(unsafe extern "C" fn(*mut c_void), NonNull<c_void>)>>);
    impl Drop for OnExit {
        fn drop(&mut self) {
            if let Some((hook, value)) = self.0.take() {
                // SAFETY: as registered by `call_on_exit`.
                unsafe { hook(value.as_ptr()) }
            }
        }
    }
    thread_local! {
        static ON_EXIT: OnExit = const { OnExit(Cell::new(None)) };
    }
    ON_EXIT
        .try_with(|on_exit| on_exit.0.set(Some((hook, value))))
        .is_ok()
}
