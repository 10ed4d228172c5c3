//! The `GlobalAlloc` hot path: tag each block with its owner scope and count it.
//!
//! Every operation reads one thread-local block ([`Ledger::owned`]), counts in a row that only
//! this thread writes, calls the inner allocator, and writes or reads the block's 2-byte owner
//! tag. It never allocates from itself, locks, blocks or panics; the only calls out are to the
//! inner allocator (also for the rare side-table page and per-thread slot).
//!
//! Where the tag lives (see the crate docs for the measured costs):
//! - jemalloc, block of at most 4 KiB whose size class has ≥ 2 bytes of slack: right after the
//!   requested bytes. The request is rounded up to the class, which jemalloc would have served
//!   anyway, so the tag costs no memory.
//! - jemalloc, a class with exactly 1 spare byte (a 7-byte string, say): a one-byte tag there,
//!   if the owner's id is below 255; otherwise that byte says "in the side table".
//! - jemalloc, any other block (an exact size class, larger than 4 KiB, or over-aligned): in the
//!   [`side_table`], 2 bytes per block, out of line, so exact-class `Vec` buffers keep their class.
//! - any other inner allocator: 2 bytes appended to the request (its size classes are unknown).
//!
//! Paths, fastest first: small blocks with ordinary alignment (inline in `__rust_alloc`), large
//! blocks with ordinary alignment (`allocate_large`), everything else (`allocate_general`, which
//! recomputes the [`Placement`] that `dealloc_general` and `realloc` also use).

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;

use crate::counters::Ledger;
use crate::mode;
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
#[cfg_attr(not(jemalloc_layout), allow(clippy::extra_unused_type_parameters))]
fn has_jemalloc_layout<A: 'static>() -> bool {
    #[cfg(jemalloc_layout)]
    {
        std::any::TypeId::of::<A>() == std::any::TypeId::of::<tikv_jemallocator::Jemalloc>()
    }
    #[cfg(not(jemalloc_layout))]
    {
        false
    }
}

/// Allocates a fast-path request: a small block's whole size class, or a large block as asked;
/// either way a size of at least its alignment, which is at most 16. For such a layout
/// `Jemalloc` calls `malloc` (or `calloc`) after checking the alignment; the fast path calls it
/// directly and saves the check.
///
/// # Safety
/// `request` has a non-zero size of at least its alignment, which is at most [`QUANTUM`].
#[inline(always)]
pub(crate) unsafe fn direct_alloc<A: GlobalAlloc + 'static, const ZEROED: bool>(
    inner: &A,
    request: Layout,
) -> *mut u8 {
    #[cfg(jemalloc_layout)]
    if has_jemalloc_layout::<A>() {
        // SAFETY: jemalloc's `malloc` and `calloc` accept any size; their result is aligned to
        // 16 bytes for sizes of 16 or more and to 8 for smaller ones, which covers
        // `request.align()` (at most 16 and at most the size).
        return unsafe {
            if ZEROED {
                tikv_jemalloc_sys::calloc(1, request.size())
            } else {
                tikv_jemalloc_sys::malloc(request.size())
            }
        }
        .cast();
    }
    // SAFETY: forwarded from the caller.
    unsafe { inner_alloc::<A, ZEROED>(inner, request) }
}

/// Frees a block allocated by [`direct_alloc`]: jemalloc's sized free with no flags, which is
/// what `Jemalloc::dealloc` computes for such a layout.
///
/// # Safety
/// `block` is live and was returned by [`direct_alloc`] for `request`, or by the inner
/// allocator's own `alloc` for it (which calls the same jemalloc function).
#[inline(always)]
pub(crate) unsafe fn direct_dealloc<A: GlobalAlloc + 'static>(
    inner: &A,
    block: *mut u8,
    request: Layout,
) {
    #[cfg(jemalloc_layout)]
    if has_jemalloc_layout::<A>() {
        // SAFETY: `block` came from jemalloc's `malloc`/`calloc` with exactly this size (see
        // `direct_alloc`), which is what `sdallocx` requires with no flags.
        return unsafe { tikv_jemalloc_sys::sdallocx(block.cast(), request.size(), 0) };
    }
    // SAFETY: forwarded from the caller.
    unsafe { inner.dealloc(block, request) }
}

/// Resizes a block: jemalloc's `realloc` directly where `Jemalloc::realloc` would call it (an
/// alignment of at most 16 and at most the new size: every small or large ordinary block),
/// else the inner allocator's `realloc`.
///
/// # Safety
/// As for `GlobalAlloc::realloc` of `request` to `new_size` on the inner allocator.
#[inline(always)]
pub(crate) unsafe fn inner_realloc<A: GlobalAlloc + 'static>(
    inner: &A,
    block: *mut u8,
    request: Layout,
    new_size: usize,
) -> *mut u8 {
    #[cfg(jemalloc_layout)]
    if has_jemalloc_layout::<A>() && request.align() <= QUANTUM && request.align() <= new_size {
        // SAFETY: `block` came from jemalloc with an alignment that plain `realloc` keeps (at
        // most 16 and at most the new size), as `Jemalloc::realloc` relies on too.
        return unsafe { tikv_jemalloc_sys::realloc(block.cast(), new_size) }.cast();
    }
    // SAFETY: forwarded from the caller.
    unsafe { inner.realloc(block, request, new_size) }
}

#[inline(always)]
pub(crate) unsafe fn inner_alloc<A: GlobalAlloc, const ZEROED: bool>(
    inner: &A,
    request: Layout,
) -> *mut u8 {
    // SAFETY: forwarded from the caller.
    unsafe {
        if ZEROED {
            inner.alloc_zeroed(request)
        } else {
            inner.alloc(request)
        }
    }
}

#[derive(Clone, Copy)]
enum Tag {
    /// Two bytes at this offset inside the block (within the bytes requested from the inner
    /// allocator).
    Inline { offset: usize },
    /// One byte at this offset (a size class with exactly one spare byte): the owner if it is
    /// below [`BYTE_ESCAPE`], else `BYTE_ESCAPE` and the owner in the side table.
    Byte { offset: usize, class: usize },
    /// In the side table, indexed by the block's jemalloc size class.
    Side { class: usize },
}

/// A one-byte tag that says "the owner is in the side table".
const BYTE_ESCAPE: u8 = u8::MAX;

/// Writes a one-byte tag: the owner if it is below [`BYTE_ESCAPE`] (then returns true), else
/// the escape (then the caller records the owner in the side table).
///
/// # Safety
/// `block + offset` is a byte of the request that the program never sees.
#[inline(always)]
unsafe fn write_byte_tag(block: *mut u8, offset: usize, owner: u16) -> bool {
    let byte = u8::try_from(owner).unwrap_or(BYTE_ESCAPE);
    // SAFETY: guaranteed by the caller.
    unsafe { block.add(offset).write(byte) };
    byte != BYTE_ESCAPE
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

/// The size class of the common block, decided with one table lookup: jemalloc and at most
/// 4 KiB with ordinary alignment (`None` for anything else). Such a block is requested as its
/// whole size class, which jemalloc would serve anyway.
#[inline(always)]
fn small_class<A: 'static>(layout: Layout) -> Option<usize> {
    let (size, align) = (layout.size(), layout.align());
    if !has_jemalloc_layout::<A>() || align > QUANTUM || size > SMALL_MAX {
        return None;
    }
    // A size below its alignment gets the alignment's class, and must be indexed as such in
    // the side table.
    Some(small_class_aligned(size, align))
}

/// Whether `layout` is a large block (over 4 KiB) with ordinary alignment under jemalloc. Each
/// such block starts in a page of its own, so its tag is the one side-table slot of that page
/// (indexed as class [`SMALL_MAX`]), and it is requested as asked.
#[inline(always)]
fn is_large_ordinary<A: 'static>(layout: Layout) -> bool {
    has_jemalloc_layout::<A>() && layout.align() <= QUANTUM && layout.size() > SMALL_MAX
}

/// Whether a small block's size class has room for the tag after the program's `size` bytes.
/// If not (an exact-class `Vec` buffer, say), the tag goes to the side table.
#[inline(always)]
fn fits_inline(class: usize, size: usize) -> bool {
    class - size >= TAG_BYTES
}

/// Where a small block's tag goes: right after the program's bytes (the line it wrote last is
/// the one most likely cached) if the class has room, else in the side table.
#[inline(always)]
fn small_tag(class: usize, size: usize) -> Tag {
    match class - size {
        0 => Tag::Side { class },
        1 => Tag::Byte {
            offset: size,
            class,
        },
        _ => Tag::Inline { offset: size },
    }
}

/// What [`small_class`] decides, as a [`Placement`].
#[inline(always)]
fn small_placement<A: 'static>(layout: Layout) -> Option<Placement> {
    let class = small_class::<A>(layout)?;
    Some(Placement {
        request: small_request(class, layout.align()),
        tag: small_tag(class, layout.size()),
    })
}

/// The request for a small block: its size class, with its alignment.
#[inline(always)]
fn small_request(class: usize, align: usize) -> Layout {
    // SAFETY: `class` is at most 4096 (so it cannot overflow `isize` when rounded up to
    // `align`) and `align` is a layout's own, hence a power of two.
    unsafe { Layout::from_size_align_unchecked(class, align) }
}

/// Records a fresh, counted block's owner in the side table; returns the block.
#[inline(always)]
pub(crate) fn tag_side<A: GlobalAlloc>(
    inner: &A,
    block: *mut u8,
    class: usize,
    owner: u16,
    size: usize,
) -> *mut u8 {
    if side_table::try_record(block as usize, class, owner) {
        return block;
    }
    // The page's first side-table block: a tail call, out of line.
    record_side(inner, block, class, owner, size)
}

/// Records a fresh block's owner in the side table, growing the table. The block was already
/// counted for `owner`; if the table could not get memory for the block's page it answers
/// `unscoped` for the block from now on, so the count moves there.
#[cold]
#[inline(never)]
fn record_side<A: GlobalAlloc>(
    inner: &A,
    block: *mut u8,
    class: usize,
    owner: u16,
    size: usize,
) -> *mut u8 {
    let recorded = side_table::record(inner, block as usize, class, owner);
    if recorded != owner {
        Ledger::allocation_failed(inner, owner, size);
        Ledger::current(inner).allocated(recorded, size);
    }
    block
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
            Tag::Byte { offset, class } => {
                // SAFETY: `offset + 1` is within the request, as above.
                if unsafe { write_byte_tag(block, offset, owner) } {
                    return owner;
                }
                side_table::record(&self.inner, block as usize, class, owner)
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
            Tag::Byte { offset, class } => {
                // SAFETY: as above.
                match unsafe { block.add(offset).read() } {
                    BYTE_ESCAPE => side_table::owner_of(block as usize, class),
                    owner => u16::from(owner),
                }
            }
            Tag::Side { class } => side_table::owner_of(block as usize, class),
        }
    }

    /// Shared by `alloc` and `alloc_zeroed` (`ZEROED` picks the inner call). The common case,
    /// a small jemalloc block on a thread that owns its counter slot, is inlined; large blocks
    /// take a similar path out of line; over-aligned blocks, other inner allocators and a
    /// thread's first block go to `allocate_general`.
    #[inline(always)]
    unsafe fn allocate<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        if let (Some(class), Some(ledger)) = (small_class::<A>(layout), Ledger::owned()) {
            let (owner, size) = (ledger.scope, layout.size());
            let request = small_request(class, layout.align());
            // SAFETY: a small request: its class is at least its alignment, at most 16.
            let block = unsafe { self.counted_alloc::<ZEROED>(ledger, size, request) };
            if block.is_null() {
                return block;
            }
            if !fits_inline(class, size) {
                // SAFETY: `block` was just returned for this layout's small placement.
                return unsafe { self.tag_tight(block, class, owner, size) };
            }
            // SAFETY: `block` was just returned for this layout's small placement, whose tag is
            // inline (`fits_inline`).
            unsafe { self.write_tag(block, Tag::Inline { offset: size }, owner) };
            return block;
        }
        if is_large_ordinary::<A>(layout) {
            if let Some(ledger) = Ledger::owned() {
                // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
                return unsafe { self.allocate_large::<ZEROED>(ledger, layout) };
            }
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { self.allocate_general::<ZEROED>(layout) }
    }

    /// A large block with ordinary alignment: like a small one with a side-table tag, but out
    /// of line.
    ///
    /// # Safety
    /// `layout` is large and ordinary ([`is_large_ordinary`]).
    #[inline(never)]
    unsafe fn allocate_large<const ZEROED: bool>(&self, ledger: Ledger, layout: Layout) -> *mut u8 {
        // SAFETY: a large size is above its alignment, which is at most 16.
        let block = unsafe { self.counted_alloc::<ZEROED>(ledger, layout.size(), layout) };
        if block.is_null() {
            return block;
        }
        tag_side(&self.inner, block, SMALL_MAX, ledger.scope, layout.size())
    }

    /// Counts a block of `size` bytes for the ledger's scope, then allocates `request` straight
    /// from jemalloc (taking the count back if that fails). Counting first leaves only the
    /// size, class and owner live across the inner call.
    ///
    /// # Safety
    /// `request` is valid for [`direct_alloc`].
    #[inline(always)]
    unsafe fn counted_alloc<const ZEROED: bool>(
        &self,
        ledger: Ledger,
        size: usize,
        request: Layout,
    ) -> *mut u8 {
        ledger.allocated(ledger.scope, size);
        // SAFETY: forwarded from the caller.
        let block = unsafe { direct_alloc::<A, ZEROED>(&self.inner, request) };
        if block.is_null() {
            Ledger::allocation_failed(&self.inner, ledger.scope, size);
        }
        block
    }

    /// Tags a fresh, counted small block whose class has fewer than 2 spare bytes: a one-byte
    /// tag if it has one and the owner fits, else the side table. Returns the block.
    ///
    /// # Safety
    /// `block` was just returned for the small placement of a `size`-byte layout of `class`.
    #[inline(always)]
    unsafe fn tag_tight(&self, block: *mut u8, class: usize, owner: u16, size: usize) -> *mut u8 {
        // SAFETY: the class has one byte past the program's `size`.
        if class - size == 1 && unsafe { write_byte_tag(block, size, owner) } {
            return block;
        }
        tag_side(&self.inner, block, class, owner, size)
    }

    /// Frees a large block with ordinary alignment, out of line.
    ///
    /// # Safety
    /// As for `GlobalAlloc::dealloc`, and `layout` is large and ordinary ([`is_large_ordinary`]).
    #[inline(never)]
    unsafe fn dealloc_large(&self, ledger: Ledger, block: *mut u8, layout: Layout) {
        let owner = side_table::owner_of(block as usize, SMALL_MAX);
        ledger.deallocated(owner, layout.size());
        // SAFETY: a large ordinary block is requested as asked (`allocate_large`, or the inner
        // allocator's own `alloc` on a thread's first block).
        unsafe { direct_dealloc(&self.inner, block, layout) }
    }

    /// Everything the fast paths in `allocate` do not take: over-aligned blocks, inner
    /// allocators other than jemalloc, and a thread's first block (it claims a counter slot).
    #[inline(never)]
    unsafe fn allocate_general<const ZEROED: bool>(&self, layout: Layout) -> *mut u8 {
        if has_jemalloc_layout::<A>() {
            let _ = mode::record(mode::Placement::SizeClass);
        } else {
            mode::record_appended(std::any::type_name::<A>());
        }
        let Some(place) = placement::<A>(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: `place.request` is at least as large as `layout`, which the caller guarantees
        // has a non-zero size.
        let block = unsafe { inner_alloc::<A, ZEROED>(&self.inner, place.request) };
        if !block.is_null() {
            let ledger = Ledger::current(&self.inner);
            // SAFETY: `block` was just returned for `place.request`.
            let owner = unsafe { self.write_tag(block, place.tag, ledger.scope) };
            ledger.allocated(owner, layout.size());
        }
        block
    }

    /// Every free the fast paths in `dealloc` do not take: over-aligned blocks, other inner
    /// allocators, threads without a slot.
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
// The fast paths call jemalloc's functions directly only when the inner allocator is `Jemalloc`,
// and only the ones it would call itself for those layouts (`direct_alloc`, `direct_dealloc`).
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
        if let (Some(class), Some(ledger)) = (small_class::<A>(layout), Ledger::owned()) {
            let size = layout.size();
            // SAFETY: the caller guarantees `block` is live and was allocated here with
            // `layout`, whose small placement put the tag there.
            let owner = unsafe { self.read_tag(block, small_tag(class, size)) };
            // Counted before the block goes back, so the inner free is a tail call.
            ledger.deallocated(owner, size);
            // SAFETY: the block was requested as `small_request(class, align)`.
            return unsafe {
                direct_dealloc(&self.inner, block, small_request(class, layout.align()))
            };
        }
        if is_large_ordinary::<A>(layout) {
            if let Some(ledger) = Ledger::owned() {
                // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
                return unsafe { self.dealloc_large(ledger, block, layout) };
            }
        }
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { self.dealloc_general(block, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(old) = placement::<A>(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: `GlobalAlloc::realloc` requires `new_size` to be non-zero and not to overflow
        // `isize` when rounded up to `layout.align()`, which is a power of two.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let Some(new) = placement::<A>(new_layout) else {
            return ptr::null_mut();
        };
        // SAFETY: the caller guarantees `block` is live and was allocated here with `layout`.
        let owner = unsafe { self.read_tag(block, old.tag) };
        // SAFETY: `old.request` is what was requested for `block`; `new.request` has the same
        // alignment and a non-zero size that does not overflow `isize` (a valid `Layout`).
        let moved = unsafe { inner_realloc(&self.inner, block, old.request, new.request.size()) };
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
