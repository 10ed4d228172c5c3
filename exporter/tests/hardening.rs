//! Hardening: debug routes off by default and behind tokens, limits on URLs, headers, bodies
//! and slow clients, a scrape storm beside idle connections, and faults that must not take the
//! service down (dump directory problems, a panicking release probe, shutdown mid-profile).
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::{get, parse_exposition, request, value_of, TempDir};

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

/// Profiling on from start-up, so the debug routes work in this test binary.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 45] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

/// Tests that change jemalloc's process-wide profiling state run one at a time.
static PROFILING: Mutex<()> = Mutex::new(());

fn builder() -> exporter::ExporterBuilder {
    exporter::Exporter::builder().listen("127.0.0.1:0".parse().unwrap())
}

fn debug_exporter(dir: &TempDir) -> exporter::ExporterHandle {
    builder()
        .debug_routes(true)
        .dump_dir(dir.path())
        .start()
        .unwrap()
}

/// What a builder left at its defaults binds: loopback, port 9464. (If another process holds
/// the port, the bind error still names that address.)
#[test]
fn the_default_builder_binds_loopback_9464() {
    match exporter::Exporter::builder().start() {
        Ok(exporter) => {
            assert_eq!(exporter.local_addr(), "127.0.0.1:9464".parse().unwrap());
            exporter.shutdown();
        }
        Err(e) => assert!(e.to_string().contains("127.0.0.1:9464"), "{e}"),
    }
}

#[test]
fn debug_routes_are_off_by_default_and_bind_loopback() {
    assert_eq!(exporter::DEFAULT_LISTEN.ip().to_string(), "127.0.0.1");
    let exporter = builder().start().unwrap();
    let response = get(exporter.local_addr(), "/debug/pprof/heap");
    assert_eq!(response.status, 404);
    assert!(
        response.text().contains("debug_routes(true)"),
        "{}",
        response.text()
    );
    assert!(!get(exporter.local_addr(), "/")
        .text()
        .contains("/debug/pprof/heap"));
}

#[test]
fn tokens_guard_debug_routes_and_metrics() {
    let dir = TempDir::new("tokens");
    let exporter = builder()
        .debug_routes(true)
        .dump_dir(dir.path())
        .debug_token("debug-s3cret")
        .metrics_token("metrics-s3cret")
        .start()
        .unwrap();
    let a = exporter.local_addr();
    for (target, token) in [
        ("/debug/pprof/status", "debug-s3cret"),
        ("/metrics", "metrics-s3cret"),
    ] {
        for header in [
            None,
            Some("Bearer wrong"),
            Some("Basic Zm9vOmJhcg=="),
            Some("Bearer "),
        ] {
            let headers: Vec<(&str, &str)> =
                header.map(|h| ("Authorization", h)).into_iter().collect();
            let response = request(a, "GET", target, &headers);
            assert_eq!(response.status, 401, "{target} with {header:?}");
            assert_eq!(
                response.header("www-authenticate"),
                Some("Bearer realm=\"memory-exporter\"")
            );
            assert!(response.text().contains("Authorization: Bearer"));
        }
        let bearer = format!("Bearer {token}");
        let ok = request(a, "GET", target, &[("Authorization", &bearer)]);
        assert_eq!(ok.status, 200, "{target}: {}", ok.text());
    }
    // The debug token does not open /metrics, nor the other way round.
    let crossed = request(
        a,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer debug-s3cret")],
    );
    assert_eq!(crossed.status, 401);
    let metrics = request(
        a,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer metrics-s3cret")],
    );
    let samples = parse_exposition(&metrics.text());
    // Four refused scrapes above, and the crossed token.
    let refused = value_of(
        &samples,
        "memory_exporter_scrapes_total",
        Some(("code", "401")),
    );
    assert_eq!(refused, Some(5.0));
}

#[test]
fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let exporter = builder().start().unwrap();
    let a = exporter.local_addr();
    let long_url = format!("/metrics?{}", "x".repeat(64 * 1024));
    let response = request(a, "GET", &long_url, &[]);
    // The request line and headers share one 16 KiB buffer: 431, as the README says.
    assert_eq!(response.status, 431, "long URL");
    let big_header = "y".repeat(64 * 1024);
    let response = request(a, "GET", "/metrics", &[("X-Big", &big_header)]);
    assert_eq!(response.status, 431, "big header");
    let many: Vec<(String, String)> = (0..200)
        .map(|i| (format!("X-H{i}"), "v".repeat(100)))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let response = request(a, "GET", "/metrics", &many);
    assert_eq!(response.status, 431, "many headers");
    assert_eq!(get(a, "/metrics").status, 200, "still serving");
}

#[test]
fn slow_clients_are_disconnected() {
    let exporter = builder()
        .header_read_timeout(Duration::from_millis(300))
        .start()
        .unwrap();
    let mut slow = TcpStream::connect(exporter.local_addr()).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap(); // never finishes
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf); // returns when the server closes the connection
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "the slow client was held {waited:?}"
    );
    assert_eq!(get(exporter.local_addr(), "/metrics").status, 200);
}

/// 300 idle connections that never send a request stay open while 3,000 scrapes run 32 at a
/// time: every scrape succeeds, and the exporter's memory returns to where it was. (Their
/// latency is a benchmark's: `http_scrape` in `bench/benches/exporter_scrape.rs`.)
#[test]
fn scrape_storm_beside_idle_connections() {
    let exporter = builder().start().unwrap();
    let a = exporter.local_addr();
    let exporter_bytes = || {
        let samples = parse_exposition(&get(a, "/metrics").text());
        value_of(
            &samples,
            "memory_scope_live_bytes",
            Some(("scope", "exporter")),
        )
        .unwrap()
    };
    let before = exporter_bytes();
    let idle: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(a).unwrap()).collect();
    let succeeded = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..32 {
            s.spawn(|| {
                for _ in 0..3000 / 32 + 1 {
                    let response = get(a, "/metrics");
                    if response.status == 200 && response.body.len() > 1000 {
                        succeeded.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap().push(response.status);
                    }
                }
            });
        }
    });
    let succeeded = succeeded.into_inner();
    let failures = failures.into_inner().unwrap();
    let during = exporter_bytes();
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let after = exporter_bytes();
    eprintln!(
        "scrape storm: {succeeded} ok / {} total; exporter scope {before} B before, {during} B with 300 idle connections, {after} B after",
        succeeded + failures.len(),
    );
    assert!(failures.is_empty(), "failed scrapes: {failures:?}");
    assert!(succeeded >= 3000, "{succeeded} scrapes");
    assert!(
        during - before < 32.0 * 1024.0 * 1024.0,
        "bounded with idle connections: {before} -> {during}"
    );
    assert!(
        after - before < 1024.0 * 1024.0,
        "memory returns: {before} -> {after}"
    );
}

#[test]
fn dump_directory_faults_are_reported_and_the_service_keeps_running() {
    let _serial = PROFILING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("faults");
    let missing = dir.path().join("does-not-exist");
    let not_a_dir = dir.path().join("a-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    for (path, cause) in [(&missing, "missing"), (&not_a_dir, "not a directory")] {
        let exporter = builder().debug_routes(true).dump_dir(path).start().unwrap();
        let a = exporter.local_addr();
        let response = request(a, "POST", "/debug/pprof/dumps", &[]);
        assert_eq!(response.status, 500, "{}", response.text());
        assert!(response.text().contains(cause), "{}", response.text());
        assert!(
            response.text().contains("dump_dir"),
            "names the setting: {}",
            response.text()
        );
        let samples = parse_exposition(&get(a, "/metrics").text());
        let errors = samples.iter().find(|s| {
            s.name == "jemalloc_prof_dumps_total"
                && s.labels.contains(&("result".into(), "error".into()))
                && s.labels.contains(&("trigger".into(), "manual".into()))
        });
        assert_eq!(errors.map(|s| s.value), Some(1.0));
        // The live heap does not need the dump directory.
        assert_eq!(get(a, "/debug/pprof/heap?format=collapsed").status, 200);
    }
}

/// Mounts a small tmpfs at `dir` with `options`, unmounted on drop; `None` without the privilege.
struct Tmpfs<'a>(&'a std::path::Path);

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a std::path::Path, options: &str) -> Option<Tmpfs<'a>> {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output();
        if mounted.as_ref().is_ok_and(|o| o.status.success()) {
            return Some(Tmpfs(dir));
        }
        let message = format!("cannot mount a tmpfs here (needs root): {mounted:?}");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message} (CI=true: the full and read-only dump directory tests may not be skipped)");
        }
        eprintln!("SKIPPED: {message}");
        None
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

/// A full dump directory (a 64 KiB tmpfs filled up) and a read-only one: 500 naming the cause.
/// Needs root to mount; skipped otherwise.
#[test]
fn full_and_read_only_dump_directories_are_reported() {
    let _serial = PROFILING.lock().unwrap_or_else(|e| e.into_inner());
    let (full, read_only) = (TempDir::new("full"), TempDir::new("read-only"));
    let Some(_full) = Tmpfs::mount(full.path(), "size=64k") else {
        return;
    };
    let Some(_read_only) = Tmpfs::mount(read_only.path(), "ro,size=64k") else {
        return;
    };
    // Fails part-way: the disk is full.
    let _ = std::fs::write(full.path().join("filler"), vec![0u8; 128 * 1024]);
    for (dir, cause) in [
        (&full, "the disk is full"),
        (&read_only, "the file system is read-only"),
    ] {
        let exporter = builder()
            .debug_routes(true)
            .dump_dir(dir.path())
            .start()
            .unwrap();
        let response = request(exporter.local_addr(), "POST", "/debug/pprof/dumps", &[]);
        assert_eq!(response.status, 500, "{}", response.text());
        assert!(response.text().contains(cause), "{}", response.text());
        assert_eq!(get(exporter.local_addr(), "/metrics").status, 200);
    }
}

/// A mallctl that fails inside jemalloc (`prof.dump` to a path that is a directory) becomes an
/// error naming the file, not a crash; the profiling routes keep working afterwards.
#[test]
fn a_failing_mallctl_is_reported() {
    let _serial = PROFILING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("mallctl");
    let target = dir.path().join("taken.heap");
    std::fs::create_dir(&target).unwrap();
    let error = exporter::profiling::ctl::dump_to(&target).unwrap_err();
    assert_eq!(error.status(), 500);
    assert!(
        error
            .to_string()
            .contains("could not write the heap profile"),
        "{error}"
    );
    assert!(error.to_string().contains("taken.heap"), "{error}");
    let exporter = debug_exporter(&dir);
    assert_eq!(
        get(exporter.local_addr(), "/debug/pprof/heap?format=collapsed").status,
        200
    );
}

#[test]
fn a_panicking_release_probe_is_reported_not_fatal() {
    let dir = TempDir::new("probe");
    let exporter = debug_exporter(&dir);
    exporter::register_release("explodes", || panic!("cache lock poisoned")).unwrap();
    let response = request(
        exporter.local_addr(),
        "POST",
        "/debug/memory/release?probe=explodes",
        &[],
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(
        response
            .text()
            .contains("the probe panicked: cache lock poisoned"),
        "{}",
        response.text()
    );
    assert_eq!(get(exporter.local_addr(), "/metrics").status, 200);
    assert!(exporter::register_release("bad name/../x", || ()).is_err());
}

#[test]
fn shutdown_during_a_timed_profile_restores_sampling() {
    let _serial = PROFILING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("shutdown");
    let exporter = debug_exporter(&dir);
    let a: SocketAddr = exporter.local_addr();
    assert_eq!(
        request(a, "POST", "/debug/pprof/heap/deactivate", &[]).status,
        200
    );
    let client = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(a).unwrap();
        stream
            .write_all(b"GET /debug/pprof/heap?seconds=60 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    std::thread::sleep(Duration::from_millis(500));
    let status: serde_json::Value =
        serde_json::from_slice(&get(a, "/debug/pprof/status").body).unwrap();
    assert_eq!(
        status["profiling_active"], true,
        "sampling during the timed profile"
    );
    let started = Instant::now();
    exporter.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    client.join().unwrap();
    // SAFETY: `prof.active` is a bool.
    let active = unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"prof.active\0") }.unwrap();
    assert!(
        !active,
        "the state before the timed profile (inactive) is restored"
    );
    // Leave sampling on for the other tests.
    // SAFETY: as above.
    unsafe { tikv_jemalloc_ctl::raw::write::<bool>(b"prof.active\0", true) }.unwrap();
}
