//! Which tracking allocator runs, and how it records owners: what the exporter publishes as
//! `memory_tracking_info` and what a user needs to know when the fast placement is not in use.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// How the running tracking allocator records each block's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// Exact, by jemalloc's size classes: an inline tag in the class's slack or a side-table
    /// slot (the fast placement; `TrackingAlloc<tikv_jemallocator::Jemalloc>`).
    SizeClass,
    /// Exact, with 2 bytes appended to every request: any other inner allocator (more memory,
    /// slower).
    Appended,
    /// Sampled: one block per `sample_interval()` bytes on average, in a region of its own
    /// (`SampledAlloc`).
    Sampled,
}

impl Placement {
    /// The label value the exporter publishes: `size_class`, `appended` or `sampled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::SizeClass => "size_class",
            Placement::Appended => "appended",
            Placement::Sampled => "sampled",
        }
    }
}

const NONE: u8 = 0;
static PLACEMENT: AtomicU8 = AtomicU8::new(NONE);
/// Set when the exact tracker's inner allocator looks like jemalloc but is not the
/// `tikv_jemallocator::Jemalloc` this crate was built against.
static FOREIGN_JEMALLOC: AtomicBool = AtomicBool::new(false);

/// Records the placement of the running allocator. Called on the general paths, which an
/// allocator other than jemalloc takes for every block: it reads the shared flag and writes it
/// only the first time, so threads do not bounce its cache line between them. Returns whether
/// this call recorded it.
#[inline]
pub(crate) fn record(placement: Placement) -> bool {
    let value = placement as u8 + 1;
    if PLACEMENT.load(Ordering::Relaxed) == value {
        return false;
    }
    PLACEMENT.store(value, Ordering::Relaxed);
    true
}

/// Records that an exact tracker's inner allocator of type `type_name` uses the appended
/// placement; notes (once) whether it looks like jemalloc. Allocates nothing.
#[inline]
pub(crate) fn record_appended(type_name: &str) {
    if !record(Placement::Appended) {
        return;
    }
    let jemalloc_like = type_name
        .as_bytes()
        .windows(b"jemalloc".len())
        .any(|w| w.eq_ignore_ascii_case(b"jemalloc"));
    if jemalloc_like {
        FOREIGN_JEMALLOC.store(true, Ordering::Relaxed);
    }
}

/// How the running tracking allocator records owners; `None` if no tracking allocator has
/// allocated (none is installed as `#[global_allocator]`).
pub fn placement() -> Option<Placement> {
    match PLACEMENT.load(Ordering::Relaxed) {
        1 => Some(Placement::SizeClass),
        2 => Some(Placement::Appended),
        3 => Some(Placement::Sampled),
        _ => None,
    }
}

/// Why the program does not get what it asked for, if so: a jemalloc inner allocator that is
/// not the `tikv_jemallocator::Jemalloc` this crate was built with (exact mode falls back to
/// the appended placement), or a sampled mode that could not set up its region.
pub fn tracking_warning() -> Option<&'static str> {
    if let Some(reason) = sampling_unavailable() {
        return Some(reason);
    }
    FOREIGN_JEMALLOC.load(Ordering::Relaxed).then_some(
        "tracking-alloc: the inner allocator looks like jemalloc but is not the \
         tikv_jemallocator::Jemalloc this crate was built with, so every block gets a 2-byte \
         appended tag (more memory, slower). Use tikv-jemallocator >=0.6.1, <0.8 (one version \
         in Cargo.lock) and wrap tikv_jemallocator::Jemalloc itself, with tracking-alloc's \
         default `jemalloc` feature on.",
    )
}

/// Why the sampled mode samples nothing, if it could not set up its region.
pub fn sampling_unavailable() -> Option<&'static str> {
    #[cfg(sampled_mode)]
    {
        crate::region::failure()
    }
    #[cfg(not(sampled_mode))]
    {
        None
    }
}

/// Prints [`tracking_warning`] to stderr, once per process.
pub(crate) fn warn_once() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Some(warning) = tracking_warning() {
        if !WARNED.swap(true, Ordering::Relaxed) {
            eprintln!("{warning}");
        }
    }
}
