//! The exporter started in-process, scraped over real HTTP.
mod support;

use std::time::Duration;

use support::{get, parse_exposition, request, value_of};
use tracking_alloc::Scope;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

fn start() -> exporter::ExporterHandle {
    exporter::Exporter::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .refresh_interval(Duration::from_millis(50))
        .start()
        .unwrap()
}

#[test]
fn scrape_has_every_family_with_help_type_and_consistent_values() {
    let held = {
        let _g = Scope::named("scrape-test").enter();
        vec![7u8; 1 << 20]
    };
    let exporter = start();
    std::thread::sleep(Duration::from_millis(200)); // a few refreshes
    let response = get(exporter.local_addr(), "/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    let text = response.text();
    let samples = parse_exposition(&text);
    let expected = [
        ("jemalloc_allocated_bytes", "gauge"),
        ("jemalloc_active_bytes", "gauge"),
        ("jemalloc_metadata_bytes", "gauge"),
        ("jemalloc_resident_bytes", "gauge"),
        ("jemalloc_mapped_bytes", "gauge"),
        ("jemalloc_retained_bytes", "gauge"),
        ("jemalloc_dirty_bytes", "gauge"),
        ("jemalloc_muzzy_bytes", "gauge"),
        ("jemalloc_tcache_bytes", "gauge"),
        ("jemalloc_arenas", "gauge"),
        ("jemalloc_background_threads", "gauge"),
        ("jemalloc_profiling_enabled", "gauge"),
        ("jemalloc_profiling_active", "gauge"),
        ("jemalloc_info", "gauge"),
        ("memory_scope_live_bytes", "gauge"),
        ("memory_scope_allocated_bytes_total", "counter"),
        ("memory_scope_deallocated_bytes_total", "counter"),
        ("memory_scope_allocations_total", "counter"),
        ("memory_scope_deallocations_total", "counter"),
        ("memory_unattributed_bytes", "gauge"),
        ("memory_tracking_overhead_bytes", "gauge"),
        ("memory_tracking_info", "gauge"),
        ("memory_tracking_warning", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("memory_exporter_refresh_duration_seconds", "gauge"),
        ("memory_exporter_refresh_errors_total", "counter"),
        ("memory_exporter_scrapes_total", "counter"),
    ];
    for (name, kind) in expected {
        let base = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n"))
                || text.contains(&format!("# TYPE {base} {kind}\n")),
            "# TYPE {name} {kind} missing"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 20),
            "# HELP {name} missing or empty"
        );
        assert!(
            samples.iter().any(|s| s.name == name),
            "no sample for {name}"
        );
    }
    let v = |name| value_of(&samples, name, None).unwrap();
    assert!(v("jemalloc_allocated_bytes") > 0.0);
    assert!(v("jemalloc_mapped_bytes") >= v("jemalloc_resident_bytes"));
    assert!(v("jemalloc_resident_bytes") >= v("jemalloc_active_bytes"));
    assert!(v("jemalloc_active_bytes") >= v("jemalloc_allocated_bytes"));
    assert!(v("process_resident_memory_bytes") >= v("jemalloc_allocated_bytes") / 2.0);
    assert_eq!(
        value_of(
            &samples,
            "memory_scope_live_bytes",
            Some(("scope", "scrape-test"))
        ),
        Some((1 << 20) as f64)
    );
    assert_eq!(
        value_of(
            &samples,
            "memory_scope_live_bytes",
            Some(("scope", "overflow"))
        ),
        Some(0.0),
        "built-in scopes are exported from the start"
    );
    assert!(v("memory_unattributed_bytes") < v("jemalloc_allocated_bytes"));
    drop(held);
    exporter.shutdown();
}

#[test]
fn routes_answer_404_405_and_head() {
    let exporter = start();
    let addr = exporter.local_addr();

    let missing = get(addr, "/nope");
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("/metrics"), "{}", missing.text());

    let wrong = request(addr, "POST", "/metrics", &[("Content-Length", "0")]);
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("GET, HEAD"));
    assert!(wrong.text().contains("use GET or HEAD"), "{}", wrong.text());

    let head = request(addr, "HEAD", "/metrics", &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    let index = get(addr, "/");
    assert_eq!(index.status, 200);
    assert!(index.text().contains("/metrics"));

    // Scrapes are counted by status code.
    let samples = parse_exposition(&get(addr, "/metrics").text());
    let scrapes = value_of(
        &samples,
        "memory_exporter_scrapes_total",
        Some(("code", "200")),
    );
    assert!(scrapes >= Some(1.0), "{scrapes:?}");
    exporter.shutdown();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the port is closed after shutdown"
    );
}

#[test]
fn runs_inside_an_existing_tokio_runtime() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let exporter = start();
        let addr = exporter.local_addr();
        let body = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
            .await
            .unwrap();
        assert_eq!(body.status, 200);
        assert!(body.text().contains("jemalloc_allocated_bytes"));
        exporter.stopped().await;
        assert!(std::net::TcpStream::connect(addr).is_err());
    });
}

#[test]
fn bind_errors_say_how_to_fix() {
    let first = start();
    let error = exporter::Exporter::builder()
        .listen(first.local_addr())
        .start()
        .err()
        .expect("the port is taken");
    let message = error.to_string();
    assert!(message.contains("already in use"), "{message}");
    assert!(message.contains("--listen"), "{message}");
}

#[test]
fn serves_a_service_registry_too() {
    let registry = prometheus::Registry::new();
    let requests = prometheus::IntCounter::new("app_requests_total", "Requests served.").unwrap();
    registry.register(Box::new(requests.clone())).unwrap();
    requests.inc_by(3);
    let exporter = exporter::Exporter::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .registry(registry)
        .start()
        .unwrap();
    let samples = parse_exposition(&get(exporter.local_addr(), "/metrics").text());
    assert_eq!(value_of(&samples, "app_requests_total", None), Some(3.0));
    assert!(value_of(&samples, "jemalloc_allocated_bytes", None).is_some());
}

/// `let _ = builder.start()?;` keeps serving: a dropped handle leaves the exporter running;
/// only `shutdown` stops it.
#[test]
fn a_dropped_handle_keeps_the_exporter_running() {
    let addr = start().local_addr(); // the handle is dropped at the end of this statement
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(get(addr, "/metrics").status, 200);

    let stopped = start();
    let addr = stopped.local_addr();
    stopped.shutdown();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "shutdown stops it"
    );
}

/// Without a server of its own the exporter binds nothing and still refreshes; its service
/// answers as the built-in server would.
#[test]
fn without_server_binds_nothing_and_serves_through_its_service() {
    let exporter = exporter::Exporter::builder()
        .without_server()
        .refresh_interval(Duration::from_millis(20))
        .start()
        .unwrap();
    assert_eq!(exporter.local_addr(), "0.0.0.0:0".parse().unwrap());
    let mut service = exporter.service();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let response = runtime.block_on(tower_service::Service::call(
        &mut service,
        http::Request::get("/metrics").body(()).unwrap(),
    ));
    let response = response.unwrap();
    assert_eq!(response.status(), 200);
    let debug = runtime.block_on(tower_service::Service::call(
        &mut service,
        http::Request::get("/debug/pprof/status")
            .body(String::new())
            .unwrap(),
    ));
    assert_eq!(
        debug.unwrap().status(),
        404,
        "debug routes are off unless enabled"
    );
    exporter.shutdown();
}

/// Each per-scope counter reports its own event, to the block and byte: 100 allocations of
/// 96 bytes, 40 of them freed (on another thread), give exactly these figures.
#[test]
fn per_scope_counters_have_exact_values() {
    let mut boxes: Vec<Box<[u8; 96]>> = Vec::with_capacity(100);
    {
        let _g = Scope::named("exact-counters").enter();
        for i in 0..100u8 {
            boxes.push(Box::new([i; 96]));
        }
    }
    let freed: Vec<_> = boxes.drain(..40).collect();
    std::thread::spawn(move || drop(freed)).join().unwrap();
    let exporter = start();
    let samples = parse_exposition(&get(exporter.local_addr(), "/metrics").text());
    let value = |name| value_of(&samples, name, Some(("scope", "exact-counters"))).unwrap();
    assert_eq!(value("memory_scope_allocations_total"), 100.0);
    assert_eq!(value("memory_scope_deallocations_total"), 40.0);
    assert_eq!(value("memory_scope_allocated_bytes_total"), 9600.0);
    assert_eq!(value("memory_scope_deallocated_bytes_total"), 3840.0);
    assert_eq!(value("memory_scope_live_bytes"), 5760.0);
    drop(boxes);
    exporter.shutdown();
}

/// A registry that already holds a family the exporter serves is refused at start, naming it
/// (serving it twice would be invalid exposition).
#[test]
fn a_registry_with_the_exporters_families_is_refused() {
    let registry = exporter::prometheus::Registry::new();
    registry
        .register(Box::new(exporter::JemallocCollector::new()))
        .unwrap();
    let error = exporter::Exporter::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .registry(registry)
        .start()
        .err()
        .expect("refused");
    assert!(error.to_string().contains("jemalloc_"), "{error}");
    assert!(
        error.to_string().contains("remove"),
        "says how to fix it: {error}"
    );
}
