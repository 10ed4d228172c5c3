//! `#[instrument]`-ed async code is attributed to its span's scope with no extra code.
use tracing::instrument;
use tracing_subscriber::prelude::*;
use tracking_alloc::{snapshot, MemoryScopeLayer};

#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

#[instrument(skip_all)]
async fn load_users(n: usize) -> Vec<Vec<u8>> {
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
        users.push(vec![i as u8; 1000]);
        tokio::task::yield_now().await;
    }
    users
}

#[instrument(skip_all, fields(memory_scope = "index-build"))]
async fn build_index() -> Vec<u64> {
    tokio::task::yield_now().await;
    vec![0u64; 512]
}

fn live(name: &str) -> u64 {
    snapshot()
        .into_iter()
        .find(|s| s.name == name)
        .map_or(0, |s| s.live_bytes)
}

#[test]
fn instrumented_async_fns_are_attributed() {
    tracing_subscriber::registry()
        .with(MemoryScopeLayer::new())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (users, index) = runtime.block_on(async {
        // Unscoped tasks allocate at the same time on the same workers.
        let noise = tokio::spawn(async {
            for _ in 0..200 {
                drop(vec![0u8; 512]);
                tokio::task::yield_now().await;
            }
        });
        let users = tokio::spawn(load_users(100)).await.unwrap();
        let index = tokio::spawn(build_index()).await.unwrap();
        noise.await.unwrap();
        (users, index)
    });
    // 100 user buffers plus the outer Vec's 100 × 24 bytes, all inside the span. The runtime's
    // own bookkeeping during a poll (its deferred-wakeup list growing on the first
    // `yield_now`) is allocated inside the span too and kept by the worker: a few dozen bytes.
    let expected = 100 * 1000 + 100 * 24;
    let attributed = live("load_users");
    assert!(
        (expected..expected + 256).contains(&attributed),
        "load_users holds {attributed} bytes, expected {expected} plus runtime bookkeeping"
    );
    let index_bytes = live("index-build");
    assert!(
        (512 * 8..512 * 8 + 256).contains(&index_bytes),
        "index-build holds {index_bytes}"
    );
    drop(users);
    drop(index);
    assert!(
        live("load_users") < 256,
        "the user buffers were credited back"
    );
    assert!(live("index-build") < 256);
}

/// Spans exited out of order: the span entered last stays current, and when it exits too the
/// scope from before both returns. (Popping blindly left A current inside B.)
#[test]
fn spans_exited_out_of_order_keep_the_right_scope() {
    let subscriber = tracing_subscriber::registry().with(MemoryScopeLayer::new());
    tracing::subscriber::with_default(subscriber, || {
        let a = tracing::info_span!("a", memory_scope = "span-a");
        let b = tracing::info_span!("b", memory_scope = "span-b");
        let before = tracking_alloc::Scope::current();
        let entered_a = a.enter();
        let entered_b = b.enter();
        drop(entered_a); // A leaves first
        assert_eq!(tracking_alloc::Scope::current().name(), "span-b");
        drop(entered_b);
        assert_eq!(tracking_alloc::Scope::current(), before);
    });
}
