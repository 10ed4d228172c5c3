//! `publish_to_metrics_facade`: a service that serves its metrics with
//! `metrics-exporter-prometheus` gets the exporter's gauges and counters on its own endpoint,
//! with the names and labels of `/metrics`.
mod support;

use std::time::Duration;

use support::parse_exposition;
use tracking_alloc::Scope;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

#[test]
fn the_facade_recorder_renders_the_same_metrics() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the recorder installs");
    let held = {
        let _g = Scope::named("facade-test").enter();
        vec![1u8; 300_000]
    };
    let exporter = exporter::Exporter::builder()
        .without_server()
        .refresh_interval(Duration::from_millis(20))
        .publish_to_metrics_facade(true)
        .start()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let rendered = handle.render();
    let samples = parse_exposition(&rendered);
    let value = |name: &str, label: Option<(&str, &str)>| {
        support::value_of(&samples, name, label)
            .unwrap_or_else(|| panic!("{name} {label:?} missing from:\n{rendered}"))
    };
    assert!(value("jemalloc_allocated_bytes", None) > 1e6);
    // Exact mode here: the facade carries the scope's exact live bytes.
    assert_eq!(
        value("memory_scope_live_bytes", Some(("scope", "facade-test"))),
        300_000.0
    );
    assert!(
        value(
            "memory_scope_allocations_total",
            Some(("scope", "facade-test"))
        ) >= 1.0
    );
    assert_eq!(value("memory_tracking_info", Some(("mode", "exact"))), 1.0);
    assert!(
        rendered.contains("# TYPE memory_scope_allocated_bytes_total counter"),
        "{rendered}"
    );
    assert!(
        rendered.contains("# TYPE jemalloc_allocated_bytes gauge"),
        "{rendered}"
    );
    assert!(
        !rendered.contains("process_resident_memory_bytes"),
        "process_* is left to metrics-process"
    );
    drop(held);
    exporter.shutdown();
}
