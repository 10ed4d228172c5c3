//! `overhead_bytes()` is what the tracker really holds: checked against jemalloc's own count of
//! allocated bytes while new threads claim counter slots (a slot that jemalloc rounded up to a
//! larger size class would show as the difference).
#![cfg(not(target_env = "musl"))]

use std::sync::{Arc, Barrier, Mutex};

use tikv_jemalloc_ctl::{epoch, stats};
use tracking_alloc::{overhead_bytes, snapshot, TrackingAlloc};

#[global_allocator]
static GLOBAL: TrackingAlloc<tikv_jemallocator::Jemalloc> =
    TrackingAlloc::new(tikv_jemallocator::Jemalloc);

/// No thread caches: `stats.allocated` then counts exactly the live blocks, not also what each
/// new thread's cache prefetched.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 14] = b"tcache:false\0\0";

/// jemalloc's allocated bytes, the tracker's overhead and the bytes the program holds (every
/// scope's live bytes: requested sizes).
fn readings() -> (i64, i64, i64) {
    epoch::advance().unwrap();
    let live: u64 = snapshot().iter().map(|s| s.live_bytes).sum();
    (
        stats::allocated::read().unwrap() as i64,
        overhead_bytes() as i64,
        live as i64,
    )
}

/// The tests measure process-wide figures: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn overhead_matches_what_jemalloc_holds_for_new_threads() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const THREADS: usize = 32;
    let before = readings();
    let parked = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(Barrier::new(THREADS + 1));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (parked, done) = (Arc::clone(&parked), Arc::clone(&done));
            std::thread::spawn(move || {
                drop(std::hint::black_box(vec![0u8; 10])); // claims a counter slot
                parked.wait();
                done.wait();
            })
        })
        .collect();
    parked.wait();
    let after = readings();
    done.wait();
    for thread in threads {
        thread.join().unwrap();
    }
    let (allocated, overhead, live) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    // Most threads get a new slot; a few may adopt one that an exited thread (another test's)
    // left, which costs nothing new on either side.
    assert!(
        overhead >= (THREADS / 2 * 32 * 1024) as i64,
        "{THREADS} threads, overhead grew {overhead} B"
    );
    // What is left: size-class rounding of the threads' own small blocks (each thread's
    // bookkeeping is a few hundred bytes).
    let unexplained = allocated - overhead - live;
    assert!(
        unexplained.abs() <= (THREADS * 512) as i64,
        "jemalloc allocated {allocated} B, the tracker reports {overhead} B of overhead and \
         {live} B of blocks: {unexplained} B unexplained"
    );
}

/// Side-table leaves are never freed, but they follow the peak, not the total: jemalloc serves
/// later blocks from the addresses it already used, whose leaves are still there. And the peak
/// costs at most 2 bytes per 8-byte block (the worst class: 1 KiB of leaf per 4 KiB page).
#[test]
fn side_table_memory_follows_the_peak_and_is_bounded() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const BOXES: usize = 500_000;
    let round = || {
        let boxes: Vec<Box<u64>> = (0..BOXES as u64).map(Box::new).collect();
        drop(std::hint::black_box(boxes));
    };
    let before = overhead_bytes();
    round();
    let peak = overhead_bytes();
    for _ in 0..5 {
        round();
    }
    let after = overhead_bytes();
    let grown = peak - before;
    assert!(
        // 2 bytes per box, plus the leaves of the `Vec`'s pages as it grows (16 bytes per page)
        // and a 4 KiB interior table per 2 MiB of addresses (and per GiB): 1.02-1.05 MB seen.
        grown <= (BOXES * 2 + 128 * 1024) as u64,
        "{BOXES} 8-byte boxes grew the side table by {grown} B"
    );
    assert!(
        after - peak <= 64 * 1024,
        "five more rounds of the same peak grew it by {} B",
        after - peak
    );
}
