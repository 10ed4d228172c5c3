//! Prometheus collectors: shape jemalloc statistics, scope counters and the exporter's own health
//! into metric families.
//!
//! Each collector implements [`prometheus::core::Collector`], so a service can register them in
//! its own `Registry` and serve them from its own HTTP stack; [`crate::Exporter`] does both for
//! you. Families are built directly (no per-scrape label hashing), so a scrape of 1,000 scopes
//! stays cheap.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::stats::{JemallocStats, ReadError};

/// One metric family: its name, help, type and (for `collect`) samples.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
}

impl Family {
    const fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: MetricType::GAUGE,
            labels: &[],
        }
    }

    fn desc(&self) -> Desc {
        let labels = self.labels.iter().map(|l| l.to_string()).collect();
        Desc::new(
            self.name.into(),
            self.help.into(),
            labels,
            Default::default(),
        )
        .expect("metric names and labels here are valid")
    }

    /// A family with one sample per `(label values, value)`.
    fn samples<'a>(&self, samples: impl IntoIterator<Item = (&'a [&'a str], f64)>) -> MetricFamily {
        let mut family = MetricFamily::default();
        family.set_name(self.name.into());
        family.set_help(self.help.into());
        family.set_field_type(self.kind);
        let metrics = samples
            .into_iter()
            .map(|(values, value)| {
                let mut metric = Metric::default();
                metric.set_label(
                    self.labels
                        .iter()
                        .zip(values)
                        .map(|(name, value)| {
                            let mut pair = LabelPair::default();
                            pair.set_name(name.to_string());
                            pair.set_value(value.to_string());
                            pair
                        })
                        .collect(),
                );
                match self.kind {
                    MetricType::COUNTER => {
                        let mut counter = Counter::default();
                        counter.set_value(value);
                        metric.set_counter(counter);
                    }
                    _ => {
                        let mut gauge = Gauge::default();
                        gauge.set_value(value);
                        metric.set_gauge(gauge);
                    }
                }
                metric
            })
            .collect();
        family.set_metric(metrics);
        family
    }

    fn single(&self, value: f64) -> MetricFamily {
        self.samples([(&[][..], value)])
    }
}

/// One reading: jemalloc's statistics and every scope's counters, taken together (the epoch
/// advanced, then the scopes read, ~15 µs apart), so figures of one scrape compare like with like.
#[derive(Debug, Clone, Default)]
pub struct Refreshed {
    pub stats: JemallocStats,
    /// Every scope's counters, read right after `stats`.
    pub scopes: Vec<tracking_alloc::ScopeStats>,
    /// Sum of live bytes over all scopes, of `scopes`.
    pub scoped_live_bytes: u64,
    /// Bytes the tracking allocator holds for itself (per-thread slots, side table).
    pub tracking_overhead_bytes: u64,
}

impl Refreshed {
    /// jemalloc's allocated bytes that no part can be named for: allocated minus what the
    /// scopes hold, what sits free in thread caches and the tracker's own overhead (clamped at
    /// 0): C libraries, allocations before the tracker, size-class rounding.
    pub fn unattributed_bytes(&self) -> u64 {
        self.stats
            .allocated
            .saturating_sub(self.scoped_live_bytes)
            .saturating_sub(self.stats.tcache)
            .saturating_sub(self.tracking_overhead_bytes)
    }
}

/// How old a reading a scrape accepts: concurrent scrapes within this share one epoch advance.
pub const SCRAPE_MAX_AGE: Duration = Duration::from_millis(100);

/// A gauge family and how to read its value from a refresh.
type JemallocGauge = (Family, fn(&Refreshed) -> f64);

const JEMALLOC_GAUGES: [JemallocGauge; 16] = [
    (Family::gauge("jemalloc_allocated_bytes", "Bytes in live allocations, as jemalloc rounds them to size classes (stats.allocated)."), |r| r.stats.allocated as f64),
    (Family::gauge("jemalloc_active_bytes", "Bytes in active pages, allocated plus free space inside them; a multiple of the page size (stats.active)."), |r| r.stats.active as f64),
    (Family::gauge("jemalloc_metadata_bytes", "Bytes of jemalloc's own metadata (stats.metadata)."), |r| r.stats.metadata as f64),
    (Family::gauge("jemalloc_resident_bytes", "Bytes in physically resident pages mapped by jemalloc, including dirty pages and metadata (stats.resident)."), |r| r.stats.resident as f64),
    (Family::gauge("jemalloc_mapped_bytes", "Bytes in active extents mapped by jemalloc (stats.mapped)."), |r| r.stats.mapped as f64),
    (Family::gauge("jemalloc_retained_bytes", "Bytes of virtual memory jemalloc keeps mapped after returning the pages to the OS; not resident (stats.retained)."), |r| r.stats.retained as f64),
    (Family::gauge("jemalloc_dirty_bytes", "Bytes in dirty pages: freed but still resident until jemalloc purges them (dirty_decay_ms)."), |r| r.stats.dirty as f64),
    (Family::gauge("jemalloc_tcache_bytes", "Bytes of free blocks held in thread caches, which jemalloc counts as allocated (stats.arenas.<all>.tcache_bytes): allocated but held by no one."), |r| r.stats.tcache as f64),
    (Family::gauge("jemalloc_muzzy_bytes", "Bytes in muzzy pages: freed and lazily returned with MADV_FREE (muzzy_decay_ms)."), |r| r.stats.muzzy as f64),
    (Family::gauge("jemalloc_arenas", "Number of jemalloc arenas (arenas.narenas)."), |r| r.stats.arenas as f64),
    (Family::gauge("jemalloc_background_threads", "jemalloc background purging threads running; 0 when background_thread is off."), |r| r.stats.background_threads as f64),
    (Family::gauge("jemalloc_profiling_enabled", "1 if heap profiling was enabled at start-up (prof:true in malloc_conf), else 0."), |r| f64::from(u8::from(r.stats.profiling_enabled))),
    (Family::gauge("jemalloc_profiling_active", "1 if heap profiling is sampling allocations right now (prof.active), else 0."), |r| f64::from(u8::from(r.stats.profiling_active))),
    (Family::gauge("jemalloc_profiling_sample_interval_bytes", "Average bytes allocated between heap profile samples (2^lg_prof_sample); 0 when profiling is not compiled in."), |r| if r.stats.profiling_compiled { (1u64 << r.stats.lg_prof_sample) as f64 } else { 0.0 }),
    (Family::gauge("memory_unattributed_bytes", "jemalloc allocated bytes held by someone no scope names: allocated minus the sum of memory_scope_live_bytes, jemalloc_tcache_bytes and memory_tracking_overhead_bytes, from one reading; clamped at 0. C libraries, allocations before the tracker, size-class rounding (scopes count requested sizes)."), |r| r.unattributed_bytes() as f64),
    (Family::gauge("memory_tracking_overhead_bytes", "Bytes the tracking allocator holds for its bookkeeping: per-thread counter slots (32 KiB per live thread) and the out-of-line tag table (2 bytes per exact-size-class block)."), |r| r.tracking_overhead_bytes as f64),
];

const JEMALLOC_INFO: Family = Family {
    name: "jemalloc_info",
    help: "jemalloc build and configuration; always 1. malloc_conf lists the effective options.",
    kind: MetricType::GAUGE,
    labels: &["version", "malloc_conf"],
};

/// The last reading, shared by the refresh task and the collectors.
#[derive(Clone, Default)]
pub struct StatsCache(Arc<CacheState>);

#[derive(Default)]
struct CacheState {
    reading: RwLock<Refreshed>,
    /// When `reading` was taken; held while a new one is taken, so concurrent callers of
    /// `fresh` share one epoch advance.
    taken: Mutex<Option<Instant>>,
}

impl StatsCache {
    /// The last reading, however old.
    pub fn get(&self) -> Refreshed {
        self.0
            .reading
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes a new reading now: advances jemalloc's epoch, then reads the scope counters. It
    /// does not count as a scrape's reading for [`fresh`](Self::fresh): a scrape right after a
    /// background refresh still takes its own.
    pub fn refresh(&self) -> Result<(), ReadError> {
        self.take().map(|_| ())
    }

    /// The last reading taken through `fresh` if it is younger than `max_age`, else a new one
    /// (what a scrape uses: [`SCRAPE_MAX_AGE`]). Callers at the same moment share one reading.
    pub fn fresh(&self, max_age: Duration) -> Result<Refreshed, ReadError> {
        let mut taken = self.0.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = *taken {
            if at.elapsed() < max_age {
                return Ok(self.get());
            }
        }
        let reading = self.take()?;
        *taken = Some(Instant::now());
        Ok(reading)
    }

    fn take(&self) -> Result<Refreshed, ReadError> {
        let stats = JemallocStats::read()?;
        let scopes = tracking_alloc::snapshot();
        let reading = Refreshed {
            stats,
            scoped_live_bytes: scopes.iter().map(|s| s.live_bytes).sum(),
            scopes,
            tracking_overhead_bytes: tracking_alloc::overhead_bytes(),
        };
        *self.0.reading.write().unwrap_or_else(|e| e.into_inner()) = reading.clone();
        Ok(reading)
    }

    /// What a scrape reports: the reading pinned for this gather ([`one_reading`]), else one at
    /// most [`SCRAPE_MAX_AGE`] old, else the last one if jemalloc cannot be read (the refresh
    /// task counts and logs that).
    fn for_scrape(&self) -> Refreshed {
        let pinned = PINNED.with(|p| match &*p.borrow() {
            Some((cache, reading)) if *cache == self.id() => Some(reading.clone()),
            _ => None,
        });
        pinned.unwrap_or_else(|| self.fresh(SCRAPE_MAX_AGE).unwrap_or_else(|_| self.get()))
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }
}

thread_local! {
    /// The reading every collector of one cache reports during a gather on this thread.
    static PINNED: std::cell::RefCell<Option<(usize, Refreshed)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `gather` with every collector that shares `cache` reporting one and the same reading,
/// so a scrape's jemalloc gauges, scope figures and `memory_unattributed_bytes` are one instant.
pub(crate) fn one_reading<T>(cache: &StatsCache, gather: impl FnOnce() -> T) -> T {
    let reading = cache.fresh(SCRAPE_MAX_AGE).unwrap_or_else(|_| cache.get());
    PINNED.with(|p| *p.borrow_mut() = Some((cache.id(), reading)));
    let result = gather();
    PINNED.with(|p| *p.borrow_mut() = None);
    result
}

/// jemalloc's statistics and configuration, from the cache the refresh task fills.
///
/// ```
/// let collector = exporter::JemallocCollector::new();
/// collector.cache().refresh().unwrap(); // normally the exporter's background task does this
/// let registry = prometheus::Registry::new();
/// registry.register(Box::new(collector)).unwrap();
/// assert!(registry.gather().iter().any(|f| f.name() == "jemalloc_allocated_bytes"));
/// ```
pub struct JemallocCollector {
    cache: StatsCache,
    descs: Vec<Desc>,
}

impl JemallocCollector {
    /// A collector with an empty cache; refresh it with [`StatsCache::refresh`].
    pub fn new() -> JemallocCollector {
        JemallocCollector::with_cache(StatsCache::default())
    }

    pub fn with_cache(cache: StatsCache) -> JemallocCollector {
        let descs = JEMALLOC_GAUGES
            .iter()
            .map(|(family, _)| family.desc())
            .chain([JEMALLOC_INFO.desc()])
            .collect();
        JemallocCollector { cache, descs }
    }

    pub fn cache(&self) -> &StatsCache {
        &self.cache
    }
}

impl Default for JemallocCollector {
    fn default() -> Self {
        JemallocCollector::new()
    }
}

impl Collector for JemallocCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let refreshed = self.cache.for_scrape();
        let mut families: Vec<_> = JEMALLOC_GAUGES
            .iter()
            .map(|(family, value)| family.single(value(&refreshed)))
            .collect();
        let info = [
            refreshed.stats.version.as_str(),
            refreshed.stats.malloc_conf.as_str(),
        ];
        families.push(JEMALLOC_INFO.samples([(&info[..], 1.0)]));
        families
    }
}

/// A per-scope family and the counter it reports.
type ScopeFamily = (Family, fn(&tracking_alloc::ScopeStats) -> u64);

const SCOPE_FAMILIES: [ScopeFamily; 5] = [
    (Family { name: "memory_scope_live_bytes", help: "Bytes allocated in the scope and not yet freed (requested sizes), wherever they are freed. An unbiased estimate in sampled mode (memory_tracking_info).", kind: MetricType::GAUGE, labels: &["scope"] }, |s| s.live_bytes),
    (Family { name: "memory_scope_allocated_bytes_total", help: "Bytes ever allocated in the scope (requested sizes; a realloc counts its new size).", kind: MetricType::COUNTER, labels: &["scope"] }, |s| s.allocated_bytes),
    (Family { name: "memory_scope_deallocated_bytes_total", help: "Bytes of the scope's blocks ever freed, on any thread, in any scope.", kind: MetricType::COUNTER, labels: &["scope"] }, |s| s.deallocated_bytes),
    (Family { name: "memory_scope_allocations_total", help: "Allocations made in the scope (a realloc counts as one free and one allocation). An unbiased estimate in sampled mode.", kind: MetricType::COUNTER, labels: &["scope"] }, |s| s.allocations),
    (Family { name: "memory_scope_deallocations_total", help: "Frees of blocks the scope allocated.", kind: MetricType::COUNTER, labels: &["scope"] }, |s| s.deallocations),
];

const TRACKING_INFO: Family = Family {
    name: "memory_tracking_info",
    help: "How per-scope memory is measured; always 1. mode: exact (TrackingAlloc: every block), sampled (SampledAlloc: unbiased estimates from one sample per sample_interval_bytes on average) or none (no tracking allocator installed). placement: where owners are recorded (size_class: inline slack or side table, the fast exact placement; appended: 2 bytes added to every block; sampled).",
    kind: MetricType::GAUGE,
    labels: &["mode", "placement", "sample_interval_bytes"],
};

const TRACKING_WARNING: Family = Family::gauge(
    "memory_tracking_warning",
    "1 when the tracking allocator does not work as configured (a jemalloc it does not recognise, so the slower appended placement; or a sampled mode that could not reserve its address range, so scopes read zero); the reason is logged at start-up and by the first snapshot. 0 otherwise.",
);

/// The `memory_tracking_info` labels of the running program.
pub(crate) fn tracking_labels() -> [String; 3] {
    let placement = tracking_alloc::placement();
    let interval = tracking_alloc::sample_interval();
    let mode = match (interval, placement) {
        (Some(_), _) => "sampled",
        (None, Some(_)) => "exact",
        (None, None) => "none",
    };
    [
        mode.to_string(),
        placement.map_or("none", |p| p.as_str()).to_string(),
        interval.unwrap_or(0).to_string(),
    ]
}

/// Per-scope counters from `tracking_alloc::snapshot()`, read at scrape time (no epoch needed:
/// the counters are always current). Every registered scope is exported, zeros included, so
/// `rate()` and `increase()` see a series from its first scrape. Also `memory_tracking_info`
/// (exact or sampled mode) and `memory_tracking_warning`.
pub struct ScopeCollector {
    descs: Vec<Desc>,
    /// Where to read the scopes from, so a scrape's scope figures and jemalloc gauges are one
    /// reading; `None`: read the counters live.
    cache: Option<StatsCache>,
}

impl ScopeCollector {
    /// Reads the scope counters live at each scrape.
    pub fn new() -> ScopeCollector {
        ScopeCollector::reading(None)
    }

    /// Reads the scopes from the reading `cache` shares with a [`JemallocCollector`], so both
    /// report the same instant (what [`register_all`] sets up).
    pub fn with_cache(cache: StatsCache) -> ScopeCollector {
        ScopeCollector::reading(Some(cache))
    }

    fn reading(cache: Option<StatsCache>) -> ScopeCollector {
        ScopeCollector {
            cache,
            descs: SCOPE_FAMILIES
                .iter()
                .map(|(f, _)| f.desc())
                .chain([TRACKING_INFO.desc(), TRACKING_WARNING.desc()])
                .collect(),
        }
    }
}

impl Default for ScopeCollector {
    fn default() -> Self {
        ScopeCollector::new()
    }
}

impl Collector for ScopeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let scopes = match &self.cache {
            Some(cache) => cache.for_scrape().scopes,
            None => tracking_alloc::snapshot(),
        };
        let mut families: Vec<_> = SCOPE_FAMILIES
            .iter()
            .map(|(family, value)| {
                family.samples(scopes.iter().map(|s| {
                    let labels: &[&str] = std::slice::from_ref(&s.name);
                    (labels, value(s) as f64)
                }))
            })
            .collect();
        let info = tracking_labels();
        let info: Vec<&str> = info.iter().map(String::as_str).collect();
        families.push(TRACKING_INFO.samples([(&info[..], 1.0)]));
        let warned = tracking_alloc::tracking_warning().is_some();
        families.push(TRACKING_WARNING.single(f64::from(u8::from(warned))));
        families
    }
}

/// The exporter's own health: how refreshes go and how often it is scraped.
#[derive(Clone)]
pub struct ExporterMetrics {
    pub refresh_duration: prometheus::Gauge,
    pub refresh_errors: IntCounter,
    pub last_refresh: prometheus::Gauge,
    pub scrapes: IntCounterVec,
    /// Heap profile dumps written, by trigger (`manual`, `auto`) and result (`ok`, `error`).
    pub prof_dumps: IntCounterVec,
}

impl ExporterMetrics {
    pub fn new() -> ExporterMetrics {
        let gauge = |name: &str, help: &str| {
            prometheus::Gauge::with_opts(Opts::new(name, help)).expect("valid metric name")
        };
        let scrapes = IntCounterVec::new(
            Opts::new(
                "memory_exporter_scrapes_total",
                "Scrapes of /metrics served, by HTTP status code.",
            ),
            &["code"],
        )
        .expect("valid metric name");
        // Start the known label values at zero so rate() and increase() have a series from the
        // first scrape, before the first error or dump.
        for code in ["200", "401"] {
            scrapes.with_label_values(&[code]);
        }
        let prof_dumps = IntCounterVec::new(
            Opts::new(
                "jemalloc_prof_dumps_total",
                "Heap profile dumps written, by trigger (manual: POST /debug/pprof/dumps; auto: the growth trigger) and result (ok, error).",
            ),
            &["trigger", "result"],
        )
        .expect("valid metric name");
        for trigger in ["manual", "auto"] {
            for result in ["ok", "error"] {
                prof_dumps.with_label_values(&[trigger, result]);
            }
        }
        ExporterMetrics {
            refresh_duration: gauge(
                "memory_exporter_refresh_duration_seconds",
                "How long the last refresh took: advancing jemalloc's epoch (which takes arena locks) and reading its statistics.",
            ),
            refresh_errors: IntCounter::new(
                "memory_exporter_refresh_errors_total",
                "Refreshes of jemalloc statistics that failed; the error is logged. The metrics keep their last good values.",
            )
            .expect("valid metric name"),
            last_refresh: gauge(
                "memory_exporter_last_refresh_timestamp_seconds",
                "Unix time of the last successful refresh of jemalloc statistics.",
            ),
            scrapes,
            prof_dumps,
        }
    }

    /// Refreshes `cache` and records how it went.
    pub fn refresh(&self, cache: &StatsCache) -> Result<(), ReadError> {
        let started = std::time::Instant::now();
        let result = cache.refresh();
        self.refresh_duration.set(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => self.last_refresh.set(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs_f64(),
            ),
            Err(_) => self.refresh_errors.inc(),
        }
        result
    }

    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.refresh_duration.clone()))?;
        registry.register(Box::new(self.refresh_errors.clone()))?;
        registry.register(Box::new(self.last_refresh.clone()))?;
        registry.register(Box::new(self.scrapes.clone()))?;
        registry.register(Box::new(self.prof_dumps.clone()))
    }
}

impl Default for ExporterMetrics {
    fn default() -> Self {
        ExporterMetrics::new()
    }
}

/// The process's own memory, CPU and file descriptors (`process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, …) from `/proc`, as every Prometheus client library names them.
pub fn process_collector() -> prometheus::process_collector::ProcessCollector {
    prometheus::process_collector::ProcessCollector::for_self()
}

/// Registers every collector the exporter serves in `registry`, sharing `cache`.
pub fn register_all(
    registry: &prometheus::Registry,
    cache: &StatsCache,
    health: &ExporterMetrics,
) -> prometheus::Result<()> {
    registry.register(Box::new(JemallocCollector::with_cache(cache.clone())))?;
    registry.register(Box::new(ScopeCollector::with_cache(cache.clone())))?;
    registry.register(Box::new(process_collector()))?;
    health.register(registry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracking_alloc::Scope;

    fn family<'a>(families: &'a [MetricFamily], name: &str) -> &'a MetricFamily {
        families
            .iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("no family {name}"))
    }

    fn value(family: &MetricFamily) -> f64 {
        let metric = &family.get_metric()[0];
        match family.get_field_type() {
            MetricType::COUNTER => metric.get_counter().get_value(),
            _ => metric.get_gauge().get_value(),
        }
    }

    #[test]
    fn jemalloc_collector_reports_the_cache() {
        let collector = JemallocCollector::new();
        collector.cache().refresh().unwrap();
        let families = collector.collect();
        assert_eq!(families.len(), collector.desc().len());
        let get = |name| value(family(&families, name));
        assert!(get("jemalloc_allocated_bytes") > 0.0);
        assert!(get("jemalloc_resident_bytes") >= get("jemalloc_active_bytes"));
        assert!(get("jemalloc_active_bytes") >= get("jemalloc_allocated_bytes"));
        assert!(get("jemalloc_arenas") >= 1.0);
        assert!(get("memory_tracking_overhead_bytes") > 0.0);
        assert!(get("memory_unattributed_bytes") <= get("jemalloc_allocated_bytes"));
        let info = &family(&families, "jemalloc_info").get_metric()[0];
        let labels: Vec<_> = info.get_label().iter().map(|l| l.name()).collect();
        assert_eq!(labels, ["version", "malloc_conf"]);
    }

    #[test]
    fn scope_collector_exports_every_scope_with_its_counters() {
        let held = {
            let _g = Scope::named("collector-test").enter();
            std::hint::black_box(vec![0u8; 12345])
        };
        let families = ScopeCollector::new().collect();
        let live = family(&families, "memory_scope_live_bytes");
        assert_eq!(live.get_field_type(), MetricType::GAUGE);
        let sample = live
            .get_metric()
            .iter()
            .find(|m| m.get_label()[0].value() == "collector-test")
            .expect("the scope is exported");
        assert_eq!(sample.get_gauge().get_value(), 12345.0);
        let allocated = family(&families, "memory_scope_allocated_bytes_total");
        assert_eq!(allocated.get_field_type(), MetricType::COUNTER);
        assert!(allocated
            .get_metric()
            .iter()
            .any(|m| m.get_label()[0].value() == "unscoped"));
        // The unit tests run under TrackingAlloc<Jemalloc>: exact, fast placement, no warning.
        let info = &family(&families, "memory_tracking_info").get_metric()[0];
        let labels: Vec<_> = info
            .get_label()
            .iter()
            .map(|l| (l.name(), l.value()))
            .collect();
        assert_eq!(
            labels,
            [
                ("mode", "exact"),
                ("placement", "size_class"),
                ("sample_interval_bytes", "0")
            ]
        );
        let warning = family(&families, "memory_tracking_warning").get_metric()[0].get_gauge();
        assert_eq!(warning.get_value(), 0.0);
        drop(held);
    }

    /// A gauge of `JEMALLOC_GAUGES` read from `reading`.
    fn gauge(reading: &Refreshed, name: &str) -> f64 {
        let (_, value) = JEMALLOC_GAUGES
            .iter()
            .find(|(family, _)| family.name == name)
            .unwrap_or_else(|| panic!("no gauge {name}"));
        value(reading)
    }

    #[test]
    fn unattributed_is_allocated_less_scopes_tcache_and_overhead_clamped_at_zero() {
        let mut reading = Refreshed {
            stats: JemallocStats {
                allocated: 10_000,
                tcache: 1_000,
                ..JemallocStats::default()
            },
            scopes: Vec::new(),
            scoped_live_bytes: 6_000,
            tracking_overhead_bytes: 500,
        };
        assert_eq!(reading.unattributed_bytes(), 2_500);
        assert_eq!(gauge(&reading, "memory_unattributed_bytes"), 2_500.0);
        reading.scoped_live_bytes = 9_000; // scopes count requested sizes, jemalloc rounds
        assert_eq!(reading.unattributed_bytes(), 0);
    }

    #[test]
    fn the_sample_interval_is_two_to_the_lg_sample_when_profiling_is_compiled() {
        let mut reading = Refreshed::default();
        reading.stats.lg_prof_sample = 19;
        assert_eq!(
            gauge(&reading, "jemalloc_profiling_sample_interval_bytes"),
            0.0
        );
        reading.stats.profiling_compiled = true;
        assert_eq!(
            gauge(&reading, "jemalloc_profiling_sample_interval_bytes"),
            524_288.0
        );
    }

    /// Bytes live in `scope` in `reading` (0 if it has no such scope).
    fn live_in(reading: &Refreshed, scope: &str) -> u64 {
        reading
            .scopes
            .iter()
            .find(|s| s.name == scope)
            .map_or(0, |s| s.live_bytes)
    }

    #[test]
    fn fresh_shares_a_young_reading_and_takes_a_new_one_when_it_is_old() {
        let cache = StatsCache::default();
        let first = cache.fresh(Duration::from_secs(3600)).unwrap();
        let held = {
            let _g = Scope::named("fresh-test").enter();
            std::hint::black_box(vec![0u8; 4096])
        };
        let shared = cache.fresh(Duration::from_secs(3600)).unwrap();
        assert_eq!(live_in(&first, "fresh-test"), 0);
        assert_eq!(
            live_in(&shared, "fresh-test"),
            0,
            "the young reading is shared"
        );
        let new = cache.fresh(Duration::ZERO).unwrap();
        assert_eq!(live_in(&new, "fresh-test"), 4096, "an old one is replaced");
        drop(held);
    }

    /// During `one_reading(a, ..)`, `a`'s collectors report the pinned reading even after a
    /// newer one was taken; another cache's collectors are not pinned to it.
    #[test]
    fn a_gather_pins_its_own_caches_reading_and_no_other() {
        let pinned = StatsCache::default();
        let other = StatsCache::default();
        let scope_live = |cache: &StatsCache| {
            let families = ScopeCollector::with_cache(cache.clone()).collect();
            family(&families, "memory_scope_live_bytes")
                .get_metric()
                .iter()
                .find(|m| m.get_label()[0].value() == "pin-test")
                .map_or(0.0, |m| m.get_gauge().get_value())
        };
        let (pinned_sees, other_sees, refreshed_sees) = one_reading(&pinned, || {
            let held = {
                let _g = Scope::named("pin-test").enter();
                std::hint::black_box(vec![0u8; 8192])
            };
            pinned.refresh().unwrap(); // a newer reading in the cache: not this gather's
            let seen = (
                scope_live(&pinned),
                scope_live(&other),
                live_in(&pinned.get(), "pin-test"),
            );
            drop(held);
            seen
        });
        assert_eq!(refreshed_sees, 8192);
        assert_eq!(
            pinned_sees, 0.0,
            "the gather's reading, taken before the allocation"
        );
        assert_eq!(other_sees, 8192.0, "another cache reads for itself");
    }

    #[test]
    fn a_collectors_cache_is_the_one_it_reads() {
        let collector = JemallocCollector::new();
        assert_eq!(collector.cache().get().stats.allocated, 0, "not read yet");
        collector.cache().refresh().unwrap();
        assert!(collector.cache().get().stats.allocated > 0);
    }

    /// What a collector declares is what it reports: the registry checks names against the
    /// declarations (a family registered twice is refused).
    #[test]
    fn collectors_declare_every_family_they_report() {
        let names = |collector: &dyn Collector| {
            let declared: Vec<String> =
                collector.desc().iter().map(|d| d.fq_name.clone()).collect();
            let reported: Vec<String> = collector
                .collect()
                .iter()
                .map(|f| f.name().to_owned())
                .collect();
            (declared, reported)
        };
        let jemalloc = JemallocCollector::new();
        jemalloc.cache().refresh().unwrap();
        for collector in [&jemalloc as &dyn Collector, &ScopeCollector::new()] {
            let (declared, reported) = names(collector);
            assert_eq!(declared, reported);
        }
    }

    #[test]
    fn health_metrics_count_refreshes() {
        let health = ExporterMetrics::new();
        let cache = StatsCache::default();
        health.refresh(&cache).unwrap();
        assert!(health.last_refresh.get() > 1.6e9);
        assert!(health.refresh_duration.get() >= 0.0);
        assert_eq!(health.refresh_errors.get(), 0);
        let registry = prometheus::Registry::new();
        register_all(&registry, &cache, &health).unwrap();
        let names: Vec<_> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for expected in [
            "process_resident_memory_bytes",
            "memory_exporter_scrapes_total",
            "memory_scope_live_bytes",
            "jemalloc_info",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
    }
}
