//! Allocator micro benchmarks under bare jemalloc (the baseline).
use criterion::{criterion_group, criterion_main, Criterion};

mod hot_path;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn bench(c: &mut Criterion) {
    hot_path::benches(c, "jemalloc");
}

criterion_group!(benches, bench);
criterion_main!(benches);
