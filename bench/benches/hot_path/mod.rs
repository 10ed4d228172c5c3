//! The allocator micro benchmarks, shared by `hot_path_bare` (plain jemalloc) and
//! `hot_path_tracked` (TrackingAlloc<Jemalloc>): same code, different `#[global_allocator]`.
//! Compare the two reports side by side; `cargo run -p alloc-bench --bin compare` prints ratios.

use std::alloc::{alloc, dealloc, realloc, Layout};
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};

/// Sizes that take each path: inline tag (100, 1000), side table (64, 4096: exact classes),
/// large (65536).
const SIZES: [usize; 5] = [64, 100, 1000, 4096, 65536];

pub fn benches(c: &mut Criterion, allocator: &str) {
    let mut group = c.benchmark_group(format!("alloc_free/{allocator}"));
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let layout = Layout::from_size_align(size, 8).unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(size), &layout, |b, &layout| {
            b.iter(|| {
                // SAFETY: non-zero size; freed with the same layout.
                unsafe {
                    let block = black_box(alloc(layout));
                    dealloc(block, layout);
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("realloc_grow/{allocator}"));
    group.bench_function("16_to_4096_doubling", |b| {
        b.iter(|| {
            let mut layout = Layout::from_size_align(16, 8).unwrap();
            // SAFETY: every realloc passes the block's current layout; the last one is freed.
            unsafe {
                let mut block = alloc(layout);
                while layout.size() < 4096 {
                    let new_size = layout.size() * 2;
                    block = black_box(realloc(block, layout, new_size));
                    layout = Layout::from_size_align(new_size, 8).unwrap();
                }
                dealloc(block, layout);
            }
        })
    });
    group.finish();

    let mut group = c.benchmark_group(format!("churn_ring/{allocator}"));
    group.throughput(Throughput::Elements(1024));
    for max in [64usize, 1024, 16384] {
        group.bench_with_input(BenchmarkId::from_parameter(max), &max, |b, &max| {
            b.iter(|| alloc_bench::churn::<()>(1024, max, 7, || None))
        });
    }
    group.finish();
}
