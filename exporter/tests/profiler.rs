//! The profiler's results, not just their shape: what a diff against a stored dump and a timed
//! profile contain, and when automatic dumps fire. In-process, with jemalloc sampling every
//! 64 KiB on average so 32 MiB is estimated within a few percent.
mod support;

use std::sync::Arc;
use std::time::Duration;

use exporter::collectors::{ExporterMetrics, Refreshed};
use exporter::profiling::operations::{self, HeapRequest};
use exporter::profiling::{AutoDump, Format, Profiler, ProfilingConfig};
use support::TempDir;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 45] = b"prof:true,prof_active:true,lg_prof_sample:16\0";

const HELD: usize = 32 << 20;

fn profiler(dir: &TempDir, auto: Option<AutoDump>) -> Arc<Profiler> {
    let config = ProfilingConfig {
        dump_dir: dir.path().to_owned(),
        auto,
        ..ProfilingConfig::default()
    };
    Profiler::new(config, ExporterMetrics::new().prof_dumps).shared()
}

/// 32 MiB in 8 KiB blocks, from a function no other stack contains.
#[inline(never)]
fn held_since_the_base_dump() -> Vec<Vec<u8>> {
    (0..HELD / 8192).map(|i| vec![i as u8; 8192]).collect()
}

#[inline(never)]
fn freed_after_the_base_dump() -> Vec<Vec<u8>> {
    (0..HELD / 8192).map(|i| vec![i as u8; 8192]).collect()
}

#[inline(never)]
fn held_during_the_window() -> Vec<Vec<u8>> {
    (0..HELD / 8192).map(|i| vec![i as u8; 8192]).collect()
}

/// Bytes the folded stacks attribute to frames named `function`.
fn bytes_of(folded: &str, function: &str) -> f64 {
    folded
        .lines()
        .filter(|l| l.contains(function))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn collapsed(profiler: &Arc<Profiler>, seconds: Option<u64>, base: Option<String>) -> String {
    let request = HeapRequest {
        format: Format::Collapsed,
        seconds,
        base,
        shown: exporter::profiling::SampleType::Inuse,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rendered = runtime
        .block_on(operations::heap(profiler.clone(), request))
        .unwrap();
    String::from_utf8(rendered.body).unwrap()
}

#[test]
fn a_diff_holds_what_grew_since_the_base_and_not_what_was_freed() {
    let dir = TempDir::new("diff-content");
    let profiler = profiler(&dir, None);
    let freed_later = freed_after_the_base_dump();
    let base = profiler
        .store_dump(exporter::profiling::Trigger::Manual)
        .unwrap();
    let held = held_since_the_base_dump();
    drop(freed_later);

    let diff = collapsed(&profiler, None, Some(base.id));
    let grew = bytes_of(&diff, "held_since_the_base_dump");
    assert!(
        (HELD as f64 * 0.75..HELD as f64 * 1.25).contains(&grew),
        "the diff shows ~32 MiB from held_since_the_base_dump: {grew}"
    );
    assert_eq!(
        bytes_of(&diff, "freed_after_the_base_dump"),
        0.0,
        "what was freed since the base is not growth"
    );
    let whole = collapsed(&profiler, None, None);
    assert!(bytes_of(&whole, "held_since_the_base_dump") > 0.75 * HELD as f64);
    drop(held);
}

#[test]
fn a_timed_profile_holds_what_the_window_allocated() {
    let dir = TempDir::new("timed-content");
    let profiler = profiler(&dir, None);
    let during = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(500));
        held_during_the_window()
    });
    let timed = collapsed(&profiler, Some(2), None);
    let grew = bytes_of(&timed, "held_during_the_window");
    assert!(
        (HELD as f64 * 0.75..HELD as f64 * 1.25).contains(&grew),
        "the 2 s profile shows ~32 MiB from held_during_the_window: {grew}"
    );
    drop(during.join().unwrap());
}

fn reading(allocated: u64) -> Refreshed {
    let mut reading = Refreshed::default();
    reading.stats.allocated = allocated;
    reading
}

/// Synthetic readings through the profiler itself: a dump when the metric grew by the
/// configured amount since the last dump (which re-baselines), none during the cooldown.
#[test]
fn automatic_dumps_rebaseline_and_cool_down() {
    let dir = TempDir::new("auto-cooldown");
    let auto = AutoDump {
        growth_bytes: Some(1000),
        cooldown: Duration::from_millis(300),
        ..AutoDump::default()
    };
    let profiler = profiler(&dir, Some(auto));
    assert!(
        profiler.check_auto(&reading(10_000)).is_none(),
        "the first reading is the baseline"
    );
    assert!(profiler.check_auto(&reading(10_999)).is_none());
    assert!(
        matches!(profiler.check_auto(&reading(11_000)), Some(Ok(_))),
        "grew by 1000"
    );
    assert!(
        profiler.check_auto(&reading(13_000)).is_none(),
        "within the cooldown no dump, however much it grew"
    );
    std::thread::sleep(Duration::from_millis(350));
    assert!(
        profiler.check_auto(&reading(11_999)).is_none(),
        "re-baselined at 11,000 by the dump: 999 more is not enough"
    );
    assert!(matches!(profiler.check_auto(&reading(12_000)), Some(Ok(_))));
    assert_eq!(profiler.list().len(), 2, "two dumps stored");
}

/// `GET /debug/pprof/status` reads jemalloc's state as this binary configured it
/// (`prof:true,prof_active:true,lg_prof_sample:16`, no `prof_accum`) and the ring's settings.
#[test]
fn status_reports_jemalloc_s_profiling_settings() {
    let dir = TempDir::new("status");
    let status = profiler(&dir, None).status();
    assert!(status.profiling_compiled && status.profiling_enabled && status.profiling_active);
    assert_eq!(status.lg_sample, 16);
    assert_eq!(status.sample_interval_bytes, 65536);
    assert!(!status.cumulative_counts, "prof_accum is off");
    assert_eq!(status.hint, None, "nothing to fix");
    assert_eq!(status.dump_dir, dir.path().display().to_string());
    assert_eq!(status.max_seconds, 300);
    assert_eq!(status.auto_dump, None);
}
