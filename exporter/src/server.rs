//! The HTTP side: one `tower::Service` that answers every route ([`ExporterService`]), and the
//! built-in hyper 1 server, a thin shell around it that adds connection limits and graceful
//! shutdown.
//!
//! Every response that is not a success says what went wrong and what to do instead. Requests
//! are never used to name files; bodies are never read.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracking_alloc::prelude::*;

use crate::auth::Tokens;
use crate::collectors::ExporterMetrics;
use crate::console::{self, History};
use crate::debug;
use crate::params::Query;
use crate::profiling::{ProfileError, Profiler, SampleType};

pub(crate) type Body = Full<Bytes>;

/// Connection and request limits. The defaults suit a scrape endpoint inside a busy service.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time a client has to send its request headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What request handlers share.
pub(crate) struct ServerState {
    pub registries: Vec<prometheus::Registry>,
    /// The reading the exporter's collectors share; one per scrape.
    pub cache: crate::collectors::StatsCache,
    pub health: ExporterMetrics,
    pub limits: Limits,
    /// Present when debug routes are enabled.
    pub profiler: Option<Arc<Profiler>>,
    /// The console's last hour, kept by the refresh task.
    pub history: Arc<History>,
    /// Bearer tokens accepted on `/debug/*` (none: no token required).
    pub debug_tokens: Tokens,
    /// Bearer tokens accepted on `/metrics` (none: no token required).
    pub metrics_tokens: Tokens,
}

#[derive(Debug, Clone, PartialEq)]
enum Route {
    Index,
    Metrics,
    /// `/heap` and `/allocs`: the same profile, shown first as live or as allocated bytes.
    Heap(SampleType),
    Activate,
    Deactivate,
    Status,
    Dumps,
    Dump(String),
    Release,
    /// The console page: a debug route, but served without a token (it carries no data and
    /// asks for the token itself; a browser cannot send one when it opens a URL).
    Console,
    ConsoleOverview,
    ConsoleScopes,
}

impl Route {
    fn is_debug(&self) -> bool {
        !matches!(self, Route::Index | Route::Metrics)
    }

    fn needs_token(&self) -> bool {
        self.is_debug() && *self != Route::Console
    }
}

const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_POST: &[Method] = &[Method::GET, Method::POST];

/// Every route, for the index page: methods, path, what it does.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/metrics", "Prometheus metrics (text format 0.0.4)"),
    ("GET", "/debug/pprof/heap", "live heap profile; ?format=pprof|jeprof|svg|collapsed, ?seconds=N (timed), ?base=ID (growth since a stored dump); ?gc= ignored"),
    ("GET", "/debug/pprof/allocs", "the same profile, shown first as allocated bytes (alloc_space) where jemalloc keeps them (prof_accum:true); Parca's and Alloy's default memory path"),
    ("POST", "/debug/pprof/heap/activate", "start sampling allocations (prof.active=true)"),
    ("POST", "/debug/pprof/heap/deactivate", "stop sampling allocations (prof.active=false)"),
    ("GET", "/debug/pprof/status", "profiling state and stored dumps (JSON)"),
    ("GET,POST", "/debug/pprof/dumps", "list stored dumps / take one now"),
    ("GET", "/debug/pprof/dumps/{id}", "a stored dump; ?format=pprof|jeprof|svg|collapsed"),
    ("POST", "/debug/memory/release", "run release probes and report the bytes freed; ?probe=NAME|all"),
    ("GET", "/debug/memory", "the memory console: a page for browsers (asks for the token itself)"),
    ("GET", "/debug/memory/overview", "JSON: jemalloc figures, RSS, tracking mode, profiling state, the last hour's chart points; ?since=MS"),
    ("GET", "/debug/memory/scopes", "JSON: every scope's live bytes, change over 1/5/60 min, allocation rates, sparkline (?spark=0: without)"),
];

fn route(path: &str) -> Option<(Route, &'static [Method])> {
    Some(match path {
        "/" => (Route::Index, GET_HEAD),
        "/metrics" => (Route::Metrics, GET_HEAD),
        "/debug/pprof/heap" => (Route::Heap(SampleType::Inuse), GET),
        // Go's name for the same profile shown as allocated bytes; Parca's and Grafana
        // Alloy's default memory path.
        "/debug/pprof/allocs" => (Route::Heap(SampleType::Allocated), GET),
        "/debug/pprof/heap/activate" => (Route::Activate, POST),
        "/debug/pprof/heap/deactivate" => (Route::Deactivate, POST),
        "/debug/pprof/status" => (Route::Status, GET),
        "/debug/pprof/dumps" => (Route::Dumps, GET_POST),
        "/debug/memory/release" => (Route::Release, POST),
        "/debug/memory" => (Route::Console, GET_HEAD),
        "/debug/memory/overview" => (Route::ConsoleOverview, GET),
        "/debug/memory/scopes" => (Route::ConsoleScopes, GET),
        other => {
            let id = other.strip_prefix("/debug/pprof/dumps/")?;
            if id.is_empty() || id.contains('/') {
                return None;
            }
            (Route::Dump(id.to_owned()), GET)
        }
    })
}

fn authorized(request: &Request<()>, tokens: &Tokens) -> bool {
    !tokens.required()
        || request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| tokens.accepts(given.trim()))
}

fn unauthorized(what: &str) -> Response<Body> {
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        format!("{what} needs a token: send the header `Authorization: Bearer <token>` with the token the service was configured with.\n"),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"memory-exporter\""),
    );
    response
}

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Answers one request (its body already dropped: no route reads one).
async fn handle(state: Arc<ServerState>, request: Request<()>) -> Response<Body> {
    let path = request.uri().path();
    let Some((route, methods)) = route(path) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no route {path}. Metrics are at GET /metrics; GET / lists every route.\n"),
        );
    };
    let profiler = match (&state.profiler, route.is_debug()) {
        (None, true) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("{path} is a debug route, and debug routes are disabled. Enable them with Exporter::builder().debug_routes(true) (the demo enables them unless --no-debug-routes).\n"),
            )
        }
        (profiler, _) => profiler.clone(),
    };
    if !methods.contains(request.method()) {
        let allowed: Vec<_> = methods.iter().map(Method::as_str).collect();
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not allowed on {path}; use {}.\n",
                request.method(),
                allowed.join(" or ")
            ),
        );
        if let Ok(allow) = HeaderValue::from_str(&allowed.join(", ")) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        return response;
    }
    if route == Route::Metrics && !authorized(&request, &state.metrics_tokens) {
        state.health.scrapes.with_label_values(&["401"]).inc();
        return unauthorized("/metrics");
    }
    if route.needs_token() && !authorized(&request, &state.debug_tokens) {
        return unauthorized("/debug/*");
    }
    if request.method() == Method::POST && has_body(&request) {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{path} takes no request body; parameters go in the query string.\n"),
        );
    }
    let head = request.method() == Method::HEAD;
    let mut response = match (route, profiler) {
        (Route::Index, _) => index(state.profiler.is_some()),
        (Route::Metrics, _) => metrics(&state),
        (route, Some(profiler)) => debug_route(route, &request, profiler, &state)
            .await
            .unwrap_or_else(|e| debug::error_response(&e)),
        (_, None) => unreachable!("debug routes without a profiler returned 404 above"),
    };
    if head {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

fn has_body(request: &Request<()>) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

async fn debug_route(
    route: Route,
    request: &Request<()>,
    profiler: Arc<Profiler>,
    state: &ServerState,
) -> Result<Response<Body>, ProfileError> {
    let query = request.uri().query();
    let post = request.method() == Method::POST;
    match route {
        Route::Heap(shown) => {
            debug::heap(
                profiler,
                // `gc=` (Go runs a GC before the profile) is accepted and has nothing to do here.
                Query::parse(query, &["format", "seconds", "base", "gc"])?,
                shown,
            )
            .await
        }
        Route::Activate | Route::Deactivate => {
            Query::parse(query, &[])?;
            debug::set_active(route == Route::Activate)
        }
        Route::Status => {
            Query::parse(query, &[])?;
            Ok(debug::json(StatusCode::OK, &profiler.status()))
        }
        Route::Dumps if post => {
            Query::parse(query, &[])?;
            debug::store(profiler).await
        }
        Route::Dumps => {
            Query::parse(query, &[])?;
            Ok(debug::json(StatusCode::OK, &profiler.list()))
        }
        Route::Dump(id) => debug::stored(profiler, id, Query::parse(query, &["format"])?).await,
        Route::Release => debug::release(profiler, Query::parse(query, &["probe"])?).await,
        Route::Console => {
            Query::parse(query, &[])?;
            Ok(console_page())
        }
        Route::ConsoleOverview => {
            let query = Query::parse(query, &["since"])?;
            let overview = console::overview(&state.history, &state.cache, &profiler, &query)?;
            Ok(debug::json_compact(
                StatusCode::OK,
                &overview,
                accepts_gzip(request),
            ))
        }
        Route::ConsoleScopes => {
            let query = Query::parse(query, &["spark"])?;
            let spark = match query.get("spark") {
                None | Some("1") => true,
                Some("0") => false,
                Some(other) => {
                    return Err(ProfileError::BadRequest(format!(
                        "spark={other:?}: give spark=0 (rows without sparklines) or spark=1"
                    )))
                }
            };
            let mut scopes = state.history.scopes(&state.cache.get());
            if !spark {
                scopes.iter_mut().for_each(|row| row.spark = Vec::new());
            }
            let scopes = console::Scopes { scopes };
            Ok(debug::json_compact(
                StatusCode::OK,
                &scopes,
                accepts_gzip(request),
            ))
        }
        Route::Index | Route::Metrics => unreachable!("not a debug route"),
    }
}

fn accepts_gzip(request: &Request<()>) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|e| e.trim().starts_with("gzip")))
}

/// The console's page, with a policy that lets it load nothing from elsewhere.
fn console_page() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(console::PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn index(debug: bool) -> Response<Body> {
    let routes: Vec<_> = ROUTES
        .iter()
        .filter(|(_, path, _)| debug || !path.starts_with("/debug/"))
        .map(|(methods, path, what)| format!("{methods:<9} {path:<30} {what}"))
        .collect();
    let note = if debug {
        ""
    } else {
        "\n(debug routes are disabled)"
    };
    text(
        StatusCode::OK,
        format!("memory exporter\n\n{}{note}\n", routes.join("\n")),
    )
}

fn metrics(state: &ServerState) -> Response<Body> {
    let families: Vec<_> = crate::collectors::one_reading(&state.cache, || {
        state.registries.iter().flat_map(|r| r.gather()).collect()
    });
    let encoder = TextEncoder::new();
    let mut buffer = Vec::with_capacity(64 * 1024);
    if let Err(e) = encoder.encode(&families, &mut buffer) {
        state.health.scrapes.with_label_values(&["500"]).inc();
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}. This is a bug in a registered collector.\n"),
        );
    }
    state.health.scrapes.with_label_values(&["200"]).inc();
    let mut response = Response::new(Full::new(Bytes::from(buffer)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    response
}

/// `/metrics` and `/debug/*`, exactly as the built-in server answers them (tokens, 4xx for bad
/// parameters, one profiling operation at a time, nothing from a request used as a path), as a
/// `tower::Service` for any request body type: mount it in an existing server. Connection-level
/// limits (connections at once, header timeouts) are the host server's. Get one from
/// [`crate::ExporterHandle::service`].
///
/// Its work, and the memory it takes, is charged to the `exporter` scope.
#[derive(Clone)]
pub struct ExporterService {
    state: Arc<ServerState>,
    scope: Scope,
}

impl ExporterService {
    pub(crate) fn new(state: Arc<ServerState>) -> ExporterService {
        ExporterService {
            state,
            scope: Scope::named("exporter"),
        }
    }
}

impl std::fmt::Debug for ExporterService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExporterService")
            .field("debug_routes", &self.state.profiler.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> tower_service::Service<Request<B>> for ExporterService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // No route reads a body (POST with one gets 413, judged from the headers), so it is
        // dropped here and the future does not depend on the body type.
        let (parts, _body) = request.into_parts();
        let request = Request::from_parts(parts, ());
        let state = self.state.clone();
        Box::pin(async move { Ok(handle(state, request).await) }.in_scope(self.scope))
    }
}

/// Accepts connections until `shutdown` turns true, then lets requests in flight finish.
pub(crate) async fn serve(
    listener: TcpListener,
    service: ExporterService,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = service.state.clone();
    let scope = service.scope;
    let connections = Arc::new(Semaphore::new(state.limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.limits.header_read_timeout)
        .max_buf_size(16 * 1024);
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("memory exporter: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        let service =
            service_fn(move |request| tower_service::Service::call(&mut service.clone(), request));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(
            async move {
                let _ = connection.await;
                drop(permit);
            }
            .in_scope(scope),
        );
    }
    drop(listener);
    if tokio::time::timeout(state.limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("memory exporter: connections still open after the shutdown grace period");
    }
}
