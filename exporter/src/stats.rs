//! Reading jemalloc's statistics: advance the epoch, then read every value of one epoch.
//!
//! jemalloc caches its statistics; they only move when the `epoch` is advanced, and advancing
//! takes most arena locks (jemalloc #2363, ~15 µs measured). So the exporter advances it at
//! most once per 100 ms for scrapes (concurrent scrapes share one reading, taken together with
//! the scope counters) and on its refresh interval for automatic dumps.

use std::fmt;
use std::time::{Duration, Instant};

use tikv_jemalloc_ctl::raw;

/// One consistent reading of jemalloc's statistics and configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JemallocStats {
    /// Bytes in live allocations (usable sizes, so including size-class rounding).
    pub allocated: u64,
    /// Bytes in active pages: `allocated` plus free space within those pages.
    pub active: u64,
    /// Bytes of jemalloc's own metadata.
    pub metadata: u64,
    /// Bytes in physically resident data pages mapped by jemalloc.
    pub resident: u64,
    /// Bytes in active extents mapped by jemalloc.
    pub mapped: u64,
    /// Bytes in virtual memory kept mapped but returned to the OS (not resident).
    pub retained: u64,
    /// Bytes in dirty pages: freed, not yet purged, still resident.
    pub dirty: u64,
    /// Bytes in muzzy pages: freed and advised away lazily (`MADV_FREE`).
    pub muzzy: u64,
    /// Bytes of free blocks cached in thread caches, which `allocated` counts.
    pub tcache: u64,
    /// Number of arenas.
    pub arenas: u64,
    /// Background threads running (purging dirty pages), 0 if disabled.
    pub background_threads: u64,
    /// Whether jemalloc was built with profiling support (`config.prof`).
    pub profiling_compiled: bool,
    /// Whether profiling was enabled at start-up (`opt.prof`, needs `prof:true`).
    pub profiling_enabled: bool,
    /// Whether sampling is active right now (`prof.active`).
    pub profiling_active: bool,
    /// log2 of the average bytes between samples (`prof.lg_sample`).
    pub lg_prof_sample: u64,
    /// jemalloc's version string.
    pub version: String,
    /// The options in effect, in `malloc_conf` syntax.
    pub malloc_conf: String,
}

/// A mallctl read that failed: which key, and jemalloc's reason.
#[derive(Debug, Clone)]
pub struct ReadError {
    pub key: &'static str,
    pub reason: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reading jemalloc's `{}` failed: {}. Is the global allocator jemalloc built with the \
             `stats` feature (tikv-jemallocator features = [\"stats\"])?",
            self.key, self.reason
        )
    }
}

impl std::error::Error for ReadError {}

/// A NUL-terminated mallctl key with its printable name.
macro_rules! key {
    ($name:literal) => {
        (concat!($name, "\0").as_bytes(), $name)
    };
}

type Key = (&'static [u8], &'static str);

fn read<T: Copy>((key, name): Key) -> Result<T, ReadError> {
    // SAFETY: every key passed here names a mallctl whose value has type `T` (see the calls).
    unsafe { raw::read::<T>(key) }.map_err(|e| ReadError {
        key: name,
        reason: e.to_string(),
    })
}

fn read_u64((key, name): Key) -> Result<u64, ReadError> {
    read::<usize>((key, name)).map(|v| v as u64)
}

/// Options that may be absent (e.g. profiling keys in a build without profiling) read as default.
fn read_or<T: Copy>(key: Key, default: T) -> T {
    read(key).unwrap_or(default)
}

/// Advances the epoch so the next reads see current values. Returns how long it took.
pub fn advance_epoch() -> Result<Duration, ReadError> {
    let started = Instant::now();
    tikv_jemalloc_ctl::epoch::advance().map_err(|e| ReadError {
        key: "epoch",
        reason: e.to_string(),
    })?;
    Ok(started.elapsed())
}

impl JemallocStats {
    /// Advances the epoch and reads everything. Takes jemalloc's arena locks briefly: call it
    /// from a background task, not per request.
    pub fn read() -> Result<JemallocStats, ReadError> {
        advance_epoch()?;
        Self::read_current_epoch()
    }

    /// Reads the values of the current epoch without advancing it.
    pub fn read_current_epoch() -> Result<JemallocStats, ReadError> {
        let page = read_u64(key!("arenas.page"))?;
        let profiling_compiled = read_or::<bool>(key!("config.prof"), false);
        let background = read_or::<bool>(key!("background_thread"), false);
        let stats = JemallocStats {
            allocated: read_u64(key!("stats.allocated"))?,
            active: read_u64(key!("stats.active"))?,
            metadata: read_u64(key!("stats.metadata"))?,
            resident: read_u64(key!("stats.resident"))?,
            mapped: read_u64(key!("stats.mapped"))?,
            retained: read_u64(key!("stats.retained"))?,
            // 4096 is MALLCTL_ARENAS_ALL: the sum over all arenas.
            dirty: read_u64(key!("stats.arenas.4096.pdirty"))? * page,
            muzzy: read_u64(key!("stats.arenas.4096.pmuzzy"))? * page,
            tcache: read_u64(key!("stats.arenas.4096.tcache_bytes"))?,
            arenas: u64::from(read::<u32>(key!("arenas.narenas"))?),
            background_threads: if background {
                read_u64(key!("stats.background_thread.num_threads")).unwrap_or(0)
            } else {
                0
            },
            profiling_compiled,
            profiling_enabled: profiling_compiled && read_or::<bool>(key!("opt.prof"), false),
            profiling_active: profiling_compiled && read_or::<bool>(key!("prof.active"), false),
            lg_prof_sample: if profiling_compiled {
                read_or::<usize>(key!("prof.lg_sample"), 0) as u64
            } else {
                0
            },
            version: version(),
            malloc_conf: effective_conf(background),
        };
        Ok(stats)
    }
}

fn read_str((key, _): Key) -> Option<String> {
    // SAFETY: the key names a `const char *` mallctl; jemalloc returns a static C string.
    let bytes = unsafe { raw::read_str(key) }.ok()?;
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    Some(String::from_utf8_lossy(bytes).into_owned())
}

fn version() -> String {
    read_str(key!("version")).unwrap_or_else(|| "unknown".to_owned())
}

/// The options that matter for memory and profiling, as jemalloc resolved them from its
/// embedded `malloc_conf`, the environment and its defaults.
fn effective_conf(background: bool) -> String {
    let mut conf = vec![
        format!("narenas:{}", read_or::<u32>(key!("opt.narenas"), 0)),
        format!(
            "dirty_decay_ms:{}",
            read_or::<isize>(key!("opt.dirty_decay_ms"), -1)
        ),
        format!(
            "muzzy_decay_ms:{}",
            read_or::<isize>(key!("opt.muzzy_decay_ms"), -1)
        ),
        format!("background_thread:{background}"),
    ];
    if read_or::<bool>(key!("config.prof"), false) {
        conf.push(format!("prof:{}", read_or::<bool>(key!("opt.prof"), false)));
        conf.push(format!(
            "prof_active:{}",
            read_or::<bool>(key!("opt.prof_active"), false)
        ));
        conf.push(format!(
            "lg_prof_sample:{}",
            read_or::<usize>(key!("opt.lg_prof_sample"), 0)
        ));
        conf.push(format!(
            "prof_accum:{}",
            read_or::<bool>(key!("opt.prof_accum"), false)
        ));
        conf.push(format!(
            "lg_prof_interval:{}",
            read_or::<isize>(key!("opt.lg_prof_interval"), -1)
        ));
    }
    conf.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_consistent_and_follow_allocations() {
        let _serial = crate::process_figures_serialized();
        let before = JemallocStats::read().unwrap();
        assert!(before.mapped >= before.resident, "{before:?}");
        assert!(before.resident >= before.active, "{before:?}");
        assert!(before.active >= before.allocated, "{before:?}");
        assert!(before.allocated > 0 && before.arenas > 0, "{before:?}");
        assert!(before.version.starts_with("5."), "{}", before.version);
        assert!(
            before.malloc_conf.contains("narenas:"),
            "{}",
            before.malloc_conf
        );
        let held = std::hint::black_box(vec![1u8; 64 << 20]);
        let during = JemallocStats::read().unwrap();
        assert!(during.allocated >= before.allocated + (64 << 20) - (1 << 20));
        drop(held);
    }

    /// Dirty and muzzy are jemalloc's page counts times the page size, read in one epoch.
    #[test]
    fn dirty_and_muzzy_are_pages_times_the_page_size() {
        let _serial = crate::process_figures_serialized();
        let page = read_u64(key!("arenas.page")).unwrap();
        // Muzzy pages need a muzzy decay (jemalloc's default, 0, leaves none): here muzzy is
        // 0 pages, and its check only tells `* page` from `+ page`.
        for _ in 0..100 {
            // Freed pages stay dirty until jemalloc's decay (10 s by default) purges them.
            drop(std::hint::black_box(vec![1u8; 8 << 20]));
            advance_epoch().unwrap();
            let pages = |key| read_u64(key).unwrap();
            let dirty = pages(key!("stats.arenas.4096.pdirty"));
            let muzzy = pages(key!("stats.arenas.4096.pmuzzy"));
            let stats = JemallocStats::read_current_epoch().unwrap();
            let same_epoch = dirty == pages(key!("stats.arenas.4096.pdirty"))
                && muzzy == pages(key!("stats.arenas.4096.pmuzzy"));
            if !same_epoch || dirty == 0 {
                continue; // another test advanced the epoch or purged: read again
            }
            assert_eq!(stats.dirty, dirty * page);
            assert_eq!(stats.muzzy, muzzy * page);
            return;
        }
        panic!("no dirty pages after freeing 8 MiB a hundred times");
    }

    /// Profiling is reported enabled and active only as jemalloc says, and only when compiled
    /// in (these tests embed no `prof:true`; `_RJEM_MALLOC_CONF` may add it).
    #[test]
    fn profiling_flags_follow_jemalloc() {
        let stats = JemallocStats::read().unwrap();
        let compiled = read_or::<bool>(key!("config.prof"), false);
        assert_eq!(stats.profiling_compiled, compiled);
        assert_eq!(
            stats.profiling_enabled,
            compiled && read_or::<bool>(key!("opt.prof"), false)
        );
        assert_eq!(
            stats.profiling_active,
            compiled && read_or::<bool>(key!("prof.active"), false)
        );
        if std::env::var("_RJEM_MALLOC_CONF").map_or(true, |c| !c.contains("prof:true")) {
            assert!(
                !stats.profiling_enabled && !stats.profiling_active,
                "{stats:?}"
            );
        }
    }

    #[test]
    fn a_read_error_names_the_key_the_reason_and_the_fix() {
        let error = ReadError {
            key: "stats.allocated",
            reason: "no such entry".into(),
        };
        let message = error.to_string();
        for part in [
            "`stats.allocated`",
            "no such entry",
            "features = [\"stats\"]",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }
}
