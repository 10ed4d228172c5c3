//! A child forked while other threads register scopes, take snapshots and create spans can do
//! all three itself: the tracker's locks are taken around `fork` (`pthread_atfork`), so the
//! child never inherits one held by a thread that does not exist in it.
#![cfg(unix)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use tracing_subscriber::prelude::*;
use tracking_alloc::{snapshot, MemoryScopeLayer, Scope, TrackingAlloc};

#[cfg(not(target_env = "musl"))]
#[global_allocator]
static GLOBAL: TrackingAlloc<tikv_jemallocator::Jemalloc> =
    TrackingAlloc::new(tikv_jemallocator::Jemalloc);

#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: TrackingAlloc<std::alloc::System> = TrackingAlloc::new(std::alloc::System);

const FORKS: usize = 300;

/// What the child does: everything that takes one of the tracker's locks. Exits 0 if all of it
/// worked, 1 if it answered wrongly; a hang is what the parent watches for.
fn child() -> ! {
    let scope = Scope::named("forked-child");
    let kept = {
        let _g = scope.enter();
        vec![7u8; 1000]
    };
    let stats = snapshot();
    let child = stats.iter().find(|s| s.name == "forked-child");
    // A span at a callsite the parent never reached: the layer's cache takes its write lock.
    let subscriber = tracing_subscriber::registry().with(MemoryScopeLayer::new());
    let in_span = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("forked_child_span");
        let _entered = span.enter();
        Scope::current().name() == "forked_child_span"
    });
    eprintln!("forked child: {child:?}, scope of a new span entered: {in_span}");
    let ok = child.is_some_and(|s| s.live_bytes == kept.len() as u64) && in_span;
    // SAFETY: `_exit` ends the child without running the parent's atexit handlers or unwinding
    // the test harness's copy.
    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
}

/// Waits up to ten seconds for `pid`; kills it and reports a hang after that.
fn wait(pid: libc::pid_t) -> Result<i32, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
            0 => {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                // SAFETY: as above; reaps the killed child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                return Err(format!(
                    "child {pid} hung for 10 s (a lock held across fork)"
                ));
            }
            p if p == pid && libc::WIFEXITED(status) => return Ok(libc::WEXITSTATUS(status)),
            other => return Err(format!("waitpid({pid}) = {other}, status {status:#x}")),
        }
    }
}

#[test]
fn a_child_forked_while_threads_hold_the_locks_can_take_them() {
    let stop = Arc::new(AtomicBool::new(false));
    // Forks start once every busy thread is in its loop: installing a subscriber takes
    // tracing-core's own dispatcher lock, which is not ours to hold across fork (a child forked
    // during that start-up can hang in its own subscriber's registration).
    let started = Arc::new(Barrier::new(4));
    let busy: Vec<_> = (0..3)
        .map(|role| {
            let (stop, started) = (Arc::clone(&stop), Arc::clone(&started));
            thread::spawn(move || {
                let subscriber = tracing_subscriber::registry().with(MemoryScopeLayer::new());
                let _default = tracing::subscriber::set_default(subscriber);
                drop(tracing::info_span!("busy_span")); // registers the callsite
                started.wait();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    match role {
                        // The registry's lock, for a lookup (names cycle) or an insertion.
                        0 => drop(Scope::named(&format!("busy-{}", i % 200))),
                        1 => drop(snapshot()),
                        // The callsite cache's read lock, on every span creation.
                        _ => drop(tracing::info_span!("busy_span")),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    started.wait();
    let mut failures = Vec::new();
    for _ in 0..FORKS {
        // SAFETY: the child only runs `child`, which ends in `_exit`.
        match unsafe { libc::fork() } {
            -1 => panic!("fork failed: {}", std::io::Error::last_os_error()),
            0 => child(),
            pid => match wait(pid) {
                Ok(0) => {}
                Ok(code) => failures.push(format!("child {pid} exited {code}")),
                Err(hang) => failures.push(hang),
            },
        }
        if failures.len() >= 3 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for thread in busy {
        thread.join().unwrap();
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
