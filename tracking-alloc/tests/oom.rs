//! Real allocation failures from jemalloc: the fast path counts a block before asking jemalloc
//! for it, so a refusal must take the count back. The test runs itself again in a child process
//! whose address space is capped (`RLIMIT_AS`), allocates until jemalloc says no, and checks
//! that the scope's counters match the blocks that were handed out.
use std::alloc::{GlobalAlloc, Layout};
use std::process::Command;

use tikv_jemallocator::Jemalloc;
use tracking_alloc::{snapshot, Scope, TrackingAlloc};

#[global_allocator]
static GLOBAL: TrackingAlloc<Jemalloc> = TrackingAlloc::new(Jemalloc);

const CHILD: &str = "TRACKING_ALLOC_OOM_CHILD";
const TEST: &str = "refused_allocations_are_not_counted";

/// One block size per path: inline tag, side-table tag (exact class), large block.
const SIZES: [usize; 3] = [100, 64, 8192];
/// Address space the child may grow by before jemalloc's `mmap` fails.
const HEADROOM: u64 = 96 << 20;

#[test]
fn refused_allocations_are_not_counted() {
    if let Some(case) = std::env::var_os(CHILD) {
        let case = case.to_string_lossy().into_owned();
        let (size, zeroed) = case.split_once(',').expect("size,zeroed");
        return allocate_until_refused(size.parse().unwrap(), zeroed == "true");
    }
    // One fresh process per case: memory jemalloc retains from an earlier case would stretch
    // the cap.
    let exe = std::env::current_exe().expect("the test binary's path");
    for size in SIZES {
        for zeroed in [false, true] {
            let out = Command::new(&exe)
                .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, format!("{size},{zeroed}"))
                .output()
                .expect("run the test binary again as the child");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
            let line = format!("size {size} zeroed {zeroed}: refused after ");
            assert!(
                stdout.contains(&line),
                "no result for {line:?} in:\n{stdout}"
            );
        }
    }
}

/// The child: allocate under a capped address space until jemalloc refuses, free everything,
/// and compare the scope's counters with what was handed out.
fn allocate_until_refused(size: usize, zeroed: bool) {
    let name = format!("oom-{size}-{zeroed}");
    let scope = Scope::named(&name);
    let layout = Layout::from_size_align(size, 8).unwrap();
    // Room for every pointer, allocated before the cap.
    let mut blocks: Vec<*mut u8> = Vec::with_capacity((HEADROOM as usize / size) * 2);
    let unscoped_before = snapshot()
        .into_iter()
        .find(|s| s.name == "unscoped")
        .unwrap();
    let refused = {
        let _cap = AddressSpaceCap::new(HEADROOM);
        let _g = scope.enter();
        loop {
            // SAFETY: non-zero size.
            let block = unsafe {
                if zeroed {
                    GLOBAL.alloc_zeroed(layout)
                } else {
                    GLOBAL.alloc(layout)
                }
            };
            if block.is_null() {
                break true;
            }
            if blocks.len() == blocks.capacity() {
                break false;
            }
            blocks.push(block);
        }
    };
    assert!(refused, "{name}: jemalloc never refused within the cap");
    let handed_out = blocks.len() as u64;
    for block in blocks {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { GLOBAL.dealloc(block, layout) };
    }
    let after = snapshot();
    let stats = after.iter().find(|s| s.name == name).unwrap();
    let unscoped_after = after.iter().find(|s| s.name == "unscoped").unwrap();
    assert!(handed_out > 0, "{name}: the cap left no room at all");
    // Never more than was handed out: a refused request leaves no count behind.
    assert!(
        stats.allocations <= handed_out,
        "{name}: {stats:?} for {handed_out} blocks"
    );
    // Fewer only where the side table could not get memory for a page's first block: those
    // blocks are charged to `unscoped`, at allocation and at free alike.
    let moved = handed_out - stats.allocations;
    let unscoped_grew = unscoped_after.allocations - unscoped_before.allocations;
    assert!(
        unscoped_grew >= moved,
        "{name}: {moved} blocks are in no scope"
    );
    assert!(
        moved <= handed_out / 100,
        "{name}: {moved} of {handed_out} moved"
    );
    assert_eq!(
        stats.allocated_bytes,
        stats.allocations * size as u64,
        "{name}"
    );
    assert_eq!(stats.deallocations, stats.allocations, "{name}");
    assert_eq!(stats.live_bytes, 0, "{name}");
    println!("size {size} zeroed {zeroed}: refused after {handed_out} blocks ({moved} unscoped)");
}

/// Caps the process's address space at its current size plus `headroom` until dropped.
struct AddressSpaceCap {
    previous: libc::rlimit,
}

impl AddressSpaceCap {
    fn new(headroom: u64) -> AddressSpaceCap {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmSize in /proc/self/status");
        let mut previous = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut previous) },
            0
        );
        let cap = libc::rlimit {
            rlim_cur: vm_kib * 1024 + headroom,
            rlim_max: previous.rlim_max,
        };
        // SAFETY: valid pointer to an initialised rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &cap) }, 0);
        AddressSpaceCap { previous }
    }
}

impl Drop for AddressSpaceCap {
    fn drop(&mut self) {
        // SAFETY: valid pointer to the limit read in `new`; raising the soft limit back up to
        // the unchanged hard limit is always allowed.
        unsafe { libc::setrlimit(libc::RLIMIT_AS, &self.previous) };
    }
}
