//! A `tracing` layer that charges allocations made inside a span to a scope.
//!
//! The scope's name is the span's `memory_scope` field if it has one, else the span's name, so
//! `#[instrument]`-ed async functions are attributed with no extra code, and
//! `#[instrument(fields(memory_scope = "cache"))]` groups several spans under one scope.
//! tracing re-enters a span on every poll of an instrumented future, on whichever thread polls
//! it, so the scope follows the task across worker threads like [`crate::InScope`] does. The
//! example is on [`MemoryScopeLayer`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, RwLock, RwLockWriteGuard};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::fork::{self, HeldAcrossFork};
use crate::{counters, Scope};

/// Name of the span field that overrides the span name as the scope name.
pub const SCOPE_FIELD: &str = "memory_scope";

/// Enters the span's scope while the span is entered: the span's `memory_scope` field names
/// the scope, else the span's name, so `#[instrument]`-ed functions are attributed with no
/// extra code; the scope follows an instrumented future across worker threads.
///
/// ```
/// use tracing_subscriber::prelude::*;
///
/// tracing_subscriber::registry()
///     .with(tracking_alloc::MemoryScopeLayer::new())
///     .init();
///
/// let span = tracing::info_span!("parse", memory_scope = "ingest");
/// let _entered = span.enter();
/// let buffer = vec![0u8; 4096]; // charged to the "ingest" scope
/// # drop(buffer);
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryScopeLayer {
    _private: (),
}

impl MemoryScopeLayer {
    pub fn new() -> Self {
        MemoryScopeLayer::default()
    }
}

/// Spans without a `memory_scope` field are named after their callsite: cache the scope per
/// callsite so creating a span costs a read lock and a pointer lookup, not the registry's lock.
static BY_CALLSITE: LazyLock<RwLock<HashMap<usize, Scope>>> = LazyLock::new(|| {
    fork::install();
    RwLock::default()
});

/// The callsite cache's write guard while a `fork` is under way (see [`crate::fork`]).
static HELD_FOR_FORK: HeldAcrossFork<RwLockWriteGuard<'static, HashMap<usize, Scope>>> =
    HeldAcrossFork::new();

/// Takes the callsite cache's lock just before `fork`, so the child gets it free.
pub(crate) fn hold_for_fork() {
    let guard = BY_CALLSITE.write().unwrap_or_else(|e| e.into_inner());
    // SAFETY: called from the prepare handler, with the cache's guard.
    unsafe { HELD_FOR_FORK.hold(guard) };
}

/// Releases what [`hold_for_fork`] took, in the parent and in the child.
pub(crate) fn release_after_fork() {
    // SAFETY: called from the after-fork handlers, on the thread that forked.
    unsafe { HELD_FOR_FORK.release() };
}

fn scope_of_callsite(metadata: &'static Metadata<'static>) -> Scope {
    let key = metadata as *const Metadata<'static> as usize;
    if let Some(&scope) = BY_CALLSITE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
    {
        return scope;
    }
    let scope = Scope::named(metadata.name());
    let _bookkeeping = Scope::UNSCOPED.enter();
    BY_CALLSITE
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, scope);
    scope
}

/// The scope stored in a span's extensions.
struct SpanScope(Scope);

/// A span entered on this thread and not yet exited, and the scope to restore when it is.
struct Entered {
    span: u64,
    restore: u16,
}

thread_local! {
    /// Spans entered on this thread and not yet exited, innermost last.
    static ENTERED: RefCell<Vec<Entered>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct ScopeFieldVisitor(Option<String>);

impl Visit for ScopeFieldVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == SCOPE_FIELD {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == SCOPE_FIELD && self.0.is_none() {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for MemoryScopeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let metadata = attrs.metadata();
        let scope = if metadata.fields().field(SCOPE_FIELD).is_some() {
            let mut visitor = ScopeFieldVisitor::default();
            attrs.record(&mut visitor);
            Scope::named(visitor.0.as_deref().unwrap_or(metadata.name()))
        } else {
            scope_of_callsite(metadata)
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanScope(scope));
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let Some(scope) = span.extensions().get::<SpanScope>().map(|s| s.0) else {
            return;
        };
        // The stack grows in the enclosing scope, never in the span's own. During thread
        // teardown there is no stack: the span then just does not change the scope.
        let pushed = ENTERED.try_with(|entered| {
            entered.borrow_mut().push(Entered {
                span: id.into_u64(),
                restore: counters::current_scope(),
            })
        });
        if pushed.is_ok() {
            // Not a `ScopeGuard`: the scope must outlive this call and is restored in `on_exit`.
            counters::replace_scope(scope.id());
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let has_scope = ctx
            .span(id)
            .is_some_and(|span| span.extensions().get::<SpanScope>().is_some());
        if !has_scope {
            return;
        }
        let _ = ENTERED.try_with(|entered| {
            let mut entered = entered.borrow_mut();
            let Some(at) = entered.iter().rposition(|e| e.span == id.into_u64()) else {
                return;
            };
            let exited = entered.remove(at);
            match entered.get_mut(at) {
                // Exited out of order (a span held across an `.await` on a `LocalSet`, say): the
                // span entered after it stays current, and will restore what this one would have.
                Some(next) => next.restore = exited.restore,
                None => {
                    counters::replace_scope(exited.restore);
                }
            }
        });
    }
}
