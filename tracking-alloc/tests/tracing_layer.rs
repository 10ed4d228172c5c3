//! `#[instrument]`-ed async code is attributed to its span's scope with no extra code.
use tracing::instrument;
use tracing_subscriber::prelude::*;
use tracking_alloc::{snapshot, MemoryScopeLayer};

#[cfg(not(miri))]
#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

/// Miri cannot run jemalloc (C): the layer is checked there over `System`.
#[cfg(miri)]
#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<std::alloc::System> =
    tracking_alloc::TrackingAlloc::new(std::alloc::System);

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
#[cfg_attr(miri, ignore = "a multi-thread runtime is too slow under Miri")]
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

/// The scope field may hold any value (`%name`, a number: its text); no other field names the
/// scope, before or after it, and a span without it (or with it left empty) is named after
/// the span.
#[test]
fn only_the_scope_field_names_the_scope_whatever_its_type() {
    let subscriber = tracing_subscriber::registry().with(MemoryScopeLayer::new());
    tracing::subscriber::with_default(subscriber, || {
        let current = || tracking_alloc::Scope::current().name();
        let name = String::from("display-scope");
        let display = tracing::info_span!("d", count = 5, memory_scope = %name, after = 6);
        assert_eq!(display.in_scope(current), "display-scope");
        let numbered = tracing::info_span!("n", memory_scope = 7);
        assert_eq!(numbered.in_scope(current), "7");
        let plain = tracing::info_span!("plain-span", count = 5);
        assert_eq!(plain.in_scope(current), "plain-span");
        let unset = tracing::info_span!(
            "unset-scope-span",
            count = 5,
            memory_scope = tracing::field::Empty
        );
        assert_eq!(unset.in_scope(current), "unset-scope-span");
    });
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

/// Two tasks on a `LocalSet` hold entered spans across `.await` (an anti-pattern, but common):
/// their enters and exits interleave on one thread. The span entered last stays current while
/// it is entered, and once both have exited the thread is back where it started.
#[test]
fn spans_held_across_await_on_a_local_set_interleave_correctly() {
    use tokio::task::{spawn_local, yield_now, LocalSet};
    use tracking_alloc::Scope;
    let subscriber = tracing_subscriber::registry().with(MemoryScopeLayer::new());
    tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        LocalSet::new().block_on(&runtime, async {
            let before = Scope::current();
            let first = spawn_local(async {
                let span = tracing::info_span!("first", memory_scope = "local-first");
                let entered = span.enter();
                yield_now().await; // `second` enters its span meanwhile
                drop(entered); // exits before `second`, which entered after it
                let current = Scope::current().name();
                yield_now().await;
                current
            });
            let second = spawn_local(async {
                let span = tracing::info_span!("second", memory_scope = "local-second");
                let entered = span.enter();
                yield_now().await;
                yield_now().await;
                let current = Scope::current().name();
                drop(entered);
                current
            });
            assert_eq!(first.await.unwrap(), "local-second");
            assert_eq!(second.await.unwrap(), "local-second");
            assert_eq!(Scope::current(), before, "both spans exited");
        });
    });
}

/// Instrumented futures polled by a multi-thread runtime enter and exit their spans on
/// whichever worker polls them, thousands of times, interleaved: afterwards no worker is left
/// in any span's scope, and each future's allocations went to its own scope.
#[test]
#[cfg_attr(miri, ignore = "a multi-thread runtime is too slow under Miri")]
fn instrumented_futures_leave_no_scope_behind_on_workers() {
    use tracing::Instrument;
    use tracking_alloc::Scope;
    let dispatch =
        tracing::Dispatch::new(tracing_subscriber::registry().with(MemoryScopeLayer::new()));
    let on_workers = dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || {
            // The workers dispatch to the layer for their whole life.
            std::mem::forget(tracing::dispatcher::set_default(&on_workers));
        })
        .build()
        .unwrap();
    let _default = tracing::dispatcher::set_default(&dispatch);
    let kept = runtime.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let span = tracing::info_span!("worker_task", memory_scope = "mt-tasks");
                // Allocated here, outside the span: only the task's own blocks are its scope's.
                let mut kept = Vec::with_capacity(20);
                tokio::spawn(
                    async move {
                        for _ in 0..20 {
                            kept.push(vec![i as u8; 100]);
                            tokio::task::yield_now().await;
                        }
                        kept
                    }
                    .instrument(span),
                )
            })
            .collect();
        let mut kept = Vec::new();
        for task in tasks {
            kept.push(task.await.unwrap());
        }
        let probes: Vec<_> = (0..32)
            .map(|_| tokio::spawn(async { Scope::current().name() }))
            .collect();
        for probe in probes {
            assert_eq!(
                probe.await.unwrap(),
                "unscoped",
                "a worker kept a span's scope"
            );
        }
        kept
    });
    // The tasks' blocks, and what the runtime itself allocates while polling them (a deferred
    // waker list growing, say: a few bytes per task).
    let held = live("mt-tasks");
    assert!(
        (64 * 20 * 100..64 * 20 * 100 + 64 * 64).contains(&held),
        "{held} B in mt-tasks"
    );
    drop(kept);
}
