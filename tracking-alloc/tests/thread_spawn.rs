//! A thread's first allocation registers the tracker's thread-exit hook. On targets where std
//! keeps thread-local destructors in a list that grows through the global allocator (musl, and
//! std before ~1.93 on every target without `__cxa_thread_atexit_impl`), registering it from
//! inside the allocator made std abort ("the global allocator may not use TLS with
//! destructors"). These run on the MSRV and on musl in the test command.

use std::cell::RefCell;

use tracking_alloc::{snapshot, Scope, TrackingAlloc};

#[global_allocator]
static GLOBAL: TrackingAlloc<std::alloc::System> = TrackingAlloc::new(std::alloc::System);

thread_local! {
    /// A lazily initialised thread-local with a destructor, as many programs have.
    static LAZY: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(100));
}

#[test]
fn spawned_threads_allocate_and_exit() {
    let handles: Vec<_> = (0..32)
        .map(|i| {
            std::thread::spawn(move || {
                let _g = Scope::named("spawned").enter();
                vec![i as u8; 1000]
            })
        })
        .collect();
    let blocks: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let spawned = snapshot()
        .into_iter()
        .find(|s| s.name == "spawned")
        .unwrap();
    assert_eq!(spawned.live_bytes, 32 * 1000);
    drop(blocks);
}

#[test]
fn a_thread_whose_first_act_is_a_lazy_thread_local() {
    let handles: Vec<_> = (0..32)
        .map(|_| {
            std::thread::spawn(|| {
                LAZY.with(|v| v.borrow_mut().push(1));
                LAZY.with(|v| v.borrow().len())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 1);
    }
}

/// Threads come and go; their counter slots are handed on, and the counts stay exact.
#[test]
fn thread_churn_keeps_exact_counts() {
    let scope = Scope::named("churn");
    for round in 0..20 {
        let handles: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(move || drop(scope.enter().then_alloc())))
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let churn = snapshot().into_iter().find(|s| s.name == "churn").unwrap();
        assert_eq!(churn.live_bytes, 0, "round {round}");
        assert_eq!(churn.allocations, (round + 1) * 8, "round {round}");
    }
}

trait ThenAlloc {
    fn then_alloc(self) -> Vec<u8>;
}

impl ThenAlloc for tracking_alloc::ScopeGuard {
    fn then_alloc(self) -> Vec<u8> {
        let block = vec![7u8; 64];
        drop(self);
        block
    }
}
