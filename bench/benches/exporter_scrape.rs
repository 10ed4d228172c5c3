//! The exporter's own costs: rendering a scrape with 10, 100 and 1,000 scopes (exposition size
//! reported once per case), one jemalloc epoch refresh, and a snapshot of the scope counters.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use prometheus::{Encoder, TextEncoder};
use tracking_alloc::Scope;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

fn render(registry: &prometheus::Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 * 1024);
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    out
}

fn bench(c: &mut Criterion) {
    let cache = exporter::StatsCache::default();
    let health = exporter::collectors::ExporterMetrics::new();
    let registry = prometheus::Registry::new();
    exporter::collectors::register_all(&registry, &cache, &health).unwrap();
    cache.refresh().unwrap();

    let mut group = c.benchmark_group("scrape");
    let mut held = Vec::new();
    let mut registered = 0;
    for scopes in [10usize, 100, 1000] {
        while registered < scopes {
            let _g = Scope::named(&format!("bench-scope-{registered}")).enter();
            held.push(vec![0u8; 64 + registered]);
            registered += 1;
        }
        let size = render(&registry).len();
        eprintln!("scrape with {scopes} scopes: {size} bytes of exposition");
        group.bench_with_input(BenchmarkId::from_parameter(scopes), &scopes, |b, _| {
            b.iter(|| black_box(render(&registry)))
        });
    }
    group.finish();

    c.bench_function("epoch_refresh", |b| b.iter(|| cache.refresh().unwrap()));
    c.bench_function("scope_snapshot_1000", |b| {
        b.iter(|| black_box(tracking_alloc::snapshot()))
    });
    black_box(held);
}

criterion_group!(benches, bench);
criterion_main!(benches);
