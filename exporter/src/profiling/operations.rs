//! The profiling operations as one call each, for every front end (the HTTP routes, a console):
//! they take the profiler for the operation's duration (one at a time), run the slow work on
//! blocking threads, and orchestrate multi-step profiles (a timed profile's begin, dump, wait,
//! dump, diff, render), so handlers only translate HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    ctl, BusyGuard, DumpInfo, Format, ProfileError, Profiler, Rendered, RestoreActive, SampleType,
    Trigger,
};

/// What heap profile to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapRequest {
    pub format: Format,
    /// A timed profile: what the live heap gained per call stack over this many seconds.
    pub seconds: Option<u64>,
    /// Growth since this stored dump.
    pub base: Option<String>,
    /// What a pprof viewer shows first (`/allocs`: allocated bytes).
    pub shown: SampleType,
}

/// How long rendering a profile may take beyond its window, for `Retry-After`.
const RENDER_ALLOWANCE: Duration = Duration::from_secs(1);

/// How long a request waits for a running short operation (a profile without a window, a
/// dump, a release probe) before answering 409, so two scrapers whose requests overlap both
/// get their profile. A timed profile's window is never waited for: 409 at once.
const WAIT_FOR_SHORT: Duration = Duration::from_secs(5);

/// Claims the profiler (see [`Profiler::begin`]), waiting up to [`WAIT_FOR_SHORT`] while a
/// short operation runs.
async fn claim(
    profiler: &Profiler,
    expected: Duration,
    window: bool,
) -> Result<BusyGuard<'_>, ProfileError> {
    let deadline = Instant::now() + WAIT_FOR_SHORT;
    loop {
        let claimed = if window {
            profiler.begin_window(expected)
        } else {
            profiler.begin(expected)
        };
        match claimed {
            Err(ProfileError::Busy { .. })
                if profiler.running_short() && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            claimed => return claimed,
        }
    }
}

/// Runs `work` on a blocking thread, charged to the `exporter` scope; a panic there becomes an
/// internal error, never a crash.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ProfileError> + Send + 'static,
) -> Result<T, ProfileError> {
    tokio::task::spawn_blocking(|| {
        let _scope = tracking_alloc::Scope::named("exporter").enter();
        let result = work();
        Profiler::release_scratch_memory();
        result
    })
    .await
    .map_err(|e| ProfileError::Internal(format!("the profiling task failed: {e}")))?
}

/// The live heap, a timed profile (`seconds`), or growth since a stored dump (`base`), rendered.
pub async fn heap(profiler: Arc<Profiler>, request: HeapRequest) -> Result<Rendered, ProfileError> {
    ctl::require_enabled()?;
    let HeapRequest {
        format,
        seconds,
        base,
        shown,
    } = request;
    if let (Some(_), Some(_)) = (seconds, &base) {
        return Err(ProfileError::BadRequest(
            "give either seconds= (a timed profile) or base= (growth since a stored dump), not both".into(),
        ));
    }
    let window = Duration::from_secs(seconds.unwrap_or(0));
    let _busy = claim(&profiler, window + RENDER_ALLOWANCE, seconds.is_some()).await?;
    let p = profiler.clone();
    match seconds {
        Some(seconds) => {
            // Sample during the window (restored afterwards, even if the caller goes away),
            // and report what the live heap gained per call stack over it.
            let restore = RestoreActive::activate()?;
            let start = blocking(move || p.dump_now()).await?;
            tokio::time::sleep(window).await;
            let p = profiler.clone();
            let end = blocking(move || p.dump_now()).await?;
            drop(restore);
            let p = profiler.clone();
            blocking(move || {
                let growth = end.growth_since(&start);
                Ok(p.render(&growth, format, &format!("heap-{seconds}s"), shown))
            })
            .await
        }
        None => {
            blocking(move || {
                let now = p.dump_now()?;
                match base {
                    Some(id) => {
                        let (info, base) = p.base(&id)?;
                        let what = format!("heap-since-{}", info.id);
                        Ok(p.render(&now.growth_since(&base), format, &what, shown))
                    }
                    None => Ok(p.render(&now, format, "heap", shown)),
                }
            })
            .await
        }
    }
}

/// Stores a dump in the ring now.
pub async fn store(profiler: Arc<Profiler>) -> Result<DumpInfo, ProfileError> {
    ctl::require_enabled()?;
    let _busy = claim(&profiler, Duration::from_secs(3), false).await?;
    let p = profiler.clone();
    blocking(move || p.store_dump(Trigger::Manual)).await
}

/// A stored dump, rendered.
pub async fn stored(
    profiler: Arc<Profiler>,
    id: String,
    format: Format,
) -> Result<Rendered, ProfileError> {
    blocking(move || {
        let (info, profile) = profiler.stored(&id)?;
        let what = format!("heap-{}", info.id);
        Ok(profiler.render(&profile, format, &what, SampleType::Inuse))
    })
    .await
}

/// Runs the release probes named by `probe` (or all): serialised with the other operations, as
/// two at once (or one during a dump) would distort each other's before/after figures.
pub async fn release(
    profiler: Arc<Profiler>,
    probe: Option<String>,
) -> Result<Vec<crate::release::Released>, ProfileError> {
    let _busy = claim(&profiler, Duration::from_secs(3), false).await?;
    blocking(move || crate::release::run(probe.as_deref())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_operation_is_waited_for_and_a_timed_window_is_not() {
        let profiler = Profiler::for_tests();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let short = profiler.begin(Duration::from_secs(1)).unwrap();
            let finish_short = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(short);
            };
            let (claimed, ()) = tokio::join!(
                claim(&profiler, Duration::from_secs(1), false),
                finish_short
            );
            assert!(claimed.is_ok(), "waited for the short operation");
            drop(claimed);

            let _window = profiler.begin_window(Duration::from_secs(10)).unwrap();
            match claim(&profiler, Duration::from_secs(1), false).await {
                Err(ProfileError::Busy { retry_after, .. }) => {
                    assert_eq!(retry_after, Duration::from_secs(10))
                }
                Err(other) => panic!("expected 409 during a timed window, got {other:?}"),
                Ok(_) => panic!("let in during a timed window"),
            }
        });
    }
}
