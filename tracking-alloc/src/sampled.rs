//! The `GlobalAlloc` hot path of the sampled mode: count nothing for most blocks.
//!
//! Where a block's owner lives, and which path it takes (fastest first):
//! - a small block (under [`EXACT_MIN`]) that is not sampled: nowhere. `alloc` subtracts its
//!   size from a thread-local countdown ([`sampler::skip`]) and calls jemalloc's `malloc`;
//!   `dealloc` checks that the pointer lies outside the sampled region ([`region::contains`]: a
//!   mask and a compare) and calls `sdallocx`. No counter, no tag.
//! - a sampled small block (the countdown ran out inside it, out of line): allocated from the
//!   region's own arenas with a 16-byte record before the program's bytes — owner, and the
//!   weights it stands for in bytes and blocks — counted by those weights; its free reads the
//!   record back and credits the owner with the same weights, so live estimates never go
//!   negative.
//! - a block of [`EXACT_MIN`] or more: tracked exactly, as [`crate::TrackingAlloc`] does, with
//!   its owner in the side table (one slot per page). Such blocks are few and jemalloc's own
//!   cost for them is high, and a sample would hold almost all of them anyway (`p ≈ 1`).

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;

use tikv_jemallocator::Jemalloc;

use crate::alloc::{direct_alloc, direct_dealloc, inner_alloc, inner_realloc, tag_side};
use crate::counters::Ledger;
use crate::sampler::{self, Weight};
use crate::size_class::{QUANTUM, SMALL_MAX};
use crate::{region, side_table};

/// Blocks of at least this many bytes are tracked exactly: jemalloc's first "large" class,
/// which it serves from extents of their own (hundreds of nanoseconds), so a side-table slot
/// costs little beside it.
pub const EXACT_MIN: usize = 16 * 1024;

/// Mean bytes between samples when none is given: 64 KiB, which estimates a scope holding
/// 256 MiB of small blocks within ±1.6 % (one standard deviation; see the crate docs).
pub const DEFAULT_SAMPLE_INTERVAL: usize = 64 * 1024;

/// Bytes of a sampled block's record: weight in bytes (`u64`), in blocks (`u32`), owner (`u16`).
const RECORD_BYTES: usize = 16;

/// A global allocator that wraps jemalloc and estimates every scope's memory by sampling,
/// with the same scope API as [`crate::TrackingAlloc`].
///
/// ```
/// #[global_allocator]
/// static GLOBAL: tracking_alloc::SampledAlloc<tikv_jemallocator::Jemalloc> =
///     tracking_alloc::SampledAlloc::new(tikv_jemallocator::Jemalloc); // one sample per 64 KiB
///
/// fn main() {
///     let cache: Vec<Vec<u8>> = {
///         let _guard = tracking_alloc::scope!("cache");
///         (0..4096).map(|_| vec![0u8; 4096]).collect() // 16 MiB
///     };
///     let stats = tracking_alloc::snapshot();
///     let estimate = stats.iter().find(|s| s.name == "cache").unwrap().live_bytes;
///     assert!((estimate as f64 / (16 << 20) as f64 - 1.0).abs() < 0.35); // ±6 % is 1 σ here
///     assert_eq!(tracking_alloc::sample_interval(), Some(64 * 1024));
///     drop(cache);
/// }
/// ```
///
/// Only `tikv_jemallocator::Jemalloc` can be wrapped: sampled blocks live in a jemalloc arena of
/// their own (see the crate docs, *Sampled mode*).
pub struct SampledAlloc<A: GlobalAlloc> {
    inner: A,
    interval: usize,
}

impl<A: GlobalAlloc> SampledAlloc<A> {
    /// Wraps `inner`, sampling once per [`DEFAULT_SAMPLE_INTERVAL`] bytes on average.
    pub const fn new(inner: A) -> Self {
        Self::with_interval(inner, DEFAULT_SAMPLE_INTERVAL)
    }

    /// Wraps `inner`, sampling once per `bytes` allocated on average (at least 1). Smaller
    /// intervals are more accurate (relative error about `√(bytes / live bytes)`) and cost more.
    pub const fn with_interval(inner: A, bytes: usize) -> Self {
        let interval = if bytes == 0 { 1 } else { bytes };
        SampledAlloc { inner, interval }
    }

    /// The wrapped allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The mean bytes between samples.
    pub fn interval(&self) -> usize {
        self.interval
    }
}

/// How far the program's bytes start into a sampled block: the record comes first, on the
/// cache line the program is most likely to touch too (after the last byte it would be a line
/// the program may never read; the two measured alike on 1–16 KiB churn), padded to the
/// layout's alignment.
#[inline(always)]
fn record_offset(align: usize) -> usize {
    align.max(RECORD_BYTES)
}

/// What a sampled block of `layout` is requested as from the region: room for the record in
/// front, aligned so that the program's bytes keep the layout's alignment.
#[inline(always)]
fn sampled_request(layout: Layout) -> (usize, usize) {
    let offset = record_offset(layout.align());
    (offset + layout.size(), offset)
}

/// Whether `layout` is small and ordinary enough for jemalloc's plain `malloc`/`sdallocx`.
#[inline(always)]
fn is_plain(layout: Layout) -> bool {
    layout.align() <= QUANTUM && layout.align() <= layout.size()
}

impl SampledAlloc<Jemalloc> {
    /// An unsampled small block: straight to jemalloc.
    #[inline(always)]
    unsafe fn plain_alloc<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        if is_plain(layout) {
            // SAFETY: a non-zero size of at least its alignment, which is at most 16.
            return unsafe { direct_alloc::<Jemalloc, ZEROED>(&self.inner, layout) };
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { inner_alloc::<Jemalloc, ZEROED>(&self.inner, layout) }
    }

    #[inline(always)]
    unsafe fn allocate<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        if size < EXACT_MIN {
            if sampler::skip(size) {
                // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
                return unsafe { self.plain_alloc::<ZEROED>(layout) };
            }
            // SAFETY: as above.
            return unsafe { self.allocate_sampled::<ZEROED>(layout) };
        }
        // SAFETY: as above.
        unsafe { self.allocate_exact::<ZEROED>(layout) }
    }

    /// The countdown ran out within this block (or the thread has not drawn yet).
    #[cold]
    #[inline(never)]
    unsafe fn allocate_sampled<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        let Some(weight) = sampler::decide(layout.size(), self.interval) else {
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
            return unsafe { self.plain_alloc::<ZEROED>(layout) };
        };
        let (size, align) = sampled_request(layout);
        let ledger = Ledger::current(&self.inner);
        let cache = ledger.region_cache();
        // SAFETY: a non-zero size (the record) and a layout's power-of-two alignment; the
        // ledger's slot is this thread's own.
        let start = unsafe { region::alloc(size, align, ZEROED, cache) };
        if start.is_null() {
            // The region is not ready (being set up by another thread, or unavailable) or full:
            // serve the block unsampled. `region::failure` and the exporter say why.
            // SAFETY: as above.
            return unsafe { self.plain_alloc::<ZEROED>(layout) };
        }
        // SAFETY: the record's 16 bytes start the request, before the program's bytes.
        unsafe { write_record(start, ledger.scope, weight) };
        ledger.allocated_weighted(ledger.scope, weight.bytes, u64::from(weight.blocks));
        // SAFETY: the program's bytes follow the record within the request.
        unsafe { start.add(record_offset(layout.align())) }
    }

    /// A block of [`EXACT_MIN`] bytes or more: counted, allocated, owner in the side table.
    #[inline(never)]
    unsafe fn allocate_exact<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        let ledger = Ledger::current(&self.inner);
        ledger.allocated(ledger.scope, layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        let block = unsafe { self.plain_alloc::<ZEROED>(layout) };
        if block.is_null() {
            Ledger::allocation_failed(&self.inner, ledger.scope, layout.size());
            return block;
        }
        // Blocks over a page never share their first page with another block's start, so the
        // page's one slot is theirs (as for large blocks in exact mode).
        tag_side(&self.inner, block, SMALL_MAX, ledger.scope, layout.size())
    }

    /// Frees a sampled block: credits its owner with the weights it was counted with.
    #[cold]
    #[inline(never)]
    unsafe fn free_sampled(&self, block: *mut u8, layout: Layout) {
        // SAFETY: a live sampled block of `layout` starts `record_offset` into its request,
        // which begins with its record.
        let start = unsafe { block.sub(record_offset(layout.align())) };
        // SAFETY: as above.
        let (owner, weight) = unsafe { read_record(start) };
        let ledger = Ledger::current(&self.inner);
        ledger.deallocated_weighted(owner, weight.bytes, u64::from(weight.blocks));
        let (size, align) = sampled_request(layout);
        let cache = ledger.region_cache();
        // SAFETY: `start` was returned by `region::alloc` for this size and alignment; the
        // ledger's slot is this thread's own.
        unsafe { region::free(start, size, align, cache) }
    }

    #[inline(never)]
    unsafe fn free_exact(&self, block: *mut u8, layout: Layout) {
        let owner = side_table::owner_of(block as usize, SMALL_MAX);
        Ledger::current(&self.inner).deallocated(owner, layout.size());
        // SAFETY: allocated by `plain_alloc` with this layout.
        unsafe { self.plain_dealloc(block, layout) }
    }

    #[inline(always)]
    unsafe fn plain_dealloc(&self, block: *mut u8, layout: Layout) {
        if is_plain(layout) {
            // SAFETY: allocated by `plain_alloc` through `direct_alloc` with this layout.
            return unsafe { direct_dealloc(&self.inner, block, layout) };
        }
        // SAFETY: allocated by `plain_alloc` through `Jemalloc::alloc` with this layout.
        unsafe { self.inner.dealloc(block, layout) }
    }

    /// A realloc that is not plain-to-plain: allocate, copy, free. Keeps each block's own path
    /// (region, exact, plain) and its count.
    #[inline(never)]
    unsafe fn realloc_moving(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `GlobalAlloc::realloc`'s contract makes this a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: non-zero size, as the contract requires.
        let moved = unsafe { self.allocate::<false>(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks are live and distinct; copy what both hold.
            unsafe {
                ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
        }
        moved
    }

    /// Both sizes at least [`EXACT_MIN`]: jemalloc may resize in place; the block moves to the
    /// scope current at the `realloc`, as in exact mode.
    #[inline(never)]
    unsafe fn realloc_exact(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let owner = side_table::owner_of(block as usize, SMALL_MAX);
        // SAFETY: allocated by `allocate_exact` with `layout`; `new_size` is valid per contract.
        let moved = unsafe { inner_realloc(&self.inner, block, layout, new_size) };
        if moved.is_null() {
            return moved;
        }
        let ledger = Ledger::current(&self.inner);
        ledger.deallocated(owner, layout.size());
        ledger.allocated(ledger.scope, new_size);
        tag_side(&self.inner, moved, SMALL_MAX, ledger.scope, new_size)
    }
}

/// Writes a sampled block's record at the start of its request.
///
/// # Safety
/// `record` was just returned by the region for a `sampled_request`, whose first 16 bytes the
/// program never sees.
#[inline(always)]
unsafe fn write_record(record: *mut u8, owner: u16, weight: Weight) {
    // SAFETY: 16 bytes of the request, before the program's bytes.
    unsafe {
        record.cast::<u64>().write_unaligned(weight.bytes);
        record.add(8).cast::<u32>().write_unaligned(weight.blocks);
        record.add(12).cast::<u16>().write_unaligned(owner);
    }
}

/// Reads what [`write_record`] wrote.
///
/// # Safety
/// `record` starts the request of a live sampled block.
#[inline(always)]
unsafe fn read_record(record: *mut u8) -> (u16, Weight) {
    // SAFETY: written by `write_record` at allocation; the program never sees those bytes.
    unsafe {
        let weight = Weight {
            bytes: record.cast::<u64>().read_unaligned(),
            blocks: record.add(8).cast::<u32>().read_unaligned(),
        };
        (record.add(12).cast::<u16>().read_unaligned(), weight)
    }
}

// SAFETY: unsampled small blocks go to jemalloc exactly as `Jemalloc` would send them (plain
// `malloc`/`sdallocx` only for layouts where `Jemalloc` uses them, else `Jemalloc` itself).
// Sampled blocks come from the region's arena with a larger request of at least the layout's
// alignment, and go back there with the same request; `region::contains` tells the two apart
// because the region's addresses are reserved for that arena alone. Blocks of `EXACT_MIN` or
// more are `Jemalloc`'s, with an owner slot in the side table that is never handed out.
unsafe impl GlobalAlloc for SampledAlloc<Jemalloc> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { self.allocate::<false>(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { self.allocate::<true>(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if layout.size() < EXACT_MIN {
            if region::contains(block as usize) {
                // SAFETY: the caller guarantees `block` is live with `layout`; it is sampled.
                return unsafe { self.free_sampled(block, layout) };
            }
            // SAFETY: an unsampled small block, allocated by `plain_alloc` with `layout`.
            return unsafe { self.plain_dealloc(block, layout) };
        }
        // SAFETY: the caller guarantees `block` is live with `layout`; it is exact.
        unsafe { self.free_exact(block, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_size, align) = (layout.size(), layout.align());
        if old_size < EXACT_MIN
            && new_size < EXACT_MIN
            && align <= QUANTUM
            && align <= new_size
            && !region::contains(block as usize)
            && sampler::skip(new_size)
        {
            // Unsampled before and after: jemalloc's own realloc, which may resize in place.
            // SAFETY: an unsampled small block of `layout`, allocated by `plain_alloc`.
            return unsafe { inner_realloc(&self.inner, block, layout, new_size) };
        }
        if old_size >= EXACT_MIN && new_size >= EXACT_MIN {
            // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
            return unsafe { self.realloc_exact(block, layout, new_size) };
        }
        // SAFETY: as above.
        unsafe { self.realloc_moving(block, layout, new_size) }
    }
}
