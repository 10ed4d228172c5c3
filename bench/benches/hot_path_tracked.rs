//! Allocator micro benchmarks under TrackingAlloc<Jemalloc>, inside one scope.
use criterion::{criterion_group, criterion_main, Criterion};

mod hot_path;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

fn bench(c: &mut Criterion) {
    let _scope = tracking_alloc::Scope::named("bench").enter();
    hot_path::benches(c, "tracked");
}

criterion_group!(benches, bench);
criterion_main!(benches);
