//! Heap profiles from the running process: on demand, timed, stored, diffed and automatic.
//!
//! Every operation goes through a [`Profiler`], which allows one profiling operation at a time
//! (a second gets [`ProfileError::Busy`], HTTP 409 with `Retry-After`), restores jemalloc's
//! sampling state after a timed profile even when the request is cancelled, and never takes a
//! file path from a request: on-demand dumps go to a private scratch directory, stored dumps to
//! the configured directory under ids the exporter generates.
//!
//! Stages, one module each: [`ctl`] (jemalloc's `prof.*` controls) → `heap_dump` (parse,
//! subtract, write back `heap_v2` text) → `symbols` (in-process symbolization, mappings, build
//! ids) → `pprof` / `render` (pprof protobuf, folded stacks, flamegraph SVG); `dumps` keeps the
//! stored ring; `auto` decides when growth warrants a dump.

mod auto;
pub mod ctl;
mod dumps;
mod heap_dump;
pub mod operations;
mod pprof;
mod render;
pub mod scope_frames;
mod symbols;
#[cfg(test)]
mod test_support;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use serde::Serialize;

pub use auto::{AutoDump, AutoMetric};
pub use dumps::{DumpInfo, DumpLimits, Trigger};
pub use heap_dump::{HeapProfile, Stack};

use crate::collectors::Refreshed;
use dumps::DumpStore;
use symbols::Symbolizer;

/// What went wrong with a profiling request, and what to do about it. Maps to an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileError {
    /// 501: profiling is not compiled in or not enabled; the message names the fix.
    NotAvailable(String),
    /// 409: another profiling operation runs.
    Busy {
        retry_after: Duration,
        message: String,
    },
    /// 400: malformed input.
    BadRequest(String),
    /// 404: an unknown dump or probe.
    NotFound(String),
    /// 409: the request conflicts with what is stored (a base dump from another build).
    Conflict(String),
    /// 500: the dump directory is missing, unwritable or full.
    Storage(String),
    /// 500: anything else.
    Internal(String),
}

impl ProfileError {
    pub fn status(&self) -> u16 {
        match self {
            ProfileError::NotAvailable(_) => 501,
            ProfileError::Busy { .. } => 409,
            ProfileError::BadRequest(_) => 400,
            ProfileError::NotFound(_) => 404,
            ProfileError::Conflict(_) => 409,
            ProfileError::Storage(_) | ProfileError::Internal(_) => 500,
        }
    }
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProfileError::Busy { message, .. } => f.write_str(message),
            ProfileError::NotAvailable(m)
            | ProfileError::BadRequest(m)
            | ProfileError::NotFound(m)
            | ProfileError::Conflict(m)
            | ProfileError::Storage(m)
            | ProfileError::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ProfileError {}

/// Output formats of a heap profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Gzipped pprof protobuf (`go tool pprof`).
    Pprof,
    /// jemalloc's raw `heap_v2` text (`jeprof --text <binary> <file>`).
    Jeprof,
    /// A flamegraph of live bytes.
    Svg,
    /// Folded stacks (`outer;…;inner bytes`).
    Collapsed,
}

impl Format {
    pub fn parse(value: &str) -> Result<Format, ProfileError> {
        match value {
            "pprof" => Ok(Format::Pprof),
            "jeprof" => Ok(Format::Jeprof),
            "svg" => Ok(Format::Svg),
            "collapsed" => Ok(Format::Collapsed),
            other => Err(ProfileError::BadRequest(format!(
                "unknown format {other:?}; use format=pprof (default), jeprof, svg or collapsed"
            ))),
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Pprof => "application/octet-stream",
            Format::Jeprof | Format::Collapsed => "text/plain; charset=utf-8",
            Format::Svg => "image/svg+xml",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Format::Pprof => "pb.gz",
            Format::Jeprof => "heap",
            Format::Svg => "svg",
            Format::Collapsed => "folded",
        }
    }
}

/// Which sample type a pprof profile shows first (its `default_sample_type`), as Go's routes
/// do: `/debug/pprof/heap` live bytes, `/debug/pprof/allocs` allocated bytes where jemalloc
/// keeps them (`prof_accum:true`), else live bytes too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SampleType {
    /// `inuse_space`: bytes live now (or gained, in a diff).
    #[default]
    Inuse,
    /// `alloc_space`: bytes allocated in all (or in the window, in a diff).
    Allocated,
}

/// A rendered profile, ready to send.
#[derive(Debug)]
pub struct Rendered {
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub filename: String,
}

/// Where stored dumps go and how profiling routes behave.
#[derive(Debug, Clone)]
pub struct ProfilingConfig {
    /// Directory of stored dumps (the ring). Must exist and be writable to store dumps. The
    /// default, [`default_dump_root`], is replaced at start by a directory of this program's
    /// own under it ([`program_dump_dir`]).
    pub dump_dir: PathBuf,
    pub limits: DumpLimits,
    /// Upper bound of `?seconds=` (default 300).
    pub max_seconds: u64,
    /// Automatic dumps on growth; `None` disables them.
    pub auto: Option<AutoDump>,
}

impl Default for ProfilingConfig {
    fn default() -> Self {
        ProfilingConfig {
            dump_dir: default_dump_root(),
            limits: DumpLimits::default(),
            max_seconds: 300,
            auto: None,
        }
    }
}

/// Where the default dump directories live: `$TMPDIR/memory-exporter-dumps`.
pub fn default_dump_root() -> PathBuf {
    std::env::temp_dir().join("memory-exporter-dumps")
}

/// This program's own ring under `root`: named after the executable, its build id and the
/// port it serves on (`demo-3f2a9c1b7d04-9464`), so programs on one host never share a ring
/// while a restart of the same binary on the same port finds its dumps again.
pub fn program_dump_dir(root: &std::path::Path, port: Option<u16>) -> PathBuf {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "program".into());
    let exe = file_name_safe(&exe);
    let build = symbols::own_build_id()
        .map_or("no-build-id".into(), |id| id[..id.len().min(12)].to_owned());
    let port = port.map_or("mounted".into(), |p| p.to_string());
    root.join(format!("{exe}-{build}-{port}"))
}

/// `name` with every character but ASCII letters, digits, `-` and `_` replaced by `_`: an
/// executable may be called anything, a directory name under a shared root should not.
fn file_name_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// jemalloc's profiling state and the stored dumps, as `GET /debug/pprof/status` reports them.
#[derive(Debug, Serialize)]
pub struct Status {
    pub profiling_compiled: bool,
    pub profiling_enabled: bool,
    pub profiling_active: bool,
    pub lg_sample: u32,
    pub sample_interval_bytes: u64,
    /// `prof_accum:true`: profiles carry `alloc_objects`/`alloc_space` too.
    pub cumulative_counts: bool,
    pub busy: bool,
    pub dump_dir: String,
    pub max_dumps: usize,
    pub max_dump_bytes: u64,
    pub max_seconds: u64,
    pub auto_dump: Option<String>,
    pub dumps: Vec<DumpInfo>,
    /// What to do when profiling is unavailable.
    pub hint: Option<String>,
}

/// Serialises profiling operations and carries their state.
pub struct Profiler {
    config: ProfilingConfig,
    store: DumpStore,
    scratch: PathBuf,
    /// The running operation, if one runs.
    busy: Mutex<Option<Running>>,
    dumps_total: IntCounterVec,
    auto: Mutex<auto::AutoState>,
}

/// What runs: until when it is expected to last, and whether it is a timed profile's window
/// (which others do not wait for) or a short operation (which they do, briefly).
#[derive(Debug, Clone, Copy)]
struct Running {
    until: Instant,
    window: bool,
}

/// Held while a profiling operation runs; frees the profiler when dropped.
pub struct BusyGuard<'a>(&'a Profiler);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Restores jemalloc's `prof.active` when dropped: after a timed profile, also when the request
/// is cancelled or the exporter shuts down mid-profile.
pub struct RestoreActive(bool);

impl RestoreActive {
    /// Turns sampling on now; the state before is restored when the guard drops.
    pub fn activate() -> Result<RestoreActive, ProfileError> {
        ctl::set_active(true).map(RestoreActive)
    }
}

impl Drop for RestoreActive {
    fn drop(&mut self) {
        if let Err(e) = ctl::set_active(self.0) {
            tracing::warn!("memory exporter: restoring prof.active failed: {e}");
        }
    }
}

impl Profiler {
    pub fn new(config: ProfilingConfig, dumps_total: IntCounterVec) -> Profiler {
        // Samples taken from now on carry their owner scope (jemalloc 5.3.1 with prof:true).
        scope_frames::install();
        let store = DumpStore::new(config.dump_dir.clone(), config.limits.clone());
        let scratch = std::env::temp_dir().join(format!("memory-exporter-{}", std::process::id()));
        Profiler {
            auto: Mutex::new(auto::AutoState::default()),
            config,
            store,
            scratch,
            busy: Mutex::new(None),
            dumps_total,
        }
    }

    pub fn config(&self) -> &ProfilingConfig {
        &self.config
    }

    /// Claims the profiler for a short operation expected to take `expected`, or answers 409.
    pub fn begin(&self, expected: Duration) -> Result<BusyGuard<'_>, ProfileError> {
        self.claim(expected, false)
    }

    /// Claims the profiler for a timed profile's window (and its rendering), or answers 409.
    pub fn begin_window(&self, expected: Duration) -> Result<BusyGuard<'_>, ProfileError> {
        self.claim(expected, true)
    }

    /// Whether a short operation runs (one a new request may wait for), not a timed window.
    pub fn running_short(&self) -> bool {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.is_some_and(|running| !running.window)
    }

    fn claim(&self, expected: Duration, window: bool) -> Result<BusyGuard<'_>, ProfileError> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Running { until, .. }) = *busy {
            // The running operation's remaining time, rounded up to whole seconds.
            let left = until.saturating_duration_since(Instant::now());
            let retry_after = Duration::from_secs(left.as_millis().div_ceil(1000).max(1) as u64);
            return Err(ProfileError::Busy {
                retry_after,
                message: format!(
                    "another heap profile is being taken; one runs at a time. Retry in {} s.",
                    retry_after.as_secs()
                ),
            });
        }
        *busy = Some(Running {
            until: Instant::now() + expected,
            window,
        });
        Ok(BusyGuard(self))
    }

    /// Checks `seconds` of a timed profile: a whole number in `1..=max_seconds`.
    pub fn parse_seconds(&self, value: &str) -> Result<u64, ProfileError> {
        let max = self.config.max_seconds;
        match value.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ProfileError::BadRequest(format!(
                "seconds={value:?} is not allowed: give a whole number of seconds from 1 to {max}"
            ))),
        }
    }

    /// Dumps the live heap to a private scratch file and parses it.
    pub fn dump_now(&self) -> Result<HeapProfile, ProfileError> {
        std::fs::create_dir_all(&self.scratch).map_err(|e| {
            ProfileError::Storage(format!(
                "cannot create the scratch directory {}: {e}; set TMPDIR to a writable directory",
                self.scratch.display()
            ))
        })?;
        let path = self.scratch.join("now.heap");
        ctl::dump_to(&path)?;
        let text = std::fs::read_to_string(&path);
        let _ = std::fs::remove_file(&path);
        let text =
            text.map_err(|e| ProfileError::Storage(format!("reading the dump failed: {e}")))?;
        HeapProfile::parse(&text).map_err(|e| ProfileError::Internal(e.to_string()))
    }

    /// The stored dump `id`, parsed, to diff against: refused (409) if another build of the
    /// program took it, whose addresses mean other code.
    pub fn base(&self, id: &str) -> Result<(DumpInfo, HeapProfile), ProfileError> {
        let (info, profile) = self.stored(id)?;
        let own = symbols::own_build_id();
        if info.build_id.is_some() && info.build_id != own {
            return Err(ProfileError::Conflict(format!(
                "dump {id} was taken by another build of the program (build id {}; this binary is \
                 {}): its call stacks are addresses in other code, so a diff would be meaningless. \
                 Store a new base with POST /debug/pprof/dumps.",
                info.build_id.as_deref().unwrap_or("unknown"),
                own.as_deref().unwrap_or("without a build id")
            )));
        }
        Ok((info, profile))
    }

    /// The stored dump `id`, parsed.
    pub fn stored(&self, id: &str) -> Result<(DumpInfo, HeapProfile), ProfileError> {
        let (info, text) = self.store.read(id)?;
        let profile = HeapProfile::parse(&text)
            .map_err(|e| ProfileError::Internal(format!("stored dump {id} is unreadable: {e}")))?;
        Ok((info, profile))
    }

    /// Renders `profile` in `format`. `what` names it in titles and file names; `shown` is the
    /// pprof default sample type.
    pub fn render(
        &self,
        profile: &HeapProfile,
        format: Format,
        what: &str,
        shown: SampleType,
    ) -> Rendered {
        let mut symbols = Symbolizer::default();
        let title = format!(
            "{what}: live heap by call stack (pid {}, sampled every {} bytes)",
            std::process::id(),
            profile.period
        );
        let body = match format {
            Format::Pprof => pprof::encode(profile, &mut symbols, &title, shown),
            Format::Jeprof => profile.to_text().into_bytes(),
            Format::Svg => render::flamegraph(profile, &mut symbols, &title),
            Format::Collapsed => render::collapsed(profile, &mut symbols).into_bytes(),
        };

        Rendered {
            body,
            content_type: format.content_type(),
            filename: format!("{what}.{}", format.extension()),
        }
    }

    /// Writes a dump into the ring, evicting the oldest past the limits, and counts it.
    pub fn store_dump(&self, trigger: Trigger) -> Result<DumpInfo, ProfileError> {
        let result = (|| {
            // `dump_to` checks the directory first and names the cause if it is unusable.
            let (id, path) = self.store.next(trigger);
            ctl::dump_to(&path)?;
            self.store
                .record_build(&id, symbols::own_build_id().as_deref());
            let evicted = self.store.evict();
            if !evicted.is_empty() {
                tracing::info!("memory exporter: evicted heap dumps {evicted:?}");
            }
            self.store.info(&id).ok_or_else(|| {
                ProfileError::Storage(format!(
                    "dump {id} vanished from {}",
                    self.store.dir().display()
                ))
            })
        })();
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.dumps_total
            .with_label_values(&[trigger.as_str(), outcome])
            .inc();
        result
    }

    pub fn list(&self) -> Vec<DumpInfo> {
        self.store.list()
    }

    pub fn status(&self) -> Status {
        let availability = ctl::availability();
        let (compiled, enabled, active) = match availability {
            ctl::Availability::NotCompiled => (false, false, false),
            ctl::Availability::NotEnabled => (true, false, false),
            ctl::Availability::Enabled { active } => (true, true, active),
        };
        let lg_sample = if enabled { ctl::lg_sample() } else { 0 };
        Status {
            profiling_compiled: compiled,
            profiling_enabled: enabled,
            profiling_active: active,
            lg_sample,
            sample_interval_bytes: if enabled { 1 << lg_sample } else { 0 },
            cumulative_counts: enabled && ctl::accumulating(),
            busy: self
                .busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some(),
            dump_dir: self.store.dir().display().to_string(),
            max_dumps: self.config.limits.max_count,
            max_dump_bytes: self.config.limits.max_bytes,
            max_seconds: self.config.max_seconds,
            auto_dump: self.config.auto.as_ref().map(|a| a.to_string()),
            dumps: self.store.list(),
            hint: ctl::require_enabled().err().map(|e| e.to_string()),
        }
    }

    /// Called after every refresh: takes an automatic dump when the configured growth is
    /// reached and the cooldown has passed. Skips quietly while another operation runs.
    pub fn check_auto(&self, refreshed: &Refreshed) -> Option<Result<DumpInfo, ProfileError>> {
        let config = self.config.auto.as_ref()?;
        if !matches!(ctl::availability(), ctl::Availability::Enabled { .. }) {
            return None;
        }
        let value = match config.metric {
            AutoMetric::Allocated => refreshed.stats.allocated,
            AutoMetric::Resident => refreshed.stats.resident,
        };
        let mut state = self.auto.lock().unwrap_or_else(|e| e.into_inner());
        if !state.should_dump(config, value, Instant::now()) {
            return None;
        }
        let _busy = self.begin(Duration::from_secs(30)).ok()?;
        let result = self.store_dump(Trigger::Auto);
        if result.is_ok() {
            state.dumped(value, Instant::now());
        }
        Some(result)
    }

    /// Frees what rendering left behind. The parsed debug info of the binary (tens of MB for a
    /// large one) would otherwise stay cached for the life of the service; profiles are rare,
    /// so it is parsed again each time, and the freed pages go back to the OS now rather than
    /// after jemalloc's decay time.
    pub fn release_scratch_memory() {
        backtrace::clear_symbol_cache();
        ctl::purge();
    }

    /// Shared so route handlers can move it onto blocking threads.
    pub fn shared(self) -> Arc<Profiler> {
        Arc::new(self)
    }

    /// A profiler with the default configuration, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Profiler {
        Profiler::new(
            ProfilingConfig::default(),
            crate::collectors::ExporterMetrics::new().prof_dumps,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let m = String::new;
        let busy = ProfileError::Busy {
            retry_after: Duration::from_secs(1),
            message: m(),
        };
        let cases = [
            (ProfileError::NotAvailable(m()), 501),
            (busy, 409),
            (ProfileError::BadRequest(m()), 400),
            (ProfileError::NotFound(m()), 404),
            (ProfileError::Conflict(m()), 409),
            (ProfileError::Storage(m()), 500),
            (ProfileError::Internal(m()), 500),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error:?}");
        }
    }

    #[test]
    fn each_format_has_its_content_type_and_extension() {
        let cases = [
            ("pprof", "application/octet-stream", "pb.gz"),
            ("jeprof", "text/plain; charset=utf-8", "heap"),
            ("svg", "image/svg+xml", "svg"),
            ("collapsed", "text/plain; charset=utf-8", "folded"),
        ];
        for (name, content_type, extension) in cases {
            let format = Format::parse(name).unwrap();
            assert_eq!(format.content_type(), content_type, "{name}");
            assert_eq!(format.extension(), extension, "{name}");
        }
        assert!(Format::parse("png").is_err());
    }

    #[test]
    fn dumps_go_under_the_temporary_directory_by_program_and_port() {
        let root = default_dump_root();
        assert_eq!(root, std::env::temp_dir().join("memory-exporter-dumps"));
        // This test binary (`exporter-<hash>`): its name, its build id's first 12 hex digits
        // (or `no-build-id`), then the port or `mounted`.
        let exe = std::env::current_exe().unwrap();
        let exe = exe.file_name().unwrap().to_str().unwrap();
        let build = symbols::own_build_id()
            .map_or("no-build-id".into(), |id| id[..id.len().min(12)].to_owned());
        assert_eq!(
            program_dump_dir(&root, Some(9464)),
            root.join(format!("{exe}-{build}-9464"))
        );
        assert_eq!(
            program_dump_dir(&root, None),
            root.join(format!("{exe}-{build}-mounted"))
        );
    }

    #[test]
    fn the_profiler_keeps_its_configuration() {
        let config = ProfilingConfig {
            max_seconds: 7,
            ..ProfilingConfig::default()
        };
        let metrics = crate::collectors::ExporterMetrics::new();
        assert_eq!(
            Profiler::new(config, metrics.prof_dumps)
                .config()
                .max_seconds,
            7
        );
    }

    #[test]
    fn seconds_are_whole_and_within_the_limit() {
        let profiler = Profiler::for_tests(); // max_seconds 300
        assert_eq!(profiler.parse_seconds("1"), Ok(1));
        assert_eq!(profiler.parse_seconds("300"), Ok(300));
        for bad in ["0", "301", "1.5", "-1", "", "ten"] {
            let error = profiler.parse_seconds(bad).unwrap_err();
            assert_eq!(error.status(), 400, "{bad:?}");
            assert!(error.to_string().contains("from 1 to 300"), "{error}");
        }
    }

    #[test]
    fn executable_names_become_safe_directory_names() {
        assert_eq!(file_name_safe("my-app_2"), "my-app_2");
        assert_eq!(file_name_safe("my app.v2/../x"), "my_app_v2____x");
        assert_eq!(file_name_safe("é"), "_");
    }

    #[test]
    fn retry_after_is_the_remaining_time_rounded_up() {
        let profiler = Profiler::for_tests();
        let _running = profiler.begin(Duration::from_millis(2500)).unwrap();
        match profiler.begin(Duration::from_secs(1)) {
            Err(ProfileError::Busy { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(3))
            }
            Err(other) => panic!("expected Busy, got {other:?}"),
            Ok(_) => panic!("a second operation was let in"),
        };
    }
}
