//! The workloads under the `tracking-allocator` crate (0.4) over jemalloc, with a tracker that
//! counts live bytes per group in shared atomics, as its documentation suggests.
use std::sync::atomic::{AtomicI64, Ordering};

use tracking_allocator::{
    AllocationGroupId, AllocationGroupToken, AllocationGuard, AllocationRegistry,
    AllocationTracker, Allocator,
};

#[global_allocator]
static GLOBAL: Allocator<tikv_jemallocator::Jemalloc> =
    Allocator::from_allocator(tikv_jemallocator::Jemalloc);

static LIVE: [AtomicI64; 256] = [const { AtomicI64::new(0) }; 256];

struct Counting;

impl AllocationTracker for Counting {
    fn allocated(&self, _addr: usize, size: usize, _wrapped: usize, group: AllocationGroupId) {
        LIVE[group.as_usize().get() % 256].fetch_add(size as i64, Ordering::Relaxed);
    }
    fn deallocated(
        &self,
        _addr: usize,
        size: usize,
        _wrapped: usize,
        source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        LIVE[source.as_usize().get() % 256].fetch_sub(size as i64, Ordering::Relaxed);
    }
}

/// Registers a group and enters it for the rest of the thread (the token is leaked so the guard
/// can live that long); `nested` mode is not comparable and reported as such by `compare`.
fn enter(_n: usize) -> AllocationGuard<'static> {
    let token: &'static mut AllocationGroupToken =
        Box::leak(Box::new(AllocationGroupToken::register().expect("group")));
    token.enter()
}

fn main() {
    AllocationRegistry::set_global_tracker(Counting).expect("tracker");
    AllocationRegistry::enable_tracking();
    alloc_bench::main(alloc_bench::Variant {
        name: "tracking-allocator",
        enter: Some(enter),
        jemalloc_stats: true,
    });
}
