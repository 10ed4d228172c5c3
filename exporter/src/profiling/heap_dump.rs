//! jemalloc's `heap_v2` profile text: parsing, subtracting one profile from another, and
//! writing it back (so a diff can still be read by `jeprof`).
//!
//! ```text
//! heap_v2/524288                        <- sampling period: 2^lg_prof_sample bytes
//!   t*: 28106: 56637512 [0: 0]          <- totals: live objects: bytes [allocated ones]
//! @ 0x55d6c0d1a2b3 0x55d6c0d19f00 ...   <- a call stack, innermost first
//!   t*: 13: 6688 [0: 0]                 <- sampled live objects and bytes from that stack, and
//!                                          [in brackets] all it ever allocated, when jemalloc
//!                                          runs with `prof_accum:true` (else `[0: 0]`)
//!   t0: 13: 6688 [0: 0]                 <- per thread (ignored)
//! MAPPED_LIBRARIES:
//! <the process's /proc/self/maps>
//! ```
//!
//! Counts are *sampled*: an allocation is recorded with probability ~size/period. Renderers
//! unbias them ([`Stack::unbiased`]) the way jeprof does.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// One call stack and its sampled live objects and bytes (and, with `prof_accum:true`, all
/// objects and bytes it allocated since the process started, freed or not).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stack {
    /// Return addresses, innermost (the allocation) first.
    pub addrs: Vec<u64>,
    pub objects: u64,
    pub bytes: u64,
    /// Cumulative sampled objects (0 without `prof_accum`).
    pub allocated_objects: u64,
    /// Cumulative sampled bytes (0 without `prof_accum`).
    pub allocated_bytes: u64,
}

impl Stack {
    /// Estimated real live objects and bytes, unbiased for sampling as jeprof's
    /// `AdjustSamples` does: an allocation of average size `s` is sampled with probability
    /// `1 - e^(-s/period)`.
    pub fn unbiased(&self, period: u64) -> (f64, f64) {
        unbias(self.objects, self.bytes, period)
    }

    /// Estimated real objects and bytes allocated in all (the `prof_accum` counts), unbiased
    /// the same way.
    pub fn unbiased_allocated(&self, period: u64) -> (f64, f64) {
        unbias(self.allocated_objects, self.allocated_bytes, period)
    }
}

fn unbias(objects: u64, bytes: u64, period: u64) -> (f64, f64) {
    // No bytes (a malformed dump: the fuzzer found one) would scale by 1/0.
    if objects == 0 || bytes == 0 || period == 0 {
        return (objects as f64, bytes as f64);
    }
    let average = bytes as f64 / objects as f64;
    // 1 - e^-x, accurate (and non-zero) for the tiny x of small blocks and long periods.
    let scale = 1.0 / -(-average / period as f64).exp_m1();
    (objects as f64 * scale, bytes as f64 * scale)
}

/// A parsed heap profile.
#[derive(Debug, Clone, PartialEq)]
pub struct HeapProfile {
    /// Average bytes between samples.
    pub period: u64,
    pub stacks: Vec<Stack>,
    /// Whether the stacks carry cumulative counts: jemalloc ran with `prof_accum:true` (its
    /// totals line then has a non-zero bracket) and, for a diff, both sides did.
    pub accumulated: bool,
    /// The `MAPPED_LIBRARIES:` section: the process's memory map when the dump was written.
    pub maps: String,
}

/// Why a dump could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a jemalloc heap_v2 profile: {}", self.0)
    }
}

/// Live objects and bytes, and the cumulative ones in brackets (`[0: 0]` when absent).
fn counts(line: &str) -> Option<[u64; 4]> {
    // "t*: 13: 6688 [20: 10240]"
    let rest = line.trim().strip_prefix("t*:")?;
    let (live, allocated) = rest.split_once('[').unwrap_or((rest, "0: 0]"));
    let (objects, bytes) = live.split_once(':')?;
    let (allocated_objects, allocated_bytes) = allocated.strip_suffix(']')?.split_once(':')?;
    let number = |s: &str| s.trim().parse().ok();
    Some([
        number(objects)?,
        number(bytes)?,
        number(allocated_objects)?,
        number(allocated_bytes)?,
    ])
}

impl HeapProfile {
    pub fn parse(text: &str) -> Result<HeapProfile, ParseError> {
        let (body, maps) = match text.split_once("\nMAPPED_LIBRARIES:\n") {
            Some((body, maps)) => (body, maps.to_owned()),
            None => (text, String::new()),
        };
        let mut lines = body.lines();
        let header = lines.next().ok_or_else(|| ParseError("empty".into()))?;
        let period = header
            .strip_prefix("heap_v2/")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| ParseError(format!("bad header {header:?}")))?;
        let mut stacks = Vec::new();
        let mut accumulated = false;
        let mut current: Option<Vec<u64>> = None;
        for line in lines {
            if let Some(addrs) = line.strip_prefix('@') {
                let addrs = addrs
                    .split_whitespace()
                    .map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| ParseError(format!("bad stack line {line:?}")))?;
                current = Some(addrs);
            } else if line.trim_start().starts_with("t*:") {
                let [objects, bytes, allocated_objects, allocated_bytes] =
                    counts(line).ok_or_else(|| ParseError(format!("bad count line {line:?}")))?;
                match current.take() {
                    Some(addrs) => stacks.push(Stack {
                        addrs,
                        objects,
                        bytes,
                        allocated_objects,
                        allocated_bytes,
                    }),
                    // The totals line, before the first stack.
                    None if stacks.is_empty() => accumulated = allocated_bytes > 0,
                    None => {}
                }
            }
        }
        Ok(HeapProfile {
            period,
            stacks,
            accumulated,
            maps,
        })
    }

    /// What grew since `base`: per call stack, the live objects and bytes this profile has
    /// beyond `base`'s and, with cumulative counts on both sides, what it allocated in between.
    /// Stacks that neither grew nor allocated are left out; one that shrank but allocated
    /// shows 0 live. A stack listed more than once (a dump may, and the fuzzer found it) counts
    /// once, with its figures summed, on both sides.
    pub fn growth_since(&self, base: &HeapProfile) -> HeapProfile {
        let accumulated = self.accumulated && base.accumulated;
        let before = summed_by_stack(&base.stacks);
        let now = summed_by_stack(&self.stacks);
        let mut seen = HashSet::new();
        let stacks = self
            .stacks
            .iter()
            .filter(|s| seen.insert(s.addrs.as_slice()))
            .filter_map(|s| {
                let [objects, bytes, allocated_objects, allocated_bytes] =
                    now[s.addrs.as_slice()];
                let [objects_before, bytes_before, allocated_objects_before, allocated_bytes_before] =
                    before.get(s.addrs.as_slice()).copied().unwrap_or_default();
                let grew = bytes > bytes_before;
                let (allocated_objects, allocated_bytes) = if accumulated {
                    (
                        allocated_objects.saturating_sub(allocated_objects_before),
                        allocated_bytes.saturating_sub(allocated_bytes_before),
                    )
                } else {
                    (0, 0)
                };
                (grew || allocated_bytes > 0).then(|| Stack {
                    addrs: s.addrs.clone(),
                    objects: if grew { objects.saturating_sub(objects_before) } else { 0 },
                    bytes: bytes.saturating_sub(bytes_before),
                    allocated_objects,
                    allocated_bytes,
                })
            })
            .collect();
        HeapProfile {
            period: self.period,
            stacks,
            accumulated,
            maps: self.maps.clone(),
        }
    }

    /// The profile without scope pseudo-frames (`scope_frames`), which jeprof could not name:
    /// stacks that differed only by scope are merged (counts add, saturating).
    pub fn without_scope_frames(&self) -> HeapProfile {
        let mut stacks: Vec<Stack> = Vec::with_capacity(self.stacks.len());
        let mut index: HashMap<&[u64], usize> = HashMap::new();
        for stack in &self.stacks {
            let (addrs, _scope) = super::scope_frames::split(&stack.addrs);
            match index.get(addrs) {
                Some(&i) => stacks[i].add(stack),
                None => {
                    index.insert(addrs, stacks.len());
                    stacks.push(Stack {
                        addrs: addrs.to_vec(),
                        ..stack.clone()
                    });
                }
            }
        }
        HeapProfile {
            period: self.period,
            stacks,
            accumulated: self.accumulated,
            maps: self.maps.clone(),
        }
    }

    /// The profile in jemalloc's own text format, readable by `jeprof`, without scope
    /// pseudo-frames ([`HeapProfile::without_scope_frames`]).
    pub fn to_text(&self) -> String {
        let plain = self.without_scope_frames();
        let mut total = Stack::default();
        plain.stacks.iter().for_each(|s| total.add(s));
        let mut out = format!("heap_v2/{}\n  t*: {}\n", self.period, total.counts_text());
        for stack in &plain.stacks {
            out.push('@');
            for addr in &stack.addrs {
                let _ = write!(out, " {addr:#x}");
            }
            let _ = writeln!(out, "\n  t*: {}", stack.counts_text());
        }
        out.push_str("\nMAPPED_LIBRARIES:\n");
        out.push_str(&self.maps);
        out
    }
}

impl Stack {
    /// Adds `other`'s counts (saturating).
    fn add(&mut self, other: &Stack) {
        self.objects = self.objects.saturating_add(other.objects);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.allocated_objects = self
            .allocated_objects
            .saturating_add(other.allocated_objects);
        self.allocated_bytes = self.allocated_bytes.saturating_add(other.allocated_bytes);
    }

    fn counts(&self) -> [u64; 4] {
        [
            self.objects,
            self.bytes,
            self.allocated_objects,
            self.allocated_bytes,
        ]
    }

    /// `objects: bytes [allocated objects: allocated bytes]`, as jemalloc writes them.
    fn counts_text(&self) -> String {
        format!(
            "{}: {} [{}: {}]",
            self.objects, self.bytes, self.allocated_objects, self.allocated_bytes
        )
    }
}

/// Counts per distinct call stack (saturating sums of repeated stacks).
fn summed_by_stack(stacks: &[Stack]) -> HashMap<&[u64], [u64; 4]> {
    let mut sums: HashMap<&[u64], Stack> = HashMap::with_capacity(stacks.len());
    for stack in stacks {
        sums.entry(stack.addrs.as_slice()).or_default().add(stack);
    }
    sums.into_iter().map(|(k, v)| (k, v.counts())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "heap_v2/524288\n  t*: 3: 3072 [0: 0]\n  t0: 3: 3072 [0: 0]\n\
        @ 0x10 0x20 0x30\n  t*: 2: 2048 [0: 0]\n  t0: 2: 2048 [0: 0]\n\
        @ 0x10 0x40\n  t*: 1: 1024 [0: 0]\n  t1: 1: 1024 [0: 0]\n\
        \nMAPPED_LIBRARIES:\n55d6c0000000-55d6c0100000 r-xp 00000000 fe:00 1 /bin/demo\n";

    #[test]
    fn parses_stacks_counts_and_maps() {
        let profile = HeapProfile::parse(DUMP).unwrap();
        assert_eq!(profile.period, 524288);
        assert_eq!(profile.stacks.len(), 2);
        assert_eq!(profile.stacks[0].addrs, [0x10, 0x20, 0x30]);
        assert_eq!(
            (profile.stacks[1].objects, profile.stacks[1].bytes),
            (1, 1024)
        );
        assert!(profile.maps.contains("/bin/demo"));
    }

    #[test]
    fn round_trips_through_text() {
        let profile = HeapProfile::parse(DUMP).unwrap();
        assert_eq!(HeapProfile::parse(&profile.to_text()).unwrap(), profile);
    }

    #[test]
    fn growth_keeps_only_what_grew() {
        let base = HeapProfile::parse(DUMP).unwrap();
        let mut now = base.clone();
        now.stacks[0].objects = 5;
        now.stacks[0].bytes = 5120;
        now.stacks[1].bytes = 0;
        now.stacks.push(Stack {
            addrs: vec![0x99],
            objects: 1,
            bytes: 64,
            ..Stack::default()
        });
        let growth = now.growth_since(&base);
        let got: Vec<_> = growth
            .stacks
            .iter()
            .map(|s| (s.addrs[0], s.objects, s.bytes))
            .collect();
        assert_eq!(got, [(0x10, 3, 3072), (0x99, 1, 64)]);
    }

    /// The same dump from a process with `prof_accum:true`: stack 0x10 0x40 was freed since.
    const ACCUMULATED: &str = "heap_v2/524288\n  t*: 2: 2048 [7: 7168]\n\
        @ 0x10 0x20 0x30\n  t*: 2: 2048 [4: 4096]\n\
        @ 0x10 0x40\n  t*: 0: 0 [3: 3072]\n";

    #[test]
    fn reads_cumulative_counts_when_jemalloc_keeps_them() {
        let plain = HeapProfile::parse(DUMP).unwrap();
        assert!(!plain.accumulated);
        let profile = HeapProfile::parse(ACCUMULATED).unwrap();
        assert!(profile.accumulated);
        let counts: Vec<_> = profile.stacks.iter().map(Stack::counts).collect();
        assert_eq!(counts, [[2, 2048, 4, 4096], [0, 0, 3, 3072]]);
        assert_eq!(HeapProfile::parse(&profile.to_text()).unwrap(), profile);
    }

    #[test]
    fn growth_with_cumulative_counts_includes_what_was_allocated_and_freed() {
        let base = HeapProfile::parse(ACCUMULATED).unwrap();
        let mut now = base.clone();
        // 0x10 0x20 0x30 freed one and allocated two more; 0x10 0x40 allocated and freed one.
        now.stacks[0] = Stack {
            objects: 3,
            bytes: 3072,
            allocated_objects: 6,
            allocated_bytes: 6144,
            ..now.stacks[0].clone()
        };
        now.stacks[1].allocated_objects = 4;
        now.stacks[1].allocated_bytes = 4096;
        let growth = now.growth_since(&base);
        assert!(growth.accumulated);
        let counts: Vec<_> = growth.stacks.iter().map(Stack::counts).collect();
        assert_eq!(counts, [[1, 1024, 2, 2048], [0, 0, 1, 1024]]);
        assert!(now.growth_since(&now).stacks.is_empty());
        // Against a dump without cumulative counts only live growth can be told.
        let plain = HeapProfile::parse(DUMP).unwrap();
        assert!(!now.growth_since(&plain).accumulated);
    }

    #[test]
    fn unbiasing_matches_jeprof() {
        // One 512 KiB allocation at a 512 KiB period: scale 1/(1 - e^-1) ≈ 1.582.
        let stack = Stack {
            addrs: vec![1],
            objects: 1,
            bytes: 524288,
            ..Stack::default()
        };
        let (objects, bytes) = stack.unbiased(524288);
        assert!((objects - 1.582).abs() < 0.001, "{objects}");
        assert!((bytes / 524288.0 - 1.582).abs() < 0.001);
        // Large allocations are always sampled: no scaling.
        let big = Stack {
            addrs: vec![1],
            objects: 1,
            bytes: 64 << 20,
            ..Stack::default()
        };
        assert!((big.unbiased(524288).1 - (64 << 20) as f64).abs() < 1.0);
    }

    #[test]
    fn cumulative_counts_are_unbiased_from_their_own_figures() {
        // Live: one 512 KiB block; allocated in all: four of 128 KiB (scale 1/(1 - e^-0.25)).
        let stack = Stack {
            addrs: vec![1],
            objects: 1,
            bytes: 524288,
            allocated_objects: 4,
            allocated_bytes: 524288,
        };
        let (objects, bytes) = stack.unbiased_allocated(524288);
        let scale = 1.0 / (1.0 - (-0.25f64).exp());
        assert!((objects - 4.0 * scale).abs() < 1e-9, "{objects}");
        assert!((bytes - 524288.0 * scale).abs() < 1e-6, "{bytes}");
    }

    #[test]
    fn counts_without_bytes_or_period_are_kept_as_they_are() {
        // Malformed dumps (no bytes, no period) must not scale by 1/0.
        for (objects, bytes, period) in [(5, 0, 524288), (0, 0, 524288), (3, 96, 0)] {
            let stack = Stack {
                objects,
                bytes,
                ..Stack::default()
            };
            assert_eq!(
                stack.unbiased(period),
                (objects as f64, bytes as f64),
                "{objects} objects, {bytes} bytes, period {period}"
            );
        }
    }

    #[test]
    fn scope_frames_are_dropped_and_the_stacks_they_told_apart_merged() {
        use crate::profiling::scope_frames::TAG;
        let stack = |addrs: Vec<u64>, objects, bytes| Stack {
            addrs,
            objects,
            bytes,
            ..Stack::default()
        };
        let profile = HeapProfile {
            period: 1,
            stacks: vec![
                stack(vec![0x10, 0x20, TAG | 3], 1, 100),
                stack(vec![0x10, 0x20, TAG | 4], 1, 50),
                stack(vec![0x30], 1, 7),
            ],
            accumulated: false,
            maps: String::new(),
        };
        let plain = profile.without_scope_frames();
        assert_eq!(
            plain.stacks,
            [stack(vec![0x10, 0x20], 2, 150), stack(vec![0x30], 1, 7)]
        );
        assert!(!plain.to_text().contains("5c09e"), "{}", plain.to_text());
    }

    #[test]
    fn parse_errors_say_what_was_expected() {
        let error = HeapProfile::parse("hello").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("not a jemalloc heap_v2 profile: "),
            "{error}"
        );
    }

    #[test]
    fn rejects_other_text() {
        assert!(HeapProfile::parse("hello").is_err());
        assert!(HeapProfile::parse("heap_v2/abc\n").is_err());
        assert!(HeapProfile::parse("heap_v2/8\n@ 0xZZ\n  t*: 1: 1 [0: 0]\n").is_err());
    }
}
