//! The last hour in memory, for the console: jemalloc's figures and every scope's live bytes,
//! one point every [`STEP`], kept by the refresh task (so it costs nothing per request).
//!
//! Bounded: [`CAPACITY`] points (one hour); per scope one `u64` per point, so 1,024 scopes
//! take 1,024 × 360 × 8 B ≈ 2.9 MiB, charged to the `exporter` scope like all of the
//! exporter's memory. Allocation rates come from the last two refreshes' counters.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::collectors::Refreshed;

/// Time between two points.
pub const STEP: Duration = Duration::from_secs(10);
/// Points kept: one hour.
pub const CAPACITY: usize = 360;
/// Points between two sparkline values: one a minute.
const SPARK_EVERY: usize = 6;

/// One point of the overview chart.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct OverviewPoint {
    /// Unix time, milliseconds.
    pub t: u64,
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub mapped: u64,
    pub retained: u64,
    /// The process's resident set (all memory, not only jemalloc's).
    pub rss: u64,
    pub unattributed: u64,
}

/// One row of the scope table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScopeRow {
    pub name: &'static str,
    pub live_bytes: u64,
    /// Change of live bytes over the last 1, 5 and 60 minutes (or since the oldest point).
    pub change_1m: i64,
    pub change_5m: i64,
    pub change_60m: i64,
    /// Bytes and allocations per second between the last two refreshes.
    pub alloc_bytes_per_sec: f64,
    pub allocs_per_sec: f64,
    /// Live bytes once a minute over the last hour, oldest first (the sparkline).
    pub spark: Vec<u64>,
}

/// Each scope's (allocated bytes, allocations) at one refresh.
type Counters = HashMap<&'static str, (u64, u64)>;

#[derive(Default)]
struct Inner {
    overview: VecDeque<OverviewPoint>,
    /// Per scope, live bytes at each point of `overview` (0 before the scope existed).
    live: HashMap<&'static str, VecDeque<u64>>,
    last_point: Option<Instant>,
    /// The previous refresh: when, and each scope's (allocated bytes, allocations).
    previous: Option<(Instant, Counters)>,
    rates: HashMap<&'static str, (f64, f64)>,
}

/// The ring; one per exporter with debug routes.
#[derive(Default)]
pub struct History(Mutex<Inner>);

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The process's resident set size, from `/proc/self/status` (0 where there is none).
fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

impl History {
    /// Takes in one refresh: updates the rates, and adds a point if [`STEP`] has passed.
    pub fn record(&self, reading: &Refreshed) {
        self.record_at(reading, Instant::now(), SystemTime::now(), process_rss());
    }

    fn record_at(&self, reading: &Refreshed, now: Instant, wall: SystemTime, rss: u64) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let counters: Counters = reading
            .scopes
            .iter()
            .map(|s| (s.name, (s.allocated_bytes, s.allocations)))
            .collect();
        if let Some((then, before)) = &inner.previous {
            let seconds = now.duration_since(*then).as_secs_f64();
            if seconds > 0.0 {
                let rates = counters
                    .iter()
                    .map(|(name, (bytes, allocs))| {
                        let (bytes_before, allocs_before) =
                            before.get(name).copied().unwrap_or((0, 0));
                        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
                        (
                            *name,
                            (rate(*bytes, bytes_before), rate(*allocs, allocs_before)),
                        )
                    })
                    .collect();
                inner.rates = rates;
            }
        }
        inner.previous = Some((now, counters));

        if inner
            .last_point
            .is_some_and(|last| now.duration_since(last) < STEP)
        {
            return;
        }
        inner.last_point = Some(now);
        let stats = &reading.stats;
        let point = OverviewPoint {
            t: unix_ms(wall),
            allocated: stats.allocated,
            active: stats.active,
            resident: stats.resident,
            mapped: stats.mapped,
            retained: stats.retained,
            rss,
            unattributed: reading.unattributed_bytes(),
        };
        let points = inner.overview.len();
        let full = points == CAPACITY;
        if full {
            inner.overview.pop_front();
        }
        inner.overview.push_back(point);
        for scope in &reading.scopes {
            inner
                .live
                .entry(scope.name)
                .or_insert_with(|| std::iter::repeat_n(0, points).collect());
        }
        let live_now: HashMap<&str, u64> = reading
            .scopes
            .iter()
            .map(|s| (s.name, s.live_bytes))
            .collect();
        for (name, ring) in inner.live.iter_mut() {
            if full {
                ring.pop_front();
            }
            ring.push_back(live_now.get(name).copied().unwrap_or(0));
        }
    }

    /// Overview points newer than `since` (Unix ms; 0: all).
    pub fn overview_since(&self, since: u64) -> Vec<OverviewPoint> {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .overview
            .iter()
            .filter(|p| p.t > since)
            .copied()
            .collect()
    }

    /// The newest point, if any.
    pub fn latest(&self) -> Option<OverviewPoint> {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.overview.back().copied()
    }

    /// Every scope of `now` (the latest reading) with its change against the ring's points
    /// 1, 5 and 60 minutes back (or the oldest; a scope newer than the ring counts from 0),
    /// biggest growers over the hour first.
    pub fn scopes(&self, now: &Refreshed) -> Vec<ScopeRow> {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let per_minute = (Duration::from_secs(60).as_secs() / STEP.as_secs()) as usize;
        let mut rows: Vec<ScopeRow> = now
            .scopes
            .iter()
            .map(|scope| {
                let ring = inner.live.get(scope.name);
                let change = |minutes: usize| -> i64 {
                    let then = ring.map_or(0, |ring| {
                        let back = (minutes * per_minute).min(ring.len().saturating_sub(1));
                        ring[ring.len() - 1 - back]
                    });
                    scope.live_bytes as i64 - then as i64
                };
                let (alloc_bytes_per_sec, allocs_per_sec) =
                    inner.rates.get(scope.name).copied().unwrap_or_default();
                // Sparkline: the ring at whole minutes back from its newest point, then now.
                let mut spark: Vec<u64> = ring
                    .map(|ring| ring.iter().rev().step_by(SPARK_EVERY).copied().collect())
                    .unwrap_or_default();
                spark.reverse();
                spark.push(scope.live_bytes);
                ScopeRow {
                    name: scope.name,
                    live_bytes: scope.live_bytes,
                    change_1m: change(1),
                    change_5m: change(5),
                    change_60m: change(60),
                    alloc_bytes_per_sec,
                    allocs_per_sec,
                    spark,
                }
            })
            .collect();
        rows.sort_by(|a, b| b.change_60m.cmp(&a.change_60m).then(a.name.cmp(b.name)));
        rows
    }

    /// Bytes the ring holds now (for the docs' figure and its test).
    pub fn heap_bytes(&self) -> usize {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.overview.capacity() * std::mem::size_of::<OverviewPoint>()
            + inner
                .live
                .values()
                .map(|r| r.capacity() * std::mem::size_of::<u64>())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracking_alloc::ScopeStats;

    fn reading(scopes: &[(&'static str, u64, u64)]) -> Refreshed {
        Refreshed {
            scopes: scopes
                .iter()
                .map(|&(name, live_bytes, allocated_bytes)| ScopeStats {
                    name,
                    live_bytes,
                    allocated_bytes,
                    deallocated_bytes: allocated_bytes - live_bytes.min(allocated_bytes),
                    allocations: allocated_bytes / 64,
                    deallocations: 0,
                })
                .collect(),
            ..Refreshed::default()
        }
    }

    #[test]
    fn a_refresh_adds_a_point_with_the_process_rss() {
        let rss = process_rss();
        // This test process: more than a MiB resident, less than a TiB (the figure is in bytes).
        assert!((1 << 20..1 << 40).contains(&rss), "{rss}");
        let history = History::default();
        history.record(&reading(&[("cache", 10, 10)]));
        let points = history.overview_since(0);
        assert_eq!(points.len(), 1);
        assert!(
            points[0].rss >= 1 << 20 && points[0].t > 0,
            "{:?}",
            points[0]
        );
        // Within STEP of the last point: the rates move, no point is added.
        history.record(&reading(&[("cache", 20, 20)]));
        assert_eq!(history.overview_since(0).len(), 1);
    }

    #[test]
    fn keeps_an_hour_of_points_and_orders_scopes_by_growth() {
        let history = History::default();
        let start = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        // Two hours at one refresh every 5 s: cache grows 1 KiB a point, lru is flat, a scope
        // appears half-way.
        let mut last = Refreshed::default();
        for i in 0..1440u64 {
            let at = Duration::from_secs(5 * i);
            let mut scopes = vec![("cache", 1024 * (i / 2), 4096 * i), ("lru", 5000, 1000 * i)];
            if i >= 720 {
                scopes.push(("late", 77, 77));
            }
            last = reading(&scopes);
            history.record_at(&last, start + at, wall + at, 1);
        }
        let points = history.overview_since(0);
        assert_eq!(points.len(), CAPACITY);
        assert!(points.windows(2).all(|w| w[1].t - w[0].t == 10_000));
        assert_eq!(history.overview_since(points[CAPACITY - 2].t).len(), 1);
        let rows = history.scopes(&last);
        let names: Vec<_> = rows.iter().map(|r| r.name).collect();
        assert_eq!(names, ["cache", "late", "lru"]);
        let cache = &rows[0];
        // One point per 10 s, 1 KiB per point: 6 KiB a minute.
        assert_eq!(cache.change_1m, 6 * 1024);
        assert_eq!(cache.change_5m, 30 * 1024);
        assert_eq!(cache.change_60m, 359 * 1024, "since the oldest point");
        // 4096 B per refresh of 5 s.
        assert!((cache.alloc_bytes_per_sec - 4096.0 / 5.0).abs() < 1e-9);
        assert_eq!(cache.spark.len(), 61, "one a minute, then now");
        assert_eq!(cache.spark.last(), Some(&cache.live_bytes));
        assert_eq!(rows[2].change_60m, 0);
        // A scope the ring has not seen yet counts from zero.
        let newer = reading(&[("cache", 1024 * 719, 0), ("new", 300, 300)]);
        let new = history
            .scopes(&newer)
            .into_iter()
            .find(|r| r.name == "new")
            .unwrap();
        assert_eq!(
            (new.live_bytes, new.change_1m, new.spark.len()),
            (300, 300, 1)
        );
        // Bounded: 3 scopes x 360 points, whatever ran before.
        let held = 3 * CAPACITY * 8 + CAPACITY * std::mem::size_of::<OverviewPoint>();
        let bytes = history.heap_bytes();
        assert!(
            (held..3 * 512 * 8 + 512 * std::mem::size_of::<OverviewPoint>()).contains(&bytes),
            "{bytes}"
        );
        // The scopes' share: at least 8 bytes a point each, against the same hour without them.
        let without_scopes = History::default();
        for i in 0..1440u64 {
            let at = Duration::from_secs(5 * i);
            without_scopes.record_at(&reading(&[]), start + at, wall + at, 1);
        }
        assert!(bytes - without_scopes.heap_bytes() >= 3 * CAPACITY * 8);
    }
}
