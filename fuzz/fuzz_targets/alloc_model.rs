#![no_main]
//! The tracking allocator (over jemalloc, as users run it) against a model: random sequences of
//! raw allocations, zeroed allocations, reallocs and frees of any size and alignment, in eight
//! scopes on two threads; every scope's figures and every block's contents are checked (see
//! `tracking-alloc/tests/model/mod.rs`, shared with the stable replay test).

#[path = "../../tracking-alloc/tests/model/mod.rs"]
mod model;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

libfuzzer_sys::fuzz_target!(|data: &[u8]| model::run(data));
