//! A small but realistic service that shows every part of the toolkit at work.
//!
//! ```text
//! cargo run --release -p exporter --example demo -- [--listen 127.0.0.1:9464]
//! ```
//!
//! Four parts of the service hold memory in four different ways, each in its own scope:
//! - `cache` — a session cache that grows slowly and is never trimmed: the leak to find;
//! - `requests` — request handlers on tokio tasks, hopping worker threads, allocating and
//!   freeing as they parse payloads and build maps: high churn, flat live bytes;
//! - `batch` — a periodic batch job that builds a large index, holds it briefly and drops it:
//!   a spike and a release;
//! - `lru` — a bounded cache attributed through a `tracing` span (`#[instrument]`), that fills
//!   and is cleared: a sawtooth that must not be mistaken for a leak.

use std::collections::{HashMap, LinkedList};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::instrument;
use tracing_subscriber::prelude::*;
use tracking_alloc::prelude::*;
use tracking_alloc::{scope, MemoryScopeLayer};

/// A service picks one mode with one line (`SampledAlloc` or `TrackingAlloc` as its
/// `#[global_allocator]`); the demo carries both to show either (`--tracking`).
#[global_allocator]
static GLOBAL: either_mode::EitherMode = either_mode::EitherMode::new();

/// The demo's allocator: exact or sampled, fixed before the first allocation.
mod either_mode {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicU8, Ordering};

    use tikv_jemallocator::Jemalloc;
    use tracking_alloc::{SampledAlloc, TrackingAlloc};

    /// The environment variable that fixes the mode at start-up; `main` sets it and executes
    /// the demo again when `--tracking` asks for the other mode.
    pub const VARIABLE: &str = "MEMORY_DEMO_TRACKING";

    pub struct EitherMode {
        exact: TrackingAlloc<Jemalloc>,
        sampled: SampledAlloc<Jemalloc>,
    }

    const UNDECIDED: u8 = 0;
    const EXACT: u8 = 1;
    const SAMPLED: u8 = 2;
    static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);

    impl EitherMode {
        pub const fn new() -> Self {
            EitherMode {
                exact: TrackingAlloc::new(Jemalloc),
                sampled: SampledAlloc::new(Jemalloc),
            }
        }

        /// The mode, read from the environment on the process's first allocation (before
        /// `main`, on one thread). `getenv` reads the environment in place: no allocation.
        #[inline]
        fn sampled(&self) -> bool {
            let mode = match MODE.load(Ordering::Relaxed) {
                UNDECIDED => {
                    // SAFETY: a NUL-terminated name; the result is null or a C string that
                    // lives as long as the environment, which nothing changes this early.
                    let value = unsafe { libc::getenv(c"MEMORY_DEMO_TRACKING".as_ptr()) };
                    let exact = !value.is_null()
                        // SAFETY: as above.
                        && unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes() == b"exact";
                    let mode = if exact { EXACT } else { SAMPLED };
                    MODE.store(mode, Ordering::Relaxed);
                    mode
                }
                mode => mode,
            };
            mode == SAMPLED
        }

        /// The mode this process runs: `exact` or `sampled`.
        pub fn mode(&self) -> &'static str {
            if self.sampled() {
                "sampled"
            } else {
                "exact"
            }
        }
    }

    // SAFETY: every block is allocated and freed by the same one of the two allocators: the
    // mode is fixed at the first allocation and never changes.
    unsafe impl GlobalAlloc for EitherMode {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded contract.
            unsafe {
                if self.sampled() {
                    self.sampled.alloc(layout)
                } else {
                    self.exact.alloc(layout)
                }
            }
        }

        #[inline]
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded contract.
            unsafe {
                if self.sampled() {
                    self.sampled.alloc_zeroed(layout)
                } else {
                    self.exact.alloc_zeroed(layout)
                }
            }
        }

        #[inline]
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded contract; the same mode allocated `ptr`.
            unsafe {
                if self.sampled() {
                    self.sampled.dealloc(ptr, layout)
                } else {
                    self.exact.dealloc(ptr, layout)
                }
            }
        }

        #[inline]
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: forwarded contract; the same mode allocated `ptr`.
            unsafe {
                if self.sampled() {
                    self.sampled.realloc(ptr, layout, new_size)
                } else {
                    self.exact.realloc(ptr, layout, new_size)
                }
            }
        }
    }
}

/// jemalloc's default options, embedded so heap profiles work with no environment variable:
/// sampling on, one sample per 512 KiB allocated on average, and cumulative counts per call
/// stack (`prof_accum`: the profiles' `alloc_space`, what Pyroscope's and Parca's allocation
/// views show). `_RJEM_MALLOC_CONF` overrides it (`_RJEM_MALLOC_CONF=prof:false` turns
/// profiling off).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 61] =
    b"prof:true,prof_active:true,lg_prof_sample:19,prof_accum:true\0";

const USAGE: &str = "\
usage: demo [OPTIONS]

  --listen ADDR           serve metrics on ADDR (default 127.0.0.1:9464)
  --tracking MODE         sampled (default: per-scope estimates, 0.97-0.99x CPU on a real
                          program) or exact (every block counted, 1.09-1.14x); README: Costs
  --leak-rate BYTES       bytes per second the `cache` scope leaks (default 32768: 112.5 MiB/h)
  --extra-scopes N        N more scopes (part-0001…), each holding a few KiB (default 0)
  --requests-per-sec N    simulated requests per second (default 200)
  --batch-every SECS      seconds between batch jobs (default 30)
  --batch-bytes BYTES     memory one batch job holds at its peak (default 67108864)
  --no-debug-routes       do not serve /debug/* (heap profiles, dumps, release probes)
  --debug-token TOKEN     require `Authorization: Bearer TOKEN` on /debug/* (repeat: any of them)
  --debug-token-file PATH accept every token in PATH (one per line, re-read when it changes)
  --metrics-token TOKEN   require `Authorization: Bearer TOKEN` on /metrics (repeatable)
  --metrics-token-file PATH  the same for /metrics
  --dump-dir DIR          directory of stored heap dumps (default $TMPDIR/memory-exporter-dumps)
  --dump-max-count N      stored dumps kept (default 32)
  --auto-dump-growth BYTES  dump automatically when jemalloc allocated grows by BYTES (default off)
  --auto-dump-cooldown SECS minimum seconds between automatic dumps (default 60)
  --refresh-interval MS   milliseconds between jemalloc statistics refreshes (default 5000)
  -h, --help              show this help
";

struct Options {
    listen: SocketAddr,
    tracking: String,
    leak_rate: u64,
    /// Scopes beyond the demo's own, each holding a little (a service with many parts).
    extra_scopes: usize,
    requests_per_sec: u64,
    batch_every: Duration,
    batch_bytes: usize,
    debug_routes: bool,
    debug_tokens: Vec<String>,
    debug_token_files: Vec<String>,
    metrics_tokens: Vec<String>,
    metrics_token_files: Vec<String>,
    dump_dir: Option<String>,
    dump_max_count: usize,
    auto_dump_growth: Option<u64>,
    auto_dump_cooldown: Duration,
    refresh_interval: Duration,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        listen: exporter::DEFAULT_LISTEN,
        tracking: "sampled".into(),
        leak_rate: 32 * 1024,
        extra_scopes: 0,
        requests_per_sec: 200,
        batch_every: Duration::from_secs(30),
        batch_bytes: 64 << 20,
        debug_routes: true,
        debug_tokens: Vec::new(),
        debug_token_files: Vec::new(),
        metrics_tokens: Vec::new(),
        metrics_token_files: Vec::new(),
        dump_dir: None,
        dump_max_count: 32,
        auto_dump_growth: None,
        auto_dump_cooldown: Duration::from_secs(60),
        refresh_interval: exporter::DEFAULT_REFRESH_INTERVAL,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            print!("{USAGE}");
            std::process::exit(0);
        }
        if flag == "--no-debug-routes" {
            options.debug_routes = false;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))?;
        let bad = |what: &str| format!("{flag} {value:?}: expected {what}\n\n{USAGE}");
        match flag.as_str() {
            "--listen" => {
                options.listen = value
                    .parse()
                    .map_err(|_| bad("an address like 127.0.0.1:9464"))?
            }
            "--tracking" => match value.as_str() {
                "exact" | "sampled" => options.tracking = value,
                _ => return Err(bad("exact or sampled")),
            },
            "--extra-scopes" => {
                options.extra_scopes = value.parse().map_err(|_| bad("a number of scopes"))?
            }
            "--leak-rate" => {
                options.leak_rate = value.parse().map_err(|_| bad("a number of bytes"))?
            }
            "--requests-per-sec" => {
                options.requests_per_sec = value.parse().map_err(|_| bad("a number"))?
            }
            "--batch-every" => {
                let secs: u64 = value.parse().map_err(|_| bad("a number of seconds"))?;
                options.batch_every = Duration::from_secs(secs.max(1));
            }
            "--batch-bytes" => {
                options.batch_bytes = value.parse().map_err(|_| bad("a number of bytes"))?
            }
            "--debug-token" => options.debug_tokens.push(value),
            "--debug-token-file" => options.debug_token_files.push(value),
            "--metrics-token" => options.metrics_tokens.push(value),
            "--metrics-token-file" => options.metrics_token_files.push(value),
            "--dump-dir" => options.dump_dir = Some(value),
            "--dump-max-count" => {
                options.dump_max_count = value.parse().map_err(|_| bad("a number"))?
            }
            "--auto-dump-growth" => {
                options.auto_dump_growth =
                    Some(value.parse().map_err(|_| bad("a number of bytes"))?)
            }
            "--auto-dump-cooldown" => {
                let secs: u64 = value.parse().map_err(|_| bad("a number of seconds"))?;
                options.auto_dump_cooldown = Duration::from_secs(secs);
            }
            "--refresh-interval" => {
                let ms: u64 = value.parse().map_err(|_| bad("a number of milliseconds"))?;
                options.refresh_interval = Duration::from_millis(ms);
            }
            _ => return Err(format!("unknown option {flag}\n\n{USAGE}")),
        }
    }
    Ok(options)
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if GLOBAL.mode() != options.tracking {
        run_again_in(&options.tracking);
    }
    tracing_subscriber::registry()
        .with(MemoryScopeLayer::new())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();

    // The exporter runs on its own thread, so a scrape is never starved by the service's load.
    let mut builder = exporter::Exporter::builder()
        .listen(options.listen)
        .refresh_interval(options.refresh_interval)
        .debug_routes(options.debug_routes)
        .dump_limits(exporter::DumpLimits {
            max_count: options.dump_max_count,
            ..exporter::DumpLimits::default()
        });
    for token in &options.debug_tokens {
        builder = builder.debug_token(token);
    }
    for file in &options.debug_token_files {
        builder = builder.debug_token_file(file);
    }
    for token in &options.metrics_tokens {
        builder = builder.metrics_token(token);
    }
    for file in &options.metrics_token_files {
        builder = builder.metrics_token_file(file);
    }
    if let Some(dir) = &options.dump_dir {
        builder = builder.dump_dir(dir);
    }
    if let Some(bytes) = options.auto_dump_growth {
        builder = builder.auto_dump(exporter::AutoDump {
            growth_bytes: Some(bytes),
            cooldown: options.auto_dump_cooldown,
            ..exporter::AutoDump::default()
        });
    }
    let service = Service::default();
    service.register_release_probes();
    let exporter = match builder.start() {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(1);
        }
    };
    let addr = exporter.local_addr();
    if options.debug_routes {
        println!("memory console (open in a browser): http://{addr}/debug/memory");
    }
    println!(
        "demo service running ({} tracking); memory metrics at:",
        GLOBAL.mode()
    );
    println!("  http://{addr}/metrics");
    println!("  http://{addr}/       (all routes)");
    if options.debug_routes {
        println!("heap profile: go tool pprof http://{addr}/debug/pprof/heap");
    }
    println!(
        "the cache scope leaks {} B/s ({:.1} MiB/h)",
        options.leak_rate,
        options.leak_rate as f64 * 3600.0 / f64::from(1 << 20)
    );
    println!("press Ctrl-C to stop");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("cannot start the demo's tokio runtime");
    let _extra = hold_in_extra_scopes(options.extra_scopes);
    runtime.block_on(async {
        let tasks = [
            tokio::spawn(service.clone().leak_sessions(options.leak_rate)),
            tokio::spawn(service.clone().serve_requests(options.requests_per_sec)),
            tokio::spawn(run_batches(options.batch_every, options.batch_bytes)),
            tokio::spawn(service.clone().refresh_lru()),
        ];
        wait_for_stop_signal().await;
        for task in tasks {
            task.abort();
        }
    });
    // A batch job may still be sleeping on a blocking thread: do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    exporter.shutdown();
    println!("demo stopped");
}

/// Executes the demo again with the allocator mode `mode` (fixed at the first allocation, so it
/// cannot change inside this process).
fn run_again_in(mode: &str) -> ! {
    use std::os::unix::process::CommandExt;
    let error = std::env::current_exe()
        .map(|exe| {
            std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env(either_mode::VARIABLE, mode)
                .exec()
        })
        .unwrap_or_else(|e| e);
    eprintln!("demo: cannot restart in {mode} tracking mode: {error}");
    std::process::exit(1);
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// `count` more scopes (`part-0001`…), each holding a few KiB, as a service with many parts
/// has; the registry's limit of 1,024 names puts the rest in `overflow`.
fn hold_in_extra_scopes(count: usize) -> Vec<Vec<u8>> {
    (1..=count)
        .map(|i| {
            let _scope = Scope::named(&format!("part-{i:04}")).enter();
            vec![1u8; 1024 * (1 + i % 16)]
        })
        .collect()
}

/// Bytes of state one session holds.
const SESSION_STATE: usize = 2048;

/// What one leaked session costs, as the tracker counts it: its state, and its list node (two
/// links and the `Session`). A list, not a map, so the cache grows by exactly this per session,
/// with no table doublings to make the rate lumpy.
const SESSION_BYTES: u64 = (SESSION_STATE + 2 * size_of::<usize>() + size_of::<Session>()) as u64;

/// A session's id and state; the demo only holds them (hence `allow`): that is the leak.
#[allow(dead_code)]
struct Session {
    id: u64,
    state: Vec<u8>,
}

#[derive(Clone, Default)]
struct Service {
    /// Sessions, added and never removed: the leak.
    sessions: Arc<Mutex<LinkedList<Session>>>,
    /// A bounded cache of rendered pages, cleared when full.
    lru: Arc<Mutex<HashMap<u64, String>>>,
}

impl Service {
    /// Lets `POST /debug/memory/release?probe=cache|lru` measure what each cache holds.
    fn register_release_probes(&self) {
        let sessions = self.sessions.clone();
        exporter::register_release("cache", move || sessions.lock().unwrap().clear())
            .expect("a valid probe name");
        let lru = self.lru.clone();
        exporter::register_release("lru", move || *lru.lock().unwrap() = HashMap::new())
            .expect("a valid probe name");
    }

    /// Adds session state at `rate` bytes per second, forever: as many whole sessions as keep
    /// the total since start at `rate × elapsed` (the remainder carries over, so the long-run
    /// rate is exactly `rate`, as the tracker counts bytes).
    async fn leak_sessions(self, rate: u64) {
        let cache = Scope::named("cache");
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        let started = tokio::time::Instant::now();
        let (mut added, mut next_id) = (0u64, 0u64);
        loop {
            ticks.tick().await;
            let due = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
            let _g = cache.enter();
            let mut sessions = self.sessions.lock().unwrap();
            while added + SESSION_BYTES <= due {
                sessions.push_back(Session {
                    id: next_id,
                    state: vec![(next_id % 251) as u8; SESSION_STATE],
                });
                added += SESSION_BYTES;
                next_id += 1;
            }
        }
    }

    /// Spawns `per_sec` simulated requests a second, each on its own task.
    async fn serve_requests(self, per_sec: u64) {
        let requests = Scope::named("requests");
        let mut ticks = tokio::time::interval(Duration::from_millis(50));
        let mut n = 0u64;
        loop {
            ticks.tick().await;
            for _ in 0..per_sec.div_ceil(20) {
                n += 1;
                let service = self.clone();
                tokio::spawn(service.handle_request(n).in_scope(requests));
            }
        }
    }

    /// Parses a JSON-like payload into a map, awaits "I/O", and renders a response.
    async fn handle_request(self, n: u64) -> usize {
        let payload: String = (0..200 + n % 300)
            .map(|i| format!("\"field{}\":{},", i % 37, i * n % 1000))
            .collect();
        let mut fields: HashMap<String, Vec<u64>> = HashMap::new();
        for pair in payload.split(',').filter(|p| !p.is_empty()) {
            if let Some((key, value)) = pair.split_once(':') {
                fields
                    .entry(key.trim_matches('"').to_owned())
                    .or_default()
                    .push(value.parse().unwrap_or(0));
            }
        }
        tokio::time::sleep(Duration::from_millis(5 + n % 20)).await; // the database
        let rendered = self.render(n, &fields).await;
        rendered.len()
    }

    /// Renders a page, through the bounded `lru` cache (attributed via its tracing span).
    #[instrument(skip_all, fields(memory_scope = "lru"))]
    async fn render(&self, n: u64, fields: &HashMap<String, Vec<u64>>) -> String {
        let key = n % 5000;
        if let Some(page) = self.lru.lock().unwrap().get(&key) {
            return page.clone();
        }
        let page = format!(
            "<html>{} fields, {} values</html>{}",
            fields.len(),
            fields.values().map(Vec::len).sum::<usize>(),
            "x".repeat(1024)
        );
        self.lru.lock().unwrap().insert(key, page.clone());
        page
    }

    /// Clears the page cache when it is full, like an LRU that evicts in bulk: a sawtooth.
    async fn refresh_lru(self) {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticks.tick().await;
            let mut lru = self.lru.lock().unwrap();
            if lru.len() >= 4000 {
                *lru = HashMap::new();
            }
        }
    }
}

/// Every `every`, builds an index of about `bytes` bytes on a blocking thread, uses it, drops it.
async fn run_batches(every: Duration, bytes: usize) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticks.tick().await;
        let job = tokio::task::spawn_blocking(move || {
            let _g = scope!("batch");
            let rows: Vec<Vec<u64>> = (0..bytes / 8192)
                .map(|i| (0..1024).map(|j| (i as u64 * 2654435761) ^ j).collect())
                .collect();
            let checksum: u64 = rows.iter().map(|row| row.iter().max().unwrap_or(&0)).sum();
            std::thread::sleep(Duration::from_secs(3)); // hold the peak long enough to be scraped
            checksum
        });
        let _ = job.await;
    }
}
