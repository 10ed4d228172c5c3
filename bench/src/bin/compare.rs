//! Runs every workload under every allocator binary, interleaved round by round so machine
//! noise hits all variants alike, and prints medians and ratios against bare jemalloc as
//! Markdown (the tables of BENCHMARKS.md).
//!
//! ```text
//! cargo build --release -p alloc-bench --bins
//! target/release/compare            # full run, a few minutes
//! target/release/compare --quick    # smoke run: every case once, tiny sizes
//! target/release/compare --instructions  # only the callgrind table (deterministic)
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

struct Case {
    binary: &'static str,
    label: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
}

fn case(binary: &'static str, label: &'static str, args: &[&str]) -> Case {
    Case {
        binary,
        label,
        args: args.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
    }
}

fn run(dir: &Path, case: &Case) -> Value {
    let out = Command::new(dir.join(case.binary))
        .args(&case.args)
        .envs(case.env.iter().copied())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (build with cargo build --release -p alloc-bench --bins)",
                case.binary
            )
        });
    assert!(
        out.status.success(),
        "{} {:?} failed: {}",
        case.binary,
        case.args,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

/// Runs `cases` for `rounds` rounds, interleaved; returns the median of `field` per label.
fn measure(dir: &Path, cases: &[Case], rounds: usize, field: &str) -> BTreeMap<&'static str, f64> {
    let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        for case in cases {
            let result = run(dir, case);
            samples
                .entry(case.label)
                .or_default()
                .push(result[field].as_f64().unwrap());
        }
    }
    samples.into_iter().map(|(k, v)| (k, median(v))).collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 1 } else { 7 };
    let ops = if quick { "20000" } else { "4000000" };
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    if std::env::args().any(|a| a == "--instructions") {
        return callgrind(&dir, quick);
    }
    println!(
        "Machine: {}. Medians of {rounds} interleaved rounds; ratio = variant / bare jemalloc.\n",
        machine()
    );

    println!("## Churn: CPU time, 1024 live blocks in a ring\n");
    println!("| sizes | threads | jemalloc (s) | sampled, one scope | tracked, one scope | tracked, no scope | tracked, nested | shared-atomic | tracking-allocator | System |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for max in ["64", "1024", "16384"] {
        for threads in ["1", "2", "4"] {
            let common = [
                "churn",
                "--max-size",
                max,
                "--threads",
                threads,
                "--ops",
                ops,
            ];
            let with = |mode: &'static str| -> Vec<&str> {
                common.iter().copied().chain(["--mode", mode]).collect()
            };
            let cases = [
                case("bench-jemalloc", "jemalloc", &with("none")),
                case("bench-sampled", "sampled-scope", &with("scope")),
                case("bench-tracked", "tracked-scope", &with("scope")),
                case("bench-tracked", "tracked-none", &with("none")),
                case("bench-tracked", "tracked-nested", &with("nested")),
                case("bench-shared-atomic", "shared-atomic", &with("scope")),
                case(
                    "bench-tracking-allocator",
                    "tracking-allocator",
                    &with("scope"),
                ),
                case("bench-system", "system", &with("none")),
            ];
            let m = measure(&dir, &cases, rounds, "cpu_s");
            let base = m["jemalloc"];
            let r = |k: &str| format!("{:.3}×", m[k] / base);
            println!(
                "| 1–{max} B | {threads} | {base:.3} | {} | {} | {} | {} | {} | {} | {} |",
                r("sampled-scope"),
                r("tracked-scope"),
                r("tracked-none"),
                r("tracked-nested"),
                r("shared-atomic"),
                r("tracking-allocator"),
                r("system")
            );
        }
    }

    println!(
        "\n## Heap overhead: HashMap<String, Vec<u64>> + Box<u64> + String, {} entries\n",
        if quick { 2000 } else { 300000 }
    );
    println!("| allocator | jemalloc allocated | ratio | jemalloc resident | ratio |");
    println!("|---|---|---|---|---|");
    let entries = if quick { "2000" } else { "300000" };
    let heap_cases: Vec<Case> = [
        ("bench-jemalloc", "jemalloc", "none"),
        ("bench-sampled", "sampled", "scope"),
        ("bench-tracked", "tracked", "scope"),
        (
            "bench-shared-atomic",
            "shared-atomic (2-byte trailer)",
            "scope",
        ),
        ("bench-tracking-allocator", "tracking-allocator", "scope"),
    ]
    .into_iter()
    .map(|(binary, label, mode)| case(binary, label, &["heap", "--ops", entries, "--mode", mode]))
    .collect();
    let results: Vec<(&str, Value)> = heap_cases.iter().map(|c| (c.label, run(&dir, c))).collect();
    let base = &results[0].1;
    for (label, r) in &results {
        let (a, res) = (
            r["allocated"].as_f64().unwrap(),
            r["resident"].as_f64().unwrap(),
        );
        println!(
            "| {label} | {:.1} MiB | {:.3}× | {:.1} MiB | {:.3}× |",
            a / 1048576.0,
            a / base["allocated"].as_f64().unwrap(),
            res / 1048576.0,
            res / base["resident"].as_f64().unwrap()
        );
    }

    // Two workers on a shared 2-core machine: wall time is the noisiest figure here, so it gets
    // three times the rounds (7 rounds have swung from 0.92x to 1.01x between runs).
    let service_rounds = rounds * 3;
    println!(
        "\n## Service: serde_json parsing into maps on tokio tasks (2 workers), wall time, \
         {service_rounds} rounds\n"
    );
    let requests = if quick { "2000" } else { "200000" };
    let cases: Vec<Case> = [
        ("bench-jemalloc", "jemalloc", "none"),
        ("bench-sampled", "sampled, scoped tasks", "scope"),
        ("bench-tracked", "tracked, scoped tasks", "scope"),
        ("bench-tracked", "tracked, unscoped", "none"),
    ]
    .into_iter()
    .map(|(binary, label, mode)| {
        case(
            binary,
            label,
            &[
                "service",
                "--ops",
                requests,
                "--threads",
                "2",
                "--mode",
                mode,
            ],
        )
    })
    .collect();
    let m = measure(&dir, &cases, service_rounds, "wall_s");
    println!("| allocator | wall (s) | throughput vs jemalloc |\n|---|---|---|");
    for (label, wall) in &m {
        println!("| {label} | {wall:.3} | {:.3}× |", m["jemalloc"] / wall);
    }

    println!(
        "\n## A real program: syn parsing Rust sources from cargo's registry, CPU time, \
         {service_rounds} rounds\n"
    );
    let files = if quick { "20" } else { "1500" };
    let syn = ["syn", "--ops", files, "--mode", "scope"];
    let mut cases = vec![
        case("bench-jemalloc", "jemalloc", &syn),
        case("bench-sampled", "sampled (SampledAlloc, 64 KiB)", &syn),
        case("bench-tracked", "exact (TrackingAlloc)", &syn),
        case(
            "bench-jemalloc",
            "jemalloc heap profiling alone (lg_prof_sample:19)",
            &syn,
        ),
    ];
    cases[3].env = vec![(
        "_RJEM_MALLOC_CONF",
        "prof:true,prof_active:true,lg_prof_sample:19",
    )];
    cpu_table(&dir, &cases, service_rounds, "allocator");

    println!("\n## Profiling cost: bare jemalloc churn (1–1024 B, 1 thread), CPU time\n");
    let churn = [
        "churn",
        "--max-size",
        "1024",
        "--threads",
        "1",
        "--ops",
        ops,
        "--mode",
        "none",
    ];
    let mut cases = vec![
        case("bench-jemalloc", "prof:false", &churn),
        case("bench-jemalloc", "prof:true,prof_active:false", &churn),
        case(
            "bench-jemalloc",
            "prof:true,prof_active:true,lg_prof_sample:19",
            &churn,
        ),
    ];
    cases[0].env = vec![("_RJEM_MALLOC_CONF", "prof:false")];
    cases[1].env = vec![("_RJEM_MALLOC_CONF", "prof:true,prof_active:false")];
    cases[2].env = vec![(
        "_RJEM_MALLOC_CONF",
        "prof:true,prof_active:true,lg_prof_sample:19",
    )];
    cpu_table(&dir, &cases, rounds, "malloc_conf");

    callgrind(&dir, quick);
}

/// Measures `cases` for `rounds` and prints their median CPU time and its ratio to the first
/// case's, one row per case, under a first column named `what`.
fn cpu_table(dir: &Path, cases: &[Case], rounds: usize, what: &str) {
    let m = measure(dir, cases, rounds, "cpu_s");
    let base = m[cases[0].label];
    println!("| {what} | CPU (s) | ratio |\n|---|---|---|");
    for case in cases {
        let cpu = m[case.label];
        println!("| {} | {cpu:.3} | {:.3}× |", case.label, cpu / base);
    }
}

/// Instructions per operation (an alloc+free pair, or a buffer grown by `realloc`), counted by
/// callgrind: deterministic, so regressions show despite a noisy machine. The difference of two
/// runs (N and 2N operations) cancels start-up.
fn callgrind(dir: &Path, quick: bool) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!(
            "\n(valgrind not installed: instruction counts skipped; apt-get install valgrind)"
        );
        return;
    }
    let n: u64 = if quick { 2000 } else { 100000 };
    let count = |binary: &str, workload: &str, size: &str, ops: u64| -> u64 {
        let out_file = std::env::temp_dir().join(format!(
            "callgrind-{binary}-{workload}-{size}-{ops}-{}",
            std::process::id()
        ));
        let out = Command::new("valgrind")
            .args([
                "--tool=callgrind",
                &format!("--callgrind-out-file={}", out_file.display()),
            ])
            .arg(dir.join(binary))
            .args([
                workload,
                "--ops",
                &ops.to_string(),
                "--max-size",
                size,
                "--mode",
                "scope",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = std::fs::read_to_string(&out_file).unwrap();
        let _ = std::fs::remove_file(&out_file);
        text.lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    println!("\n## Instructions per operation (callgrind)\n");
    println!(
        "| operation | tag (exact mode) | jemalloc | tracked | added | sampled | added |\n|---|---|---|---|---|---|---|"
    );
    for (workload, size, operation, path) in [
        ("pairs", "100", "alloc+free 100 B", "inline"),
        (
            "pairs",
            "63",
            "alloc+free 63 B",
            "one byte (1 spare byte in the class)",
        ),
        ("pairs", "64", "alloc+free 64 B", "side table (exact class)"),
        (
            "pairs",
            "4096",
            "alloc+free 4096 B",
            "side table (page-aligned class)",
        ),
        ("pairs", "8192", "alloc+free 8192 B", "side table (large)"),
        (
            "grow",
            "4096",
            "8 B grown to 4 KiB by 9 reallocs, freed",
            "side table",
        ),
    ] {
        let per = |binary: &str| {
            (count(binary, workload, size, 2 * n) - count(binary, workload, size, n)) / n
        };
        let (bare, tracked, sampled) = (
            per("bench-jemalloc"),
            per("bench-tracked"),
            per("bench-sampled"),
        );
        println!(
            "| {operation} | {path} | {bare} | {tracked} | +{} | {sampled} | {:+} |",
            tracked as i64 - bare as i64,
            sampled as i64 - bare as i64
        );
    }
}
