//! An axum service that serves the exporter's routes on its own port, beside its own routes.
//!
//! ```text
//! cargo run --release -p exporter --features axum --example axum_app -- [--listen 127.0.0.1:8080] [--debug-token TOKEN]
//! curl http://127.0.0.1:8080/orders/42      # the app's own route
//! curl http://127.0.0.1:8080/metrics        # the exporter's, same port
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use tracking_alloc::prelude::*;
use tracking_alloc::SampledAlloc;

#[global_allocator]
static GLOBAL: SampledAlloc<tikv_jemallocator::Jemalloc> =
    SampledAlloc::new(tikv_jemallocator::Jemalloc);

/// Heap profiles work with no environment variable (see the README, *Heap profiles*).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 45] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

/// Orders seen so far: the app's state, charged to the `orders` scope.
type Orders = Arc<Mutex<HashMap<u64, String>>>;

async fn order(Path(id): Path<u64>, State(orders): State<Orders>) -> String {
    async move {
        let mut orders = orders.lock().unwrap();
        let entry = orders
            .entry(id)
            .or_insert_with(|| format!("order {id}: {}", "item ".repeat(64)));
        entry.clone()
    }
    .in_scope(Scope::named("orders"))
    .await
}

#[tokio::main]
async fn main() {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut debug_token = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--listen", Some(value)) => listen = value,
            ("--debug-token", Some(value)) => debug_token = Some(value),
            _ => {
                eprintln!("usage: axum_app [--listen ADDR] [--debug-token TOKEN]");
                std::process::exit(2);
            }
        }
    }

    // No listener of the exporter's own: its routes join the app's router.
    let mut builder = exporter::Exporter::builder()
        .without_server()
        .debug_routes(true);
    if let Some(token) = debug_token {
        builder = builder.debug_token(token);
    }
    let exporter = builder.start().expect("the exporter starts");

    let app = Router::new()
        .route("/", get(|| async { "orders service: GET /orders/{id}\n" }))
        .route("/orders/{id}", get(order))
        .with_state(Orders::default())
        .merge(exporter.router());

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {listen}: {e}"));
    println!(
        "listening on http://{}  (metrics: /metrics, profiles: /debug/pprof/heap)",
        listener.local_addr().expect("a bound address")
    );
    axum::serve(listener, app).await.expect("the server runs");
}
