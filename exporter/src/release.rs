//! Release probes: measure what a cache holds by releasing it.
//!
//! The source article's technique for slow growth: free a structure you suspect (usually a
//! cache) and see how much memory comes back. A service registers named hooks; a request runs
//! one or all of them and reports, per probe, jemalloc's allocated and resident bytes before
//! and after (epoch advanced around each, dirty pages purged so resident reflects the release).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! let cache = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
//! let handle = cache.clone();
//! exporter::register_release("lru", move || handle.lock().unwrap().clear());
//! ```

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, LazyLock, Mutex};

use serde::Serialize;

use crate::profiling::{ctl, ProfileError};
use crate::stats::JemallocStats;

type Hook = Arc<dyn Fn() + Send + Sync>;

static PROBES: LazyLock<Mutex<Vec<(String, Hook)>>> = LazyLock::new(Default::default);

/// Registers (or replaces) the release hook `name`. Names are 1–64 characters of letters,
/// digits, `-`, `_` and `.`; other names are refused with a message.
pub fn register_release(
    name: impl Into<String>,
    hook: impl Fn() + Send + Sync + 'static,
) -> Result<(), String> {
    let name = name.into();
    if !valid_name(&name) {
        return Err(format!(
            "release probe name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
        ));
    }
    let mut probes = PROBES.lock().unwrap_or_else(|e| e.into_inner());
    probes.retain(|(n, _)| *n != name);
    probes.push((name, Arc::new(hook)));
    Ok(())
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Names of the registered probes.
pub fn release_probes() -> Vec<String> {
    PROBES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(n, _)| n.clone())
        .collect()
}

/// What one probe released.
#[derive(Debug, Serialize)]
pub struct Released {
    pub probe: String,
    pub allocated_before: u64,
    pub allocated_after: u64,
    /// `allocated_before - allocated_after`; negative if memory grew meanwhile.
    pub allocated_freed: i64,
    pub resident_before: u64,
    pub resident_after: u64,
    pub resident_freed: i64,
    /// Set if the hook panicked (the service keeps running; the figures are still reported).
    pub error: Option<String>,
}

fn reading() -> Result<JemallocStats, ProfileError> {
    JemallocStats::read().map_err(|e| ProfileError::Internal(e.to_string()))
}

/// Runs the probe `selection` (or every probe for `None` / `"all"`) and reports each.
pub fn run(selection: Option<&str>) -> Result<Vec<Released>, ProfileError> {
    let probes: Vec<(String, Hook)> = PROBES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let chosen: Vec<_> = match selection {
        None | Some("all") => probes,
        Some(name) => {
            if !valid_name(name) {
                return Err(ProfileError::BadRequest(format!(
                    "probe={name:?} is not a probe name (letters, digits, '-', '_', '.')"
                )));
            }
            let found: Vec<_> = probes.iter().filter(|(n, _)| n == name).cloned().collect();
            if found.is_empty() {
                let known: Vec<_> = probes.iter().map(|(n, _)| n.as_str()).collect();
                return Err(ProfileError::NotFound(format!(
                    "no release probe {name:?}; registered: {known:?} (or probe=all)"
                )));
            }
            found
        }
    };
    let mut report = Vec::with_capacity(chosen.len());
    for (probe, hook) in chosen {
        ctl::purge();
        let before = reading()?;
        let error = catch_unwind(AssertUnwindSafe(|| hook()))
            .err()
            .map(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("memory exporter: release probe {probe} panicked: {what}");
                format!("the probe panicked: {what}")
            });
        ctl::purge();
        let after = reading()?;
        report.push(Released {
            probe,
            allocated_freed: before.allocated as i64 - after.allocated as i64,
            resident_freed: before.resident as i64 - after.resident as i64,
            allocated_before: before.allocated,
            allocated_after: after.allocated,
            resident_before: before.resident,
            resident_after: after.resident,
            error,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probes of these tests' own names (the registry is the process's).
    fn names_starting(prefix: &str) -> Vec<String> {
        let mut names: Vec<_> = release_probes()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn registering_a_name_again_replaces_only_that_probe() {
        register_release("replace-a", || ()).unwrap();
        register_release("replace-b", || ()).unwrap();
        register_release("replace-a", || ()).unwrap();
        assert_eq!(names_starting("replace-"), ["replace-a", "replace-b"]);
    }

    #[test]
    fn a_probe_reports_what_its_hook_released() {
        let _serial = crate::process_figures_serialized();
        let cache = Arc::new(Mutex::new(vec![1u8; 64 << 20]));
        let held = cache.clone();
        register_release("measured-cache", move || {
            *held.lock().unwrap() = Vec::new();
        })
        .unwrap();
        let report = run(Some("measured-cache")).unwrap();
        assert_eq!(report.len(), 1);
        let released = &report[0];
        assert_eq!(released.probe, "measured-cache");
        assert_eq!(released.error, None);
        assert!(released.allocated_before > 64 << 20, "{released:?}");
        // Smaller allocations of other tests may land meanwhile; 64 MiB stands out.
        assert!(released.allocated_freed > 32 << 20, "{released:?}");
        assert_eq!(
            released.allocated_freed,
            released.allocated_before as i64 - released.allocated_after as i64
        );
        assert!(released.resident_after > 0, "{released:?}");
        assert_eq!(
            released.resident_freed,
            released.resident_before as i64 - released.resident_after as i64
        );
        assert!(cache.lock().unwrap().is_empty());
    }

    #[test]
    fn a_panicking_hook_is_reported_not_fatal() {
        register_release("panics-first", || panic!("poisoned lock")).unwrap();
        let report = run(Some("panics-first")).unwrap();
        assert_eq!(
            report[0].error.as_deref(),
            Some("the probe panicked: poisoned lock")
        );
    }

    #[test]
    fn bad_and_unknown_names_are_refused_with_what_exists() {
        assert!(register_release("", || ()).is_err());
        assert!(register_release("a/b", || ()).is_err());
        assert!(register_release("x".repeat(65), || ()).is_err());
        register_release("x".repeat(64), || ()).unwrap();
        register_release("known-probe", || ()).unwrap();
        let unknown = run(Some("no-such-probe")).unwrap_err();
        assert!(matches!(unknown, ProfileError::NotFound(_)), "{unknown}");
        assert!(unknown.to_string().contains("known-probe"), "{unknown}");
        let bad = run(Some("../etc")).unwrap_err();
        assert!(matches!(bad, ProfileError::BadRequest(_)), "{bad}");
    }
}
