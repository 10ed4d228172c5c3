//! Semantics every inner allocator must give. Each test binary installs a different
//! `#[global_allocator]` and expands `semantics_tests!()`; scope names are unique per test so
//! that tests running in parallel in one process never share a scope.
#![allow(dead_code)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::mpsc;
use std::thread;

use tracking_alloc::{snapshot, Scope, ScopeStats};

pub fn stats(name: &str) -> ScopeStats {
    snapshot()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("scope {name:?} is not registered"))
}

/// Every scope's figures, by name, from one snapshot.
pub fn all_stats() -> HashMap<&'static str, ScopeStats> {
    snapshot().into_iter().map(|s| (s.name, s)).collect()
}

fn assert_balanced(name: &str, bytes: u64, blocks: u64) {
    let s = stats(name);
    assert_eq!(
        (s.allocated_bytes, s.deallocated_bytes, s.live_bytes),
        (bytes, bytes, 0),
        "{s:?}"
    );
    assert_eq!((s.allocations, s.deallocations), (blocks, blocks), "{s:?}");
}

/// `full` normally, `miri` under Miri (which interprets every instruction, ~1000x slower):
/// the same shapes, fewer repetitions.
pub const fn under_miri(full: usize, miri: usize) -> usize {
    if cfg!(miri) {
        miri
    } else {
        full
    }
}

/// Sizes that cover inline tags, exact size classes (side table), large and odd sizes.
pub fn sizes(n: usize) -> impl Iterator<Item = usize> {
    const INTERESTING: [usize; 16] = [
        1, 7, 8, 14, 16, 31, 32, 48, 63, 64, 100, 128, 1024, 4096, 5000, 65536,
    ];
    (0..n).map(|i| {
        if i % 2 == 0 {
            INTERESTING[i / 2 % INTERESTING.len()]
        } else {
            1 + (i * 7919) % 20_000
        }
    })
}

pub fn cross_thread_frees_credit_the_owner() {
    const BLOCKS: usize = under_miri(2000, 16);
    let scope = Scope::named("cross-thread");
    let mut blocks = Vec::with_capacity(BLOCKS);
    let mut bytes = 0;
    {
        let _g = scope.enter();
        for (i, size) in sizes(BLOCKS).enumerate() {
            bytes += size as u64;
            // Every third block through `alloc_zeroed`, the others through `alloc`.
            let fill: u8 = if i % 3 == 0 { 0 } else { 0xa5 };
            let block = vec![fill; size].into_boxed_slice();
            assert!(
                block.iter().all(|&b| b == fill),
                "{size}-byte block not filled"
            );
            blocks.push(block);
        }
    }
    assert_eq!(stats("cross-thread").live_bytes, bytes);
    // Freed on another thread, inside another scope.
    thread::spawn(move || {
        let _g = Scope::named("cross-thread-other").enter();
        drop(blocks);
    })
    .join()
    .unwrap();
    assert_balanced("cross-thread", bytes, BLOCKS as u64);
    let other = stats("cross-thread-other");
    assert_eq!(other.deallocated_bytes, 0, "{other:?}");
}

pub fn eight_threads_hammer_one_scope() {
    const THREADS: usize = under_miri(8, 3);
    const PER_THREAD: usize = under_miri(20_000, 100);
    let scope = Scope::named("hammer");
    let (tx, rx) = mpsc::sync_channel::<Box<[u8]>>(1024);
    // Frees happen on one consumer thread while eight producers allocate.
    let consumer = thread::spawn(move || {
        let _g = Scope::named("hammer-consumer").enter();
        let mut freed = 0usize;
        for block in rx {
            freed += block.len();
        }
        freed
    });
    let producers: Vec<_> = (0..THREADS)
        .map(|t| {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut bytes = 0u64;
                let mut kept = Vec::with_capacity(64);
                for (i, size) in sizes(PER_THREAD).enumerate() {
                    let size = size % 3000 + 1 + t;
                    let block = {
                        let _g = scope.enter();
                        vec![t as u8; size].into_boxed_slice()
                    };
                    bytes += size as u64;
                    if i % 3 == 0 {
                        // Some are freed locally, in the producer's own (other) scope.
                        kept.push(block);
                        if kept.len() == 64 {
                            kept.clear();
                        }
                    } else {
                        tx.send(block).unwrap();
                    }
                }
                bytes
            })
        })
        .collect();
    drop(tx);
    let bytes: u64 = producers.into_iter().map(|p| p.join().unwrap()).sum();
    consumer.join().unwrap();
    assert_balanced("hammer", bytes, (THREADS * PER_THREAD) as u64);
}

pub fn nested_scopes_restore() {
    let outer = Scope::named("nest-outer");
    let inner = Scope::named("nest-inner");
    let before = Scope::current();
    let (a, b, c);
    {
        let _o = outer.enter();
        // `black_box`: the compiler may otherwise elide an allocation nothing reads.
        a = black_box(vec![1u8; 100]);
        {
            let _i = inner.enter();
            assert_eq!(Scope::current(), inner);
            b = black_box(vec![2u8; 200]);
        }
        assert_eq!(Scope::current(), outer);
        c = black_box(vec![3u8; 300]);
    }
    assert_eq!(Scope::current(), before);
    assert_eq!(stats("nest-outer").live_bytes, 400);
    assert_eq!(stats("nest-inner").live_bytes, 200);
    drop((a, b, c));
    assert_balanced("nest-outer", 400, 2);
    assert_balanced("nest-inner", 200, 1);
}

pub fn realloc_moves_ownership_to_the_resizer() {
    let (first, resizer, freer) = (
        Scope::named("realloc-first"),
        Scope::named("realloc-resizer"),
        Scope::named("realloc-freer"),
    );
    for (from, to) in [(10, 5000), (32, 64), (64, 8), (5000, 70_000), (100, 101)] {
        let mut v: Vec<u8> = {
            let _g = first.enter();
            Vec::with_capacity(from)
        };
        v.extend(std::iter::repeat_n(7, from));
        {
            let _g = resizer.enter();
            if to > from {
                v.reserve_exact(to - from);
            } else {
                v.truncate(to);
                v.shrink_to_fit();
            }
        }
        assert_eq!(v.capacity(), to);
        assert!(v[..from.min(to)].iter().all(|&x| x == 7), "contents kept");
        let _g = freer.enter();
        drop(v);
    }
    let sum_from: u64 = [10, 32, 64, 5000, 100].iter().sum();
    let sum_to: u64 = [5000, 64, 8, 70_000, 101].iter().sum();
    assert_balanced("realloc-first", sum_from, 5);
    assert_balanced("realloc-resizer", sum_to, 5);
    assert_balanced("realloc-freer", 0, 0);
}

pub fn absurd_requests_fail_without_counting() {
    let scope = Scope::named("absurd");
    let mut v: Vec<u8> = Vec::new();
    {
        let _g = scope.enter();
        assert!(v.try_reserve(1 << 62).is_err(), "4 EiB must not be granted");
        v.push(1);
    }
    let before = stats("absurd");
    {
        let _g = scope.enter();
        assert!(v.try_reserve_exact(1 << 62).is_err(), "realloc to 4 EiB");
    }
    assert_eq!(v, [1], "the block survives a failed realloc");
    assert_eq!(stats("absurd"), before);
    drop(v);
    assert_balanced("absurd", 8, 1);
}

pub fn thread_churn_is_exact_and_bounded() {
    const THREADS: usize = under_miri(10_000, 64);
    const BATCH: usize = 16;
    let scope = Scope::named("churn");
    let overhead_before = tracking_alloc::overhead_bytes();
    let mut survivors = Vec::with_capacity(THREADS);
    for batch in 0..THREADS / BATCH {
        let handles: Vec<_> = (0..BATCH)
            .map(|i| {
                thread::spawn(move || {
                    let _g = scope.enter();
                    let size = 1 + (batch * BATCH + i) % 700;
                    let freed_here = black_box(vec![0u8; size]);
                    drop(freed_here);
                    black_box(vec![1u8; size]) // freed later, on the main thread
                })
            })
            .collect();
        survivors.extend(handles.into_iter().map(|h| h.join().unwrap()));
    }
    let bytes: u64 = survivors.iter().map(|v| 2 * v.len() as u64).sum();
    let live: u64 = survivors.iter().map(|v| v.len() as u64).sum();
    assert_eq!(stats("churn").live_bytes, live);
    drop(survivors);
    assert_balanced("churn", bytes, 2 * THREADS as u64);
    // Exited threads' slots are reused: growth is bounded by the peak of live threads (a batch,
    // plus other tests' threads), not by the 10,000 threads that ran.
    let grown = tracking_alloc::overhead_bytes() - overhead_before;
    assert!(
        grown < 128 * 33 * 1024,
        "per-thread state leaked: overhead grew by {grown} bytes"
    );
}

pub fn teardown_allocations_do_not_recurse() {
    struct AllocatesOnDrop;
    impl Drop for AllocatesOnDrop {
        fn drop(&mut self) {
            // Runs during TLS teardown, possibly after the tracker released the thread's slot.
            let _g = Scope::named("teardown").enter();
            let v = black_box(vec![9u8; 1000]);
            assert_eq!(v.len(), 1000);
        }
    }
    thread_local! {
        static ON_EXIT: AllocatesOnDrop = const { AllocatesOnDrop };
    }
    let handles: Vec<_> = (0..50)
        .map(|_| {
            thread::spawn(|| {
                ON_EXIT.with(|_| ());
                drop(black_box(vec![0u8; 10]));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_balanced("teardown", 50_000, 50);
}

pub fn same_name_same_scope() {
    let a = Scope::named("same-name");
    let b = Scope::named(&String::from("same-name"));
    assert_eq!(a, b);
    assert_eq!(a.name(), "same-name");
    let from_macro = || {
        let _g = tracking_alloc::scope!("same-name");
        Scope::current()
    };
    assert_eq!(from_macro(), a);
    assert_eq!(from_macro(), a);
}

/// Blocks whose size class has exactly one spare byte (a one-byte tag under jemalloc), in
/// scopes with ids below and above 255 (the one-byte tag's escape to the side table), grown by
/// `realloc` and freed on another thread.
pub fn one_spare_byte_blocks_in_many_scopes() {
    const SIZES: [usize; 6] = [7, 15, 47, 63, 127, 159];
    // Under Miri (System inner: no one-byte tags) a few scopes exercise the same paths.
    let scopes: Vec<(String, Scope)> = (0..under_miri(300, 12))
        .map(|i| {
            let name = format!("spare-byte-{i}");
            let scope = Scope::named(&name);
            (name, scope)
        })
        .collect();
    assert!(scopes.iter().any(|(_, s)| s.id() < 255));
    assert!(cfg!(miri) || scopes.iter().any(|(_, s)| s.id() > 255));
    // Allocated up front: growing it inside a scope would charge that scope.
    let mut blocks = Vec::with_capacity(scopes.len() * SIZES.len());
    for (_, scope) in &scopes {
        let _g = scope.enter();
        for size in SIZES {
            blocks.push(black_box(vec![1u8; size]));
        }
    }
    let per_scope: usize = SIZES.iter().sum();
    let snapshot = all_stats();
    for (name, _) in &scopes {
        assert_eq!(
            snapshot[name.as_str()].live_bytes,
            per_scope as u64,
            "{name}"
        );
    }
    // Grown in the other scope's name: `realloc` moves the block to the scope resizing it.
    let grower = Scope::named("spare-byte-grower");
    {
        let _g = grower.enter();
        for block in blocks.iter_mut().step_by(SIZES.len()) {
            block.reserve_exact(block.capacity() * 2 + 1 - block.len());
        }
    }
    let grown: u64 = blocks
        .iter()
        .step_by(SIZES.len())
        .map(|b| b.capacity() as u64)
        .sum();
    assert_eq!(stats("spare-byte-grower").live_bytes, grown);
    thread::spawn(move || drop(blocks)).join().unwrap();
    let snapshot = all_stats();
    for (name, _) in &scopes {
        let s = &snapshot[name.as_str()];
        assert_eq!(
            (s.live_bytes, s.allocations, s.deallocations),
            (0, 6, 6),
            "{s:?}"
        );
    }
    assert_eq!(stats("spare-byte-grower").live_bytes, 0);
}

#[macro_export]
macro_rules! semantics_tests {
    () => {
        #[test]
        fn one_spare_byte_blocks_in_many_scopes() {
            common::one_spare_byte_blocks_in_many_scopes();
        }
        #[test]
        fn cross_thread_frees_credit_the_owner() {
            common::cross_thread_frees_credit_the_owner();
        }
        #[test]
        fn eight_threads_hammer_one_scope() {
            common::eight_threads_hammer_one_scope();
        }
        #[test]
        fn nested_scopes_restore() {
            common::nested_scopes_restore();
        }
        #[test]
        fn realloc_moves_ownership_to_the_resizer() {
            common::realloc_moves_ownership_to_the_resizer();
        }
        #[test]
        // Miri stops on a 4 EiB request instead of refusing it; `null_inner` covers refusals.
        #[cfg_attr(miri, ignore = "Miri aborts on huge requests")]
        fn absurd_requests_fail_without_counting() {
            common::absurd_requests_fail_without_counting();
        }
        #[test]
        fn thread_churn_is_exact_and_bounded() {
            common::thread_churn_is_exact_and_bounded();
        }
        #[test]
        fn teardown_allocations_do_not_recurse() {
            common::teardown_allocations_do_not_recurse();
        }
        #[test]
        fn same_name_same_scope() {
            common::same_name_same_scope();
        }
    };
}
