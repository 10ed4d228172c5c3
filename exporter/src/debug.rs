//! The `/debug/*` routes: heap profiles, stored dumps and release probes.
//!
//! Served only when the builder enables them; behind a bearer token when one is set (checked in
//! `server`). Each handler translates HTTP into one call of `profiling::operations` (which runs
//! the slow work on blocking threads, one profiling operation at a time) and its result back.

use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::params::Query;
use crate::profiling::operations::{self, HeapRequest};
use crate::profiling::{Format, ProfileError, Profiler, SampleType};
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

/// Pretty-printed JSON, for people with curl.
pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    json_body(status, serde_json::to_vec_pretty(value))
}

/// Compact JSON for the console's refreshes, gzipped when the client accepts it (browsers
/// do): the scope table of 1,024 scopes is ~150 KiB of repetitive text.
pub(crate) fn json_compact(
    status: StatusCode,
    value: &impl Serialize,
    accepts_gzip: bool,
) -> Response<Body> {
    let body = serde_json::to_vec(value);
    let compressed = match (&body, accepts_gzip) {
        (Ok(plain), true) => gzip(plain),
        _ => None,
    };
    match compressed {
        Some(compressed) => {
            let mut response = json_body(status, Ok(compressed));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
            response
        }
        None => json_body(status, body),
    }
}

fn gzip(plain: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(plain).ok()?;
    gz.finish().ok()
}

fn json_body(status: StatusCode, body: serde_json::Result<Vec<u8>>) -> Response<Body> {
    let body = body.unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
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

/// `GET /debug/pprof/heap|allocs[?format=..][&seconds=N][&base=ID]`.
pub(crate) async fn heap(
    profiler: Arc<Profiler>,
    query: Query,
    shown: SampleType,
) -> Result<Response<Body>, ProfileError> {
    let request = HeapRequest {
        format: format_of(&query)?,
        seconds: query
            .get("seconds")
            .map(|s| profiler.parse_seconds(s))
            .transpose()?,
        base: query.get("base").map(str::to_owned),
        shown,
    };
    operations::heap(profiler, request).await.map(rendered)
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
    let info = operations::store(profiler).await?;
    Ok(json(StatusCode::CREATED, &info))
}

/// `GET /debug/pprof/dumps/{id}[?format=..]`.
pub(crate) async fn stored(
    profiler: Arc<Profiler>,
    id: String,
    query: Query,
) -> Result<Response<Body>, ProfileError> {
    operations::stored(profiler, id, format_of(&query)?)
        .await
        .map(rendered)
}

/// `POST /debug/memory/release?probe=NAME|all`.
pub(crate) async fn release(
    profiler: Arc<Profiler>,
    query: Query,
) -> Result<Response<Body>, ProfileError> {
    let probe = query.get("probe").map(str::to_owned);
    let report = operations::release(profiler, probe).await?;
    #[derive(Serialize)]
    struct Report {
        probes: Vec<release::Released>,
    }
    Ok(json(StatusCode::OK, &Report { probes: report }))
}
