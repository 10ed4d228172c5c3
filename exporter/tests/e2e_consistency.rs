//! One instant per scrape: in every scrape of the demo over a minute, batch spikes included,
//! the scopes never hold more than jemalloc has allocated (plus the allocations in flight) and
//! `memory_unattributed_bytes` is exactly what the same scrape's figures leave over.
mod support;

use std::time::{Duration, Instant};

use support::{get, parse_exposition, value_of, Demo};

/// Allocations counted but not yet visible in `stats.allocated` when a reading is taken: the
/// exact tracker counts a block just before calling jemalloc, so at most one block per thread
/// (the demo's largest are its batch rows vector, ~200 KiB, and 8 KiB rows; ~12 threads); and
/// frees jemalloc has seen but the scope read after it has not (the ~15 µs between the epoch
/// advance and the scope read). 4 MiB covers both with room.
const IN_FLIGHT: f64 = 4.0 * 1024.0 * 1024.0;

#[test]
fn every_scrape_is_one_consistent_instant() {
    let demo = Demo::start(
        &[
            "--tracking",
            "exact",
            "--batch-every",
            "4",
            "--batch-bytes",
            "33554432",
            "--requests-per-sec",
            "400",
        ],
        &[],
    );
    let started = Instant::now();
    let (mut scrapes, mut low, mut high) = (0, f64::MAX, 0f64);
    while started.elapsed() < Duration::from_secs(60) {
        let text = get(demo.addr, "/metrics").text();
        let samples = parse_exposition(&text);
        let value = |name: &str| value_of(&samples, name, None).unwrap_or_else(|| panic!("{name}"));
        let allocated = value("jemalloc_allocated_bytes");
        let scoped: f64 = samples
            .iter()
            .filter(|s| s.name == "memory_scope_live_bytes")
            .map(|s| s.value)
            .sum();
        let parts =
            scoped + value("jemalloc_tcache_bytes") + value("memory_tracking_overhead_bytes");
        assert!(
            scoped <= allocated + IN_FLIGHT,
            "scrape {scrapes}: scopes hold {scoped} of {allocated} allocated"
        );
        assert_eq!(
            value("memory_unattributed_bytes"),
            (allocated - parts).max(0.0),
            "scrape {scrapes}: unattributed is allocated minus the named parts"
        );
        low = low.min(allocated);
        high = high.max(allocated);
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(scrapes > 200, "{scrapes} scrapes");
    assert!(
        high - low > 24.0 * 1024.0 * 1024.0,
        "the 32 MiB batch spikes show in jemalloc_allocated_bytes: {low}..{high}"
    );
}
