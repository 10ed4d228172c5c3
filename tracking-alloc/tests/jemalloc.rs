//! Semantics with jemalloc inside: inline tags in size-class slack plus the side table.
mod common;

use std::future::Future;
use tikv_jemallocator::Jemalloc;

use tracking_alloc::Scope;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<Jemalloc> =
    tracking_alloc::TrackingAlloc::new(Jemalloc);

semantics_tests!();

/// Exact-class buffers keep their class: the tag goes out of line, not into a bigger class.
#[cfg(feature = "jemalloc")]
#[test]
fn exact_class_blocks_keep_their_size_class() {
    let _g = Scope::named("exact-class").enter();
    for capacity in [1usize, 2, 4, 8, 16, 32, 64, 128, 1024, 2048] {
        let v: Vec<u64> = Vec::with_capacity(capacity);
        // SAFETY: `v`'s buffer is a live jemalloc allocation.
        let usable = unsafe { tikv_jemallocator::usable_size(v.as_ptr()) };
        assert_eq!(usable, capacity * 8, "Vec<u64> with capacity {capacity}");
    }
    for len in [7usize, 8, 15, 16, 100, 1000] {
        let s = "x".repeat(len);
        // SAFETY: as above.
        let usable = unsafe { tikv_jemallocator::usable_size(s.as_ptr()) };
        let bare = tikv_jemalloc_ctl_nallocx(len);
        assert_eq!(usable, bare, "String of {len} bytes");
    }
}

#[cfg(feature = "jemalloc")]
fn tikv_jemalloc_ctl_nallocx(size: usize) -> usize {
    // SAFETY: nallocx only computes a size class.
    unsafe { tikv_jemalloc_sys::nallocx(size, 0) }
}

/// Over-aligned layouts, and sizes below their alignment, go through the side table with
/// jemalloc's aligned size classes. Neighbouring blocks alternate between two scopes, so a
/// side-table slot shared by two live blocks would show up as misattributed bytes.
#[test]
fn over_aligned_blocks_are_tracked() {
    use std::alloc::{alloc, dealloc, Layout};
    let scopes = [Scope::named("aligned-a"), Scope::named("aligned-b")];
    let mut blocks = Vec::with_capacity(8000);
    let mut bytes = [0u64; 2];
    for i in 0..8000 {
        // A quarter are 16-byte blocks, a quarter 6–8 bytes aligned to 16, which jemalloc serves
        // from the same 16-byte class (so they share slabs); the rest are over-aligned.
        let layout = match i % 4 {
            0 => Layout::from_size_align(16, 8),
            1 => Layout::from_size_align(8 - i % 3, 16),
            _ => Layout::from_size_align(1 + i % 300, [32, 64, 128, 4096, 8192][i % 5]),
        }
        .unwrap();
        let _g = scopes[i % 2].enter();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null());
        assert_eq!(p as usize % layout.align(), 0);
        bytes[i % 2] += layout.size() as u64;
        blocks.push((p as usize, layout));
    }
    let live = |name| common::stats(name).live_bytes;
    assert_eq!([live("aligned-a"), live("aligned-b")], bytes);
    std::thread::spawn(move || {
        for (p, layout) in blocks {
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p as *mut u8, layout) };
        }
    })
    .join()
    .unwrap();
    for name in ["aligned-a", "aligned-b"] {
        let s = common::stats(name);
        assert_eq!((s.live_bytes, s.deallocations), (0, 4000), "{s:?}");
    }
}

/// A future in a scope is charged on every worker thread that polls it, while other tasks on the
/// same workers allocate unscoped; dropping it unpolled runs its destructor in the scope too.
#[test]
fn future_hops_worker_threads_in_its_scope() {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use tracking_alloc::prelude::*;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let threads = Arc::new(Mutex::new(HashSet::with_capacity(64)));
    let seen = threads.clone();
    let held = runtime.block_on(async move {
        let noise: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(async {
                    for i in 0..300 {
                        drop(vec![0u8; 64 + i]);
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let mut held = Vec::with_capacity(200);
        let task = tokio::spawn(
            async move {
                for i in 0..200 {
                    seen.lock().unwrap().insert(std::thread::current().id());
                    held.push(vec![1u8; 100 + i]);
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
                held
            }
            .in_scope(Scope::named("hopping")),
        );
        for n in noise {
            n.await.unwrap();
        }
        task.await.unwrap()
    });
    let expected: u64 = (0..200).map(|i| 100 + i as u64).sum();
    let hopping = common::stats("hopping");
    assert_eq!(hopping.live_bytes, expected, "{hopping:?}");
    assert_eq!(hopping.allocations, 200);
    eprintln!(
        "the scoped future ran on {} worker threads",
        threads.lock().unwrap().len()
    );
    drop(held);
    assert_eq!(common::stats("hopping").live_bytes, 0);

    // Dropped without completing: its buffers are freed (and credited) wherever it is dropped.
    let pending = async {
        let buffer = std::hint::black_box(vec![5u8; 4096]);
        std::future::pending::<()>().await;
        drop(buffer);
    }
    .in_scope(Scope::named("cancelled"));
    let mut pending = Box::pin(pending);
    let waker = std::task::Waker::noop();
    assert!(pending
        .as_mut()
        .poll(&mut std::task::Context::from_waker(waker))
        .is_pending());
    assert_eq!(common::stats("cancelled").live_bytes, 4096);
    drop(pending);
    assert_eq!(common::stats("cancelled").live_bytes, 0);
}

#[cfg(feature = "jemalloc")]
#[test]
fn the_fast_placement_is_in_use() {
    assert_eq!(
        tracking_alloc::placement(),
        Some(tracking_alloc::Placement::SizeClass)
    );
    assert_eq!(tracking_alloc::sample_interval(), None, "exact mode");
    assert_eq!(tracking_alloc::tracking_warning(), None);
    // The label values the exporter publishes in `memory_tracking_info{placement}`.
    let labels = [
        tracking_alloc::Placement::SizeClass,
        tracking_alloc::Placement::Appended,
    ]
    .map(tracking_alloc::Placement::as_str);
    assert_eq!(labels, ["size_class", "appended"]);
}

/// A scope is found by its id (what a heap profile's scope frame carries) up to the last
/// registered one and no further, and prints its name.
#[test]
fn scopes_are_found_by_id_up_to_the_last_and_print_their_name() {
    use tracking_alloc::Scope;
    let scope = Scope::named("found-by-id");
    assert_eq!(Scope::by_id(scope.id()), Some(scope));
    assert_eq!(Scope::by_id(0).map(Scope::name), Some("unscoped"));
    loop {
        // Other tests register scopes meanwhile: judge only a count that held throughout.
        let registered = tracking_alloc::snapshot().len();
        let last = Scope::by_id(registered as u16 - 1);
        let past = Scope::by_id(registered as u16);
        if tracking_alloc::snapshot().len() == registered {
            assert!(last.is_some(), "scope {} of {registered}", registered - 1);
            assert_eq!(past, None, "no scope {registered} of {registered}");
            break;
        }
    }
    assert_eq!(format!("{scope:?}"), r#"Scope("found-by-id")"#);
    let guard = scope.enter();
    let inner = Scope::named("found-by-id-inner").enter();
    assert_eq!(
        format!("{inner:?}"),
        r#"ScopeGuard { previous: Scope("found-by-id") }"#
    );
    drop(inner);
    drop(guard);
}

/// Without the `jemalloc` feature the tracker cannot use jemalloc's layout: it appends its
/// tag, and says the inner allocator looked like jemalloc.
#[cfg(not(feature = "jemalloc"))]
#[test]
fn without_the_feature_jemalloc_gets_the_appended_placement_and_a_warning() {
    drop(vec![0u8; 10]);
    assert_eq!(
        tracking_alloc::placement(),
        Some(tracking_alloc::Placement::Appended)
    );
    assert!(tracking_alloc::tracking_warning().is_some());
}
