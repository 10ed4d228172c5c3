//! Errors from starting the exporter, each saying what went wrong and how to fix it.

use std::fmt;
use std::net::SocketAddr;

#[derive(Debug)]
pub enum Error {
    /// The listen address could not be bound.
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The exporter's own runtime thread could not be started.
    Runtime(std::io::Error),
    /// A collector could not be registered (usually: a metric name already registered).
    Register(prometheus::Error),
    /// A token file could not be read or holds no token.
    TokenFile {
        path: std::path::PathBuf,
        problem: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, source } if source.kind() == std::io::ErrorKind::AddrInUse => {
                write!(
                f,
                "cannot listen on {addr}: the address is already in use. Stop the other process or \
                 choose another address with `.listen(..)` (the demo: `--listen 127.0.0.1:PORT`)"
            )
            }
            Error::Bind { addr, source } => write!(
                f,
                "cannot listen on {addr}: {source}. Check the address and that this process may \
                 bind it (ports below 1024 need privileges)"
            ),
            Error::Runtime(source) => write!(
                f,
                "cannot start the exporter's runtime thread: {source}. The process may be out of \
                 threads or memory; start the exporter inside an existing tokio runtime instead"
            ),
            Error::Register(source) => write!(
                f,
                "cannot register the exporter's collectors: {source}. A registry passed with \
                 `.registry(..)` must not already contain jemalloc_*, memory_* or process_* metrics"
            ),
            Error::TokenFile { path, problem } => write!(
                f,
                "cannot use the token file {}: {problem}. Give a readable file with one token per \
                 line (in Kubernetes, mount the Secret that holds the scraper's token), or pass \
                 the token itself with `.debug_token(..)` / `.metrics_token(..)`",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } | Error::Runtime(source) => Some(source),
            Error::Register(source) => Some(source),
            Error::TokenFile { .. } => None,
        }
    }
}
