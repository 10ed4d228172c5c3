//! Keeping the tracker's locks usable in a child process after `fork()`.
//!
//! `fork` copies only the calling thread. A lock that another thread held at that instant stays
//! held in the child forever, so a child forked while a busy thread was registering a scope
//! would hang in its first `Scope::named`, `snapshot` or span creation. `pthread_atfork`
//! handlers take the tracker's two locks (the scope registry, the tracing layer's callsite
//! cache) just before `fork` and release them just after, in the parent and in the child, so the
//! child inherits them free and consistent.
//!
//! Order matters: prepare handlers run in the reverse order of registration. Ours are
//! registered when the registry is first used, after the allocator has served allocations
//! (jemalloc registers its own handlers when it initialises, glibc's malloc locks itself inside
//! `fork` after every handler), so they run first: a thread that holds the registry while it
//! allocates can still finish, and only then does the allocator lock itself.

use std::cell::UnsafeCell;

/// A lock guard parked between the prepare and the after-fork handlers.
pub(crate) struct HeldAcrossFork<G>(UnsafeCell<Option<G>>);

// SAFETY: the cell is written only by the fork handlers (`hold` in prepare, `release` after),
// and only while the thread that runs them holds the lock whose guard it stores: another
// forking thread blocks on that lock in its own prepare handler until `release` dropped the
// guard. So no two threads ever touch the cell at once.
unsafe impl<G> Sync for HeldAcrossFork<G> {}

impl<G> HeldAcrossFork<G> {
    pub(crate) const fn new() -> Self {
        HeldAcrossFork(UnsafeCell::new(None))
    }

    /// Parks `guard` until [`release`](Self::release).
    ///
    /// # Safety
    /// Called only from a prepare handler, with the guard of the lock this cell belongs to.
    pub(crate) unsafe fn hold(&self, guard: G) {
        // SAFETY: exclusive access, as argued on the `Sync` impl.
        unsafe { *self.0.get() = Some(guard) };
    }

    /// Drops the parked guard: the lock is free again.
    ///
    /// # Safety
    /// Called only from an after-fork handler (parent or child), on the thread that forked.
    pub(crate) unsafe fn release(&self) {
        // SAFETY: exclusive access, as argued on the `Sync` impl.
        drop(unsafe { (*self.0.get()).take() });
    }
}

/// Registers the fork handlers, once per process.
pub(crate) fn install() {
    #[cfg(unix)]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: the handlers are `extern "C"` functions that live for the whole program.
            // A failure (ENOMEM) leaves fork as it was before: nothing to undo.
            let _ = unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
        });
    }
}

#[cfg(unix)]
extern "C" fn prepare() {
    #[cfg(feature = "tracing")]
    crate::layer::hold_for_fork();
    crate::scope::hold_for_fork();
}

#[cfg(unix)]
extern "C" fn after() {
    crate::scope::release_after_fork();
    #[cfg(feature = "tracing")]
    crate::layer::release_after_fork();
}
