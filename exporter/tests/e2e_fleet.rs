//! End to end, as continuous profilers see the demo: its profiles read by Go's own pprof
//! parser (the one Parca and Grafana Alloy call) with the sample types, period, default sample
//! type, labels and mappings those backends classify by; token files as Kubernetes mounts
//! them; and scrape loops that behave like Alloy's `pyroscope.scrape` and Parca's scraper
//! (their paths, parameters, headers, timeouts and checks), none of whose scrapes may fail.
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{get, request, try_request, Demo, GoPprof, Response, TempDir};

/// Go's heap profile sample types, in Go's order, as Pyroscope maps them to profile types.
fn sample_types(summary: &Value) -> Vec<String> {
    summary["sample_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}/{}",
                t["type"].as_str().unwrap(),
                t["unit"].as_str().unwrap()
            )
        })
        .collect()
}

/// Pyroscope's profile type ids (`memory:<type>:<unit>:<period type>:<period unit>`).
fn pyroscope_types(summary: &Value) -> Vec<String> {
    let period = &summary["period_type"];
    sample_types(summary)
        .iter()
        .map(|t| {
            format!(
                "memory:{}:{}:{}",
                t.replace('/', ":"),
                period["type"].as_str().unwrap(),
                period["unit"].as_str().unwrap()
            )
        })
        .collect()
}

fn inspect_one(go: &GoPprof, response: &Response) -> Value {
    assert_eq!(response.status, 200, "{}", response.text());
    go.inspect(&[&response.body])
        .unwrap_or_else(|e| panic!("Go's parser refused the profile: {e}"))
        .remove(0)
}

/// Waits until the demo's leak has put some sampled bytes in the `cache` scope.
fn wait_for_cache_samples(go: &GoPprof, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let summary = inspect_one(go, &get(addr, "/debug/pprof/heap"));
        if summary["labels"]["scope"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("cache")))
        {
            return;
        }
        assert!(Instant::now() < deadline, "no cache samples: {summary}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn profiles_read_by_gos_parser_as_parca_and_pyroscope_read_them() {
    let Some(go) = GoPprof::build() else { return };
    let demo = Demo::start(&[], &[]);
    let a = demo.addr;
    wait_for_cache_samples(&go, a);

    // /debug/pprof/allocs with cumulative counts (the demo runs with prof_accum:true), which
    // the status reports.
    let status: Value = serde_json::from_slice(&get(a, "/debug/pprof/status").body).unwrap();
    assert_eq!(status["cumulative_counts"], true);
    let allocs = get(a, "/debug/pprof/allocs");
    assert_eq!(
        allocs.header("content-type"),
        Some("application/octet-stream")
    );
    let summary = inspect_one(&go, &allocs);
    assert_eq!(
        sample_types(&summary),
        [
            "alloc_objects/count",
            "alloc_space/bytes",
            "inuse_objects/count",
            "inuse_space/bytes"
        ]
    );
    let types = pyroscope_types(&summary);
    assert!(types.contains(&"memory:inuse_space:bytes:space:bytes".to_owned()));
    assert!(types.contains(&"memory:alloc_space:bytes:space:bytes".to_owned()));
    assert_eq!(summary["period"], 524288);
    assert_eq!(summary["default_sample_type"], "alloc_space");
    let totals = &summary["totals"];
    assert!(
        totals["alloc_space"].as_i64().unwrap() >= totals["inuse_space"].as_i64().unwrap(),
        "everything live was allocated: {totals}"
    );
    let scopes = summary["labels"]["scope"].as_array().unwrap();
    for scope in ["cache", "requests", "lru"] {
        assert!(scopes.contains(&json!(scope)), "scope {scope}: {scopes:?}");
    }
    // The main mapping is the demo binary, with its GNU build id for offline symbolization.
    let main = &summary["mappings"][0];
    assert!(main["file"].as_str().unwrap().ends_with("/demo"), "{main}");
    let build_id = main["build_id"].as_str().unwrap();
    assert!(
        build_id.len() == 40 && build_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{main}"
    );
    assert_eq!(main["has_functions"], true);
    let functions = summary["functions"].as_array().unwrap();
    assert!(
        functions
            .iter()
            .any(|f| f.as_str().unwrap().contains("leak_sessions")),
        "the demo's leaking function is named"
    );

    // /debug/pprof/heap: the same types, live bytes first; gc= is accepted and ignored.
    let heap = inspect_one(&go, &get(a, "/debug/pprof/heap?gc=1"));
    assert_eq!(heap["default_sample_type"], "inuse_space");
    assert_eq!(sample_types(&heap), sample_types(&summary));

    // A delta scrape as Alloy sends it (seconds= interval - 1, repeated by its shared
    // parameter list): what was allocated during the window.
    let delta = inspect_one(&go, &get(a, "/debug/pprof/allocs?seconds=2&seconds=2"));
    assert_eq!(delta["default_sample_type"], "alloc_space");
    assert!(
        delta["totals"]["alloc_space"].as_i64().unwrap() > 0,
        "the demo allocates during any 2 s: {delta}"
    );
    assert!(
        delta["totals"]["alloc_space"].as_i64().unwrap() < totals["alloc_space"].as_i64().unwrap(),
        "a window holds less than the process's whole history"
    );

    // A second scraper's delta scrape during a window: 409 with Retry-After, at once.
    let window = std::thread::spawn(move || get(a, "/debug/pprof/allocs?seconds=3"));
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let refused = get(a, "/debug/pprof/allocs?seconds=3");
    let answered_in = asked.elapsed();
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert!(refused.header("retry-after").is_some());
    assert!(refused
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    println!("a second delta scrape during a window was refused in {answered_in:?}");
    assert_eq!(window.join().unwrap().status, 200);

    // Errors are never answered 200 (Alloy would take the text for a profile).
    for bad in [
        "/debug/pprof/allocs?seconds=0",
        "/debug/pprof/allocs?seconds=100000",
        "/debug/pprof/allocs?seconds=2&seconds=3",
        "/debug/pprof/allocs?debug=1",
    ] {
        let response = get(a, bad);
        assert_eq!(response.status, 400, "{bad}: {}", response.text());
    }
}

#[test]
fn without_cumulative_counts_profiles_carry_go_s_inuse_types_only() {
    let Some(go) = GoPprof::build() else { return };
    // The environment overrides the demo's embedded options (prof stays on).
    let demo = Demo::start(&[], &[("_RJEM_MALLOC_CONF", "prof_accum:false")]);
    let summary = inspect_one(&go, &get(demo.addr, "/debug/pprof/allocs"));
    assert_eq!(
        sample_types(&summary),
        ["inuse_objects/count", "inuse_space/bytes"]
    );
    assert_eq!(summary["default_sample_type"], "inuse_space");
    assert_eq!(
        summary["period_type"],
        json!({"type": "space", "unit": "bytes"})
    );
    let status: Value =
        serde_json::from_slice(&get(demo.addr, "/debug/pprof/status").body).unwrap();
    assert_eq!(status["cumulative_counts"], false);
}

#[test]
fn tokens_from_a_mounted_file_and_the_command_line_all_work_and_rotate() {
    let dir = TempDir::new("token-file");
    let file = dir.path().join("token");
    std::fs::write(&file, "profiler-sa-token\nsecond-scraper\n").unwrap();
    let demo = Demo::start(
        &[
            "--debug-token-file",
            file.to_str().unwrap(),
            "--debug-token",
            "operator",
        ],
        &[],
    );
    let status = |token: &str| {
        let header = format!("Bearer {token}");
        request(
            demo.addr,
            "GET",
            "/debug/pprof/status",
            &[("authorization", &header)],
        )
        .status
    };
    for token in ["profiler-sa-token", "second-scraper", "operator"] {
        assert_eq!(status(token), 200, "{token}");
    }
    assert_eq!(status("someone-else"), 401);
    assert_eq!(get(demo.addr, "/debug/pprof/status").status, 401);

    // Kubernetes rotates a mounted Secret by swapping the file: the new token works without a
    // restart (files are looked at once a second), the old one no longer does.
    let next = dir.path().join("token.next");
    std::fs::write(&next, "rotated-token\n").unwrap();
    std::fs::rename(&next, &file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status("rotated-token") != 200 {
        assert!(
            Instant::now() < deadline,
            "the rotated token was never accepted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status("profiler-sa-token"), 401);
    assert_eq!(status("operator"), 200);
}

/// A scraper as configured in `deploy/`: how it asks and what it accepts.
struct Scraper {
    name: &'static str,
    user_agent: &'static str,
    interval: Duration,
    /// The `seconds=` it sends for a delta profile, from its interval.
    delta_seconds: fn(Duration) -> u64,
    /// Its HTTP timeout for a scrape, from interval and `seconds=`.
    timeout: fn(Duration, Option<u64>) -> Duration,
    /// Whether it takes the answer as a profile (before parsing it).
    accepts: fn(&Response) -> Result<(), String>,
}

/// Grafana Alloy's `pyroscope.scrape`: `seconds` = interval - 1, timeout = scrape_timeout
/// (10 s) + interval - 1 s for a delta profile; any 2xx with a non-empty body whose
/// Content-Type is application/octet-stream and which does not look like HTML or JSON.
const ALLOY: Scraper = Scraper {
    name: "alloy",
    user_agent: "Alloy/v1.5.0 (linux; binary)",
    interval: Duration::from_secs(2),
    delta_seconds: |interval| interval.as_secs() - 1,
    timeout: |interval, seconds| {
        Duration::from_secs(10)
            + seconds.map_or(Duration::ZERO, |_| interval - Duration::from_secs(1))
    },
    accepts: |r| {
        if r.status / 100 != 2 {
            return Err(format!(
                "server returned HTTP status ({}) {}",
                r.status,
                r.text()
            ));
        }
        let content_type = r.header("content-type").unwrap_or("");
        if !content_type.starts_with("application/octet-stream") {
            return Err(format!("unexpected Content-Type {content_type}"));
        }
        let first = r.body.iter().find(|b| !b.is_ascii_whitespace());
        if matches!(first, Some(b'<' | b'{' | b'[')) {
            return Err("text response instead of pprof".into());
        }
        Ok(())
    },
};

/// Parca's scraper (User-Agent conprof/…): `seconds` = the whole interval for a delta
/// profile, timeout = its scrape_timeout (here the interval + 5 s); exactly 200, non-empty.
const PARCA: Scraper = Scraper {
    name: "parca",
    user_agent: "conprof/v0.23.1",
    interval: Duration::from_secs(1),
    delta_seconds: |interval| interval.as_secs(),
    timeout: |interval, _| interval + Duration::from_secs(5),
    accepts: |r| {
        if r.status != 200 {
            return Err(format!("server returned HTTP status {}", r.status));
        }
        if r.body.is_empty() {
            return Err("empty memory profile".into());
        }
        Ok(())
    },
};

/// What one scrape loop saw: failures (with the time) and the profiles it got.
struct Scraped {
    failures: Vec<String>,
    profiles: Vec<Vec<u8>>,
    slowest: Duration,
}

/// `scrapes` scrapes of `/debug/pprof/allocs` on the scraper's ticker, as its loop runs them:
/// one at a time, the next on the next tick (or at once, if the last one took longer).
fn scrape_loop(
    scraper: &Scraper,
    addr: SocketAddr,
    token: &str,
    delta: bool,
    scrapes: usize,
) -> Scraped {
    let seconds = delta.then(|| (scraper.delta_seconds)(scraper.interval));
    let target = match seconds {
        Some(s) => format!("/debug/pprof/allocs?seconds={s}"),
        None => "/debug/pprof/allocs".to_owned(),
    };
    let timeout = (scraper.timeout)(scraper.interval, seconds);
    let authorization = format!("Bearer {token}");
    let headers = [
        ("user-agent", scraper.user_agent),
        ("authorization", authorization.as_str()),
        ("accept-encoding", "gzip"),
    ];
    let mut scraped = Scraped {
        failures: Vec::new(),
        profiles: Vec::new(),
        slowest: Duration::ZERO,
    };
    let start = Instant::now();
    for n in 0..scrapes {
        let tick = start + scraper.interval * n as u32;
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        let began = Instant::now();
        let outcome = try_request(addr, "GET", &target, &headers, timeout)
            .and_then(|r| (scraper.accepts)(&r).map(|()| r));
        scraped.slowest = scraped.slowest.max(began.elapsed());
        match outcome {
            Ok(response) => scraped.profiles.push(response.body),
            Err(e) => scraped.failures.push(format!(
                "{} scrape {n} ({target}) at {:?}: {e}",
                scraper.name,
                began - start
            )),
        }
    }
    scraped
}

#[test]
fn alloy_and_parca_scrape_loops_never_fail() {
    let Some(go) = GoPprof::build() else { return };
    let dir = TempDir::new("scrapers");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "scraper-token\n").unwrap();
    let demo = Demo::start(&["--debug-token-file", token_file.to_str().unwrap()], &[]);
    let a = demo.addr;

    // Both scrapers' memory profiles at once (their default: no delta), 10 scrapes each,
    // then each one's delta profiles, 10 each: a pod is delta-scraped by one profiler.
    let (alloy, parca) = std::thread::scope(|s| {
        let alloy = s.spawn(|| scrape_loop(&ALLOY, a, "scraper-token", false, 10));
        let parca = s.spawn(|| scrape_loop(&PARCA, a, "scraper-token", false, 10));
        (alloy.join().unwrap(), parca.join().unwrap())
    });
    let alloy_delta = scrape_loop(&ALLOY, a, "scraper-token", true, 10);
    let parca_delta = scrape_loop(&PARCA, a, "scraper-token", true, 10);

    let mut failures = Vec::new();
    for (what, scraped) in [
        ("alloy", &alloy),
        ("parca", &parca),
        ("alloy delta", &alloy_delta),
        ("parca delta", &parca_delta),
    ] {
        println!(
            "{what}: {} profiles, {} failures, slowest scrape {:?}",
            scraped.profiles.len(),
            scraped.failures.len(),
            scraped.slowest
        );
        failures.extend(scraped.failures.iter().cloned());
        // Every answer parses with Go's parser, as the scraper's next step does.
        let bodies: Vec<&[u8]> = scraped.profiles.iter().map(Vec::as_slice).collect();
        let summaries = go
            .inspect(&bodies)
            .unwrap_or_else(|e| panic!("{what}: Go's parser refused a profile: {e}"));
        assert!(summaries
            .iter()
            .all(|s| s["default_sample_type"] == "alloc_space"));
    }
    assert!(
        failures.is_empty(),
        "failed scrapes:\n{}",
        failures.join("\n")
    );
}
