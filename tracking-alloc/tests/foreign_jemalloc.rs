//! An inner allocator that looks like jemalloc but is not the `tikv_jemallocator::Jemalloc`
//! this crate was built with (say, the old `jemallocator` crate): the tracker says so.

use std::alloc::{GlobalAlloc, Layout, System};

use tracking_alloc::{placement, tracking_warning, Placement, Scope, TrackingAlloc};

/// Stands in for another crate's jemalloc type; only its name matters here.
struct Jemalloc;

// SAFETY: forwards to `System`.
unsafe impl GlobalAlloc for Jemalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: TrackingAlloc<Jemalloc> = TrackingAlloc::new(Jemalloc);

#[test]
fn a_foreign_jemalloc_is_reported() {
    let _g = Scope::named("foreign").enter();
    let v = vec![1u8; 100];
    assert_eq!(placement(), Some(Placement::Appended));
    let warning = tracking_warning().expect("a warning for a jemalloc that is not recognised");
    assert!(warning.contains(">=0.6.1, <0.8"), "{warning}");
    drop(v);
}
