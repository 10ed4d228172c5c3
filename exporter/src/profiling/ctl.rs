//! jemalloc's profiling controls (`prof.*` mallctls), with errors that name the fix.

use std::ffi::CString;
use std::os::raw::c_char;
use std::path::Path;

use tikv_jemalloc_ctl::raw;

use super::ProfileError;

/// Whether heap profiles can be taken, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// jemalloc was built without profiling support.
    NotCompiled,
    /// Built with profiling, but the process started without `prof:true`.
    NotEnabled,
    /// Profiles can be taken; `active` says whether sampling is on right now.
    Enabled { active: bool },
}

fn read_bool(key: &[u8]) -> Option<bool> {
    // SAFETY: the keys passed here name boolean mallctls.
    unsafe { raw::read::<bool>(key) }.ok()
}

/// Reads jemalloc's profiling state.
pub fn availability() -> Availability {
    if read_bool(b"config.prof\0") != Some(true) {
        return Availability::NotCompiled;
    }
    if read_bool(b"opt.prof\0") != Some(true) {
        return Availability::NotEnabled;
    }
    Availability::Enabled {
        active: read_bool(b"prof.active\0").unwrap_or(false),
    }
}

/// What to do when the process started without `prof:true`; its snippet compiles as written.
const NOT_ENABLED: &str = "heap profiling was not enabled when the process started. Start it with \
             _RJEM_MALLOC_CONF=prof:true (tikv-jemallocator's default, prefixed build; a build with \
             the unprefixed_malloc_on_supported_platforms feature reads MALLOC_CONF instead), or \
             embed the default in the binary: #[unsafe(export_name = \"_rjem_malloc_conf\")] \
             pub static MALLOC_CONF: &[u8; 45] = b\"prof:true,prof_active:true,lg_prof_sample:19\\0\"; \
             (see the README, section Heap profiles). prof:true cannot be switched on at run time.";

/// The error for every profiling route when profiles cannot be taken, naming the fix.
pub fn require_enabled() -> Result<bool, ProfileError> {
    match availability() {
        Availability::Enabled { active } => Ok(active),
        Availability::NotCompiled => Err(ProfileError::NotAvailable(
            "heap profiling is not compiled into this binary's jemalloc. Enable the `profiling` \
             feature of tikv-jemallocator (tikv-jemallocator = { features = [\"profiling\"] }) and \
             rebuild."
                .into(),
        )),
        Availability::NotEnabled => Err(ProfileError::NotAvailable(NOT_ENABLED.into())),
    }
}

/// Whether dumps carry cumulative counts per call stack (`prof_accum:true`, fixed at start).
pub fn accumulating() -> bool {
    read_bool(b"opt.prof_accum\0") == Some(true)
}

/// log2 of the average bytes between samples.
pub fn lg_sample() -> u32 {
    // SAFETY: `prof.lg_sample` is a size_t.
    unsafe { raw::read::<usize>(b"prof.lg_sample\0") }.map_or(0, |v| v as u32)
}

/// Turns sampling on or off; returns the previous state.
pub fn set_active(active: bool) -> Result<bool, ProfileError> {
    require_enabled()?;
    // SAFETY: `prof.active` is a bool, readable and writable.
    unsafe { raw::update::<bool>(b"prof.active\0", active) }
        .map_err(|e| ProfileError::Internal(format!("setting jemalloc's prof.active failed: {e}")))
}

/// Writes a heap profile (jemalloc's `heap_v2` text) to `path`, which the exporter chose.
///
/// jemalloc reports every failure as "interface with side effects failed"; the checks before
/// the call report the real cause (missing directory, no permission, disk full).
pub fn dump_to(path: &Path) -> Result<(), ProfileError> {
    require_enabled()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    check_writable(dir)?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        ProfileError::Internal(format!("dump path {} contains a NUL byte", path.display()))
    })?;
    // SAFETY: `prof.dump` takes a `const char *` file name; `c_path` outlives the call.
    unsafe { raw::write::<*const c_char>(b"prof.dump\0", c_path.as_ptr()) }.map_err(|e| {
        ProfileError::Storage(format!(
            "jemalloc could not write the heap profile to {}: {e} (check free space and \
             permissions of {})",
            path.display(),
            dir.display()
        ))
    })
}

/// Checks that `dir` exists and a file can be created and written in it.
pub fn check_writable(dir: &Path) -> Result<(), ProfileError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(ProfileError::Storage(format!(
                "the dump directory {} is not a directory; point the exporter's dump_dir (demo: \
                 --dump-dir) at a writable directory",
                dir.display()
            )))
        }
        Err(e) => {
            return Err(ProfileError::Storage(format!(
                "the dump directory {} is missing or unreadable ({e}); create it or point the \
                 exporter's dump_dir (demo: --dump-dir) at a writable directory",
                dir.display()
            )))
        }
    }
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    let written = std::fs::write(&probe, [0u8; 4096]);
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| {
        let cause = match e.raw_os_error() {
            Some(28) => "the disk is full".to_owned(), // ENOSPC
            Some(13) | Some(1) => "permission denied".to_owned(), // EACCES, EPERM
            Some(30) => "the file system is read-only".to_owned(), // EROFS
            _ => e.to_string(),
        };
        ProfileError::Storage(format!(
            "cannot write heap profiles to {}: {cause}. Free space, fix its permissions, or point \
             the exporter's dump_dir (demo: --dump-dir) elsewhere",
            dir.display()
        ))
    })
}

/// Returns the dirty pages of all arenas to the OS, so that resident memory reflects a release.
pub fn purge() {
    // `arena.<i>.purge` takes neither an old nor a new value: both pointers must be null (a
    // zero-length write through `raw::write` is refused with EPERM). 4096 is MALLCTL_ARENAS_ALL.
    // SAFETY: the name is NUL-terminated; null pointers with zero lengths are what it expects.
    let result = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if result != 0 {
        tracing::warn!("memory exporter: purging jemalloc's dirty pages failed (errno {result})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hint's `&[u8; N]` matches its byte-string literal (a mismatch does not compile).
    #[test]
    fn the_not_enabled_hint_declares_the_right_length() {
        let declared: usize = NOT_ENABLED
            .split("&[u8; ")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .and_then(|n| n.parse().ok())
            .expect("the hint declares an array length");
        let literal = NOT_ENABLED
            .split("b\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the hint has a byte-string literal");
        // `\0` in the literal is one byte.
        let bytes = literal.replace("\\0", "\0").len();
        assert_eq!(declared, bytes, "{NOT_ENABLED}");
        assert!(
            NOT_ENABLED.contains("#[unsafe(export_name"),
            "edition 2024 form"
        );
    }

    #[test]
    fn profiling_routes_say_how_to_turn_profiling_on() {
        // This test binary embeds no malloc_conf: profiling is compiled in but off, unless
        // _RJEM_MALLOC_CONF turns it on (then there is nothing to explain).
        match availability() {
            Availability::NotEnabled => {
                let error = require_enabled().unwrap_err();
                assert_eq!(error.status(), 501);
                assert!(
                    error.to_string().contains("_RJEM_MALLOC_CONF=prof:true"),
                    "{error}"
                );
            }
            Availability::Enabled { active } => assert_eq!(require_enabled(), Ok(active)),
            Availability::NotCompiled => {
                let error = require_enabled().unwrap_err().to_string();
                assert!(error.contains("`profiling` feature"), "{error}");
            }
        }
    }

    #[test]
    fn a_dump_directory_must_be_a_directory_that_exists() {
        let file = std::env::temp_dir().join(format!("ctl-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let not_a_dir = check_writable(&file).unwrap_err().to_string();
        let missing = check_writable(&file.join("below")).unwrap_err().to_string();
        let writable = check_writable(&std::env::temp_dir());
        std::fs::remove_file(&file).unwrap();
        assert!(not_a_dir.contains("is not a directory"), "{not_a_dir}");
        assert!(missing.contains("is missing or unreadable"), "{missing}");
        assert!(missing.contains("--dump-dir"), "names the fix: {missing}");
        assert_eq!(writable, Ok(()));
    }

    #[test]
    fn purge_returns_dirty_pages() {
        let _serial = crate::process_figures_serialized();
        let dirty = || crate::stats::JemallocStats::read().unwrap().dirty;
        let held: Vec<Vec<u8>> = (0..64)
            .map(|_| std::hint::black_box(vec![1u8; 1 << 20]))
            .collect();
        drop(held);
        let before = dirty();
        super::purge();
        let after = dirty();
        eprintln!("dirty before purge {before}, after {after}");
        assert!(
            after < before / 2 || before < (8 << 20),
            "{before} -> {after}"
        );
    }
}
