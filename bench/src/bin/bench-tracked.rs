//! The workloads under `TrackingAlloc<Jemalloc>`.
use tracking_alloc::TrackingAlloc;

#[global_allocator]
static GLOBAL: TrackingAlloc<tikv_jemallocator::Jemalloc> =
    TrackingAlloc::new(tikv_jemallocator::Jemalloc);

fn main() {
    alloc_bench::main(alloc_bench::Variant {
        name: "tracked",
        enter: Some(alloc_bench::enter_bench_scope),
        jemalloc_stats: true,
    });
}
