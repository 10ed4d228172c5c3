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
    // One reading for the whole scrape: the unattributed bytes are exactly what is left.
    let scoped: f64 = samples
        .iter()
        .filter(|s| s.name == "memory_scope_live_bytes")
        .map(|s| s.value)
        .sum();
    let left = v("jemalloc_allocated_bytes")
        - scoped
        - v("jemalloc_tcache_bytes")
        - v("memory_tracking_overhead_bytes");
    assert_eq!(v("memory_unattributed_bytes"), left.max(0.0));
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
    let cause = std::error::Error::source(&error).expect("the OS error is its source");
    assert_eq!(
        cause.downcast_ref::<std::io::Error>().map(|e| e.kind()),
        Some(std::io::ErrorKind::AddrInUse)
    );

    // An address this host does not have (TEST-NET-1) is another fault, named as such.
    let error = exporter::Exporter::builder()
        .listen("192.0.2.1:9464".parse().unwrap())
        .start()
        .err()
        .expect("not an address of this host");
    let message = error.to_string();
    assert!(!message.contains("already in use"), "{message}");
    assert!(message.contains("Check the address"), "{message}");
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

/// What the builder is told reaches what it configures: the profiler's limits and automatic
/// dumps (the status reports them), collectors added to the handle's registry (served on
/// `/metrics`), and the refresh task's interval (its timestamp moves between scrapes).
#[test]
fn builder_settings_reach_what_they_configure() {
    let dir = support::TempDir::new("builder-settings");
    let exporter = exporter::Exporter::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .refresh_interval(Duration::from_millis(20))
        .debug_routes(true)
        .dump_dir(dir.path())
        .dump_limits(exporter::DumpLimits {
            max_count: 3,
            max_bytes: 5 << 20,
        })
        .auto_dump(exporter::AutoDump {
            growth_bytes: Some(64 << 20),
            cooldown: Duration::from_secs(90),
            ..exporter::AutoDump::default()
        })
        .max_profile_seconds(42)
        .start()
        .unwrap();
    let a = exporter.local_addr();
    let status: serde_json::Value =
        serde_json::from_str(&get(a, "/debug/pprof/status").text()).unwrap();
    assert_eq!(status["dump_dir"], dir.path().to_str().unwrap(), "{status}");
    assert_eq!(status["max_dumps"], 3, "{status}");
    assert_eq!(status["max_dump_bytes"], 5 << 20, "{status}");
    assert_eq!(status["max_seconds"], 42, "{status}");
    assert_eq!(
        status["auto_dump"],
        "Allocated +67108864 bytes since the last dump, at most every 90 s"
    );

    let mine = prometheus::IntGauge::new("app_added_later", "Added to the handle's registry.");
    let mine = mine.unwrap();
    mine.set(7);
    exporter.registry().register(Box::new(mine)).unwrap();
    let samples = parse_exposition(&get(a, "/metrics").text());
    assert_eq!(value_of(&samples, "app_added_later", None), Some(7.0));

    // A scrape takes a reading of its own; only the refresh task moves this timestamp.
    let last_refresh = || {
        let samples = parse_exposition(&get(a, "/metrics").text());
        value_of(
            &samples,
            "memory_exporter_last_refresh_timestamp_seconds",
            None,
        )
        .unwrap()
    };
    let first = last_refresh();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while last_refresh() == first {
        assert!(
            std::time::Instant::now() < deadline,
            "no refresh in 30 s with a 20 ms interval"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    exporter.shutdown();
}

/// Token files guard their routes as literal tokens do: `/metrics` with the metrics file's
/// token, `/debug/*` with the debug file's, each refusing the other's.
#[test]
fn token_files_guard_metrics_and_debug_routes() {
    let dir = support::TempDir::new("token-files");
    let metrics_file = dir.path().join("metrics-token");
    let debug_file = dir.path().join("debug-token");
    std::fs::write(&metrics_file, "scraper-token\n").unwrap();
    std::fs::write(&debug_file, "operator-token\n").unwrap();
    let exporter = exporter::Exporter::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .debug_routes(true)
        .metrics_token_file(&metrics_file)
        .debug_token_file(&debug_file)
        .start()
        .unwrap();
    let a = exporter.local_addr();
    let status = |target: &str, token: Option<&str>| {
        let header = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("authorization", h.as_str()))
            .collect();
        request(a, "GET", target, &headers).status
    };
    for (target, right, wrong) in [
        ("/metrics", "scraper-token", "operator-token"),
        ("/debug/pprof/status", "operator-token", "scraper-token"),
    ] {
        assert_eq!(status(target, None), 401, "{target} without a token");
        assert_eq!(status(target, Some(wrong)), 401, "{target} with {wrong}");
        assert_eq!(status(target, Some(right)), 200, "{target} with {right}");
    }
    exporter.shutdown();
}

/// `max_connections(1)`: while one connection is open, the next waits in the accept queue
/// (unanswered), and is served once the first closes.
#[test]
fn connections_past_the_limit_wait_their_turn() {
    use std::io::{Read, Write};
    let exporter = exporter::Exporter::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .max_connections(1)
        .start()
        .unwrap();
    let a = exporter.local_addr();
    let held = std::net::TcpStream::connect(a).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // accepted: it holds the one permit
    let mut waiting = std::net::TcpStream::connect(a).unwrap();
    waiting
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut first = [0u8; 1];
    let early = waiting.read(&mut first);
    assert!(
        early.is_err(),
        "served while the only connection allowed was open: {early:?}"
    );
    drop(held);
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut response = Vec::new();
    waiting.read_to_end(&mut response).unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response[..response.len().min(200)])
    );
    exporter.shutdown();
}
