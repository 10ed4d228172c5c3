//! Scopes for futures: re-entered on every poll, and while the future is dropped.
//!
//! A task may be polled on a different worker thread each time, so a guard taken inside an
//! `async` block would charge the wrong thread's allocations once the task moves. [`InScope`]
//! enters its scope around each `poll` (as `tracing::Instrument` does with spans) and around the
//! inner future's drop, so everything the future allocates or frees-and-reallocates is charged
//! to it, on whichever thread runs it.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::Scope;

/// A future that runs `F` inside a scope. Created by [`InScopeExt::in_scope`].
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct InScope<F> {
    inner: ManuallyDrop<F>,
    scope: Scope,
}

/// Attaches a scope to any future: `future.in_scope(Scope::named("requests"))`.
pub trait InScopeExt: Future + Sized {
    /// Runs `self` inside `scope` on every poll and while it is dropped.
    fn in_scope(self, scope: Scope) -> InScope<Self> {
        InScope {
            inner: ManuallyDrop::new(self),
            scope,
        }
    }
}

impl<F: Future> InScopeExt for F {}

impl<F: Future> Future for InScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _guard = self.scope.enter();
        // SAFETY: `inner` is structurally pinned: it is never moved out of `self`, and it is
        // dropped in place (in `Drop`), so a pinned `InScope` keeps its inner future pinned.
        let inner = unsafe { self.map_unchecked_mut(|this| &mut *this.inner) };
        inner.poll(cx)
    }
}

impl<F> Drop for InScope<F> {
    fn drop(&mut self) {
        let _guard = self.scope.enter();
        // SAFETY: `inner` is dropped exactly once, here, in place; `self` is never used again.
        unsafe { ManuallyDrop::drop(&mut self.inner) }
    }
}
