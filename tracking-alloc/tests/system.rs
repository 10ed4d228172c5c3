//! Semantics with `std::alloc::System` inside: the generic placement (tag appended).
mod common;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<std::alloc::System> =
    tracking_alloc::TrackingAlloc::new(std::alloc::System);

semantics_tests!();
