//! The workloads under a 2-byte trailer with shared atomic per-scope counters, over jemalloc.
use alloc_bench::shared_atomic::{enter, SharedAtomicAlloc};

#[global_allocator]
static GLOBAL: SharedAtomicAlloc<tikv_jemallocator::Jemalloc> =
    SharedAtomicAlloc(tikv_jemallocator::Jemalloc);

fn main() {
    alloc_bench::main(alloc_bench::Variant {
        name: "shared-atomic",
        enter: Some(enter),
        jemalloc_stats: true,
    });
}
