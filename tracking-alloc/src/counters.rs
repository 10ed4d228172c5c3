//! Per-thread counter slots: the only memory the hot path writes besides the block's tag.
//!
//! A counter shared by all threads costs a contended read-modify-write per operation (measured
//! 3.8× CPU on two threads, see `BENCHMARKS.md`). Instead every thread owns a [`Slot`]: an array
//! of counters, one row per scope, that only this thread writes (a plain load and store, no
//! `lock` prefix). A free charges the *owner's* row in the *freeing* thread's slot, so a block
//! freed on another thread still credits the scope that allocated it; [`crate::snapshot`] adds
//! the rows of all slots.
//!
//! Slots are never freed. When a thread exits its slot is marked free and the next new thread
//! adopts it, counters and all: the sums stay exact and memory is bounded by the peak number of
//! live threads (32 KiB per slot, allocated from the inner allocator, pages touched lazily).
//! Allocations that happen while a thread has no slot (while it claims one, during its TLS
//! teardown, or past [`MAX_THREADS`] live threads) go to one shared slot with atomic adds.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::scope::{MAX_SCOPES, UNSCOPED_ID};

/// Live threads that get a slot of their own; more share the atomic fallback slot.
pub(crate) const MAX_THREADS: usize = 4096;

/// One scope's counters in one slot. Monotonic: live bytes are derived, never stored, so a
/// gauge can never go negative through a free charged to the wrong row.
#[repr(C)]
pub(crate) struct Counters {
    pub(crate) allocated_bytes: AtomicU64,
    pub(crate) allocations: AtomicU64,
    pub(crate) deallocated_bytes: AtomicU64,
    pub(crate) deallocations: AtomicU64,
}

impl Counters {
    const fn zero() -> Counters {
        Counters {
            allocated_bytes: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
            deallocated_bytes: AtomicU64::new(0),
            deallocations: AtomicU64::new(0),
        }
    }
}

/// One thread's counters: exactly 32 KiB, a size class of its own in jemalloc (a few bytes
/// more would be served as 40 KiB). What else a slot needs lives in [`SlotState`].
#[repr(C, align(128))]
pub(crate) struct Slot {
    rows: [Counters; MAX_SCOPES],
}

const _: () = assert!(size_of::<Slot>() == 32 * 1024);

/// The rest of a slot's state, beside the slot with the same index (kept out of the slot so
/// that the slot stays one size class).
struct SlotState {
    /// Set while a live thread owns the slot.
    in_use: AtomicBool,
    /// The sampled mode's explicit jemalloc thread cache for its region (index + 1; 0: none
    /// yet). It belongs to the slot, so the next thread to adopt the slot reuses it.
    region_cache: AtomicU32,
}

impl Slot {
    #[inline(always)]
    fn row(&self, scope: u16) -> &Counters {
        // Masking keeps any id in bounds without a branch; an out-of-range id could only come
        // from a tag corrupted by a heap overflow in the program.
        &self.rows[scope as usize & (MAX_SCOPES - 1)]
    }
}

/// Slots of live and exited threads; `SLOT_COUNT` entries have been handed out.
static SLOTS: [AtomicPtr<Slot>; MAX_THREADS] =
    [const { AtomicPtr::new(ptr::null_mut()) }; MAX_THREADS];
static SLOT_COUNT: AtomicUsize = AtomicUsize::new(0);
static STATES: [SlotState; MAX_THREADS] = [const {
    SlotState {
        in_use: AtomicBool::new(false),
        region_cache: AtomicU32::new(0),
    }
}; MAX_THREADS];

/// The fallback slot, written with atomic read-modify-writes by any thread.
static SHARED: Slot = Slot {
    rows: [const { Counters::zero() }; MAX_SCOPES],
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    /// No slot yet: the next allocation claims one.
    New,
    /// Claiming a slot, or inside the library's own bookkeeping: charge `unscoped`, shared slot.
    Busy,
    /// Owns `slot`.
    Owner,
    /// Past TLS teardown, or no slot could be had: use the shared slot from now on.
    Shared,
}

/// Everything the hot path needs from thread-local storage, in one `const`-initialised block
/// with no destructor, so access is a single TLS offset: no lazy-init check, no allocation.
struct ThreadState {
    scope: Cell<u16>,
    status: Cell<Status>,
    slot: Cell<*const Slot>,
    /// The index of `slot` in `SLOTS` (when there is one).
    index: Cell<u16>,
}

thread_local! {
    static STATE: ThreadState = const {
        ThreadState {
            scope: Cell::new(UNSCOPED_ID),
            status: Cell::new(Status::New),
            slot: Cell::new(ptr::null()),
            index: Cell::new(0),
        }
    };
}

/// Runs when a thread that claimed a slot exits (see `thread_exit`; `index_plus_one` is the
/// slot's index + 1, as an address): the thread's later allocations (other exit hooks) go to
/// the shared slot, and the next new thread may adopt its own.
unsafe extern "C" fn release_slot(index_plus_one: *mut std::ffi::c_void) {
    let _ = STATE.try_with(|state| {
        state.status.set(Status::Shared);
        state.slot.set(ptr::null());
    });
    if let Some(state) = STATES.get(index_plus_one.addr().wrapping_sub(1)) {
        state.in_use.store(false, Ordering::Release);
    }
}

/// The scope the current thread charges new allocations to.
#[inline]
pub(crate) fn current_scope() -> u16 {
    STATE.try_with(|s| s.scope.get()).unwrap_or(UNSCOPED_ID)
}

/// Makes `scope` current and returns the previous one.
#[inline]
pub(crate) fn replace_scope(scope: u16) -> u16 {
    STATE
        .try_with(|s| s.scope.replace(scope))
        .unwrap_or(UNSCOPED_ID)
}

/// Where the current thread's allocation events go: the owner to tag new blocks with, and the
/// slot to count in (`None`: the shared fallback slot, counted with atomic adds).
#[derive(Clone, Copy)]
pub(crate) struct Ledger {
    pub(crate) scope: u16,
    slot: Option<&'static Slot>,
}

impl Ledger {
    /// The current thread's ledger; claims a slot on the thread's first allocation.
    #[inline(always)]
    pub(crate) fn current<A: GlobalAlloc>(inner: &A) -> Ledger {
        Self::owned().unwrap_or_else(|| STATE.with(|state| Self::without_slot(state, inner)))
    }

    /// The ledger of a thread that owns its slot, or `None` (then use [`Ledger::current`]).
    /// Calls nothing, so a caller's fast path stays free of calls.
    #[inline(always)]
    pub(crate) fn owned() -> Option<Ledger> {
        STATE.with(|state| {
            // SAFETY: a non-null `slot` was published by `claim` for this thread and is never freed.
            unsafe { state.slot.get().as_ref() }.map(|slot| Ledger {
                scope: state.scope.get(),
                slot: Some(slot),
            })
        })
    }

    #[cold]
    #[inline(never)]
    fn without_slot<A: GlobalAlloc>(state: &ThreadState, inner: &A) -> Ledger {
        match state.status.get() {
            Status::New => claim(state, inner),
            Status::Shared => Ledger {
                scope: state.scope.get(),
                slot: None,
            },
            Status::Busy | Status::Owner => Ledger {
                scope: UNSCOPED_ID,
                slot: None,
            },
        }
    }

    #[inline(always)]
    pub(crate) fn allocated(&self, owner: u16, bytes: usize) {
        self.count(Event::Allocated, owner, bytes as u64, 1);
    }

    #[inline(always)]
    pub(crate) fn deallocated(&self, owner: u16, bytes: usize) {
        self.count(Event::Deallocated, owner, bytes as u64, 1);
    }

    /// Where the sampled mode keeps the explicit thread cache of this thread's slot; `None`
    /// for a thread without a slot of its own.
    #[cfg_attr(not(sampled_mode), allow(dead_code))]
    #[inline]
    pub(crate) fn region_cache(&self) -> Option<&'static AtomicU32> {
        self.slot?;
        let index = STATE
            .try_with(|state| usize::from(state.index.get()))
            .ok()?;
        Some(&STATES[index].region_cache)
    }

    /// Counts a sampled allocation by its weights (the bytes and blocks it stands for).
    #[cfg_attr(not(sampled_mode), allow(dead_code))]
    #[inline(always)]
    pub(crate) fn allocated_weighted(&self, owner: u16, bytes: u64, blocks: u64) {
        self.count(Event::Allocated, owner, bytes, blocks);
    }

    /// Counts the free of a sampled block by the weights it was allocated with.
    #[cfg_attr(not(sampled_mode), allow(dead_code))]
    #[inline(always)]
    pub(crate) fn deallocated_weighted(&self, owner: u16, bytes: u64, blocks: u64) {
        self.count(Event::Deallocated, owner, bytes, blocks);
    }

    /// Takes back an [`allocated`](Self::allocated) count made before an inner allocation that
    /// then failed (adding the two's complement: counters wrap). A snapshot taken in between saw
    /// the bytes for a moment. Finds the ledger again rather than taking it, so callers keep
    /// nothing live across the inner call for it.
    #[cold]
    #[inline(never)]
    pub(crate) fn allocation_failed<A: GlobalAlloc>(inner: &A, owner: u16, bytes: usize) {
        let ledger = Self::current(inner);
        ledger.count(
            Event::Allocated,
            owner,
            (bytes as u64).wrapping_neg(),
            u64::MAX,
        );
    }

    /// Adds `bytes` and `blocks` (wrapping) to `event`'s counters in `owner`'s row.
    #[inline(always)]
    fn count(&self, event: Event, owner: u16, bytes: u64, blocks: u64) {
        match self.slot {
            Some(slot) => {
                let (total, count) = slot.row(owner).of(event);
                bump_own(total, bytes);
                bump_own(count, blocks);
            }
            None => count_shared(event, owner, bytes, blocks),
        }
    }
}

/// Which pair of counters an operation moves.
#[derive(Clone, Copy)]
enum Event {
    Allocated,
    Deallocated,
}

impl Counters {
    /// The byte and block counters of `event`.
    #[inline(always)]
    fn of(&self, event: Event) -> (&AtomicU64, &AtomicU64) {
        match event {
            Event::Allocated => (&self.allocated_bytes, &self.allocations),
            Event::Deallocated => (&self.deallocated_bytes, &self.deallocations),
        }
    }
}

/// Adds to a counter of the thread's own slot: only this thread writes it, so a plain load and
/// store suffice (no locked instruction). Release pairs with the snapshot's Acquire (`totals`).
#[inline(always)]
fn bump_own(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Release,
    );
}

/// Counts in the shared fallback slot, which any thread may write: atomic adds.
#[cold]
#[inline(never)]
fn count_shared(event: Event, owner: u16, bytes: u64, blocks: u64) {
    let (total, count) = SHARED.row(owner).of(event);
    total.fetch_add(bytes, Ordering::AcqRel);
    count.fetch_add(blocks, Ordering::AcqRel);
}

/// Gives the thread a slot: a free one left by an exited thread, or a new one.
fn claim<A: GlobalAlloc>(state: &ThreadState, inner: &A) -> Ledger {
    // Anything allocated meanwhile (a new slot comes from the inner allocator) sees `Busy`.
    state.status.set(Status::Busy);
    let slot = adopt_free_slot().or_else(|| new_slot(inner));
    match slot {
        // The slot goes back when the thread exits; a thread that cannot arrange that (out of
        // thread-exit keys) gives it back now and counts in the shared slot.
        Some((index, slot)) if crate::thread_exit::call_on_exit(release_slot, tag(index)) => {
            state.slot.set(slot);
            state.index.set(index as u16);
            state.status.set(Status::Owner);
        }
        Some((index, _)) => {
            STATES[index].in_use.store(false, Ordering::Release);
            state.status.set(Status::Shared);
        }
        None => state.status.set(Status::Shared),
    }
    Ledger::current(inner)
}

/// A slot's index as the non-null value a thread-exit hook is registered with.
fn tag(index: usize) -> NonNull<std::ffi::c_void> {
    NonNull::new(ptr::without_provenance_mut(index + 1)).unwrap_or(NonNull::dangling())
}

/// A slot an exited thread left, marked in use again, with its index.
fn adopt_free_slot() -> Option<(usize, &'static Slot)> {
    let count = SLOT_COUNT.load(Ordering::Acquire).min(MAX_THREADS);
    SLOTS[..count]
        .iter()
        .zip(&STATES)
        .enumerate()
        .find_map(|(index, (entry, state))| {
            // SAFETY: non-null entries point to published slots that are never freed.
            let slot = unsafe { entry.load(Ordering::Acquire).as_ref() }?;
            state
                .in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
                .then_some((index, slot))
        })
}

/// A new slot, in use, with its index.
fn new_slot<A: GlobalAlloc>(inner: &A) -> Option<(usize, &'static Slot)> {
    let index = SLOT_COUNT.fetch_add(1, Ordering::AcqRel);
    if index >= MAX_THREADS {
        SLOT_COUNT.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    // SAFETY: `Slot` has a non-zero size. All-zero bytes are a valid `Slot` (atomics at zero),
    // so the zeroed allocation is initialised.
    let slot = unsafe { inner.alloc_zeroed(Layout::new::<Slot>()) }.cast::<Slot>();
    // SAFETY: non-null, zero-initialised as above, and never freed, so `'static`.
    let Some(slot) = (unsafe { slot.as_ref() }) else {
        // The index stays reserved but empty; readers skip null entries.
        return None;
    };
    STATES[index].in_use.store(true, Ordering::Relaxed);
    SLOTS[index].store(ptr::from_ref(slot).cast_mut(), Ordering::Release);
    Some((index, slot))
}

/// Counter totals of one scope over all slots.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) allocated_bytes: u64,
    pub(crate) allocations: u64,
    pub(crate) deallocated_bytes: u64,
    pub(crate) deallocations: u64,
}

/// Sums the first `scopes` rows over all slots.
///
/// Deallocation counters are read in a first pass, allocation counters in a second. A free is
/// counted only after its block's allocation was (the program passed the pointer between
/// threads), and the Release/Acquire pair makes that earlier count visible to the second pass,
/// so `allocated >= deallocated` holds in every snapshot.
pub(crate) fn totals(scopes: usize) -> Vec<Totals> {
    let scopes = scopes.min(MAX_SCOPES);
    let mut totals = vec![Totals::default(); scopes];
    let slots = || {
        let count = SLOT_COUNT.load(Ordering::Acquire).min(MAX_THREADS);
        // SAFETY: non-null entries point to published slots that are never freed.
        let own = SLOTS[..count]
            .iter()
            .filter_map(|entry| unsafe { entry.load(Ordering::Acquire).as_ref() });
        own.chain(std::iter::once(&SHARED))
    };
    for slot in slots() {
        for (total, row) in totals.iter_mut().zip(&slot.rows) {
            let bytes = row.deallocated_bytes.load(Ordering::Acquire);
            total.deallocated_bytes = total.deallocated_bytes.wrapping_add(bytes);
            let count = row.deallocations.load(Ordering::Acquire);
            total.deallocations = total.deallocations.wrapping_add(count);
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    for slot in slots() {
        for (total, row) in totals.iter_mut().zip(&slot.rows) {
            let bytes = row.allocated_bytes.load(Ordering::Acquire);
            total.allocated_bytes = total.allocated_bytes.wrapping_add(bytes);
            let count = row.allocations.load(Ordering::Acquire);
            total.allocations = total.allocations.wrapping_add(count);
        }
    }
    totals
}

/// Bytes of per-thread counter memory held.
pub(crate) fn metadata_bytes() -> usize {
    let count = SLOT_COUNT.load(Ordering::Acquire).min(MAX_THREADS);
    SLOTS[..count]
        .iter()
        .filter(|entry| !entry.load(Ordering::Relaxed).is_null())
        .count()
        * size_of::<Slot>()
}
