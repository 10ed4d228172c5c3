//! 3,000 distinct names (1,100 under Miri): the table fills, later names share `overflow`,
//! nothing fails.
use tracking_alloc::{snapshot, Scope, MAX_SCOPES};

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<std::alloc::System> =
    tracking_alloc::TrackingAlloc::new(std::alloc::System);

#[test]
fn names_past_the_table_overflow_gracefully() {
    let names = if cfg!(miri) { 1100 } else { 3000 };
    let scopes: Vec<Scope> = (0..names)
        .map(|i| Scope::named(&format!("name-{i}")))
        .collect();
    let fitted = MAX_SCOPES - 2;
    for (i, scope) in scopes.iter().enumerate() {
        if i < fitted {
            assert_eq!(scope.name(), format!("name-{i}"));
            assert_eq!(*scope, Scope::named(&format!("name-{i}")), "stable ids");
        } else {
            assert_eq!(*scope, Scope::OVERFLOW, "name-{i}");
        }
    }
    let held: Vec<Vec<u8>> = scopes
        .iter()
        .enumerate()
        .map(|(i, scope)| {
            let _g = scope.enter();
            vec![0u8; 100 + i % 3]
        })
        .collect();
    let stats = snapshot();
    assert_eq!(stats.len(), MAX_SCOPES);
    let by_name = |n: &str| stats.iter().find(|s| s.name == n).unwrap().live_bytes;
    assert_eq!(by_name("name-0"), 100);
    assert_eq!(by_name("name-1021"), 100 + 1021 % 3);
    let overflowed: u64 = (fitted..names).map(|i| 100 + (i % 3) as u64).sum();
    assert_eq!(by_name("overflow"), overflowed);
    drop(held);
    assert!(snapshot()
        .iter()
        .all(|s| s.live_bytes == 0 || s.name == "unscoped"));
}
