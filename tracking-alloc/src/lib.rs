//! Per-scope heap accounting for Rust programs: exact, or sampled and cheap enough to leave on
//! everywhere.
//!
//! Wrap the global allocator once, mark regions of code with a scope, and ask at any time how
//! many bytes each scope holds (here exactly; [`SampledAlloc`] is used the same way, see
//! *Sampled mode*):
//!
//! ```
//! use tracking_alloc::prelude::*;
//! use tracking_alloc::{scope, snapshot, TrackingAlloc};
//!
//! #[global_allocator]
//! static GLOBAL: TrackingAlloc<tikv_jemallocator::Jemalloc> =
//!     TrackingAlloc::new(tikv_jemallocator::Jemalloc);
//!
//! fn main() {
//!     let cache = {
//!         let _guard = scope!("cache");
//!         vec![0u64; 1024] // 8 KiB, charged to "cache"
//!     };
//!     // Freed anywhere (another thread, another scope), the block is credited back to "cache".
//!     let stats = snapshot();
//!     let cache_stats = stats.iter().find(|s| s.name == "cache").unwrap();
//!     assert_eq!(cache_stats.live_bytes, 8192);
//!     drop(cache);
//!
//!     // Futures carry their scope across worker threads:
//!     let _task = async { vec![1u8; 100] }.in_scope(Scope::named("requests"));
//! }
//! ```
//!
//! # Semantics
//!
//! - Bytes are the sizes the program asked for (`Layout::size()`), not the allocator's rounding.
//! - A block belongs to the scope current when it was allocated. Freeing it anywhere credits
//!   that scope. `realloc` moves the block to the scope current at the `realloc`.
//! - Counters are monotonic (`allocated_*`, `deallocated_*`, counts); live bytes are derived
//!   from them, so they cannot drift negative the way a +/− gauge does when a free is charged to
//!   the wrong group.
//! - The library's own bookkeeping (registering a name, growing a table) is charged to
//!   `unscoped`. Allocations outside any scope are charged to `unscoped`; names registered after
//!   [`MAX_SCOPES`] are charged to `overflow`.
//!
//! # Design and costs
//!
//! **Who owns a block.** Exact attribution needs the owner stored per live block; a free on
//! another thread has nothing else to go on. The owner is a 2-byte scope id. jemalloc rounds
//! every request up to a size class, so most blocks have slack after the requested bytes: there
//! the tag costs nothing. But `Vec` capacities double and land *exactly* on a class; growing them
//! by 2 bytes would cost a whole class step (+25 %, or +100 % for 8-byte boxes), which is why
//! inline trailers measure 1.17–1.21× jemalloc's allocated bytes on a map-of-vectors heap. So
//! exact-class blocks, blocks over 4 KiB and over-aligned blocks keep their tag out of line, in a
//! per-page array of `u16` indexed by the block's offset in the page (jemalloc keeps one size
//! class per page): 2 bytes per block, rounded up to a power of two per page (see *Side table*
//! below). An inline tag sits right after the requested bytes, on the cache line the program
//! most likely wrote last; a class with a single spare byte holds a one-byte tag for scope ids
//! below 255.
//!
//! **Counting.** Counters shared by all threads cost a contended atomic per operation (3.8× CPU
//! on two threads). Each thread instead owns a slot of counters (one row per scope, 32 KiB,
//! reused by the next thread when it exits) that only it writes, with a plain load and store; a
//! free on thread B charges the owner's row in B's slot. [`snapshot`] sums the slots.
//!
//! **Hot path.** One thread-local access, one table lookup for the size class, the counter
//! update (made *before* calling jemalloc, so only the size, class and owner live across the
//! call, and taken back if jemalloc refuses), jemalloc's own `malloc`/`sdallocx` called directly
//! (the layouts on this path never need `Jemalloc`'s alignment flags), then a 2-byte tag write
//! or, for exact-class blocks, a three-level side-table walk. Nothing allocates, locks or
//! panics; side-table growth, a thread's first allocation, large blocks and the shared
//! fallback slot are out of line, and `dealloc` counts first so that it tail-calls the inner
//! free. With any inner allocator other than `tikv_jemallocator::Jemalloc` (e.g. `System`),
//! whose size classes are unknown, the tag is appended to every request instead (2 bytes per
//! block, plus the inner allocator's rounding).
//!
//! **Measured** (`BENCHMARKS.md`, 2 cores, against bare jemalloc):
//! - heap of `HashMap<String, Vec<u64>>` + `Box<u64>` + `String`: jemalloc allocated **1.018×**
//!   (resident 1.03×), where a 2-byte trailer on every block costs 1.22×;
//! - instructions per alloc+free pair: +59 (inline tag), +67 (one-byte tag), +127 (side
//!   table), +125 (8 KiB block) over jemalloc's 85 (281 at 8 KiB);
//! - alloc/free churn: 1.03–1.37× CPU, the same on 1, 2 and 4 threads (shared atomic counters:
//!   1.9–3.0× on 2–4 threads). That misses the 1.05× goal in a loop that does nothing but
//!   allocate: jemalloc's pair is ~6 ns, 5 % of it is about one instruction. A serde/tokio
//!   service workload runs at 0.88–0.89× throughput (1.12× the instructions).
//!
//! # Sampled mode
//!
//! [`SampledAlloc`] (feature `jemalloc`) is used like `TrackingAlloc`; its docs have the example.
//!
//! A Poisson process over the bytes each thread allocates picks the blocks to record: a block
//! of `s` bytes is sampled with probability `p = 1 − e^(−s/T)` and counted as `s / p` bytes
//! and `1 / p` blocks, so every [`ScopeStats`] field is an unbiased estimate, still a monotonic
//! counter (live bytes never go negative). The relative standard deviation for a scope holding
//! `L` bytes of small blocks is about `√(T / L)`; blocks of [`EXACT_MIN`] (16 KiB) or more are
//! counted exactly. Unsampled blocks cost a thread-local countdown on `alloc` and one
//! mask-and-compare on `free` (+22 instructions per pair over jemalloc's 85); sampled blocks
//! live in jemalloc arenas of their own whose extents come from one reserved, size-aligned
//! address range (64 GiB of address space), which is what makes that compare possible.
//! Measured: 0.97–0.99× CPU on a real program (1.045× its instructions), 1.002× heap
//! (`BENCHMARKS.md`).
//!
//! # Side table
//!
//! Leaves (per 4 KiB page) and interior nodes (4 KiB per 2 MiB and per GiB of address space)
//! come from the inner allocator and are never freed; [`overhead_bytes`] reports them together
//! with the per-thread slots, and the exporter publishes that figure.
//!
//! # Safety
//!
//! The hot path (`alloc.rs`, `sampled.rs`) never allocates from itself, locks, panics or
//! unwinds; every `unsafe` block states why it is sound. Points a reviewer should know:
//!
//! - **Provenance.** The tag after the program's bytes (and a sampled block's record before
//!   them) is read, and the padded request freed, through the pointer the program hands back.
//!   Under Tree Borrows (Miri's `-Zmiri-tree-borrows`) that pointer keeps permission for the
//!   whole allocation it was derived from, so these are accesses through the allocation's own
//!   provenance: sound. Stacked Borrows shrinks a `Box`'s or `Vec`'s retag to `layout.size()`
//!   and rejects any allocator that pads a request this way; re-deriving the pointer from
//!   exposed provenance does not help (a `Box`'s protector forbids freeing through another
//!   tag, and a read through it conflicts the `Box`'s permission) — both tried under Miri. The
//!   side table holds pointers, never integers (strict provenance).
//! - **Threads.** Counters are per-thread slots written with plain stores (only the owner
//!   writes) and read with Acquire; a thread's exit is noticed through a pthread key, never a
//!   `thread_local!` destructor (which aborted std on musl and old toolchains).
//! - **`fork()`.** The two locks (the scope registry, the tracing layer's callsite cache) are
//!   taken around `fork` by `pthread_atfork` handlers, so a child forked beside busy threads
//!   can register scopes, snapshot and create spans.
//!
//! Tested (`scripts/test.sh`): Miri over the tests that run on `System`; AddressSanitizer and
//! valgrind memcheck over the multi-thread stress tests; libFuzzer against a model of the
//! allocator (`fuzz/fuzz_targets/alloc_model.rs`); Rust 1.85 on glibc and musl.
//!
//! # Features
//!
//! - `jemalloc` (default): recognise `tikv_jemallocator::Jemalloc` as the inner allocator and use
//!   its size classes, and provide [`SampledAlloc`]. Works with tikv-jemallocator 0.6.1 and 0.7
//!   (one jemalloc per program). A jemalloc-looking inner allocator of another type gets the
//!   generic (append) placement, still exact but larger; [`tracking_warning`] says so.
//! - `tracing`: `MemoryScopeLayer`, a `tracing_subscriber::Layer` that enters a scope while a
//!   span is entered.

mod alloc;
mod counters;
mod fork;
mod future;
#[cfg(feature = "tracing")]
mod layer;
mod mode;
#[cfg(sampled_mode)]
mod region;
#[cfg(sampled_mode)]
mod sampled;
mod sampler;
mod scope;
mod side_table;
mod size_class;
mod stats;
mod thread_exit;

pub use alloc::TrackingAlloc;
pub use future::{InScope, InScopeExt};
#[cfg(feature = "tracing")]
pub use layer::{MemoryScopeLayer, SCOPE_FIELD};
pub use mode::{placement, sampling_unavailable, tracking_warning, Placement};
#[cfg(sampled_mode)]
pub use sampled::{SampledAlloc, DEFAULT_SAMPLE_INTERVAL, EXACT_MIN};
#[doc(hidden)]
pub use sampler::__set_sampling_seed;
pub use sampler::sample_interval;
#[doc(hidden)]
pub use scope::CallSite;
pub use scope::{Scope, ScopeGuard, MAX_SCOPES};
pub use stats::{overhead_bytes, snapshot, ScopeStats};

/// The traits and types a program needs to scope its code: `use tracking_alloc::prelude::*;`.
pub mod prelude {
    pub use crate::future::InScopeExt;
    pub use crate::scope::Scope;
}

/// The size class the allocator assumes jemalloc uses for `(size, align)` when it is at most
/// 4 KiB, by the same functions the hot path uses; exposed for the test that checks it against
/// `nallocx`.
#[doc(hidden)]
pub fn __size_class_model(size: usize, align: usize) -> Option<usize> {
    if size <= size_class::SMALL_MAX && align <= size_class::QUANTUM {
        return Some(size_class::small_class_aligned(size, align));
    }
    size_class::aligned_class(size, align)
}
