//! Semantics with `std::alloc::System` inside: the generic placement (tag appended).
mod common;

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<std::alloc::System> =
    tracking_alloc::TrackingAlloc::new(std::alloc::System);

semantics_tests!();

#[test]
fn the_appended_placement_is_reported_without_a_warning() {
    drop(vec![0u8; 10]);
    assert_eq!(
        tracking_alloc::placement(),
        Some(tracking_alloc::Placement::Appended)
    );
    assert_eq!(
        tracking_alloc::tracking_warning(),
        None,
        "System is not jemalloc"
    );
}
