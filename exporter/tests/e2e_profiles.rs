//! End to end: heap profiles from the running demo, read by the real `go tool pprof` and
//! `jeprof`; timed, stored, diffed and automatic dumps; release probes; every bad parameter.
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{get, parse_exposition, request, require_tool, value_of, Demo, TempDir};

/// `go tool pprof -top` of a profile; panics with its output if it cannot read it.
fn pprof_top(go: &Path, profile: &[u8], dir: &TempDir, name: &str) -> String {
    let file = dir.path().join(name);
    std::fs::write(&file, profile).unwrap();
    let out = Command::new(go)
        .args([
            "tool",
            "pprof",
            "-top",
            "-symbolize=none",
            "-sample_index=inuse_space",
        ])
        .arg(&file)
        .env("HOME", dir.path())
        .output()
        .expect("go tool pprof runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "go tool pprof could not read {name}:\n{text}"
    );
    text
}

fn pprof_traces(go: &Path, file: &Path, dir: &TempDir) -> String {
    pprof_with(go, &["-traces"], file, dir)
}

/// `go tool pprof -symbolize=none <flags> file`'s output; panics if it fails.
fn pprof_with(go: &Path, flags: &[&str], file: &Path, dir: &TempDir) -> String {
    let out = Command::new(go)
        .args(["tool", "pprof", "-symbolize=none"])
        .args(flags)
        .arg(file)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dumps_counted(metrics: &[support::Sample], trigger: &str, result: &str) -> f64 {
    metrics
        .iter()
        .find(|s| {
            s.name == "jemalloc_prof_dumps_total"
                && s.labels.contains(&("trigger".into(), trigger.into()))
                && s.labels.contains(&("result".into(), result.into()))
        })
        .map_or(0.0, |s| s.value)
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[test]
fn profiles_are_read_by_go_tool_pprof_and_jeprof() {
    let (Some(go), Some(jeprof)) = (
        require_tool("go", "golang-go"),
        require_tool("jeprof", "libjemalloc-dev"),
    ) else {
        return;
    };
    let dumps = TempDir::new("dumps");
    let demo = Demo::start(
        &[
            "--batch-every",
            "1",
            "--dump-dir",
            dumps.path().to_str().unwrap(),
        ],
        &[],
    );
    let a = demo.addr;
    std::thread::sleep(Duration::from_secs(2));
    let work = TempDir::new("pprof");

    // The live heap as pprof: readable, symbolized in-process, the demo's own frames visible.
    let heap = get(a, "/debug/pprof/heap");
    assert_eq!(heap.status, 200, "{}", heap.text());
    assert_eq!(&heap.body[..2], &[0x1f, 0x8b], "gzipped");
    let top = pprof_top(&go, &heap.body, &work, "heap.pb.gz");
    assert!(top.contains("Type: inuse_space"), "{top}");
    // Go's name for it, as Parca and Grafana Alloy request it by default (with gc=).
    let allocs = get(a, "/debug/pprof/allocs?gc=1");
    assert_eq!(allocs.status, 200, "{}", allocs.text());
    assert_eq!(
        allocs.header("content-type"),
        Some("application/octet-stream")
    );
    pprof_top(&go, &allocs.body, &work, "allocs.pb.gz");
    let traces = pprof_traces(&go, &work.path().join("heap.pb.gz"), &work);
    assert!(traces.contains("demo::"), "no demo:: frames in\n{traces}");
    assert!(
        top.contains("Build ID:"),
        "mappings carry build ids:\n{top}"
    );

    // jemalloc's raw dump, read by jeprof with the binary.
    let raw = get(a, "/debug/pprof/heap?format=jeprof");
    assert_eq!(raw.status, 200);
    assert!(
        raw.text().starts_with("heap_v2/524288\n"),
        "{}",
        &raw.text()[..40]
    );
    let raw_file = work.path().join("heap.txt");
    std::fs::write(&raw_file, &raw.body).unwrap();
    let binary = support::demo_binary();
    let out = Command::new(&jeprof)
        .arg("--text")
        .arg(&binary)
        .arg(&raw_file)
        .output()
        .unwrap();
    let jeprof_text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && jeprof_text.contains("Total:"),
        "jeprof: {jeprof_text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Flamegraph and folded stacks.
    let svg = get(a, "/debug/pprof/heap?format=svg");
    assert_eq!(svg.header("content-type"), Some("image/svg+xml"));
    let svg_text = svg.text();
    assert!(svg_text.contains("<svg") && svg_text.trim_end().ends_with("</svg>"));
    assert!(
        svg_text.contains("demo::"),
        "the flamegraph names demo frames"
    );
    let folded = get(a, "/debug/pprof/heap?format=collapsed").text();
    let line = folded.lines().next().expect("some folded stack");
    let (_, bytes) = line.rsplit_once(' ').unwrap();
    assert!(bytes.parse::<u64>().unwrap() > 0, "{line}");

    // A timed profile, and a second request while it runs: 409 with Retry-After.
    let timed = std::thread::spawn(move || get(a, "/debug/pprof/heap?seconds=2"));
    std::thread::sleep(Duration::from_millis(500));
    let busy = get(a, "/debug/pprof/heap");
    assert_eq!(busy.status, 409, "{}", busy.text());
    // Retry-After is the running profile's remaining time, rounded up: ~2.5 s of the 2 s window
    // plus its 1 s rendering allowance, 0.5 s in.
    let retry_after: u64 = busy.header("retry-after").unwrap().parse().unwrap();
    assert!((2..=3).contains(&retry_after), "Retry-After: {retry_after}");
    assert!(busy.text().contains("one runs at a time"));
    let timed = timed.join().unwrap();
    assert_eq!(timed.status, 200, "{}", timed.text());
    pprof_top(&go, &timed.body, &work, "timed.pb.gz");
    let status = json(&get(a, "/debug/pprof/status").body);
    assert_eq!(
        status["profiling_active"], true,
        "the previous state (active) is restored"
    );
    assert_eq!(status["busy"], false);

    // Stored dumps: taken, listed, read back in every format, and diffed against.
    let stored = request(a, "POST", "/debug/pprof/dumps", &[]);
    assert_eq!(stored.status, 201, "{}", stored.text());
    let id = json(&stored.body)["id"].as_str().unwrap().to_owned();
    let listed = json(&get(a, "/debug/pprof/dumps").body);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["id"] == id.as_str() && d["trigger"] == "manual"));
    let dump = get(a, &format!("/debug/pprof/dumps/{id}"));
    pprof_top(&go, &dump.body, &work, "stored.pb.gz");
    assert!(get(a, &format!("/debug/pprof/dumps/{id}?format=jeprof"))
        .text()
        .starts_with("heap_v2/"));
    std::thread::sleep(Duration::from_secs(2)); // the cache leaks meanwhile
    let diff = get(a, &format!("/debug/pprof/heap?base={id}"));
    assert_eq!(diff.status, 200, "{}", diff.text());
    pprof_top(&go, &diff.body, &work, "diff.pb.gz");
    let diff_folded = get(a, &format!("/debug/pprof/heap?base={id}&format=collapsed")).text();
    let full_folded = get(a, "/debug/pprof/heap?format=collapsed").text();
    let total = |folded: &str| -> u64 {
        folded
            .lines()
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    };
    assert!(
        total(&diff_folded) < total(&full_folded),
        "a diff holds less than the whole heap"
    );
    let metrics = parse_exposition(&get(a, "/metrics").text());
    assert_eq!(dumps_counted(&metrics, "manual", "ok"), 1.0);
    assert_eq!(dumps_counted(&metrics, "manual", "error"), 0.0);
}

/// Every sample of a heap profile carries its owner's scope as a pprof label, in both tracking
/// modes: `-tagfocus=scope=cache` keeps the leak's stacks and nothing of the `lru` page cache.
#[test]
fn heap_profiles_are_labelled_by_scope_in_both_modes() {
    let Some(go) = require_tool("go", "golang-go") else {
        return;
    };
    for mode in ["exact", "sampled"] {
        let demo = Demo::start(
            &[
                "--tracking",
                mode,
                "--leak-rate",
                "4000000",
                "--batch-every",
                "3600",
            ],
            &[],
        );
        let metrics = parse_exposition(&get(demo.addr, "/metrics").text());
        let info = metrics
            .iter()
            .find(|s| s.name == "memory_tracking_info")
            .expect("memory_tracking_info");
        assert!(
            info.labels.contains(&("mode".into(), mode.into())),
            "{info:?}"
        );
        std::thread::sleep(Duration::from_secs(3));
        let work = TempDir::new("labels");
        let heap = get(demo.addr, "/debug/pprof/heap");
        assert_eq!(heap.status, 200, "{}", heap.text());
        let file = work.path().join("heap.pb.gz");
        std::fs::write(&file, &heap.body).unwrap();

        let tags = pprof_with(&go, &["-tags"], &file, &work);
        assert!(
            tags.contains("scope:") && tags.contains("cache"),
            "{mode}: {tags}"
        );
        let cache = pprof_with(&go, &["-traces", "-tagfocus=scope=cache"], &file, &work);
        assert!(
            cache.contains("leak_sessions"),
            "{mode}: the leak's stacks\n{cache}"
        );
        assert!(
            !cache.contains("render"),
            "{mode}: no lru stacks under cache\n{cache}"
        );
        let lru = pprof_with(&go, &["-traces", "-tagfocus=scope=lru"], &file, &work);
        assert!(
            !lru.contains("leak_sessions"),
            "{mode}: no cache stacks under lru\n{lru}"
        );

        // Flamegraphs start from the scope; jeprof's text never sees the pseudo-frame.
        let folded = get(demo.addr, "/debug/pprof/heap?format=collapsed").text();
        assert!(
            folded.lines().any(|l| l.starts_with("[scope cache];")),
            "{mode}: {folded}"
        );
        let raw = get(demo.addr, "/debug/pprof/heap?format=jeprof").text();
        assert!(
            !raw.contains("0x5c09e"),
            "{mode}: a scope frame reached jeprof's text"
        );
    }
}

#[test]
fn bad_parameters_get_4xx_with_a_message() {
    let demo = Demo::start(&[], &[]);
    let a = demo.addr;
    let cases: &[(&str, &str, u16, &str)] = &[
        (
            "GET",
            "/debug/pprof/heap?seconds=abc",
            400,
            "whole number of seconds",
        ),
        ("GET", "/debug/pprof/heap?seconds=-1", 400, "from 1 to 300"),
        ("GET", "/debug/pprof/heap?seconds=0", 400, "from 1 to 300"),
        ("GET", "/debug/pprof/heap?seconds=301", 400, "from 1 to 300"),
        (
            "GET",
            "/debug/pprof/heap?seconds=99999999999999999999999",
            400,
            "whole number",
        ),
        ("GET", "/debug/pprof/heap?format=xml", 400, "format=pprof"),
        (
            "GET",
            "/debug/pprof/heap?base=..%2F..%2Fetc%2Fpasswd",
            400,
            "not a dump id",
        ),
        (
            "GET",
            "/debug/pprof/heap?base=1-manual",
            404,
            "no stored dump",
        ),
        (
            "GET",
            "/debug/pprof/heap?seconds=1&base=1-manual",
            400,
            "not both",
        ),
        ("GET", "/debug/pprof/heap?nope=1", 400, "unknown parameter"),
        ("GET", "/debug/pprof/heap?seconds=1&seconds=2", 400, "twice"),
        (
            "GET",
            "/debug/pprof/heap?format=%zz",
            400,
            "percent-encoding",
        ),
        (
            "GET",
            "/debug/pprof/dumps/..%2f..%2fetc",
            400,
            "not a dump id",
        ),
        ("GET", "/debug/pprof/dumps/not-an-id", 400, "not a dump id"),
        ("GET", "/debug/pprof/dumps/1-manual", 404, "no stored dump"),
        (
            "GET",
            "/debug/pprof/dumps/1-manual?format=gif",
            400,
            "unknown format",
        ),
        ("GET", "/debug/pprof/dumps/a/b", 404, "no route"),
        ("POST", "/debug/pprof/heap", 405, "use GET"),
        ("GET", "/debug/pprof/heap/activate", 405, "use POST"),
        ("DELETE", "/debug/pprof/dumps", 405, "use GET or POST"),
        (
            "POST",
            "/debug/memory/release?probe=nope",
            404,
            "no release probe",
        ),
        (
            "POST",
            "/debug/memory/release?probe=..%2Fx",
            400,
            "not a probe name",
        ),
        ("POST", "/debug/pprof/status", 405, "use GET"),
        ("GET", "/debug/nothing", 404, "no route"),
    ];
    for (method, target, status, message) in cases {
        let response = request(a, method, target, &[]);
        assert_eq!(
            response.status,
            *status,
            "{method} {target}: {}",
            response.text()
        );
        assert!(
            response.text().contains(message),
            "{method} {target}: {:?} lacks {message:?}",
            response.text()
        );
    }
    // A body on a POST route is refused, never buffered.
    let with_body = request(a, "POST", "/debug/pprof/dumps", &[("Content-Length", "5")]);
    assert_eq!(with_body.status, 413, "{}", with_body.text());
}

#[test]
fn profiling_disabled_by_environment_answers_with_the_fix() {
    let demo = Demo::start(&[], &[("_RJEM_MALLOC_CONF", "prof:false")]);
    for (method, target) in [
        ("GET", "/debug/pprof/heap"),
        ("GET", "/debug/pprof/heap?seconds=1"),
        ("POST", "/debug/pprof/heap/activate"),
        ("POST", "/debug/pprof/dumps"),
    ] {
        let response = request(demo.addr, method, target, &[]);
        assert_eq!(response.status, 501, "{target}: {}", response.text());
        assert!(
            response.text().contains("_RJEM_MALLOC_CONF=prof:true"),
            "{}",
            response.text()
        );
        assert!(
            response.text().contains("MALLOC_CONF"),
            "{}",
            response.text()
        );
    }
    let status = json(&get(demo.addr, "/debug/pprof/status").body);
    assert_eq!(status["profiling_compiled"], true);
    assert_eq!(status["profiling_enabled"], false);
    assert!(status["hint"].as_str().unwrap().contains("prof:true"));
    let metrics = parse_exposition(&get(demo.addr, "/metrics").text());
    assert_eq!(
        value_of(&metrics, "jemalloc_profiling_enabled", None),
        Some(0.0)
    );
}

#[test]
fn automatic_dumps_fire_on_growth_and_the_ring_evicts() {
    let dumps = TempDir::new("auto");
    let demo = Demo::start(
        &[
            "--dump-dir",
            dumps.path().to_str().unwrap(),
            "--auto-dump-growth",
            "1000000",
            "--auto-dump-cooldown",
            "0",
            "--dump-max-count",
            "2",
            "--refresh-interval",
            "100",
            "--leak-rate",
            "4000000",
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let taken = loop {
        let metrics = parse_exposition(&get(demo.addr, "/metrics").text());
        let taken = dumps_counted(&metrics, "auto", "ok");
        if taken >= 4.0 {
            break taken;
        }
        assert!(
            Instant::now() < deadline,
            "only {taken} automatic dumps in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let listed = json(&get(demo.addr, "/debug/pprof/dumps").body);
    let listed = listed.as_array().unwrap();
    assert!(listed.len() <= 2, "the ring keeps 2 of {taken}: {listed:?}");
    assert!(listed.iter().all(|d| d["trigger"] == "auto"));
    let files: Vec<String> = std::fs::read_dir(dumps.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let count = |ext: &str| files.iter().filter(|f| f.ends_with(ext)).count();
    assert!(count(".heap") <= 2, "evicted dumps are removed: {files:?}");
    assert!(
        count(".build") <= count(".heap"),
        "and their build records: {files:?}"
    );
}

#[test]
fn release_probe_reports_what_the_cache_held() {
    // Exact mode: the check compares the scope's counters with jemalloc's own drop to 10 %,
    // tighter than a sampled estimate of 24 MB (±5 % at one standard deviation).
    let demo = Demo::start(
        &[
            "--tracking",
            "exact",
            "--leak-rate",
            "8000000",
            "--requests-per-sec",
            "1",
            "--batch-every",
            "3600",
        ],
        &[],
    );
    std::thread::sleep(Duration::from_secs(3));
    let response = request(demo.addr, "POST", "/debug/memory/release?probe=cache", &[]);
    assert_eq!(response.status, 200, "{}", response.text());
    let report = json(&response.body);
    let probe = &report["probes"][0];
    assert_eq!(probe["probe"], "cache");
    let freed = probe["allocated_freed"].as_i64().unwrap();
    // The scope's counters say what the cache held (requested sizes); jemalloc's allocated
    // drop says what the release returned (size classes). They agree within 10 %.
    let metrics = parse_exposition(&get(demo.addr, "/metrics").text());
    let allocated_total = value_of(
        &metrics,
        "memory_scope_deallocated_bytes_total",
        Some(("scope", "cache")),
    )
    .unwrap();
    assert!(
        allocated_total > 10e6,
        "the release credited the cache scope: {allocated_total}"
    );
    let live_after = value_of(
        &metrics,
        "memory_scope_live_bytes",
        Some(("scope", "cache")),
    )
    .unwrap();
    let held = allocated_total; // everything the cache had allocated and now freed
    let ratio = freed as f64 / held;
    assert!(
        (0.9..1.1).contains(&ratio),
        "freed {freed} of {held} bytes held ({ratio:.3}); {probe}"
    );
    assert!(live_after < 2e6, "the cache starts over: {live_after}");
    assert!(probe["error"].is_null());
}
