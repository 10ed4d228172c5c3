//! The sampled blocks' own jemalloc arena, inside one reserved range of addresses.
//!
//! [`crate::SampledAlloc`] must tell, on every free, whether the block was sampled, with no
//! lookup. So sampled blocks come from a jemalloc arena of their own whose extent hooks hand out
//! memory only from one range reserved at start-up, aligned to its own size: a pointer is a
//! sampled block iff `ptr & !(REGION_BYTES - 1) == base`, one load, one `and`, one compare
//! (TCMalloc keeps sampled objects in a separate address region for the same reason).
//!
//! Pitfall (jemalloc#825): the thread cache mixes arenas, handing a block freed into it to the
//! next ordinary `malloc` of that class, whatever arena the block came from. Every call here
//! therefore names an explicit thread cache (`tcache.create`) that only region blocks ever
//! enter, kept in the thread's counter slot, or `MALLOCX_TCACHE_NONE`; region blocks never
//! reach an ordinary thread cache and ordinary blocks never come from the region.
//!
//! The hooks: memory is handed out by a bump pointer over the reservation (`mprotect` to
//! read-write as it advances, so nothing is committed before it is used); jemalloc keeps freed
//! extents for reuse (`dalloc` opts out, as with `retain:true`), and returns their pages to the
//! OS through `purge_forced` (`madvise(MADV_DONTNEED)`). Nothing here calls the Rust allocator.

use std::ffi::{c_uint, c_void};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};

use tikv_jemalloc_sys as sys;

/// Size of the reserved range, and its alignment: 64 GiB of address space (not memory). Only
/// sampled blocks below [`crate::sampled`]'s exact threshold live here; their bytes are about
/// `average size / interval` of the program's small-block heap.
pub(crate) const REGION_BYTES: usize = 1 << 36;

/// A `base` that no masked pointer equals (masked pointers are multiples of `REGION_BYTES`).
const NO_REGION: usize = 1;

/// The reserved range's start once it is ready, else [`NO_REGION`].
static BASE: AtomicUsize = AtomicUsize::new(NO_REGION);
/// The bump pointer: the first address of the range not yet handed to jemalloc.
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// The end of the reserved range (set before the arena exists, as its set-up calls the hooks).
static LIMIT: AtomicUsize = AtomicUsize::new(0);
/// Region arenas, so threads do not contend for one arena's bin locks when their caches fill
/// and flush (as jemalloc's own arenas spread threads): one per CPU, at most this many.
const MAX_ARENAS: usize = 16;
/// The arenas' indices, valid once `STATE` is [`READY`]; `ARENA_COUNT` of them.
static ARENAS: [AtomicUsize; MAX_ARENAS] = [const { AtomicUsize::new(0) }; MAX_ARENAS];
static ARENA_COUNT: AtomicUsize = AtomicUsize::new(1);

const UNSET: u8 = 0;
const STARTING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;
static STATE: AtomicU8 = AtomicU8::new(UNSET);
/// Why the region could not be set up, when `STATE` is [`FAILED`].
static FAILURE: AtomicU8 = AtomicU8::new(0);

/// Why sampling is off: indexes into [`FAILURES`].
const FAILURES: [&str; 3] = [
    "",
    "could not reserve 64 GiB of address space for sampled blocks (mmap failed: is the address \
     space limited by `ulimit -v` / RLIMIT_AS?); per-scope estimates read zero",
    "jemalloc refused to create the sampled blocks' arena (mallctl arenas.create failed)",
];

/// Whether `addr` lies in the region: the free path's whole test.
#[inline(always)]
pub(crate) fn contains(addr: usize) -> bool {
    // Relaxed is enough: a region pointer reaches a free only after its allocation, which
    // happened after `BASE` was published (release) on the allocating thread, and the program's
    // own synchronisation that handed the pointer over orders this load after that store.
    addr & !(REGION_BYTES - 1) == BASE.load(Ordering::Relaxed)
}

/// Sets the region up on first use. Returns whether it is ready; `false` while another thread
/// is setting it up (the caller serves that block unsampled) or when setting up failed.
#[cold]
pub(crate) fn ready() -> bool {
    match STATE.load(Ordering::Acquire) {
        READY => return true,
        STARTING | FAILED => return false,
        _ => {}
    }
    if STATE
        .compare_exchange(UNSET, STARTING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return STATE.load(Ordering::Acquire) == READY;
    }
    match set_up() {
        Ok(()) => {
            STATE.store(READY, Ordering::Release);
            true
        }
        Err(reason) => {
            FAILURE.store(reason, Ordering::Relaxed);
            STATE.store(FAILED, Ordering::Release);
            false
        }
    }
}

/// Why sampling is unavailable, if setting the region up failed.
pub(crate) fn failure() -> Option<&'static str> {
    (STATE.load(Ordering::Acquire) == FAILED)
        .then(|| FAILURES[usize::from(FAILURE.load(Ordering::Relaxed)).min(FAILURES.len() - 1)])
}

fn set_up() -> Result<(), u8> {
    let base = reserve().ok_or(1)?;
    NEXT.store(base, Ordering::Relaxed);
    LIMIT.store(base + REGION_BYTES, Ordering::Release);
    // SAFETY: `sysconf` only reads a system setting.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, MAX_ARENAS as _);
    let mut count = 0;
    for slot in &ARENAS[..cpus as usize] {
        let Some(arena) = create_arena() else { break };
        slot.store(arena, Ordering::Relaxed);
        count += 1;
    }
    if count == 0 {
        return Err(2);
    }
    ARENA_COUNT.store(count, Ordering::Relaxed);
    BASE.store(base, Ordering::Release);
    Ok(())
}

/// A jemalloc arena whose extents come from the region's hooks.
fn create_arena() -> Option<usize> {
    let mut arena: c_uint = 0;
    let mut arena_len = size_of::<c_uint>();
    let mut hooks: *mut sys::extent_hooks_t = ptr::from_ref(&HOOKS.0).cast_mut();
    // SAFETY: `arenas.create` reads an `extent_hooks_t *` and writes an `unsigned`, with the
    // lengths given. `HOOKS` is a `static`, so it outlives the arena as jemalloc requires, and
    // jemalloc only reads it. Setting up calls the hooks below, which call no allocator.
    let failed = unsafe {
        sys::mallctl(
            c"arenas.create".as_ptr(),
            ptr::from_mut(&mut arena).cast(),
            &mut arena_len,
            ptr::from_mut(&mut hooks).cast(),
            size_of::<*mut sys::extent_hooks_t>(),
        )
    } != 0;
    (!failed).then_some(arena as usize)
}

/// Reserves `REGION_BYTES` of address space aligned to its size: maps twice that inaccessible,
/// then unmaps the parts outside the aligned middle.
fn reserve() -> Option<usize> {
    let len = 2 * REGION_BYTES;
    // SAFETY: an anonymous, inaccessible, unreserved mapping at an address of the kernel's
    // choosing touches no existing memory.
    let start = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if start == libc::MAP_FAILED {
        return None;
    }
    let start = start as usize;
    let base = (start + REGION_BYTES - 1) & !(REGION_BYTES - 1);
    let (head, tail) = (base - start, start + len - (base + REGION_BYTES));
    // SAFETY: both ranges lie inside the mapping just made, which nothing else uses yet.
    unsafe {
        if head > 0 {
            libc::munmap(start as *mut c_void, head);
        }
        if tail > 0 {
            libc::munmap((base + REGION_BYTES) as *mut c_void, tail);
        }
    }
    Some(base)
}

/// `mallocx`/`sdallocx` flags for a region block of this alignment: a thread cache that only
/// ever holds region blocks (or none), and the alignment when jemalloc's default would not
/// give it.
#[inline]
fn flags(size: usize, align: usize, cache: Option<&AtomicU32>) -> i32 {
    let align_flag = if align > 16 || align > size {
        align.trailing_zeros() as i32 // MALLOCX_LG_ALIGN
    } else {
        0
    };
    align_flag
        | cache
            .and_then(region_cache)
            .map_or(sys::MALLOCX_TCACHE_NONE, sys::MALLOCX_TCACHE)
}

/// The explicit jemalloc thread cache kept in `cell` (a counter slot's), created on first use.
/// Without one, each sampled block would take the arena's bin lock and, with few live samples,
/// free and refill whole slabs (measured: ~450 ns per sample). Explicit caches are never used
/// for ordinary blocks, so they never mix arenas. `None` if jemalloc has no cache to give.
fn region_cache(cell: &AtomicU32) -> Option<usize> {
    match cell.load(Ordering::Relaxed) {
        0 => {}
        index => return Some(index as usize - 1),
    }
    let mut index: c_uint = 0;
    let mut len = size_of::<c_uint>();
    // SAFETY: `tcache.create` writes an `unsigned` of the length given; it allocates from
    // jemalloc's internal metadata, not through the Rust allocator.
    let failed = unsafe {
        sys::mallctl(
            c"tcache.create".as_ptr(),
            ptr::from_mut(&mut index).cast(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    } != 0;
    if failed {
        return None;
    }
    // Only the slot's owner thread gets here, so no other thread raced to create one.
    cell.store(index + 1, Ordering::Relaxed);
    Some(index as usize)
}

/// Allocates `size` bytes aligned to `align` in the region, or null (region not ready, full, or
/// jemalloc out of memory), through the explicit thread cache kept in `cache` if any.
///
/// # Safety
/// `size` is non-zero; `align` is a power of two; `cache` is the calling thread's own.
pub(crate) unsafe fn alloc(
    size: usize,
    align: usize,
    zeroed: bool,
    cache: Option<&AtomicU32>,
) -> *mut u8 {
    if !ready() {
        return ptr::null_mut();
    }
    // Threads with a cache of their own spread over the arenas by its index (stable per slot);
    // others share the first.
    let spread = cache.map_or(0, |c| c.load(Ordering::Relaxed) as usize);
    let arena = ARENAS[spread % ARENA_COUNT.load(Ordering::Relaxed)].load(Ordering::Relaxed);
    let arena = sys::MALLOCX_ARENA(arena);
    let zero = if zeroed { sys::MALLOCX_ZERO } else { 0 };
    // SAFETY: non-zero size, valid flags (an arena that exists, a power-of-two alignment, an
    // explicit cache that only this thread uses).
    unsafe { sys::mallocx(size, flags(size, align, cache) | arena | zero) }.cast()
}

/// Frees a block from [`alloc`], into the explicit thread cache kept in `cache` if any.
///
/// # Safety
/// `block` is live and was returned by [`alloc`] for `size` and `align`; `cache` is the calling
/// thread's own.
pub(crate) unsafe fn free(block: *mut u8, size: usize, align: usize, cache: Option<&AtomicU32>) {
    // SAFETY: as the caller guarantees; the flags carry the same alignment as at allocation, and
    // a cache that only holds region blocks (or none), so the block never reaches an ordinary
    // thread cache.
    unsafe { sys::sdallocx(block.cast(), size, flags(size, align, cache)) }
}

/// The extent hooks, in a `static` jemalloc may keep a pointer to.
struct Hooks(sys::extent_hooks_t);
// SAFETY: function pointers only, never written after initialisation.
unsafe impl Sync for Hooks {}

static HOOKS: Hooks = Hooks(sys::extent_hooks_t {
    alloc: Some(extent_alloc),
    dalloc: Some(extent_dalloc),
    destroy: Some(extent_destroy),
    commit: Some(answer::<false>),
    decommit: Some(answer::<true>),
    purge_lazy: None,
    purge_forced: Some(extent_purge_forced),
    split: Some(extent_split_or_merge),
    merge: Some(extent_merge),
});

const PAGE_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// Hands out `size` bytes aligned to `alignment` from the bump pointer, made read-write.
unsafe extern "C" fn extent_alloc(
    _hooks: *mut sys::extent_hooks_t,
    new_addr: *mut c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    _arena: c_uint,
) -> *mut c_void {
    let end = LIMIT.load(Ordering::Acquire);
    let align = alignment.max(1);
    let mut next = NEXT.load(Ordering::Relaxed);
    let start = loop {
        let start = (next + align - 1) & !(align - 1);
        // Extending an extent in place is only possible right at the bump pointer.
        if (!new_addr.is_null() && new_addr as usize != start) || start + size > end {
            return ptr::null_mut();
        }
        match NEXT.compare_exchange_weak(next, start + size, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => break start,
            Err(seen) => next = seen,
        }
    };
    // SAFETY: `[start, start + size)` lies in the reserved range and was just claimed by this
    // call alone; making it accessible touches nothing else.
    if unsafe { libc::mprotect(start as *mut c_void, size, PAGE_RW) } != 0 {
        return ptr::null_mut();
    }
    // SAFETY: jemalloc passes valid pointers to its flags. Fresh anonymous pages read as zero.
    unsafe {
        *zero = true;
        *commit = true;
    }
    start as *mut c_void
}

/// Declines: jemalloc keeps the extent for reuse (its pages are purged by `purge_forced`).
unsafe extern "C" fn extent_dalloc(
    _hooks: *mut sys::extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    true
}

/// Only called when the arena is destroyed, which this crate never does: give the pages back.
unsafe extern "C" fn extent_destroy(
    _hooks: *mut sys::extent_hooks_t,
    addr: *mut c_void,
    size: usize,
    _committed: bool,
    _arena: c_uint,
) {
    // SAFETY: jemalloc owns `[addr, addr + size)`, an extent of the region it no longer uses.
    unsafe { libc::madvise(addr, size, libc::MADV_DONTNEED) };
}

/// A commit or decommit hook that only answers `ANSWER`: commit succeeds at once (`false`:
/// memory handed out is always read-write), decommit declines (`true`: pages stay mapped and
/// jemalloc purges them instead).
unsafe extern "C" fn answer<const ANSWER: bool>(
    _hooks: *mut sys::extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _offset: usize,
    _length: usize,
    _arena: c_uint,
) -> bool {
    ANSWER
}

/// Returns the pages to the OS; they read as zero when touched again.
unsafe extern "C" fn extent_purge_forced(
    _hooks: *mut sys::extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: jemalloc asks to purge a part of an extent of the region that holds no live block.
    unsafe {
        libc::madvise(
            addr.cast::<u8>().add(offset).cast(),
            length,
            libc::MADV_DONTNEED,
        ) != 0
    }
}

/// The whole region is one mapping, so extents split and merge freely.
unsafe extern "C" fn extent_split_or_merge(
    _hooks: *mut sys::extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _size_a: usize,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}

unsafe extern "C" fn extent_merge(
    _hooks: *mut sys::extent_hooks_t,
    _addr_a: *mut c_void,
    _size_a: usize,
    _addr_b: *mut c_void,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}
