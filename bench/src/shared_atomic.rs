//! The baseline design PRIOR_ART measured: a 2-byte inline trailer on every block and one
//! shared atomic counter per scope, updated with `fetch_add`/`fetch_sub` from every thread.
//! Exact too, but each operation is a locked instruction on a cache line all threads share.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};

pub const SCOPES: usize = 256;
pub static LIVE: [AtomicI64; SCOPES] = [const { AtomicI64::new(0) }; SCOPES];

thread_local! {
    static CURRENT: Cell<u16> = const { Cell::new(0) };
}

pub struct SharedAtomicAlloc<A>(pub A);

pub struct Guard(u16);

impl Drop for Guard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

pub fn enter(scope: usize) -> Guard {
    Guard(CURRENT.with(|c| c.replace((scope % SCOPES) as u16)))
}

fn padded(layout: Layout) -> Layout {
    Layout::from_size_align(layout.size() + 2, layout.align()).unwrap()
}

// SAFETY: forwards to the inner allocator with a larger layout of the same alignment.
unsafe impl<A: GlobalAlloc> GlobalAlloc for SharedAtomicAlloc<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the padded layout has a non-zero size.
        let block = unsafe { self.0.alloc(padded(layout)) };
        if !block.is_null() {
            let scope = CURRENT.with(Cell::get);
            // SAFETY: the 2 bytes after `size` are ours (padded request).
            unsafe {
                block
                    .add(layout.size())
                    .cast::<u16>()
                    .write_unaligned(scope)
            };
            LIVE[scope as usize].fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: written by `alloc`.
        let scope = unsafe { block.add(layout.size()).cast::<u16>().read_unaligned() };
        LIVE[scope as usize].fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: allocated by `alloc` with the padded layout.
        unsafe { self.0.dealloc(block, padded(layout)) }
    }
}
