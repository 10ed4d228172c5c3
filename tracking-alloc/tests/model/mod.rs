//! The allocator against a model: a byte string becomes a sequence of raw `alloc`,
//! `alloc_zeroed`, `realloc` and `dealloc` calls of arbitrary size and alignment, in eight
//! scopes, on two threads, and every few operations each scope's figures must equal what the
//! model predicts: live bytes, allocations and frees. Block contents are checked too (zeroed
//! blocks read zero, a `realloc` keeps the bytes both sizes share, nothing the tracker wrote
//! leaks into a block).
//!
//! Shared by the cargo-fuzz target `alloc_model` (fuzz/fuzz_targets) and by
//! `tests/alloc_model.rs`, which replays the fuzz corpus and random sequences on stable. The
//! program that includes it installs the tracker as its global allocator.
#![allow(dead_code)]

use std::alloc::Layout;
use std::sync::mpsc::{channel, Sender};
use std::sync::{LazyLock, Mutex};
use std::thread;

use tracking_alloc::{snapshot, Scope};

const SCOPES: usize = 8;
const THREADS: usize = 2;
/// Bytes one operation is decoded from.
const OP_BYTES: usize = 6;
const MAX_LIVE: usize = 64;

/// Sizes around the boundaries the tracker cares about: the 1-spare-byte and exact size
/// classes, a page (small/large), the sampled mode's exact threshold; or any size up to 80 KiB.
const EDGES: [usize; 16] = [
    1, 7, 8, 15, 16, 47, 48, 127, 128, 4095, 4096, 4097, 16_383, 16_384, 16_385, 40_960,
];

fn scope(i: usize) -> Scope {
    static SCOPES_: LazyLock<Vec<Scope>> = LazyLock::new(|| {
        (0..SCOPES)
            .map(|i| Scope::named(&format!("model-{i}")))
            .collect()
    });
    SCOPES_[i]
}

/// A job for one of the model's worker threads (so blocks are allocated and freed on different
/// threads, in different scopes).
type Job = Box<dyn FnOnce() + Send>;

fn workers() -> &'static [Mutex<Sender<Job>>; THREADS] {
    static WORKERS: LazyLock<[Mutex<Sender<Job>>; THREADS]> = LazyLock::new(|| {
        std::array::from_fn(|_| {
            let (tx, rx) = channel::<Job>();
            thread::spawn(move || {
                for job in rx {
                    job();
                }
            });
            Mutex::new(tx)
        })
    });
    &WORKERS
}

/// Runs `f` on worker `thread` inside `scope`, and waits for its result.
fn on_thread<R: Send + 'static>(
    thread: usize,
    scope: Scope,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = channel();
    let job: Job = Box::new(move || {
        let result = {
            let _g = scope.enter();
            f()
        };
        let _ = tx.send(result);
    });
    workers()[thread].lock().unwrap().send(job).unwrap();
    rx.recv().expect("the worker thread died")
}

#[derive(Clone, Copy, Debug)]
struct Block {
    addr: usize,
    layout: Layout,
    owner: usize,
    fill: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Figures {
    live_bytes: u64,
    allocations: u64,
    deallocations: u64,
}

fn measured() -> [Figures; SCOPES] {
    scope(0); // registers the model's scopes before the snapshot
    let stats = snapshot();
    std::array::from_fn(|i| {
        let name = scope(i).name();
        let s = stats.iter().find(|s| s.name == name).expect("registered");
        Figures {
            live_bytes: s.live_bytes,
            allocations: s.allocations,
            deallocations: s.deallocations,
        }
    })
}

/// `fill` repeated over the block (the bytes the program may use).
fn fill(addr: usize, len: usize, fill: u8) {
    // SAFETY: `addr` is a live block of at least `len` bytes that only the model touches.
    unsafe { std::ptr::write_bytes(addr as *mut u8, fill, len) }
}

fn assert_filled(addr: usize, len: usize, fill: u8, what: &str) {
    // SAFETY: as above.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    if let Some(i) = bytes.iter().position(|&b| b != fill) {
        panic!(
            "{what}: byte {i} of {len} is {:#x}, expected {fill:#x}",
            bytes[i]
        );
    }
}

fn decode_size(a: u8, b: u8) -> usize {
    if a & 0x80 != 0 {
        EDGES[usize::from(b) % EDGES.len()]
    } else {
        1 + (usize::from(a) << 8 | usize::from(b)) % 81_920
    }
}

/// Runs the operations `data` encodes and checks the tracker against the model; panics on any
/// disagreement. Frees everything it allocated before returning.
pub fn run(data: &[u8]) {
    // One run at a time: the model's scopes are shared by every caller in the process.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let start = measured();
    let mut expected = start;
    let mut live: Vec<Block> = Vec::with_capacity(MAX_LIVE);
    for (n, op) in data.chunks_exact(OP_BYTES).enumerate() {
        let thread = usize::from(op[1]) % THREADS;
        let current = usize::from(op[1] >> 1) % SCOPES;
        let size = decode_size(op[2], op[3]);
        let align = 1usize << (op[4] % 15); // 1 B .. 16 KiB
        let pick = usize::from(op[5]);
        match op[0] % 4 {
            // alloc / alloc_zeroed
            kind @ (0 | 1) if live.len() < MAX_LIVE => {
                let layout = Layout::from_size_align(size, align).unwrap();
                let zeroed = kind == 1;
                let addr = on_thread(thread, scope(current), move || {
                    // SAFETY: a non-zero size.
                    let p = unsafe {
                        if zeroed {
                            std::alloc::alloc_zeroed(layout)
                        } else {
                            std::alloc::alloc(layout)
                        }
                    };
                    p as usize
                });
                assert!(addr != 0, "{layout:?} refused");
                assert_eq!(addr % align, 0, "{layout:?} misaligned");
                if zeroed {
                    assert_filled(addr, size, 0, "alloc_zeroed");
                }
                let fill_byte = (n as u8) | 1;
                fill(addr, size, fill_byte);
                live.push(Block {
                    addr,
                    layout,
                    owner: current,
                    fill: fill_byte,
                });
                let e = &mut expected[current];
                e.live_bytes += size as u64;
                e.allocations += 1;
            }
            // realloc: the block moves to the scope current at the realloc
            2 if !live.is_empty() => {
                let block = live[pick % live.len()];
                let keep = size.min(block.layout.size());
                let old = block.layout;
                let addr = on_thread(thread, scope(current), move || {
                    // SAFETY: a live block of `old`; `size` is non-zero and, rounded up to the
                    // alignment (at most 16 KiB), far below `isize::MAX`.
                    unsafe { std::alloc::realloc(block.addr as *mut u8, old, size) as usize }
                });
                assert!(addr != 0, "realloc of {old:?} to {size} refused");
                assert_eq!(addr % old.align(), 0, "realloc to {size} misaligned");
                assert_filled(addr, keep, block.fill, "realloc kept");
                fill(addr, size, block.fill);
                let slot = live.iter().position(|b| b.addr == block.addr).unwrap();
                live[slot] = Block {
                    addr,
                    layout: Layout::from_size_align(size, old.align()).unwrap(),
                    owner: current,
                    fill: block.fill,
                };
                let from = &mut expected[block.owner];
                from.live_bytes -= old.size() as u64;
                from.deallocations += 1;
                let to = &mut expected[current];
                to.live_bytes += size as u64;
                to.allocations += 1;
            }
            // dealloc, on any thread, in any scope: credited to the owner
            3 if !live.is_empty() => {
                let block = live.swap_remove(pick % live.len());
                assert_filled(block.addr, block.layout.size(), block.fill, "live block");
                free_on(thread, current, block);
                let e = &mut expected[block.owner];
                e.live_bytes -= block.layout.size() as u64;
                e.deallocations += 1;
            }
            _ => {}
        }
        if n % 8 == 7 {
            assert_eq!(measured(), expected, "after operation {n}");
        }
    }
    for (i, block) in live.drain(..).enumerate() {
        free_on(i % THREADS, i % SCOPES, block);
        let e = &mut expected[block.owner];
        e.live_bytes -= block.layout.size() as u64;
        e.deallocations += 1;
    }
    let end = measured();
    assert_eq!(end, expected, "after freeing everything");
    for (i, (end, start)) in end.iter().zip(&start).enumerate() {
        assert_eq!(end.live_bytes, start.live_bytes, "model-{i} kept bytes");
    }
}

fn free_on(thread: usize, current: usize, block: Block) {
    on_thread(thread, scope(current), move || {
        // SAFETY: a live block of this layout, freed once.
        unsafe { std::alloc::dealloc(block.addr as *mut u8, block.layout) }
    });
}
