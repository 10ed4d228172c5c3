//! Scopes: named regions of code that allocations are charged to.
//!
//! A scope is a small integer id (`u16`) so that it fits in a block's 2-byte tag. Names are
//! registered once and never removed; the table holds [`MAX_SCOPES`] ids, the first two being
//! the built-in `unscoped` and `overflow`. Names registered after the table is full all share
//! `overflow`, so a program that builds scope names from unbounded input degrades, never fails.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use crate::counters;
use crate::fork::{self, HeldAcrossFork};

/// Capacity of the scope table, built-in scopes included.
pub const MAX_SCOPES: usize = 1024;

pub(crate) const UNSCOPED_ID: u16 = 0;
pub(crate) const OVERFLOW_ID: u16 = 1;

/// A named scope. Cheap to copy and to send anywhere; the same name always gives the same scope.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope(u16);

struct Registry {
    names: Vec<&'static str>,
    ids: HashMap<&'static str, u16>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    let names = vec!["unscoped", "overflow"];
    let ids = names.iter().zip(0..).map(|(n, id)| (*n, id)).collect();
    fork::install();
    Mutex::new(Registry { names, ids })
});

/// The registry's guard while a `fork` is under way (see [`crate::fork`]).
static HELD_FOR_FORK: HeldAcrossFork<MutexGuard<'static, Registry>> = HeldAcrossFork::new();

/// Takes the registry's lock just before `fork`, so the child gets it free and consistent.
pub(crate) fn hold_for_fork() {
    let guard = registry();
    // SAFETY: called from the prepare handler, with the registry's guard.
    unsafe { HELD_FOR_FORK.hold(guard) };
}

/// Releases what [`hold_for_fork`] took, in the parent and in the child.
pub(crate) fn release_after_fork() {
    // SAFETY: called from the after-fork handlers, on the thread that forked.
    unsafe { HELD_FOR_FORK.release() };
}

fn registry() -> MutexGuard<'static, Registry> {
    // The registry is consistent after every statement, so a panic elsewhere cannot corrupt it.
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Scope {
    /// Everything allocated outside any scope.
    pub const UNSCOPED: Scope = Scope(UNSCOPED_ID);
    /// Every name registered after the table was full.
    pub const OVERFLOW: Scope = Scope(OVERFLOW_ID);

    /// The scope called `name`, registering it on first use. Takes a lock: call it once and keep
    /// the `Scope` (or use [`scope!`](crate::scope!), which caches it per call site).
    pub fn named(name: &str) -> Scope {
        // The registry's own allocations are bookkeeping: never charged to the caller's scope.
        let _bookkeeping = Scope::UNSCOPED.enter();
        let mut registry = registry();
        if let Some(&id) = registry.ids.get(name) {
            return Scope(id);
        }
        if registry.names.len() >= MAX_SCOPES {
            return Scope::OVERFLOW;
        }
        let id = registry.names.len() as u16;
        let name: &'static str = Box::leak(name.into());
        registry.names.push(name);
        registry.ids.insert(name, id);
        Scope(id)
    }

    /// Charges the current thread's allocations to this scope until the guard is dropped.
    #[inline]
    pub fn enter(self) -> ScopeGuard {
        ScopeGuard {
            previous: counters::replace_scope(self.0),
            _not_send: PhantomData,
        }
    }

    /// The scope the current thread charges its allocations to right now.
    #[inline]
    pub fn current() -> Scope {
        Scope(counters::current_scope())
    }

    /// The scope's name.
    pub fn name(self) -> &'static str {
        registry()
            .names
            .get(self.0 as usize)
            .copied()
            .unwrap_or("overflow")
    }

    /// The registered scope with this [`id`](Scope::id), if any.
    pub fn by_id(id: u16) -> Option<Scope> {
        let _bookkeeping = Scope::UNSCOPED.enter();
        (usize::from(id) < registry().names.len()).then_some(Scope(id))
    }

    /// The scope's numeric id: its row in [`snapshot`](crate::snapshot) order.
    pub fn id(self) -> u16 {
        self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scope").field(&self.name()).finish()
    }
}

/// Names of all registered scopes, in id order.
pub(crate) fn names() -> Vec<&'static str> {
    let _bookkeeping = Scope::UNSCOPED.enter();
    registry().names.clone()
}

/// Restores the previous scope when dropped. Tied to the thread that created it.
#[must_use = "the scope ends when the guard is dropped"]
pub struct ScopeGuard {
    previous: u16,
    _not_send: PhantomData<*const ()>,
}

impl Drop for ScopeGuard {
    #[inline]
    fn drop(&mut self) {
        counters::replace_scope(self.previous);
    }
}

impl fmt::Debug for ScopeGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeGuard")
            .field("previous", &Scope(self.previous))
            .finish()
    }
}

/// A `scope!` call site: registers its name on first use, then answers from a cached id.
#[doc(hidden)]
pub struct CallSite {
    name: &'static str,
    id: AtomicU32,
}

impl CallSite {
    const UNREGISTERED: u32 = u32::MAX;

    pub const fn new(name: &'static str) -> CallSite {
        CallSite {
            name,
            id: AtomicU32::new(Self::UNREGISTERED),
        }
    }

    #[inline]
    pub fn scope(&self) -> Scope {
        match self.id.load(Ordering::Relaxed) {
            Self::UNREGISTERED => self.register(),
            id => Scope(id as u16),
        }
    }

    #[cold]
    fn register(&self) -> Scope {
        let scope = Scope::named(self.name);
        self.id.store(u32::from(scope.0), Ordering::Relaxed);
        scope
    }
}

/// Charges the current thread's allocations to the named scope until the returned
/// [`ScopeGuard`] is dropped. The name is registered once per call site.
///
/// ```
/// let _guard = tracking_alloc::scope!("cache");
/// let entries: Vec<u64> = Vec::with_capacity(1024); // charged to "cache"
/// # drop(entries);
/// ```
#[macro_export]
macro_rules! scope {
    ($name:expr) => {{
        static CALL_SITE: $crate::CallSite = $crate::CallSite::new($name);
        CALL_SITE.scope().enter()
    }};
}
