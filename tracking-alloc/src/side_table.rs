//! Out-of-line owner ids for blocks whose size class has no room for an inline tag.
//!
//! `Vec` capacities double, so most `Vec` buffers are exactly a jemalloc size class and have no
//! slack. Growing them by a 2-byte tag would cost a whole class step (+25 %, +100 % for 8-byte
//! blocks). Instead their owner id lives here, in a per-page array of `u16`.
//!
//! jemalloc never mixes size classes within a page: small blocks come from slabs of one class,
//! large blocks start on a page boundary of their own. So within one 4 KiB page, two live blocks
//! of class `c` start at least `c` bytes apart, and `offset_in_page >> floor_log2(c)` is a unique
//! slot index. A page's leaf therefore needs `4096 >> floor_log2(c)` slots of 2 bytes:
//! 2 bytes per block, rounded up to a power of two (1 KiB per page of 8-byte blocks, 2 bytes per
//! page of large blocks). This invariant is why the table is only used when the inner allocator
//! is jemalloc (see `alloc.rs`).
//!
//! Pages are found through a three-level radix tree over 48-bit addresses: a static root indexed
//! by `addr >> 30`, then 4 KiB tables per GiB and per 2 MiB, then the leaf. Interior tables and
//! leaves come from the inner allocator, are published with compare-and-swap (no lock), and are
//! never freed: a page that switches to a smaller class keeps its larger leaf (at most 1 KiB).
//!
//! **What it costs, worst case.** Readers take no lock, so freeing a leaf would need a grace
//! period on the hot path; instead the table is bounded by the address range jemalloc has used
//! for blocks without inline room, like jemalloc's own radix tree (also never freed): 2 bytes
//! per block slot of every page that held such blocks — 25 % of those pages for 8-byte blocks
//! (1 KiB per 4 KiB page), 12.5 % for 16-byte ones, `2 / class` in general, 2 bytes per page of
//! large blocks — plus a 4 KiB table per 2 MiB of that range (0.2 %). jemalloc serves later
//! blocks from the addresses it already used (it retains them), so the table follows the peak,
//! not the total: 500,000 `Box<u64>` cost 1.02 MB of leaves, and five more rounds of the same
//! peak add nothing (`tests/overhead.rs`).

use std::alloc::{GlobalAlloc, Layout};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU16, AtomicUsize, Ordering};

use crate::scope::UNSCOPED_ID;

const LG_PAGE: u32 = 12;
const LG_FANOUT: u32 = 9;
const FANOUT: usize = 1 << LG_FANOUT;
/// Addresses at or above 2^48 are not tracked here (no such user addresses on x86_64/aarch64
/// Linux with 4-level page tables); their blocks are charged to `unscoped` consistently.
const ADDRESS_BITS: u32 = 48;
const ROOT_LEN: usize = 1 << (ADDRESS_BITS - LG_PAGE - 2 * LG_FANOUT);

/// A table of 512 pointers (4 KiB) to the leaf entries of one 2 MiB range, one per page. Entries
/// are pointers, never integers, so every pointer the table follows keeps the provenance of the
/// allocation it came from (Miri's strict provenance checks this).
type Low = [AtomicPtr<u8>; FANOUT];
/// A table of 512 pointers (4 KiB) to the [`Low`] tables of one GiB.
type Mid = [AtomicPtr<Low>; FANOUT];

static ROOT: [AtomicPtr<Mid>; ROOT_LEN] = [const { AtomicPtr::new(ptr::null_mut()) }; ROOT_LEN];

/// Slot index of a block within its page, and log2 of the slots a leaf needs for its class.
#[inline(always)]
fn slot_of(addr: usize, class: usize) -> (usize, u32) {
    // Every class given here is at most a page (large blocks pass 4096), so masking to
    // `2 * PAGE - 1` changes nothing but bounds `lg_class` by `LG_PAGE` for any input (which
    // keeps the slot within its leaf); `| 1` makes `ilog2` one instruction that cannot panic.
    let lg_class = ((class & ((2 << LG_PAGE) - 1)) | 1).ilog2();
    (
        (addr & ((1 << LG_PAGE) - 1)) >> lg_class,
        LG_PAGE - lg_class,
    )
}

/// A leaf entry: the leaf's pointer with `1 + log2(its slot count)` in the low four bits (free
/// by its 16-byte alignment), so that an empty (null) entry fails the size check of every
/// lookup by itself.
#[inline(always)]
fn leaf_entry_of(leaf: *mut u8, lg_slots: u32) -> *mut u8 {
    leaf.map_addr(|addr| addr | (lg_slots as usize + 1))
}

/// The slot for `slot` in the leaf that `entry` points to, if there is a leaf and it has at
/// least `1 << lg_slots` slots.
#[inline(always)]
fn leaf_slot(entry: *mut u8, slot: usize, lg_slots: u32) -> Option<&'static AtomicU16> {
    if ((entry.addr() & 0xf) as u32) <= lg_slots {
        return None;
    }
    // SAFETY: an entry with a non-zero tag was made by `leaf_entry_of` from a published leaf of
    // `1 << (tag - 1)` zero-initialised slots that is never freed, and `slot < 1 << lg_slots`
    // (callers take both from `slot_of`), which is at most that.
    Some(unsafe {
        &*entry
            .map_addr(|addr| addr & !0xf)
            .cast::<AtomicU16>()
            .add(slot)
    })
}

/// Records `owner` for the block at `addr` of jemalloc size class `class`. Returns the owner
/// actually recorded: `owner`, or `unscoped` when the table could not get memory for this page
/// (then [`owner_of`] also answers `unscoped` for it, so the books still balance).
#[inline(always)]
pub(crate) fn record<A: GlobalAlloc>(inner: &A, addr: usize, class: usize, owner: u16) -> u16 {
    if try_record(addr, class, owner) {
        return owner;
    }
    record_growing(inner, addr, class, owner)
}

/// [`record`]'s common case: the page already has a leaf large enough. Calls nothing, so a
/// caller can keep its fast path free of calls and send `false` to [`record`] out of line.
#[inline(always)]
pub(crate) fn try_record(addr: usize, class: usize, owner: u16) -> bool {
    let Some(entry) = find_leaf_entry(addr) else {
        return false;
    };
    let (slot, lg_slots) = slot_of(addr, class);
    match leaf_slot(entry.load(Ordering::Acquire), slot, lg_slots) {
        Some(leaf) => {
            leaf.store(owner, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// The first block of a page (or of a smaller class than the page's leaf holds): create the
/// path to the page and a leaf large enough, then record.
#[cold]
#[inline(never)]
fn record_growing<A: GlobalAlloc>(inner: &A, addr: usize, class: usize, owner: u16) -> u16 {
    let Some(leaf_entry) = leaf_entry(inner, addr) else {
        return UNSCOPED_ID;
    };
    let (slot, lg_slots) = slot_of(addr, class);
    let mut current = leaf_entry.load(Ordering::Acquire);
    loop {
        if let Some(leaf) = leaf_slot(current, slot, lg_slots) {
            leaf.store(owner, Ordering::Relaxed);
            return owner;
        }
        let Some(fresh) = alloc_zeroed_table(inner, 2usize << lg_slots) else {
            return UNSCOPED_ID;
        };
        let tagged = leaf_entry_of(fresh, lg_slots);
        match leaf_entry.compare_exchange(current, tagged, Ordering::AcqRel, Ordering::Acquire) {
            // The old, smaller leaf (if any) is left in place: reads of it may still be in flight
            // on other threads only if jemalloc broke its one-class-per-page rule, and keeping it
            // costs at most one small leaf per page.
            Ok(_) => current = tagged,
            Err(seen) => {
                free_unpublished_table(inner, fresh, 2usize << lg_slots);
                current = seen;
            }
        }
    }
}

/// The owner recorded for the block at `addr` of class `class`, or `unscoped` if none was.
#[inline]
pub(crate) fn owner_of(addr: usize, class: usize) -> u16 {
    let (slot, lg_slots) = slot_of(addr, class);
    let entry = find_leaf_entry(addr).map_or(ptr::null_mut(), |e| e.load(Ordering::Acquire));
    leaf_slot(entry, slot, lg_slots).map_or(UNSCOPED_ID, |leaf| leaf.load(Ordering::Relaxed))
}

/// The entry that holds the leaf pointer of `addr`'s page, creating interior tables on the way.
fn leaf_entry<A: GlobalAlloc>(inner: &A, addr: usize) -> Option<&'static AtomicPtr<u8>> {
    let root = ROOT.get(addr >> (LG_PAGE + 2 * LG_FANOUT))?;
    let mid = node_or_create(inner, root)?;
    let low = node_or_create(inner, &mid[(addr >> (LG_PAGE + LG_FANOUT)) & (FANOUT - 1)])?;
    Some(&low[(addr >> LG_PAGE) & (FANOUT - 1)])
}

#[inline(always)]
fn find_leaf_entry(addr: usize) -> Option<&'static AtomicPtr<u8>> {
    let mid = ROOT
        .get(addr >> (LG_PAGE + 2 * LG_FANOUT))?
        .load(Ordering::Acquire);
    // SAFETY: non-null root entries point to published, zero-initialised, never-freed nodes.
    let mid = unsafe { mid.as_ref() }?;
    let low = mid[(addr >> (LG_PAGE + LG_FANOUT)) & (FANOUT - 1)].load(Ordering::Acquire);
    // SAFETY: likewise for non-null interior entries.
    let low = unsafe { low.as_ref() }?;
    Some(&low[(addr >> LG_PAGE) & (FANOUT - 1)])
}

/// The table `slot` points to, allocated (zeroed: all null) and published if there is none yet.
/// `T` is [`Mid`] or [`Low`], arrays of atomic pointers that are valid when zeroed.
fn node_or_create<A: GlobalAlloc, T>(inner: &A, slot: &AtomicPtr<T>) -> Option<&'static T> {
    let mut node = slot.load(Ordering::Acquire);
    if node.is_null() {
        let fresh = alloc_zeroed_table(inner, size_of::<T>())?.cast::<T>();
        node = match slot.compare_exchange(
            ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => fresh,
            Err(seen) => {
                free_unpublished_table(inner, fresh.cast(), size_of::<T>());
                seen
            }
        };
    }
    // SAFETY: `node` is non-null, zero-initialised (a valid table of null atomic pointers: the
    // only `T`s used) and never freed.
    Some(unsafe { &*node })
}

fn table_layout(bytes: usize) -> Layout {
    // 16-byte alignment leaves the low four bits of a leaf pointer free for its size.
    Layout::from_size_align(bytes.max(16), 16).unwrap_or(Layout::new::<u128>())
}

static METADATA_BYTES: AtomicUsize = AtomicUsize::new(0);

fn alloc_zeroed_table<A: GlobalAlloc>(inner: &A, bytes: usize) -> Option<*mut u8> {
    let layout = table_layout(bytes);
    // SAFETY: the layout has a non-zero size.
    let table = unsafe { inner.alloc_zeroed(layout) };
    if table.is_null() {
        return None;
    }
    METADATA_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
    Some(table)
}

fn free_unpublished_table<A: GlobalAlloc>(inner: &A, table: *mut u8, bytes: usize) {
    let layout = table_layout(bytes);
    METADATA_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    // SAFETY: callers pass a table they allocated with `alloc_zeroed_table(inner, bytes)` and
    // never published, so no other thread can hold a reference to it.
    unsafe { inner.dealloc(table, layout) };
}

/// Bytes of side-table memory held (interior nodes and leaves, including leaves outgrown by
/// their page), for the docs' cost figures and the exporter's overhead gauge.
pub(crate) fn metadata_bytes() -> usize {
    METADATA_BYTES.load(Ordering::Relaxed)
}
