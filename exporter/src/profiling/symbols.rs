//! In-process symbolization of profile addresses, and the process's mappings with build ids.
//!
//! The exporter runs inside the profiled process, so it can resolve addresses with the
//! binary's own symbol table and line tables (via `backtrace`, which reads the DWARF through
//! gimli). Outputs need no separate symbolization step: `go tool pprof` shows function names,
//! files and lines straight away.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// One (possibly inlined) function at an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// Resolves addresses to frames, caching each address.
#[derive(Default)]
pub struct Symbolizer {
    cache: HashMap<u64, Vec<Frame>>,
}

impl Symbolizer {
    /// The frames at return address `addr`, innermost (inlined) first. Never empty: an address
    /// without symbols gets one frame named after the address.
    pub fn frames(&mut self, addr: u64) -> &[Frame] {
        self.cache.entry(addr).or_insert_with(|| {
            let mut frames = Vec::new();
            // A return address points after the call; the call itself is one byte earlier.
            backtrace::resolve(
                addr.saturating_sub(1) as usize as *mut std::ffi::c_void,
                |symbol| {
                    let function = symbol
                        .name()
                        .map(|name| format!("{name:#}"))
                        .unwrap_or_else(|| format!("{addr:#x}"));
                    frames.push(Frame {
                        function,
                        file: symbol.filename().map(|f| f.display().to_string()),
                        line: symbol.lineno(),
                    });
                },
            );
            if frames.is_empty() {
                frames.push(Frame {
                    function: format!("{addr:#x}"),
                    file: None,
                    line: None,
                });
            }
            // Inlined allocator plumbing (`alloc::alloc::alloc`, `Global::alloc_impl`) on top of
            // the program's own frame at this address says nothing; drop it, keep the rest.
            let plumbing = frames
                .iter()
                .take_while(|f| is_allocator_frame(&f.function))
                .count();
            if plumbing < frames.len() {
                frames.drain(..plumbing);
            }
            frames
        })
    }

    /// The stack without the allocator's own frames at its top (jemalloc's sampling code, the
    /// Rust allocation shims, this toolkit's tracking allocator): it starts at the program's
    /// code that asked for memory.
    pub fn trim_allocator_frames<'a>(&mut self, addrs: &'a [u64]) -> &'a [u64] {
        let first_program_frame = addrs
            .iter()
            .position(|&addr| {
                !self
                    .frames(addr)
                    .iter()
                    .all(|f| is_allocator_frame(&f.function))
            })
            .unwrap_or(0);
        &addrs[first_program_frame..]
    }
}

fn is_allocator_frame(function: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "_rjem_",
        "je_",
        "prof_",
        "imalloc",
        "ialloc",
        "tikv_jemallocator::",
        "<tikv_jemallocator::",
        "tracking_alloc::",
        "<tracking_alloc::",
        "exporter::profiling::scope_frames::",
        "__rustc::",
        "__rust_",
        "__rdl_",
        "alloc::alloc::",
        "<alloc::alloc::Global",
        "std::alloc::",
        "0x",
    ];
    // Any global allocator's methods, the program's own wrappers included.
    PREFIXES.iter().any(|p| function.starts_with(p))
        || function.contains(" as core::alloc::global::GlobalAlloc>::")
}

/// An executable mapping of the process, from the profile's `MAPPED_LIBRARIES` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub limit: u64,
    pub offset: u64,
    pub path: String,
    pub build_id: Option<String>,
}

/// Executable, file-backed mappings from `/proc/self/maps` text, with their ELF build ids.
pub fn mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let path = fields.nth(2)?;
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (start, limit) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                limit: u64::from_str_radix(limit, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                path: path.to_owned(),
                build_id: build_id(path),
            })
        })
        .collect()
}

/// The GNU build id of the running executable, hex-encoded (`None` if it has none).
pub fn own_build_id() -> Option<String> {
    static OWN: LazyLock<Option<String>> = LazyLock::new(|| {
        let exe = std::env::current_exe().ok()?;
        build_id(exe.to_str()?)
    });
    OWN.clone()
}

/// The GNU build id of an ELF file, hex-encoded; cached per path.
fn build_id(path: &str) -> Option<String> {
    static CACHE: LazyLock<Mutex<HashMap<String, Option<String>>>> =
        LazyLock::new(Default::default);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(path.to_owned())
        .or_insert_with(|| {
            use object::Object;
            let data = std::fs::read(path).ok()?;
            let file = object::File::parse(&*data).ok()?;
            let id = file.build_id().ok()??;
            Some(id.iter().map(|b| format!("{b:02x}")).collect())
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiling::test_support::call_site;

    #[test]
    fn resolves_this_crate_and_trims_the_allocator_frames_above_it() {
        let mut symbols = Symbolizer::default();
        let here = call_site();
        let frames = symbols.frames(here);
        assert!(
            frames[0].function.contains("test_support::call_site"),
            "{frames:?}"
        );
        assert!(frames[0]
            .file
            .as_deref()
            .unwrap()
            .ends_with("test_support.rs"));
        // An address without symbols is named after itself, and counts as the allocator's
        // (jemalloc's own frames have no Rust symbols): trimmed above the program's frames.
        assert_eq!(
            symbols.frames(0x10),
            [Frame {
                function: "0x10".into(),
                file: None,
                line: None
            }]
        );
        assert_eq!(symbols.trim_allocator_frames(&[0x10, here]), [here]);
        assert_eq!(symbols.trim_allocator_frames(&[here, 0x10]), [here, 0x10]);
        // Nothing but allocator frames: kept, rather than an empty stack.
        assert_eq!(symbols.trim_allocator_frames(&[0x10, 0x20]), [0x10, 0x20]);
    }

    #[test]
    fn only_executable_file_mappings_are_kept() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 42 /usr/bin/app
55d0c0100000-55d0c0500000 r-xp 00100000 fd:01 42 /usr/bin/app
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 [vdso]
7f0000100000-7f0000200000 r-xp 00000000 00:00 0
";
        assert_eq!(
            mappings(maps),
            [Mapping {
                start: 0x55d0_c010_0000,
                limit: 0x55d0_c050_0000,
                offset: 0x10_0000,
                path: "/usr/bin/app".into(),
                build_id: None,
            }]
        );
    }

    #[test]
    fn own_executable_mapping_has_a_build_id() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::env::current_exe().unwrap().display().to_string();
        let mine: Vec<_> = mappings(&maps)
            .into_iter()
            .filter(|m| m.path == exe)
            .collect();
        assert!(!mine.is_empty(), "the test binary is mapped executable");
        assert!(mine[0].limit > mine[0].start);
        let id = mine[0]
            .build_id
            .as_deref()
            .expect("rustc links with a build id");
        assert!(
            id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(own_build_id().as_deref(), Some(id), "the same, read once");
    }

    #[test]
    fn allocator_frames_are_recognised() {
        assert!(is_allocator_frame("_rjem_je_prof_backtrace"));
        assert!(is_allocator_frame(
            "tracking_alloc::alloc::TrackingAlloc<A>::allocate"
        ));
        assert!(is_allocator_frame("alloc::alloc::exchange_malloc"));
        assert!(!is_allocator_frame("demo::Service::handle_request"));
        assert!(!is_allocator_frame("alloc::vec::Vec<T>::push"));
    }
}
