//! jemalloc and per-scope memory metrics for Prometheus, served from inside your service.
//!
//! ```
//! use tracking_alloc::TrackingAlloc;
//!
//! #[global_allocator]
//! static GLOBAL: TrackingAlloc<tikv_jemallocator::Jemalloc> =
//!     TrackingAlloc::new(tikv_jemallocator::Jemalloc);
//!
//! fn main() -> Result<(), exporter::Error> {
//!     let exporter = exporter::Exporter::builder()
//!         .listen("127.0.0.1:0".parse().unwrap()) // default 127.0.0.1:9464; 0 picks a free port
//!         .refresh_interval(std::time::Duration::from_secs(5))
//!         .start()?; // its own thread here; a task when called inside a tokio runtime
//!     println!("metrics at http://{}/metrics", exporter.local_addr());
//!     // … run the service …
//!     exporter.shutdown();
//!     Ok(())
//! }
//! ```
//!
//! The data flows in three stages, one module each:
//! - [`stats`] reads jemalloc (advance the epoch, read one consistent set of values);
//! - [`collectors`] shapes jemalloc values, `tracking_alloc` scope counters and the exporter's
//!   own health into Prometheus metric families — register them in your own `Registry` if you
//!   serve metrics yourself;
//! - `server` moves them over HTTP (hyper 1), with limits and graceful shutdown, started by
//!   [`ExporterBuilder::start`] together with the background refresh task.
//!
//! With debug routes on, [`profiling`] serves heap profiles (`/debug/pprof/*`) and [`console`]
//! a page for the browser at `/debug/memory` with the JSON it reads.

mod auth;
mod builder;
pub mod collectors;
pub mod console;
mod debug;
mod error;
#[cfg(feature = "metrics")]
mod facade;
pub mod params;
pub mod profiling;
mod release;
mod server;
pub mod stats;

#[doc(hidden)]
pub mod fuzzing;

pub use builder::{ExporterBuilder, ExporterHandle, DEFAULT_LISTEN, DEFAULT_REFRESH_INTERVAL};
pub use collectors::{JemallocCollector, ScopeCollector, StatsCache};
pub use error::Error;
pub use profiling::{AutoDump, AutoMetric, DumpLimits, ProfilingConfig};
/// The `prometheus` crate this exporter is built with: register collectors in a
/// `exporter::prometheus::Registry` to serve them too, with no version mismatch.
pub use prometheus;
pub use release::{register_release, release_probes};
pub use server::ExporterService;

/// Entry point: `Exporter::builder()…start()`.
pub struct Exporter;

impl Exporter {
    pub fn builder() -> ExporterBuilder {
        ExporterBuilder::default()
    }
}

/// Held by unit tests that allocate tens of MiB, purge, or assert on process-wide jemalloc
/// figures, so tests running in parallel do not move each other's figures.
#[cfg(test)]
pub(crate) fn process_figures_serialized() -> std::sync::MutexGuard<'static, ()> {
    static PROCESS_FIGURES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    PROCESS_FIGURES.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);
