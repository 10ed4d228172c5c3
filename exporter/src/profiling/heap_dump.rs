//! jemalloc's `heap_v2` profile text: parsing, subtracting one profile from another, and
//! writing it back (so a diff can still be read by `jeprof`).
//!
//! ```text
//! heap_v2/524288                        <- sampling period: 2^lg_prof_sample bytes
//!   t*: 28106: 56637512 [0: 0]          <- totals: objects: bytes
//! @ 0x55d6c0d1a2b3 0x55d6c0d19f00 ...   <- a call stack, innermost first
//!   t*: 13: 6688 [0: 0]                 <- sampled live objects and bytes from that stack
//!   t0: 13: 6688 [0: 0]                 <- per thread (ignored)
//! MAPPED_LIBRARIES:
//! <the process's /proc/self/maps>
//! ```
//!
//! Counts are *sampled*: an allocation is recorded with probability ~size/period. Renderers
//! unbias them ([`Stack::unbiased`]) the way jeprof does.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// One call stack and its sampled live objects and bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    /// Return addresses, innermost (the allocation) first.
    pub addrs: Vec<u64>,
    pub objects: u64,
    pub bytes: u64,
}

impl Stack {
    /// Estimated real objects and bytes, unbiased for sampling as jeprof's `AdjustSamples` does:
    /// an allocation of average size `s` is sampled with probability `1 - e^(-s/period)`.
    pub fn unbiased(&self, period: u64) -> (f64, f64) {
        // No bytes (a malformed dump: the fuzzer found one) would scale by 1/0.
        if self.objects == 0 || self.bytes == 0 || period == 0 {
            return (self.objects as f64, self.bytes as f64);
        }
        let average = self.bytes as f64 / self.objects as f64;
        // 1 - e^-x, accurate (and non-zero) for the tiny x of small blocks and long periods.
        let scale = 1.0 / -(-average / period as f64).exp_m1();
        (self.objects as f64 * scale, self.bytes as f64 * scale)
    }
}

/// A parsed heap profile.
#[derive(Debug, Clone, PartialEq)]
pub struct HeapProfile {
    /// Average bytes between samples.
    pub period: u64,
    pub stacks: Vec<Stack>,
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

fn counts(line: &str) -> Option<(u64, u64)> {
    // "t*: 13: 6688 [0: 0]"
    let rest = line.trim().strip_prefix("t*:")?;
    let mut parts = rest.split([':', '[']).map(str::trim);
    let objects = parts.next()?.parse().ok()?;
    let bytes = parts.next()?.parse().ok()?;
    Some((objects, bytes))
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
                let (objects, bytes) =
                    counts(line).ok_or_else(|| ParseError(format!("bad count line {line:?}")))?;
                if let Some(addrs) = current.take() {
                    stacks.push(Stack {
                        addrs,
                        objects,
                        bytes,
                    });
                }
            }
        }
        Ok(HeapProfile {
            period,
            stacks,
            maps,
        })
    }

    /// What grew since `base`: per call stack, the objects and bytes this profile has beyond
    /// `base`'s. Stacks that shrank or vanished are left out. A stack listed more than once (a
    /// dump may, and the fuzzer found it) counts once, with its figures summed, on both sides.
    pub fn growth_since(&self, base: &HeapProfile) -> HeapProfile {
        let before = summed_by_stack(&base.stacks);
        let now = summed_by_stack(&self.stacks);
        let mut seen = HashSet::new();
        let stacks = self
            .stacks
            .iter()
            .filter(|s| seen.insert(s.addrs.as_slice()))
            .filter_map(|s| {
                let (objects, bytes) = now[s.addrs.as_slice()];
                let (objects_before, bytes_before) =
                    before.get(s.addrs.as_slice()).copied().unwrap_or((0, 0));
                (bytes > bytes_before).then(|| Stack {
                    addrs: s.addrs.clone(),
                    objects: objects.saturating_sub(objects_before),
                    bytes: bytes - bytes_before,
                })
            })
            .collect();
        HeapProfile {
            period: self.period,
            stacks,
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
                Some(&i) => {
                    stacks[i].objects = stacks[i].objects.saturating_add(stack.objects);
                    stacks[i].bytes = stacks[i].bytes.saturating_add(stack.bytes);
                }
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
            maps: self.maps.clone(),
        }
    }

    /// The profile in jemalloc's own text format, readable by `jeprof`, without scope
    /// pseudo-frames ([`HeapProfile::without_scope_frames`]).
    pub fn to_text(&self) -> String {
        let plain = self.without_scope_frames();
        let (objects, bytes) = plain.stacks.iter().fold((0u64, 0u64), |(o, b), s| {
            (o.saturating_add(s.objects), b.saturating_add(s.bytes))
        });
        let mut out = format!("heap_v2/{}\n  t*: {objects}: {bytes} [0: 0]\n", self.period);
        for stack in &plain.stacks {
            out.push('@');
            for addr in &stack.addrs {
                let _ = write!(out, " {addr:#x}");
            }
            let _ = writeln!(out, "\n  t*: {}: {} [0: 0]", stack.objects, stack.bytes);
        }
        out.push_str("\nMAPPED_LIBRARIES:\n");
        out.push_str(&self.maps);
        out
    }
}

/// Objects and bytes per distinct call stack (saturating sums of repeated stacks).
fn summed_by_stack(stacks: &[Stack]) -> HashMap<&[u64], (u64, u64)> {
    let mut sums: HashMap<&[u64], (u64, u64)> = HashMap::with_capacity(stacks.len());
    for stack in stacks {
        let sum = sums.entry(stack.addrs.as_slice()).or_default();
        *sum = (
            sum.0.saturating_add(stack.objects),
            sum.1.saturating_add(stack.bytes),
        );
    }
    sums
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
        });
        let growth = now.growth_since(&base);
        let got: Vec<_> = growth
            .stacks
            .iter()
            .map(|s| (s.addrs[0], s.objects, s.bytes))
            .collect();
        assert_eq!(got, [(0x10, 3, 3072), (0x99, 1, 64)]);
    }

    #[test]
    fn unbiasing_matches_jeprof() {
        // One 512 KiB allocation at a 512 KiB period: scale 1/(1 - e^-1) ≈ 1.582.
        let stack = Stack {
            addrs: vec![1],
            objects: 1,
            bytes: 524288,
        };
        let (objects, bytes) = stack.unbiased(524288);
        assert!((objects - 1.582).abs() < 0.001, "{objects}");
        assert!((bytes / 524288.0 - 1.582).abs() < 0.001);
        // Large allocations are always sampled: no scaling.
        let big = Stack {
            addrs: vec![1],
            objects: 1,
            bytes: 64 << 20,
        };
        assert!((big.unbiased(524288).1 - (64 << 20) as f64).abs() < 1.0);
    }

    #[test]
    fn rejects_other_text() {
        assert!(HeapProfile::parse("hello").is_err());
        assert!(HeapProfile::parse("heap_v2/abc\n").is_err());
        assert!(HeapProfile::parse("heap_v2/8\n@ 0xZZ\n  t*: 1: 1 [0: 0]\n").is_err());
    }
}
