//! The memory console: one self-contained page at `GET /debug/memory` (HTML, CSS and script
//! embedded in the binary, nothing loaded from elsewhere) and the JSON it reads, a small API
//! for scripts too:
//!
//! - `GET /debug/memory/overview[?since=MS]`: jemalloc's figures and the process's RSS now,
//!   the tracking mode, profiling state, release probes, and the chart's points newer than
//!   `since` (Unix milliseconds; all of the last hour without it);
//! - `GET /debug/memory/scopes`: every scope's live bytes, change over 1/5/60 minutes,
//!   allocation rates and a sparkline, biggest growers first.
//!
//! The page itself carries no data: with a token configured it asks for it once, keeps it in
//! the tab's memory and sends it on every call; the heap views, dumps and actions use the
//! `/debug/pprof/*` and `/debug/memory/release` routes.

mod history;

use serde::Serialize;

pub use history::{History, OverviewPoint, ScopeRow, CAPACITY, STEP};

use crate::collectors::StatsCache;
use crate::params::Query;
use crate::profiling::{ProfileError, Profiler};

/// The page: under 100 KB, no external resources.
pub(crate) const PAGE: &str = include_str!("page.html");

/// What `/debug/memory/overview` answers.
#[derive(Serialize)]
pub(crate) struct Overview {
    pub now: Now,
    /// Chart points newer than `since`, oldest first.
    pub points: Vec<OverviewPoint>,
    pub step_seconds: u64,
    pub history_points: usize,
    pub release_probes: Vec<String>,
    pub profiling: crate::profiling::Status,
}

/// The figures of the latest refresh.
#[derive(Serialize)]
pub(crate) struct Now {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub mapped: u64,
    pub retained: u64,
    pub unattributed: u64,
    /// resident ÷ allocated.
    pub fragmentation: f64,
    pub rss: u64,
    pub tracking_mode: String,
    pub tracking_placement: String,
    pub sample_interval_bytes: u64,
}

/// `GET /debug/memory/overview[?since=MS]`.
pub(crate) fn overview(
    history: &History,
    cache: &StatsCache,
    profiler: &Profiler,
    query: &Query,
) -> Result<Overview, ProfileError> {
    let since = match query.get("since") {
        None => 0,
        Some(value) => value.parse::<u64>().map_err(|_| {
            ProfileError::BadRequest(format!(
                "since={value:?} is not a time: give Unix milliseconds, as the points' `t`"
            ))
        })?,
    };
    let reading = cache.get();
    let points = history.overview_since(since);
    let rss = history.latest().map_or(0, |p| p.rss);
    let [mode, placement, interval] = crate::collectors::tracking_labels();
    let stats = &reading.stats;
    Ok(Overview {
        now: Now {
            allocated: stats.allocated,
            active: stats.active,
            resident: stats.resident,
            mapped: stats.mapped,
            retained: stats.retained,
            unattributed: reading.unattributed_bytes(),
            fragmentation: if stats.allocated == 0 {
                0.0
            } else {
                stats.resident as f64 / stats.allocated as f64
            },
            rss,
            tracking_mode: mode,
            tracking_placement: placement,
            sample_interval_bytes: interval.parse().unwrap_or(0),
        },
        points,
        step_seconds: STEP.as_secs(),
        history_points: CAPACITY,
        release_probes: crate::release::release_probes(),
        profiling: profiler.status(),
    })
}

/// What `/debug/memory/scopes` answers.
#[derive(Serialize)]
pub(crate) struct Scopes {
    pub scopes: Vec<ScopeRow>,
}
