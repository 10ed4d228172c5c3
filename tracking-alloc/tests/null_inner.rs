//! When the inner allocator returns null, so does the tracker, and no counter moves.
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};

use tracking_alloc::{snapshot, Scope, TrackingAlloc};

/// `System`, except that it refuses every request while `REFUSE` is set.
struct Refusing;

static REFUSE: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Refusing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if REFUSE.load(Ordering::SeqCst) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if REFUSE.load(Ordering::SeqCst) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: TrackingAlloc<Refusing> = TrackingAlloc::new(Refusing);

fn refused_stats() -> tracking_alloc::ScopeStats {
    snapshot()
        .into_iter()
        .find(|s| s.name == "refused")
        .unwrap()
}

#[test]
fn null_from_inner_moves_no_counter() {
    let scope = Scope::named("refused");
    let mut kept = {
        let _g = scope.enter();
        vec![1u8; 100]
    };
    let before = refused_stats();
    let layout = Layout::from_size_align(64, 8).unwrap();
    let (fresh, zeroed, grown) = {
        let _g = scope.enter();
        REFUSE.store(true, Ordering::SeqCst);
        // SAFETY: non-zero sizes; `kept`'s buffer was allocated with this layout.
        // `black_box`: the compiler may elide an allocation that is only compared with null and
        // assume it succeeded.
        let result = unsafe {
            (
                black_box(std::alloc::alloc(layout)),
                black_box(std::alloc::alloc_zeroed(layout)),
                black_box(std::alloc::realloc(
                    kept.as_mut_ptr(),
                    Layout::array::<u8>(100).unwrap(),
                    4000,
                )),
            )
        };
        let grow = kept.try_reserve_exact(10_000).is_err();
        REFUSE.store(false, Ordering::SeqCst);
        assert!(grow, "try_reserve must report the refusal");
        result
    };
    assert!(fresh.is_null() && zeroed.is_null() && grown.is_null());
    assert_eq!(refused_stats(), before, "no counter moved");
    assert_eq!(kept, vec![1u8; 100], "the block survives a refused realloc");
    drop(kept);
    let after = refused_stats();
    assert_eq!((after.live_bytes, after.deallocations), (0, 1));
}
