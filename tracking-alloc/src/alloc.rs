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
use crate::size_class::{aligned_class, small_class, QUANTUM, SMALL_MAX};

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
    let (size, align) = (layout.size(), layout.align());
    if !has_jemalloc_layout::<A>() {
        let request = Layout::from_size_align(size.checked_add(TAG_BYTES)?, align).ok()?;
        return Some(Placement {
            request,
            tag: Tag::Inline { offset: size },
        });
    }
    if align <= QUANTUM && size <= SMALL_MAX {
        let class = small_class(size);
        if class - size >= TAG_BYTES {
            // SAFETY: `class` is at most 4096 (so it cannot overflow `isize` when rounded up to
            // `align`) and `align` is the layout's own, hence a power of two.
            let request = unsafe { Layout::from_size_align_unchecked(class, align) };
            return Some(Placement {
                request,
                tag: Tag::Inline {
                    offset: class - TAG_BYTES,
                },
            });
        }
        return Some(Placement {
            request: layout,
            tag: Tag::Side { class },
        });
    }
    let class = aligned_class(size, align).unwrap_or(SMALL_MAX);
    Some(Placement {
        request: layout,
        tag: Tag::Side { class },
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

    /// Shared by `alloc` and `alloc_zeroed`: `get` is the inner allocator's matching call.
    #[inline(always)]
    unsafe fn allocate(&self, layout: Layout, get: unsafe fn(&A, Layout) -> *mut u8) -> *mut u8 {
        let Some(place) = placement::<A>(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: `place.request` is at least as large as `layout`, which the caller guarantees
        // has a non-zero size.
        let block = unsafe { get(&self.inner, place.request) };
        if block.is_null() {
            return block;
        }
        let ledger = Ledger::current(&self.inner);
        // SAFETY: `block` was just returned for `place.request`.
        let owner = unsafe { self.write_tag(block, place.tag, ledger.scope) };
        ledger.allocated(owner, layout.size());
        block
    }
}

// SAFETY: every method forwards to the inner allocator with a layout derived deterministically
// from the caller's (`placement`), at least as large and equally aligned, so the inner
// allocator's guarantees carry over; the extra bytes hold only the tag and are never handed out.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for TrackingAlloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { self.allocate(layout, |inner, request| inner.alloc(request)) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { self.allocate(layout, |inner, request| inner.alloc_zeroed(request)) }
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // A layout that was allocated always has a placement; answer gracefully regardless.
        let Some(place) = placement::<A>(layout) else {
            return;
        };
        // SAFETY: the caller guarantees `block` is live and was allocated here with `layout`.
        let owner = unsafe { self.read_tag(block, place.tag) };
        // SAFETY: `place.request` is what `alloc` requested for this `layout`.
        unsafe { self.inner.dealloc(block, place.request) };
        Ledger::current(&self.inner).deallocated(owner, layout.size());
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
