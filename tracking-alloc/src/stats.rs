//! Reading the counters: what the exporter and tests consume.

use crate::{counters, scope, side_table};

/// One scope's counters, summed over all threads at the moment of the [`snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeStats {
    /// The scope's name (`unscoped` and `overflow` are built in).
    pub name: &'static str,
    /// Bytes allocated in this scope and not yet freed: `allocated_bytes - deallocated_bytes`.
    pub live_bytes: u64,
    /// Bytes ever allocated in this scope (requested sizes; `realloc` counts the new size).
    pub allocated_bytes: u64,
    /// Bytes of this scope's blocks ever freed, wherever they were freed.
    pub deallocated_bytes: u64,
    /// Allocations ever made in this scope (a `realloc` counts as one free and one allocation).
    pub allocations: u64,
    /// Frees of this scope's blocks.
    pub deallocations: u64,
}

/// The counters of every registered scope, in registration order (`unscoped` and `overflow`
/// first). Costs one pass over the per-thread slots; meant for a scrape every few seconds, not
/// for a hot loop.
pub fn snapshot() -> Vec<ScopeStats> {
    crate::mode::warn_once();
    let names = scope::names();
    let totals = counters::totals(names.len());
    names
        .into_iter()
        .zip(totals)
        .map(|(name, t)| ScopeStats {
            name,
            // Never negative: `totals` reads frees before allocations (see there).
            live_bytes: t.allocated_bytes.saturating_sub(t.deallocated_bytes),
            allocated_bytes: t.allocated_bytes,
            deallocated_bytes: t.deallocated_bytes,
            allocations: t.allocations,
            deallocations: t.deallocations,
        })
        .collect()
}

/// Bytes the tracking itself holds outside program blocks: per-thread counter slots and the
/// side table. Inline tags live in size-class slack and cost nothing extra.
pub fn overhead_bytes() -> u64 {
    (counters::metadata_bytes() + side_table::metadata_bytes()) as u64
}
