//! Semantics with jemalloc inside: inline tags in size-class slack plus the side table.
mod common;

use tikv_jemallocator::Jemalloc;
use tracking_alloc::Scope;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<Jemalloc> =
    tracking_alloc::TrackingAlloc::new(Jemalloc);

semantics_tests!();

/// Exact-class buffers keep their class: the tag goes out of line, not into a bigger class.
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

fn tikv_jemalloc_ctl_nallocx(size: usize) -> usize {
    // SAFETY: nallocx only computes a size class.
    unsafe { tikv_jemalloc_sys::nallocx(size, 0) }
}

/// Over-aligned layouts go through the side table with jemalloc's aligned size classes.
#[test]
fn over_aligned_blocks_are_tracked() {
    use std::alloc::{alloc, dealloc, Layout};
    let scope = Scope::named("aligned");
    let mut blocks = Vec::with_capacity(4000);
    let mut bytes = 0;
    {
        let _g = scope.enter();
        for (i, align) in [32usize, 64, 128, 4096, 8192]
            .iter()
            .cycle()
            .take(4000)
            .enumerate()
        {
            let layout = Layout::from_size_align(1 + i % 300, *align).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { alloc(layout) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            bytes += layout.size() as u64;
            blocks.push((p as usize, layout));
        }
    }
    assert_eq!(common::stats("aligned").live_bytes, bytes);
    std::thread::spawn(move || {
        for (p, layout) in blocks {
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p as *mut u8, layout) };
        }
    })
    .join()
    .unwrap();
    let s = common::stats("aligned");
    assert_eq!((s.live_bytes, s.deallocations), (0, 4000), "{s:?}");
}
