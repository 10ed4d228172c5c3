//! When to take a heap dump without being asked: the growth trigger.
//!
//! For problems that cannot be reproduced (the source article's advice): keep profiling on and
//! have a dump written whenever memory has grown enough since the last one, so the dump ring
//! holds the heap's state at each step of a growth. Cheaper than `lg_prof_interval`, which
//! dumps on every N bytes *allocated* (churn included), not on growth of what is held.

use std::fmt;
use std::time::{Duration, Instant};

/// Which jemalloc figure the trigger watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoMetric {
    /// `stats.allocated`: bytes in live allocations.
    Allocated,
    /// `stats.resident`: resident pages, including fragmentation and dirty pages.
    Resident,
}

/// The growth trigger's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoDump {
    pub metric: AutoMetric,
    /// Dump when the metric grew by this many bytes since the last dump.
    pub growth_bytes: Option<u64>,
    /// Dump when the metric grew by this fraction (0.2 = 20 %) since the last dump.
    pub growth_ratio: Option<f64>,
    /// Dump at every new high-water mark of the metric.
    pub on_high_water: bool,
    /// Minimum time between automatic dumps.
    pub cooldown: Duration,
}

impl Default for AutoDump {
    fn default() -> Self {
        AutoDump {
            metric: AutoMetric::Allocated,
            growth_bytes: Some(1 << 30),
            growth_ratio: None,
            on_high_water: false,
            cooldown: Duration::from_secs(300),
        }
    }
}

impl fmt::Display for AutoDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut conditions = Vec::new();
        if let Some(bytes) = self.growth_bytes {
            conditions.push(format!("+{bytes} bytes"));
        }
        if let Some(ratio) = self.growth_ratio {
            conditions.push(format!("+{:.0}%", ratio * 100.0));
        }
        if self.on_high_water {
            conditions.push("new high-water mark".to_owned());
        }
        write!(
            f,
            "{:?} {} since the last dump, at most every {} s",
            self.metric,
            conditions.join(" or "),
            self.cooldown.as_secs()
        )
    }
}

/// The baseline the trigger compares with.
#[derive(Debug, Default)]
pub(super) struct AutoState {
    /// The metric when the last dump was taken (or when watching began).
    baseline: Option<u64>,
    high_water: u64,
    last_dump: Option<Instant>,
}

impl AutoState {
    pub(super) fn should_dump(&mut self, config: &AutoDump, value: u64, now: Instant) -> bool {
        let Some(baseline) = self.baseline else {
            self.baseline = Some(value);
            self.high_water = value;
            return false;
        };
        let cooling = self
            .last_dump
            .is_some_and(|last| now.duration_since(last) < config.cooldown);
        let grew_bytes = config
            .growth_bytes
            .is_some_and(|b| value >= baseline.saturating_add(b));
        let grew_ratio = config
            .growth_ratio
            .is_some_and(|r| value as f64 >= baseline as f64 * (1.0 + r));
        let new_high = config.on_high_water && value > self.high_water;
        !cooling && (grew_bytes || grew_ratio || new_high)
    }

    pub(super) fn dumped(&mut self, value: u64, now: Instant) {
        self.baseline = Some(value);
        self.high_water = self.high_water.max(value);
        self.last_dump = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_on_growth_respects_cooldown_and_rebases() {
        let config = AutoDump {
            growth_bytes: Some(100),
            cooldown: Duration::from_secs(10),
            ..AutoDump::default()
        };
        let mut state = AutoState::default();
        let t0 = Instant::now();
        assert!(
            !state.should_dump(&config, 1000, t0),
            "the first reading sets the baseline"
        );
        assert!(!state.should_dump(&config, 1099, t0));
        assert!(state.should_dump(&config, 1100, t0));
        state.dumped(1100, t0);
        assert!(
            !state.should_dump(&config, 1300, t0 + Duration::from_secs(5)),
            "cooling down"
        );
        assert!(
            state.should_dump(&config, 1300, t0 + Duration::from_secs(10)),
            "the cooldown is over after exactly its length"
        );
        state.dumped(1300, t0 + Duration::from_secs(11));
        assert!(
            !state.should_dump(&config, 1350, t0 + Duration::from_secs(30)),
            "rebased at 1300"
        );
    }

    #[test]
    fn ratio_and_high_water() {
        let ratio = AutoDump {
            growth_bytes: None,
            growth_ratio: Some(0.5),
            cooldown: Duration::ZERO,
            ..AutoDump::default()
        };
        let mut state = AutoState::default();
        let now = Instant::now();
        state.should_dump(&ratio, 1000, now);
        assert!(!state.should_dump(&ratio, 1499, now));
        assert!(state.should_dump(&ratio, 1500, now));

        let high = AutoDump {
            growth_bytes: None,
            on_high_water: true,
            cooldown: Duration::ZERO,
            ..AutoDump::default()
        };
        let mut state = AutoState::default();
        state.should_dump(&high, 1000, now);
        assert!(!state.should_dump(&high, 900, now));
        assert!(state.should_dump(&high, 1001, now));
        state.dumped(1001, now);
        assert!(!state.should_dump(&high, 1001, now));
    }
}
