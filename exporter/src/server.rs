//! The HTTP side: routes, limits and graceful shutdown, on hyper 1.
//!
//! Every response that is not a success says what went wrong and what to do instead. Requests
//! are never used to name files; bodies are never read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
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

use crate::collectors::ExporterMetrics;

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
    pub health: ExporterMetrics,
    pub limits: Limits,
}

/// A route and the methods it answers; anything else on a known path is 405.
const ROUTES: &[(&str, &[Method])] = &[
    ("/", &[Method::GET, Method::HEAD]),
    ("/metrics", &[Method::GET, Method::HEAD]),
];

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(state: Arc<ServerState>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    let Some((_, methods)) = ROUTES.iter().find(|(route, _)| *route == path) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no route {path}. Metrics are at GET /metrics; GET / lists every route.\n"),
        );
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
    let mut response = match path {
        "/metrics" => metrics(&state),
        _ => index(),
    };
    if request.method() == Method::HEAD {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

fn index() -> Response<Body> {
    let routes: Vec<_> = ROUTES
        .iter()
        .map(|(path, methods)| {
            let methods: Vec<_> = methods.iter().map(Method::as_str).collect();
            format!("{:<10} {path}", methods.join(","))
        })
        .collect();
    text(
        StatusCode::OK,
        format!("memory exporter\n\n{}\n", routes.join("\n")),
    )
}

fn metrics(state: &ServerState) -> Response<Body> {
    let families: Vec<_> = state.registries.iter().flat_map(|r| r.gather()).collect();
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

/// Accepts connections until `shutdown` turns true, then lets requests in flight finish.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let scope = Scope::named("exporter");
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
        let state = state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(state, request).await) }
        });
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
