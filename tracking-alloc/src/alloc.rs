//! The `GlobalAlloc` hot path: tag each block with its owner scope and count it.
//!
//! Every operation reads one thread-local block ([`Ledger::current`]), calls the inner
//! allocator, writes or reads the block's 2-byte owner tag, and bumps two counters that only
//! this thread writes. It never allocates from itself, locks, blocks or panics; the only calls
//! out are to the inner allocator (also for the rare side-table page and per-thread slot).
//!
//! Where the tag lives (see the crate docs for the measured costs):
//! - jemalloc, block of at most 4 KiB whose size class has ≥ 2 bytes of slack: in the last two
//!   bytes of the size class. The request is rounded up to the class, which jemalloc would have
//!   served anyway, so the tag costs no memory.
//! - jemalloc, any other block (an exact size class, larger than 4 KiB, or over-aligned): in the
//!   [`side_table`], 2 bytes per block, out of line, so exact-class `Vec` buffers keep their class.
//! - any other inner allocator: 2 bytes appended to the request (its size classes are unknown).

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;

use crate::counters::Ledger;
use crate::side_table;
use crate::size_class::{aligned_class, small_class_aligned, QUANTUM, SMALL_MAX};

const TAG_BYTES: usize = size_of::<u16>();

/// A global allocator that wraps `A` and charges every block to the scope that allocated it.
///
/// ```
/// use tracking_alloc::TrackingAlloc;
///
/// #[global_allocator]
/// static GLOBAL: TrackingAlloc<std::alloc::System> = TrackingAlloc::new(std::alloc::System);
/// # fn main() {}
/// ```
pub struct TrackingAlloc<A: GlobalAlloc> {
    inner: A,
}

impl<A: GlobalAlloc> TrackingAlloc<A> {
    /// Wraps `inner`. `const`, so it can initialise a `#[global_allocator]` static.
    pub const fn new(inner: A) -> Self {
        TrackingAlloc { inner }
    }

    /// The wrapped allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

/// Whether the inner allocator keeps one size class per page and rounds like
/// [`crate::size_class`]: true for `tikv_jemallocator::Jemalloc` on 64-bit x86 and ARM (jemalloc's
/// quantum is 16 bytes there). Decided at compile time: the comparison folds to a constant.
#[inline(always)]
#[cfg_attr(
    not(all(
        feature = "jemalloc",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    allow(clippy::extra_unused_type_parameters)
)]
fn has_jemalloc_layout<A: 'static>() -> bool {
    #[cfg(all(
        feature = "jemalloc",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        std::any::TypeId::of::<A>() == std::any::TypeId::of::<tikv_jemallocator::Jemalloc>()
    }
    #[cfg(not(all(
        feature = "jemalloc",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )))]
    {
        false
    }
}

#[derive(Clone, Copy)]
enum Tag {
    /// At this byte offset inside the block (within the bytes requested from the inner allocator).
    Inline { offset: usize },
    /// In the side table, indexed by the block's jemalloc size class.
    Side { class: usize },
}

#[derive(Clone, Copy)]
struct Placement {
    /// What is asked of the inner allocator for a `Layout` the program asked for.
    request: Layout,
    tag: Tag,
}

/// Where `layout`'s tag goes, and what to request from `A`. A pure function of the layout, so
/// `dealloc` and `realloc` recompute exactly what `alloc` decided. `None` if the padded request
/// would overflow `isize`.
#[inline(always)]
fn placement<A: 'static>(layout: Layout) -> Option<Placement> {
    if let Some(place) = small_placement::<A>(layout) {
        return Some(place);
    }
    if !has_jemalloc_layout::<A>() {
        let size = layout.size();
        let request = Layout::from_size_align(size.checked_add(TAG_BYTES)?, layout.align()).ok()?;
        return Some(Placement {
            request,
            tag: Tag::Inline { offset: size },
        });
    }
    let class = aligned_class(layout.size(), layout.align()).unwrap_or(SMALL_MAX);
    Some(Placement {
        request: layout,
        tag: Tag::Side { class },
    })
}

/// The common case, decided with one table lookup: jemalloc and a block of at most 4 KiB with
/// ordinary alignment. Inline tag if its size class has 2 spare bytes, else the side table.
#[inline(always)]
fn small_placement<A: 'static>(layout: Layout) -> Option<Placement> {
    let (size, align) = (layout.size(), layout.align());
    if !has_jemalloc_layout::<A>() || align > QUANTUM || size > SMALL_MAX {
        return None;
    }
    // A size below its alignment gets the alignment's class, and must be indexed as such in
    // the side table.
    let class = small_class_aligned(size, align);
    if class - size < TAG_BYTES {
        return Some(Placement {
            request: layout,
            tag: Tag::Side { class },
        });
    }
    // SAFETY: `class` is at most 4096 (so it cannot overflow `isize` when rounded up to
    // `align`) and `align` is the layout's own, hence a power of two.
    let request = unsafe { Layout::from_size_align_unchecked(class, align) };
    // Right after the program's bytes: the line it wrote last is the one most likely cached.
    Some(Placement {
        request,
        tag: Tag::Inline { offset: size },
    })
}

impl<A: GlobalAlloc + 'static> TrackingAlloc<A> {
    /// Writes `owner` into a fresh block's tag; returns the owner actually recorded.
    ///
    /// # Safety
    /// `block` was just returned by the inner allocator for `tag`'s placement.
    #[inline(always)]
    unsafe fn write_tag(&self, block: *mut u8, tag: Tag, owner: u16) -> u16 {
        match tag {
            Tag::Inline { offset } => {
                // SAFETY: `offset + 2` is within the bytes requested from the inner allocator,
                // which the program never sees; the caller guarantees `block` is that request.
                unsafe { block.add(offset).cast::<u16>().write_unaligned(owner) };
                owner
            }
            Tag::Side { class } => side_table::record(&self.inner, block as usize, class, owner),
        }
    }

    /// Reads a live block's owner.
    ///
    /// # Safety
    /// `block` is live and was allocated by this allocator with `tag`'s placement.
    #[inline(always)]
    unsafe fn read_tag(&self, block: *mut u8, tag: Tag) -> u16 {
        match tag {
            // SAFETY: written by `write_tag` when the block was allocated; in bounds as there.
            Tag::Inline { offset } => unsafe { block.add(offset).cast::<u16>().read_unaligned() },
            Tag::Side { class } => side_table::owner_of(block as usize, class),
        }
    }

    /// Shared by `alloc` and `alloc_zeroed` (`ZEROED` picks the inner call). Small jemalloc blocks
    /// take a path whose only call is the inner allocator's; large and over-aligned blocks and
    /// other inner allocators go to `allocate_general`, a thread's first block to `finish_block`.
    #[inline(always)]
    unsafe fn allocate<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        let Some(place) = small_placement::<A>(layout) else {
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
            return unsafe { self.allocate_general::<ZEROED>(layout) };
        };
        // SAFETY: `place.request` is at least as large as `layout` (non-zero size).
        let block = unsafe { self.inner_alloc::<ZEROED>(place.request) };
        if block.is_null() {
            return block;
        }
        match Ledger::owned() {
            Some(ledger) => {
                // SAFETY: `block` was just returned for `place.request`.
                let owner = unsafe { self.write_tag(block, place.tag, ledger.scope) };
                ledger.allocated(owner, layout.size());
                block
            }
            // A tail call, out of line: claim a slot for this thread, then tag and count.
            // SAFETY: `block` was just returned for this layout's placement.
            None => unsafe { self.finish_block(block, layout) },
        }
    }

    #[inline(always)]
    unsafe fn inner_alloc<const ZEROED: bool>(&self, request: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe {
            if ZEROED {
                self.inner.alloc_zeroed(request)
            } else {
                self.inner.alloc(request)
            }
        }
    }

    /// Tags and counts a block allocated by a thread without a slot yet (it claims one here).
    #[cold]
    #[inline(never)]
    unsafe fn finish_block(&self, block: *mut u8, layout: Layout) -> *mut u8 {
        if let Some(place) = placement::<A>(layout) {
            // SAFETY: the caller passes a block just allocated for this layout's placement.
            unsafe { self.tag_and_count(block, place.tag, layout.size()) };
        }
        block
    }

    /// Tags a fresh block with the current scope (claiming a slot if the thread has none) and
    /// counts it.
    ///
    /// # Safety
    /// `block` was just returned by the inner allocator for `tag`'s placement.
    #[inline(always)]
    unsafe fn tag_and_count(&self, block: *mut u8, tag: Tag, size: usize) {
        let ledger = Ledger::current(&self.inner);
        // SAFETY: forwarded from the caller.
        let owner = unsafe { self.write_tag(block, tag, ledger.scope) };
        ledger.allocated(owner, size);
    }

    /// Everything the fast path in `allocate` does not take: large and over-aligned blocks, and
    /// inner allocators other than jemalloc.
    #[inline(never)]
    unsafe fn allocate_general<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        let Some(place) = placement::<A>(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: `place.request` is at least as large as `layout`, which the caller guarantees
        // has a non-zero size.
        let block = unsafe { self.inner_alloc::<ZEROED>(place.request) };
        if !block.is_null() {
            // SAFETY: `block` was just returned for `place.request`.
            unsafe { self.tag_and_count(block, place.tag, layout.size()) };
        }
        block
    }

    /// Every free the fast path in `dealloc` does not take: side-table tags, other allocators,
    /// threads without a slot.
    #[inline(never)]
    unsafe fn dealloc_general(&self, block: *mut u8, layout: Layout) {
        // A layout that was allocated always has a placement; answer gracefully regardless.
        let Some(place) = placement::<A>(layout) else {
            return;
        };
        // SAFETY: the caller guarantees `block` is live and was allocated here with `layout`.
        let owner = unsafe { self.read_tag(block, place.tag) };
        // Counted before the block goes back, so the inner free is a tail call: nothing needs to
        // survive it. A snapshot in between sees the block freed a moment early; never negative.
        Ledger::current(&self.inner).deallocated(owner, layout.size());
        // SAFETY: `place.request` is what `alloc` requested for this `layout`.
        unsafe { self.inner.dealloc(block, place.request) };
    }
}

// SAFETY: every method forwards to the inner allocator with a layout derived deterministically
// from the caller's (`placement`), at least as large and equally aligned, so the inner
// allocator's guarantees carry over; the extra bytes hold only the tag and are never handed out.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for TrackingAlloc<A> {
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
        if let (Some(place), Some(ledger)) = (small_placement::<A>(layout), Ledger::owned()) {
            // SAFETY: the caller guarantees `block` is live and was allocated here with `layout`.
            let owner = unsafe { self.read_tag(block, place.tag) };
            // Counted before the block goes back, so the inner free is a tail call.
            ledger.deallocated(owner, layout.size());
            // SAFETY: `place.request` is what `alloc` requested for this `layout`.
            return unsafe { self.inner.dealloc(block, place.request) };
        }
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { self.dealloc_general(block, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(old) = placement::<A>(layout) else {
            return ptr::null_mut();
        };
        let Some(new) = Layout::from_size_align(new_size, layout.align())
            .ok()
            .and_then(placement::<A>)
        else {
            return ptr::null_mut();
        };
        // SAFETY: the caller guarantees `block` is live and was allocated here with `layout`.
        let owner = unsafe { self.read_tag(block, old.tag) };
        // SAFETY: `old.request` is what was requested for `block`; `new.request` has the same
        // alignment and a non-zero size that does not overflow `isize` (checked by `Layout`).
        let moved = unsafe { self.inner.realloc(block, old.request, new.request.size()) };
        if moved.is_null() {
            // The old block is untouched, tag included: nothing to count.
            return moved;
        }
        let ledger = Ledger::current(&self.inner);
        // SAFETY: `moved` was just returned by the inner allocator for `new.request`.
        let new_owner = unsafe { self.write_tag(moved, new.tag, ledger.scope) };
        // The old size leaves its owner; the new size is charged to the scope resizing it.
        ledger.deallocated(owner, layout.size());
        ledger.allocated(new_owner, new_size);
        moved
    }
}
