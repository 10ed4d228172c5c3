//! Workloads run under different global allocators, one binary per allocator
//! (`src/bin/bench-*.rs`), so each measures its allocator alone; `compare` runs them side by side
//! in one session and prints ratios. See BENCHMARKS.md.

pub mod shared_atomic;

use std::alloc::{alloc, dealloc, realloc, Layout};
use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

/// How a workload uses scopes, and how this binary's allocator enters one.
pub struct Variant<G> {
    pub name: &'static str,
    /// Enters scope number `n`; `None` if the allocator has no such concept.
    pub enter: Option<fn(usize) -> G>,
    /// Whether `stats.allocated` of jemalloc describes this allocator's heap.
    pub jemalloc_stats: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// No scope entered: everything is charged to the default group.
    None,
    /// One scope held for the whole workload.
    Scope,
    /// One scope held, and a second entered and left around every allocation.
    Nested,
}

/// Options of one run, parsed from the command line (`compare` passes them).
pub struct Run {
    pub workload: String,
    pub threads: usize,
    pub max_size: usize,
    pub ops: u64,
    pub mode: Mode,
}

impl Run {
    pub fn from_args() -> Run {
        let mut args = std::env::args().skip(1);
        let mut run = Run {
            workload: args.next().unwrap_or_else(|| "churn".into()),
            threads: 1,
            max_size: 1024,
            ops: 2_000_000,
            mode: Mode::Scope,
        };
        while let (Some(flag), Some(value)) = (args.next(), args.next()) {
            match flag.as_str() {
                "--threads" => run.threads = value.parse().expect("--threads N"),
                "--max-size" => run.max_size = value.parse().expect("--max-size BYTES"),
                "--ops" => run.ops = value.parse().expect("--ops N"),
                "--mode" => {
                    run.mode = match value.as_str() {
                        "none" => Mode::None,
                        "scope" => Mode::Scope,
                        "nested" => Mode::Nested,
                        other => panic!("--mode none|scope|nested, not {other}"),
                    }
                }
                other => panic!("unknown option {other}"),
            }
        }
        run
    }
}

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_PROCESS_CPUTIME_ID is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn jemalloc_allocated_resident() -> (u64, u64) {
    tikv_jemalloc_ctl::epoch::advance().unwrap();
    (
        tikv_jemalloc_ctl::stats::allocated::read().unwrap() as u64,
        tikv_jemalloc_ctl::stats::resident::read().unwrap() as u64,
    )
}

/// Runs the workload named on the command line and prints one JSON line with the measurements.
/// Enters one of 256 scopes (`bench-0` …), as the tracking variants' workloads do.
pub fn enter_bench_scope(n: usize) -> tracking_alloc::ScopeGuard {
    static SCOPES: std::sync::OnceLock<Vec<tracking_alloc::Scope>> = std::sync::OnceLock::new();
    let scopes = SCOPES.get_or_init(|| {
        (0..256)
            .map(|i| tracking_alloc::Scope::named(&format!("bench-{i}")))
            .collect()
    });
    scopes[n % scopes.len()].enter()
}

pub fn main<G: 'static>(variant: Variant<G>) {
    let run = Run::from_args();
    let enter = |n: usize| match (run.mode, variant.enter) {
        (Mode::None, _) | (_, None) => None,
        (_, Some(enter)) => Some(enter(n)),
    };
    let nested = |n: usize| match (run.mode, variant.enter) {
        (Mode::Nested, Some(enter)) => Some(enter(n)),
        _ => None,
    };
    // The syn workload reads its sources before the clock starts.
    let sources = (run.workload == "syn").then(|| rust_sources(run.ops as usize));
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    let mut extra = String::new();
    match run.workload.as_str() {
        "churn" => {
            std::thread::scope(|s| {
                for t in 0..run.threads {
                    let (enter, nested) = (&enter, &nested);
                    let run = &run;
                    s.spawn(move || {
                        let _scope = enter(t);
                        churn(run.ops / run.threads as u64, run.max_size, t as u64, || {
                            nested(100 + t)
                        });
                    });
                }
            });
        }
        "pairs" => {
            let _scope = enter(0);
            pairs(run.ops, run.max_size);
        }
        "grow" => {
            let _scope = enter(0);
            grow(run.ops, run.max_size);
        }
        "heap" => {
            let _scope = enter(0);
            let heap = build_heap(run.ops as usize);
            if variant.jemalloc_stats {
                let (allocated, resident) = jemalloc_allocated_resident();
                extra = format!(r#","allocated":{allocated},"resident":{resident}"#);
            }
            black_box(&heap);
        }
        "service" => {
            let enter = if run.mode == Mode::None {
                None
            } else {
                variant.enter
            };
            let done = service(run.ops as usize, run.threads, enter);
            extra = format!(r#","requests":{done}"#);
        }
        "syn" => {
            let _scope = enter(0);
            let sources = sources.as_deref().unwrap_or_default();
            let items: usize = sources
                .iter()
                .filter_map(|source| syn::parse_file(source).ok())
                .map(|file| black_box(file).items.len())
                .sum();
            extra = format!(r#","files":{},"items":{items}"#, sources.len());
        }
        other => panic!("unknown workload {other}: churn, pairs, grow, heap, service, syn"),
    }
    let (cpu, wall) = (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64());
    println!(
        r#"{{"variant":"{}","workload":"{}","threads":{},"max_size":{},"mode":"{:?}","cpu_s":{cpu:.6},"wall_s":{wall:.6}{extra}}}"#,
        variant.name, run.workload, run.threads, run.max_size, run.mode
    );
}

/// Up to `count` Rust source files (under 256 KiB each) from cargo's registry sources, in path
/// order: a real allocation-heavy program's input (parsing them with `syn`, as proc macros and
/// tools do). `BENCH_SOURCES` names another directory.
fn rust_sources(count: usize) -> Vec<String> {
    let root = std::env::var_os("BENCH_SOURCES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("CARGO_HOME")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo"))
                })
                .expect("CARGO_HOME or HOME");
            home.join("registry").join("src")
        });
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                Ok(t) if t.is_file() && path.extension().is_some_and(|e| e == "rs") => {
                    files.push(path)
                }
                _ => {}
            }
        }
    }
    files.sort();
    let sources: Vec<String> = files
        .iter()
        .filter(|p| p.metadata().is_ok_and(|m| m.len() < 256 * 1024))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .take(count)
        .collect();
    assert!(!sources.is_empty(), "no .rs files under {}", root.display());
    sources
}

/// xorshift64*: cheap, deterministic sizes.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// 1024 live blocks in a ring: each step frees the oldest and allocates a block of random size
/// in `1..=max_size`, writing its first byte as a program would.
pub fn churn<G>(ops: u64, max_size: usize, seed: u64, mut around_alloc: impl FnMut() -> Option<G>) {
    const RING: usize = 1024;
    let mut state = 0x9e37_79b9_7f4a_7c15 ^ (seed + 1);
    let mut ring: Vec<(*mut u8, Layout)> = Vec::with_capacity(RING);
    for i in 0..ops as usize + RING {
        let size = (next(&mut state) % max_size as u64) as usize + 1;
        let layout = Layout::from_size_align(size, 8).unwrap();
        let block = {
            let _inner = around_alloc();
            // SAFETY: non-zero size.
            unsafe { alloc(layout) }
        };
        assert!(!block.is_null());
        // SAFETY: `block` has at least one byte.
        unsafe { block.write(i as u8) };
        if ring.len() < RING {
            ring.push((block, layout));
        } else {
            let (old, old_layout) = std::mem::replace(&mut ring[i % RING], (block, layout));
            // SAFETY: allocated above with this layout, freed once.
            unsafe { dealloc(old, old_layout) };
        }
    }
    for (block, layout) in ring {
        // SAFETY: as above.
        unsafe { dealloc(block, layout) };
    }
}

/// `ops` alloc+free pairs of one size: the unit that callgrind counts instructions for.
///
/// The loop reuses one block. jemalloc built with profiling frees page-aligned blocks through a
/// slower path (they might be sampled), and which block the loop gets depends on the heap's
/// history, so blocks that start a page are held aside first: every variant then measures the
/// common path (unless every block of the size is page-aligned, as at 4 KiB).
pub fn pairs(ops: u64, size: usize) {
    let layout = Layout::from_size_align(size, 8).unwrap();
    let mut aligned = Vec::new();
    for _ in 0..64 {
        // SAFETY: non-zero size.
        let block = unsafe { alloc(layout) };
        if !(block as usize).is_multiple_of(4096) {
            // SAFETY: allocated just above with `layout`.
            unsafe { dealloc(block, layout) };
            break;
        }
        aligned.push(block);
    }
    for _ in 0..ops {
        // SAFETY: non-zero size; freed with the same layout.
        unsafe {
            let block = black_box(alloc(layout));
            dealloc(block, layout);
        }
    }
    for block in aligned {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { dealloc(block, layout) };
    }
}

/// `ops` buffers grown by `realloc` from 8 bytes to `max_size`, doubling (as `Vec` does), then
/// freed: the growth pattern of vectors and strings.
pub fn grow(ops: u64, max_size: usize) {
    for _ in 0..ops {
        let mut layout = Layout::from_size_align(8, 8).unwrap();
        // SAFETY: non-zero size; every realloc passes the block's current layout, and the last
        // layout frees it.
        unsafe {
            let mut block = black_box(alloc(layout));
            while layout.size() < max_size {
                let new_size = layout.size() * 2;
                block = black_box(realloc(block, layout, new_size));
                layout = Layout::from_size_align(new_size, 8).unwrap();
            }
            dealloc(block, layout);
        }
    }
}

/// The heap of PRIOR_ART's measurement: a `HashMap<String, Vec<u64>>` whose vectors grew by
/// pushing (so their capacities are powers of two), plus boxed integers and strings.
pub struct Heap {
    pub map: HashMap<String, Vec<u64>>,
    pub boxes: Vec<Box<u64>>,
    pub strings: Vec<String>,
}

pub fn build_heap(entries: usize) -> Heap {
    let mut state = 42u64;
    let mut heap = Heap {
        map: HashMap::new(),
        boxes: Vec::new(),
        strings: Vec::new(),
    };
    for i in 0..entries {
        let len = (next(&mut state) % 64) as usize + 1;
        let mut values = Vec::new();
        for j in 0..len {
            values.push(j as u64 ^ i as u64);
        }
        heap.map.insert(format!("key-{i:08}"), values);
        heap.boxes.push(Box::new(i as u64));
        let text_len = (next(&mut state) % 48) as usize + 4;
        heap.strings.push("s".repeat(text_len));
    }
    heap
}

/// A service-like workload: `requests` JSON documents parsed into maps on tokio tasks, each
/// task entering its scope on both sides of an await (as `in_scope` does per poll). Returns the
/// number of requests done.
pub fn service<G: 'static>(
    requests: usize,
    workers: usize,
    enter: Option<fn(usize) -> G>,
) -> usize {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .build()
        .unwrap();
    let documents: Vec<String> = (0..64)
        .map(|d| {
            let fields: Vec<String> = (0..40)
                .map(|f| format!(r#""field{f}":[{},{},{}]"#, d * f, d + f, d ^ f))
                .collect();
            format!("{{{}}}", fields.join(","))
        })
        .collect();
    let documents = std::sync::Arc::new(documents);
    runtime.block_on(async {
        let mut tasks = Vec::with_capacity(requests);
        for r in 0..requests {
            let documents = documents.clone();
            tasks.push(tokio::spawn(async move {
                let scoped = || enter.map(|enter| enter(r % 8));
                let parsed: HashMap<String, Vec<u64>> = {
                    let _scope = scoped();
                    serde_json::from_str(&documents[r % documents.len()]).unwrap()
                };
                tokio::task::yield_now().await;
                let _scope = scoped();
                let sum = parsed.values().flatten().sum::<u64>();
                drop(parsed);
                sum
            }));
        }
        let mut total = 0u64;
        for task in tasks {
            total = total.wrapping_add(task.await.unwrap());
        }
        black_box(total);
    });
    requests
}
