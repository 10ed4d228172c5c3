//! The `/debug/*` routes: heap profiles, stored dumps and release probes.
//!
//! Served only when the builder enables them; behind a bearer token when one is set (checked in
//! `server`). Slow work (dumping, symbolizing, encoding, running probes) runs on tokio's blocking
//! threads, one profiling operation at a time.

use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::params::Query;
use crate::profiling::{Format, ProfileError, Profiler, RestoreActive, Trigger};
use crate::release;
use crate::server::{text, Body};

pub(crate) fn error_response(error: &ProfileError) -> Response<Body> {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = text(status, format!("{error}\n"));
    if let ProfileError::Busy { retry_after, .. } = error {
        if let Ok(value) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value)
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn rendered(rendered: crate::profiling::Rendered) -> Response<Body> {
    let mut response = Response::new(Body::from(rendered.body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(rendered.content_type),
    );
    if let Ok(value) = HeaderValue::from_str(&format!("inline; filename=\"{}\"", rendered.filename))
    {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

fn format_of(query: &Query) -> Result<Format, ProfileError> {
    query.get("format").map_or(Ok(Format::Pprof), Format::parse)
}

/// Runs `work` on a blocking thread; a panic there becomes a 500, never a crash.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ProfileError> + Send + 'static,
) -> Result<T, ProfileError> {
    tokio::task::spawn_blocking(|| {
        // The exporter's own memory (dumps, symbol tables) is charged to its scope.
        let _scope = tracking_alloc::Scope::named("exporter").enter();
        let result = work();
        Profiler::release_scratch_memory();
        result
    })
    .await
    .map_err(|e| ProfileError::Internal(format!("the profiling task failed: {e}")))?
}

/// `GET /debug/pprof/heap[?format=..][&seconds=N][&base=ID]`.
pub(crate) async fn heap(
    profiler: Arc<Profiler>,
    query: Query,
) -> Result<Response<Body>, ProfileError> {
    let format = format_of(&query)?;
    crate::profiling::ctl::require_enabled()?;
    let seconds = query
        .get("seconds")
        .map(|s| profiler.parse_seconds(s))
        .transpose()?;
    let base = query.get("base").map(str::to_owned);
    if let (Some(_), Some(_)) = (seconds, &base) {
        return Err(ProfileError::BadRequest(
            "give either seconds= (a timed profile) or base= (growth since a stored dump), not both".into(),
        ));
    }
    let expected = Duration::from_secs(seconds.unwrap_or(0) + 5);
    let guard = profiler.begin(expected)?;
    let result = match seconds {
        Some(seconds) => {
            // Sample during the window (restored afterwards, even if this request is dropped),
            // and report what the live heap gained per call stack over it.
            let restore = RestoreActive::activate()?;
            let p = profiler.clone();
            let start = blocking(move || p.dump_now()).await?;
            tokio::time::sleep(Duration::from_secs(seconds)).await;
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
            let p = profiler.clone();
            blocking(move || {
                let now = p.dump_now()?;
                match base {
                    Some(id) => {
                        let (info, base) = p.stored(&id)?;
                        Ok(p.render(
                            &now.growth_since(&base),
                            format,
                            &format!("heap-since-{}", info.id),
                        ))
                    }
                    None => Ok(p.render(&now, format, "heap")),
                }
            })
            .await
        }
    };
    drop(guard);
    result.map(rendered)
}

/// `POST /debug/pprof/heap/activate` and `/deactivate`.
pub(crate) fn set_active(active: bool) -> Result<Response<Body>, ProfileError> {
    let previous = crate::profiling::ctl::set_active(active)?;
    #[derive(Serialize)]
    struct Changed {
        active: bool,
        previous: bool,
    }
    Ok(json(StatusCode::OK, &Changed { active, previous }))
}

/// `POST /debug/pprof/dumps`: a dump into the ring.
pub(crate) async fn store(profiler: Arc<Profiler>) -> Result<Response<Body>, ProfileError> {
    crate::profiling::ctl::require_enabled()?;
    let guard = profiler.begin(Duration::from_secs(30))?;
    let p = profiler.clone();
    let info = blocking(move || p.store_dump(Trigger::Manual)).await;
    drop(guard);
    Ok(json(StatusCode::CREATED, &info?))
}

/// `GET /debug/pprof/dumps/{id}[?format=..]`.
pub(crate) async fn stored(
    profiler: Arc<Profiler>,
    id: String,
    query: Query,
) -> Result<Response<Body>, ProfileError> {
    let format = format_of(&query)?;
    let p = profiler.clone();
    blocking(move || {
        let (info, profile) = p.stored(&id)?;
        Ok(p.render(&profile, format, &format!("heap-{}", info.id)))
    })
    .await
    .map(rendered)
}

/// `POST /debug/memory/release?probe=NAME|all`.
pub(crate) async fn release(query: Query) -> Result<Response<Body>, ProfileError> {
    let probe = query.get("probe").map(str::to_owned);
    let report = blocking(move || release::run(probe.as_deref())).await?;
    #[derive(Serialize)]
    struct Report {
        probes: Vec<release::Released>,
    }
    Ok(json(StatusCode::OK, &Report { probes: report }))
}
