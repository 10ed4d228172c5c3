//! What the profiling modules' unit tests share.

use std::sync::OnceLock;

/// A return address inside this function: a code address of this binary that symbolizes to
/// a known name (`…::test_support::call_site`), to stand for a frame of a heap profile.
#[inline(never)]
pub fn call_site() -> u64 {
    static HERE: OnceLock<u64> = OnceLock::new();
    *HERE.get_or_init(|| {
        let mut found = None;
        backtrace::trace(|frame| {
            backtrace::resolve_frame(frame, |symbol| {
                let name = symbol.name().map(|n| format!("{n:#}")).unwrap_or_default();
                if name.contains("test_support::call_site") {
                    found.get_or_insert(frame.ip() as u64);
                }
            });
            found.is_none()
        });
        found.expect("a frame of call_site in its own backtrace")
    })
}
