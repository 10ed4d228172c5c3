//! The workloads under `SampledAlloc<Jemalloc>` (sampled mode, default interval).
use tracking_alloc::SampledAlloc;

#[global_allocator]
static GLOBAL: SampledAlloc<tikv_jemallocator::Jemalloc> =
    SampledAlloc::new(tikv_jemallocator::Jemalloc);

fn main() {
    alloc_bench::main(alloc_bench::Variant {
        name: "sampled",
        enter: Some(alloc_bench::enter_bench_scope),
        jemalloc_stats: true,
    });
}
