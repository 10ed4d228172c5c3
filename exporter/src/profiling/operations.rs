//! The profiling operations as one call each, for every front end (the HTTP routes, a console):
//! they take the profiler for the operation's duration (one at a time), run the slow work on
//! blocking threads, and orchestrate multi-step profiles (a timed profile's begin, dump, wait,
//! dump, diff, render), so handlers only translate HTTP.

use std::sync::Arc;
use std::time::Duration;

use super::{ctl, DumpInfo, Format, ProfileError, Profiler, Rendered, RestoreActive, Trigger};

/// What heap profile to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapRequest {
    pub format: Format,
    /// A timed profile: what the live heap gained per call stack over this many seconds.
    pub seconds: Option<u64>,
    /// Growth since this stored dump.
    pub base: Option<String>,
}

/// How long rendering a profile may take beyond its window, for `Retry-After`.
const RENDER_ALLOWANCE: Duration = Duration::from_secs(1);

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
    } = request;
    if let (Some(_), Some(_)) = (seconds, &base) {
        return Err(ProfileError::BadRequest(
            "give either seconds= (a timed profile) or base= (growth since a stored dump), not both".into(),
        ));
    }
    let window = Duration::from_secs(seconds.unwrap_or(0));
    let _busy = profiler.begin(window + RENDER_ALLOWANCE)?;
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
                Ok(p.render(&growth, format, &format!("heap-{seconds}s")))
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
                        Ok(p.render(&now.growth_since(&base), format, &what))
                    }
                    None => Ok(p.render(&now, format, "heap")),
                }
            })
            .await
        }
    }
}

/// Stores a dump in the ring now.
pub async fn store(profiler: Arc<Profiler>) -> Result<DumpInfo, ProfileError> {
    ctl::require_enabled()?;
    let _busy = profiler.begin(Duration::from_secs(30))?;
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
        Ok(profiler.render(&profile, format, &format!("heap-{}", info.id)))
    })
    .await
}

/// Runs the release probes named by `probe` (or all): serialised with the other operations, as
/// two at once (or one during a dump) would distort each other's before/after figures.
pub async fn release(
    profiler: Arc<Profiler>,
    probe: Option<String>,
) -> Result<Vec<crate::release::Released>, ProfileError> {
    let _busy = profiler.begin(Duration::from_secs(30))?;
    blocking(move || crate::release::run(probe.as_deref())).await
}
