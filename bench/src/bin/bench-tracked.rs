//! The workloads under `TrackingAlloc<Jemalloc>`.
use tracking_alloc::{Scope, ScopeGuard, TrackingAlloc};

#[global_allocator]
static GLOBAL: TrackingAlloc<tikv_jemallocator::Jemalloc> =
    TrackingAlloc::new(tikv_jemallocator::Jemalloc);

fn enter(n: usize) -> ScopeGuard {
    static SCOPES: std::sync::OnceLock<Vec<Scope>> = std::sync::OnceLock::new();
    let scopes = SCOPES.get_or_init(|| {
        (0..256)
            .map(|i| Scope::named(&format!("bench-{i}")))
            .collect()
    });
    scopes[n % scopes.len()].enter()
}

fn main() {
    alloc_bench::main(alloc_bench::Variant {
        name: "tracked",
        enter: Some(enter),
        jemalloc_stats: true,
    });
}
