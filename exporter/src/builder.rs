//! Starting everything with one call, in a runtime of the caller's or on a thread of our own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use tracking_alloc::prelude::*;

use crate::auth::Tokens;
use crate::collectors::{register_all, ExporterMetrics, StatsCache};
use crate::console::History;
use crate::profiling::{AutoDump, DumpLimits, Profiler, ProfilingConfig};
use crate::server::{self, ExporterService, Limits, ServerState};
use crate::Error;

/// Default listen address: loopback only, the OpenTelemetry Prometheus exporter's port.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Default interval between jemalloc epoch advances.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Where the tokens of one group of routes come from, until `start` reads them.
#[derive(Debug, Clone, Default)]
struct TokenSources {
    literal: Vec<String>,
    files: Vec<std::path::PathBuf>,
}

impl TokenSources {
    fn read(self) -> Result<Tokens, Error> {
        Tokens::new(self.literal, self.files)
    }
}

/// Configures and starts the exporter. Created by [`crate::Exporter::builder`].
#[derive(Debug, Clone)]
pub struct ExporterBuilder {
    listen: SocketAddr,
    refresh_interval: Duration,
    registries: Vec<prometheus::Registry>,
    limits: Limits,
    debug_routes: bool,
    profiling: ProfilingConfig,
    debug_tokens: TokenSources,
    metrics_tokens: TokenSources,
    /// Whether `start` binds a listener of its own (`without_server` turns it off).
    own_server: bool,
    /// Whether each refresh also sets the metrics through the `metrics` facade.
    #[cfg(feature = "metrics")]
    facade: bool,
}

impl Default for ExporterBuilder {
    fn default() -> Self {
        ExporterBuilder {
            listen: DEFAULT_LISTEN,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            registries: Vec::new(),
            limits: Limits::default(),
            debug_routes: false,
            profiling: ProfilingConfig::default(),
            debug_tokens: TokenSources::default(),
            metrics_tokens: TokenSources::default(),
            own_server: true,
            #[cfg(feature = "metrics")]
            facade: false,
        }
    }
}

impl ExporterBuilder {
    /// Address to serve on (default `127.0.0.1:9464`). Port 0 picks a free port; see
    /// [`ExporterHandle::local_addr`].
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// How often the background task advances jemalloc's epoch (default 5 s, at least 10 ms).
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Also serve the metrics of the service's own registry on `/metrics`.
    pub fn registry(mut self, registry: prometheus::Registry) -> Self {
        self.registries.push(registry);
        self
    }

    /// Connections served at once (default 512).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.limits.max_connections = max.max(1);
        self
    }

    /// How long a client may take to send its request headers (default 10 s).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.limits.header_read_timeout = timeout;
        self
    }

    /// Serves the `/debug/*` routes: heap profiles, stored dumps, release probes (default off:
    /// they expose the program's internals; set a [`debug_token`](Self::debug_token) too when
    /// the address is reachable by others).
    pub fn debug_routes(mut self, enabled: bool) -> Self {
        self.debug_routes = enabled;
        self
    }

    /// Requires `Authorization: Bearer <token>` on every `/debug/*` request. Call it again, or
    /// add [`debug_token_file`](Self::debug_token_file)s, to accept several tokens (a
    /// profiler's and an operator's); any one of them is let in. An empty token is ignored.
    pub fn debug_token(mut self, token: impl Into<String>) -> Self {
        self.debug_tokens.literal.push(token.into());
        self
    }

    /// Accepts on `/debug/*` every token in this file (one per line), read at start and again
    /// when the file changes: a Kubernetes Secret mounted into the pod, rotated without a
    /// restart. A missing or empty file makes [`start`](Self::start) fail.
    pub fn debug_token_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.debug_tokens.files.push(path.into());
        self
    }

    /// Requires `Authorization: Bearer <token>` on `/metrics` (Prometheus: `authorization`);
    /// several calls accept several tokens, as for [`debug_token`](Self::debug_token).
    pub fn metrics_token(mut self, token: impl Into<String>) -> Self {
        self.metrics_tokens.literal.push(token.into());
        self
    }

    /// Accepts on `/metrics` every token in this file, as
    /// [`debug_token_file`](Self::debug_token_file) does for `/debug/*`.
    pub fn metrics_token_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.metrics_tokens.files.push(path.into());
        self
    }

    /// Directory of stored heap dumps (a directory you name must exist). The default is this
    /// program's own, created at start: `$TMPDIR/memory-exporter-dumps/<executable>-<build
    /// id>-<port>`, so programs on one host never share a ring and a restart of the same binary
    /// on the same port finds its dumps again.
    pub fn dump_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.profiling.dump_dir = dir.into();
        self
    }

    /// How many stored dumps, and how many bytes of them, the ring keeps.
    pub fn dump_limits(mut self, limits: DumpLimits) -> Self {
        self.profiling.limits = limits;
        self
    }

    /// Takes heap dumps automatically when memory grows (see [`AutoDump`]).
    pub fn auto_dump(mut self, auto: AutoDump) -> Self {
        self.profiling.auto = Some(auto);
        self
    }

    /// Upper bound of a timed profile's `?seconds=` (default 300).
    pub fn max_profile_seconds(mut self, seconds: u64) -> Self {
        self.profiling.max_seconds = seconds.max(1);
        self
    }

    /// Serves no HTTP of its own: `start` runs the refresh (and automatic dumps) only, and the
    /// service mounts the routes in its own server with [`ExporterHandle::service`] (any
    /// `tower` stack) or [`ExporterHandle::router`] (axum, feature `axum`). `listen` and the
    /// connection limits then do not apply; tokens, parameter checks and the one-profile-at-a-
    /// time rule do.
    pub fn without_server(mut self) -> Self {
        self.own_server = false;
        self
    }

    /// Also sets every gauge and counter (same names and labels as on `/metrics`, `process_*`
    /// aside) through the installed `metrics` recorder on each refresh, so a service that
    /// serves metrics with `metrics-exporter-prometheus` gets them on its own endpoint.
    /// Install the recorder before `start`.
    #[cfg(feature = "metrics")]
    pub fn publish_to_metrics_facade(mut self, enabled: bool) -> Self {
        self.facade = enabled;
        self
    }

    /// Binds the listener (unless [`without_server`](Self::without_server)), takes a first
    /// reading, and starts the refresh task and the server: on the current tokio runtime if
    /// there is one, else on a thread of its own. They run until [`ExporterHandle::shutdown`];
    /// dropping the handle leaves them running for the life of the process, so
    /// `let _ = builder.start()?;` serves as one expects.
    pub fn start(self) -> Result<ExporterHandle, Error> {
        let listener = if self.own_server {
            Some(bind(self.listen)?)
        } else {
            None
        };
        let local_addr = listener.as_ref().map_or(NO_ADDRESS, |(_, addr)| *addr);
        let debug_tokens = self.debug_tokens.read()?;
        let metrics_tokens = self.metrics_tokens.read()?;

        if let Some(warning) = tracking_alloc::tracking_warning() {
            tracing::warn!("memory exporter: {warning}");
        }
        let cache = StatsCache::default();
        let health = ExporterMetrics::new();
        let registry = prometheus::Registry::new();
        register_all(&registry, &cache, &health).map_err(Error::Register)?;
        refuse_duplicates(&registry, &self.registries)?;
        let mut registries = vec![registry.clone()];
        registries.extend(self.registries);
        let mut profiling = self.profiling;
        if profiling.dump_dir == crate::profiling::default_dump_root() {
            // A ring of this program's own, created: see `program_dump_dir`.
            let port = listener.as_ref().map(|(_, addr)| addr.port());
            profiling.dump_dir = crate::profiling::program_dump_dir(&profiling.dump_dir, port);
            if self.debug_routes {
                let _ = std::fs::create_dir_all(&profiling.dump_dir);
            }
        }
        let profiler = self
            .debug_routes
            .then(|| Profiler::new(profiling, health.prof_dumps.clone()).shared());
        let history = Arc::new(History::default());
        let service = ExporterService::new(Arc::new(ServerState {
            registries,
            cache: cache.clone(),
            health: health.clone(),
            limits: self.limits,
            profiler: profiler.clone(),
            history: history.clone(),
            debug_tokens,
            metrics_tokens,
        }));

        let refresher = Refresher {
            cache,
            health,
            debug: profiler.map(|profiler| (history, profiler)),
            #[cfg(feature = "metrics")]
            facade: self.facade.then(|| registry.clone()),
        };
        if let Err(e) = refresher.once() {
            tracing::warn!("memory exporter: first refresh failed: {e}");
        }

        let (stop, mut stopped) = watch::channel(false);
        let interval = self.refresh_interval;
        let server = service.clone();
        let run = async move {
            let refresh = tokio::spawn(refresher.every(interval, stopped.clone()));
            match listener.map(|(listener, _)| tokio::net::TcpListener::from_std(listener)) {
                Some(Ok(listener)) => server::serve(listener, server, stopped).await,
                Some(Err(e)) => tracing::error!("memory exporter: cannot serve: {e}"),
                None => {
                    let _ = stopped.changed().await;
                }
            }
            refresh.abort();
        }
        .in_scope(Scope::named("exporter"));

        let runner = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Runner::Task(runtime.spawn(run)),
            Err(_) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::Runtime)?;
                let thread = std::thread::Builder::new()
                    .name("memory-exporter".into())
                    .spawn(move || runtime.block_on(run))
                    .map_err(Error::Runtime)?;
                Runner::Thread(thread)
            }
        };
        Ok(ExporterHandle {
            local_addr,
            registry,
            service,
            stop: Some(stop),
            runner: Some(runner),
        })
    }
}

/// Refuses registries (given with `.registry(..)`) that hold a family the exporter serves too:
/// `/metrics` would carry it twice, which Prometheus rejects as invalid exposition.
fn refuse_duplicates(
    ours: &prometheus::Registry,
    theirs: &[prometheus::Registry],
) -> Result<(), Error> {
    let served: std::collections::HashSet<String> =
        ours.gather().iter().map(|f| f.name().to_owned()).collect();
    for registry in theirs {
        if let Some(family) = registry.gather().iter().find(|f| served.contains(f.name())) {
            return Err(Error::Register(prometheus::Error::Msg(format!(
                "the registry passed to .registry() holds `{}`, which the exporter serves itself; \
                 remove that collector from your registry (the exporter's /metrics has it)",
                family.name()
            ))));
        }
    }
    Ok(())
}

/// What [`ExporterHandle::local_addr`] answers when there is no built-in server.
const NO_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A non-blocking listener on `addr`, and the address actually bound.
fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), Error> {
    let error = |source| Error::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(error)?;
    let local_addr = listener.local_addr().map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    Ok((listener, local_addr))
}

/// What every refresh does, off the async workers: read jemalloc (advancing its epoch takes
/// arena locks), check the automatic dump triggers, publish through the `metrics` facade.
#[derive(Clone)]
struct Refresher {
    cache: StatsCache,
    health: ExporterMetrics,
    /// The console's history and the profiler (automatic dumps), when debug routes are on.
    debug: Option<(Arc<History>, Arc<Profiler>)>,
    /// The registry to publish through the `metrics` facade, when asked to.
    #[cfg(feature = "metrics")]
    facade: Option<prometheus::Registry>,
}

impl Refresher {
    /// One refresh, charged to the `exporter` scope.
    fn once(&self) -> Result<(), crate::stats::ReadError> {
        let _g = Scope::named("exporter").enter();
        let result = self.health.refresh(&self.cache);
        // One copy of the reading (every scope's counters) for the history and the automatic
        // dumps, taken only when they exist (debug routes on).
        if let Some((history, profiler)) = &self.debug {
            let reading = self.cache.get();
            if result.is_ok() {
                history.record(&reading);
            }
            if let Some(Err(e)) = profiler.check_auto(&reading) {
                tracing::warn!("memory exporter: automatic heap dump failed: {e}");
            }
        }
        #[cfg(feature = "metrics")]
        if let Some(registry) = &self.facade {
            crate::facade::publish(registry);
        }
        result
    }

    /// Refreshes every `interval` until `stopped` changes.
    async fn every(self, interval: Duration, mut stopped: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate; `start` already refreshed
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = ticks.tick() => {}
            }
            let refresher = self.clone();
            match tokio::task::spawn_blocking(move || refresher.once()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("memory exporter: refresh failed: {e}"),
                Err(e) => tracing::warn!("memory exporter: refresh task failed: {e}"),
            }
        }
    }
}

enum Runner {
    Task(tokio::task::JoinHandle<()>),
    Thread(JoinHandle<()>),
}

/// A running exporter. [`ExporterHandle::shutdown`] stops it and waits; dropping the handle
/// leaves it running for the life of the process (as `metrics-exporter-prometheus`'s
/// `install()` does), so keeping the handle is only needed to stop it or to mount its routes.
pub struct ExporterHandle {
    local_addr: SocketAddr,
    registry: prometheus::Registry,
    service: ExporterService,
    /// Taken by `shutdown`/`stopped`; leaked on drop, so the exporter keeps running.
    stop: Option<watch::Sender<bool>>,
    runner: Option<Runner>,
}

impl ExporterHandle {
    /// The address the built-in server bound (useful with port 0); `0.0.0.0:0` for an
    /// exporter started [`without_server`](ExporterBuilder::without_server).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The routes as a `tower::Service` for any request body type, answering `/metrics` and
    /// `/debug/*` exactly as the built-in server does (see [`ExporterService`]). Route the
    /// paths `/metrics` and `/debug/...` of your server to it.
    pub fn service(&self) -> ExporterService {
        self.service.clone()
    }

    /// The routes as an `axum::Router` to `merge` into an application's router: `/metrics`
    /// and everything under `/debug/`.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let exporter = exporter::Exporter::builder().without_server().start()?;
    /// let app = axum::Router::new()
    ///     .route("/hello", axum::routing::get(|| async { "hello" }))
    ///     .merge(exporter.router());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// axum::serve(listener, app).await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "axum")]
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route_service("/metrics", self.service())
            .route_service("/debug/{*path}", self.service())
    }

    /// The registry holding the exporter's collectors, e.g. to add a collector of your own.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// Stops accepting connections, lets requests in flight finish (up to 5 s) and, when the
    /// exporter runs on its own thread, waits for it. Inside a tokio runtime this only signals;
    /// await [`ExporterHandle::stopped`] to wait there.
    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(Runner::Thread(thread)) = self.runner.take() {
            let _ = thread.join();
        }
    }

    /// Signals shutdown and waits for the exporter's task or thread to finish.
    pub async fn stopped(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        match self.runner.take() {
            Some(Runner::Task(task)) => {
                let _ = task.await;
            }
            Some(Runner::Thread(thread)) => {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            None => {}
        }
    }
}

impl Drop for ExporterHandle {
    fn drop(&mut self) {
        // The exporter runs until the sender says stop or is dropped: keep it for good.
        if let Some(stop) = self.stop.take() {
            std::mem::forget(stop);
        }
    }
}
