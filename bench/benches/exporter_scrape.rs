//! The exporter's own costs: rendering a scrape with 10, 100 and 1,000 scopes (exposition size
//! reported once per case), one jemalloc epoch refresh, a snapshot of the scope counters, and
//! a whole scrape over HTTP, alone and in a storm (31 other scrapers, 300 idle connections).
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};

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
        // A scrape reuses a reading younger than SCRAPE_MAX_AGE: let the new scopes in.
        std::thread::sleep(exporter::collectors::SCRAPE_MAX_AGE);
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

/// One `GET /metrics` on a fresh connection, as Prometheus's first scrape of a target.
fn scrape_over_http(addr: SocketAddr) -> usize {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::with_capacity(64 * 1024);
    stream.read_to_end(&mut response).unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200"), "scrape failed");
    response.len()
}

/// Scrape latency through the built-in server: alone, then while 31 threads scrape without
/// pause and 300 connections sit idle (what the hardening test's storm does, timed here
/// because tests on a shared machine assert behaviour, not time).
fn bench_http(c: &mut Criterion) {
    let exporter = exporter::Exporter::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .unwrap();
    let addr = exporter.local_addr();
    let mut group = c.benchmark_group("http_scrape");
    group.bench_function("alone", |b| b.iter(|| scrape_over_http(addr)));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let idle: Vec<TcpStream> = (0..300)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        for _ in 0..31 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    scrape_over_http(addr);
                }
            });
        }
        group.bench_function("storm_31_scrapers_300_idle", |b| {
            b.iter(|| scrape_over_http(addr))
        });
        stop.store(true, Ordering::Relaxed);
        drop(idle);
    });
    group.finish();
    exporter.shutdown();
}

criterion_group!(benches, bench, bench_http);
criterion_main!(benches);
