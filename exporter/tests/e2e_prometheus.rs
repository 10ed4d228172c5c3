//! End to end: the demo binary scraped every second by a real Prometheus server, its exposition
//! checked by promtool.
mod support;

use std::time::Duration;

use support::{
    dashboards, generated_rules, get, promtool_check_metrics, require_tool, Demo, Prometheus,
    TempDir,
};

/// The demo's leak in this test, bytes per second: eight times the default, so that the sampled
/// estimate's slope over 30 s is a measurement rather than a handful of samples.
const LEAK_RATE: u64 = 256 * 1024;

#[test]
fn prometheus_scrapes_the_demo() {
    let (Some(prometheus), Some(promtool)) = (
        require_tool("prometheus", "prometheus"),
        require_tool("promtool", "prometheus"),
    ) else {
        return;
    };
    // Sampled mode (the demo's default, named here): per-scope estimates, not exact counts.
    let demo = Demo::start(
        &[
            "--tracking",
            "sampled",
            "--batch-every",
            "2",
            "--requests-per-sec",
            "400",
            "--leak-rate",
            &LEAK_RATE.to_string(),
        ],
        &[],
    );

    let scrape = get(demo.addr, "/metrics");
    assert_eq!(scrape.status, 200);
    if let Err(problems) = promtool_check_metrics(&promtool, &scrape.body) {
        panic!("promtool check metrics failed:\n{problems}");
    }

    // The repository's rules, evaluated every second instead of every minute, with a 10 s floor
    // window (the floor-growth panel reads its recording rule, which needs two windows of data).
    let rules_dir = TempDir::new("rules");
    let rules = generated_rules(
        &rules_dir,
        &["--group-interval", "1s", "--floor-window", "10s"],
    );
    let server = Prometheus::start(
        &prometheus,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: demo\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            demo.addr
        ),
    );
    let up = server.wait_for("up{job=\"demo\"} == 1", Duration::from_secs(60));
    assert_eq!(up[0]["value"][1], "1");

    for scope in ["cache", "requests", "batch", "lru", "unscoped", "exporter"] {
        server.wait_for(
            &format!("memory_scope_live_bytes{{job=\"demo\",scope=\"{scope}\"}}"),
            Duration::from_secs(30),
        );
    }
    let rate = server.wait_for(
        "rate(memory_scope_allocated_bytes_total{job=\"demo\",scope=\"requests\"}[5s]) > 0",
        Duration::from_secs(60),
    );
    let bytes_per_sec: f64 = rate[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(
        bytes_per_sec > 1000.0,
        "requests allocate: {bytes_per_sec} B/s"
    );

    // The leak grows: live bytes of `cache` rise between two scrapes a few seconds apart.
    let growth = server.wait_for(
        "delta(memory_scope_live_bytes{job=\"demo\",scope=\"cache\"}[5s]) > 0",
        Duration::from_secs(60),
    );
    assert!(!growth.is_empty());

    // Consistency of what Prometheus stored.
    server.wait_for(
        "jemalloc_resident_bytes{job=\"demo\"} >= ignoring() jemalloc_allocated_bytes{job=\"demo\"}",
        Duration::from_secs(10),
    );

    // Every panel of every dashboard returns data, with the template variables filled in as
    // Grafana would: this job and instance, all scopes, and Grafana's rate interval.
    let instance = demo.addr.to_string();
    for (file, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$job", "demo")
                    .replace("$instance", &instance)
                    .replace("$scope", ".*")
                    .replace("$__rate_interval", "5s");
                let result = server.wait_for(&expr, Duration::from_secs(30));
                assert!(
                    !result.is_empty(),
                    "{file} / {}: no data for {expr}",
                    panel["title"]
                );
            }
        }
    }
    server.wait_for(
        "memory_tracking_info{job=\"demo\",mode=\"sampled\",sample_interval_bytes=\"65536\"}",
        Duration::from_secs(10),
    );
    // The leak shows as steady growth of the sampled estimate: over 30 s of 1 s scrapes, its
    // slope is the leak's rate. At 256 KiB/s the 64 KiB sampler sees ~4 leaked bytes' samples a
    // second, ~120 in the window: the slope's noise is ~10 %, not the ~25 % (and a red full run,
    // 9.3 kB/s for 33 kB/s) of the default 32 KiB/s.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(35) {
        std::thread::sleep(Duration::from_secs(1));
    }
    let slope = server.wait_for(
        "deriv(memory_scope_live_bytes{job=\"demo\",scope=\"cache\"}[30s])",
        Duration::from_secs(10),
    );
    let bytes_per_sec: f64 = slope[0]["value"][1].as_str().unwrap().parse().unwrap();
    let expected = LEAK_RATE as f64;
    assert!(
        (0.6 * expected..1.5 * expected).contains(&bytes_per_sec),
        "cache grows steadily in sampled mode: {bytes_per_sec:.0} B/s over 30 s, leaking {expected} B/s"
    );

    // The rule files load and the recording rules evaluate.
    server.wait_for(
        "instance:jemalloc_fragmentation:ratio{job=\"demo\"}",
        Duration::from_secs(30),
    );
    server.wait_for(
        "instance_scope:memory_scope_live_bytes:deriv1h{scope=\"cache\"}",
        Duration::from_secs(30),
    );
}

/// The leak rate the demo prints is what its `cache` scope does, measured from the exporter's
/// own counters over ~10 s (exact mode, so the figure is not an estimate).
#[test]
fn the_demo_leaks_at_the_rate_it_prints() {
    let demo = Demo::start(&["--tracking", "exact", "--batch-every", "3600"], &[]);
    let printed_line = || {
        let lines = demo.output.lock().unwrap();
        lines
            .iter()
            .find(|l| l.contains("cache scope leaks"))
            .cloned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        match printed_line() {
            Some(line) => break line,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            None => panic!("no leak rate printed: {:?}", demo.output.lock().unwrap()),
        }
    };
    let printed: f64 = line
        .split_whitespace()
        .nth(4)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {line}"));
    let live = || {
        let samples = support::parse_exposition(&get(demo.addr, "/metrics").text());
        support::value_of(
            &samples,
            "memory_scope_live_bytes",
            Some(("scope", "cache")),
        )
        .unwrap()
    };
    std::thread::sleep(Duration::from_secs(1));
    let (first, start) = (live(), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let rate = (live() - first) / start.elapsed().as_secs_f64();
    assert!(
        (rate / printed - 1.0).abs() < 0.10,
        "the demo prints {printed} B/s and leaks {rate:.0} B/s"
    );
}
