//! Heap profile samples labelled by scope: which part of the program holds memory, joined with
//! which line allocated it.
//!
//! jemalloc 5.3.1 (tikv-jemalloc-sys 0.7) lets a program replace the unwinder it calls for each
//! sampled allocation (`experimental.hooks.prof_backtrace`). Ours calls jemalloc's own and
//! appends one pseudo-frame, [`TAG`] | the allocating thread's current scope id, as the
//! outermost frame. The allocating thread's scope is the block's owner in both tracking modes,
//! so every stack in a dump carries its owner; readers split it off again ([`split`]): pprof
//! gets a `scope` label per sample (`go tool pprof -tagfocus=scope=cache`), flamegraphs a root
//! frame per scope, and jeprof's text the stacks without it. With jemalloc 5.3.0 (0.6) or
//! without `prof:true` the hook cannot be installed and profiles simply carry no scope.

use std::ffi::{c_uint, c_void};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

/// The high bits of a scope pseudo-frame: non-canonical on x86_64 and aarch64, so no return
/// address ever looks like one.
pub const TAG: u64 = 0x5c09_e000_0000_0000;
const TAG_MASK: u64 = 0xffff_ffff_ffff_0000;

type Backtrace = unsafe extern "C" fn(*mut *mut c_void, *mut c_uint, c_uint);

/// jemalloc's own unwinder, called first by ours.
static DEFAULT: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());

/// Installs the hook once per process. `true` if samples from now on carry their scope.
pub fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let mut default: Option<Backtrace> = None;
        let mut len = size_of::<Option<Backtrace>>();
        // SAFETY: the mallctl reads a `prof_backtrace_hook_t` (a nullable C function pointer,
        // laid out as `Option<fn>`) into `default`, of the length given.
        let read = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"experimental.hooks.prof_backtrace".as_ptr(),
                ptr::from_mut(&mut default).cast(),
                &mut len,
                ptr::null_mut(),
                0,
            )
        };
        let Some(default) = default.filter(|_| read == 0) else {
            return false; // jemalloc 5.3.0, or built without profiling
        };
        DEFAULT.store(default as *mut c_void, Ordering::Release);
        let mut hook: Option<Backtrace> = Some(with_scope);
        // SAFETY: writes a `prof_backtrace_hook_t` of the length given; `with_scope` lives for
        // the whole program. jemalloc refuses (ENOENT) when the process runs without prof:true.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                c"experimental.hooks.prof_backtrace".as_ptr(),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::from_mut(&mut hook).cast(),
                size_of::<Option<Backtrace>>(),
            ) == 0
        }
    })
}

/// The hook: jemalloc's unwinder, then the scope pseudo-frame. Runs inside jemalloc for a
/// sampled allocation, so it allocates nothing and only reads a thread-local.
unsafe extern "C" fn with_scope(frames: *mut *mut c_void, len: *mut c_uint, max_len: c_uint) {
    let default = DEFAULT.load(Ordering::Acquire);
    if max_len == 0 || default.is_null() {
        return;
    }
    // SAFETY: `DEFAULT` holds the function pointer read from jemalloc in `install`.
    let default: Backtrace = unsafe { std::mem::transmute::<*mut c_void, Backtrace>(default) };
    // SAFETY: jemalloc's arguments, with one slot kept back for the pseudo-frame.
    unsafe {
        default(frames, len, max_len - 1);
        let n = (*len).min(max_len - 1);
        let scope = tracking_alloc::Scope::current().id();
        *frames.add(n as usize) = (TAG | u64::from(scope)) as usize as *mut c_void;
        *len = n + 1;
    }
}

/// A stack without its scope pseudo-frame, and the scope id it carried.
pub fn split(addrs: &[u64]) -> (&[u64], Option<u16>) {
    match addrs.split_last() {
        Some((&last, rest)) if last & TAG_MASK == TAG => (rest, Some(last as u16)),
        _ => (addrs, None),
    }
}

/// The name of the scope with `id`, as pprof labels and flamegraph roots show it.
pub fn name(id: u16) -> &'static str {
    tracking_alloc::Scope::by_id(id).map_or("unknown", tracking_alloc::Scope::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_frame_is_split_off_the_outermost_end() {
        let stack = [0x10, 0x20, TAG | 7];
        assert_eq!(split(&stack), (&stack[..2], Some(7)));
        assert_eq!(split(&[0x10, 0x20]), (&[0x10u64, 0x20][..], None));
        assert_eq!(split(&[]), (&[][..], None));
    }

    #[test]
    fn a_scope_id_is_named_after_its_scope() {
        let scope = tracking_alloc::Scope::named("scope-frames-test");
        assert_eq!(name(scope.id()), "scope-frames-test");
        assert_eq!(name(u16::MAX), "unknown", "an id no scope has");
    }
}
