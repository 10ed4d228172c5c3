//! Which allocations [`crate::SampledAlloc`] samples, and what each sample stands for.
//!
//! A Poisson process over the bytes a thread allocates, with mean gap `T` (the interval): a
//! block of `s` bytes is sampled iff a point falls inside it, which happens with probability
//! `p = 1 − e^(−s/T)`, independently for each block. Weighting a sampled block by `s / p` bytes
//! and `1 / p` blocks makes every sum of weights an unbiased estimate of the true sum (TCMalloc,
//! Go's runtime and jemalloc's profiler sample the same way); the relative standard deviation
//! for a scope holding `L` bytes of small blocks is about `√(T / L)`.
//!
//! The hot path is one thread-local countdown of the bytes to the next point: subtract the
//! block's size, and only when it would reach zero take [`decide`] out of line, which draws the
//! next gap from the exponential distribution (memoryless, so restarting it at the end of the
//! sampled block keeps the process Poisson).

// Without the sampled mode (no `jemalloc` feature, or a target it does not support) only
// `sample_interval` is used; the sampler stays compiled so its unit tests run everywhere.
#![cfg_attr(not(sampled_mode), allow(dead_code))]

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

thread_local! {
    /// Bytes this thread may still allocate before the next sample; 0 before its first draw.
    static COUNTDOWN: Cell<usize> = const { Cell::new(0) };
    /// This thread's xorshift64* state; 0 until seeded.
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// The interval of the running `SampledAlloc`, 0 when none has allocated.
static INTERVAL: AtomicUsize = AtomicUsize::new(0);

/// Mixed into every thread's seed; tests set it to compare seeds.
static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);

/// Counts a block of `size` bytes against the countdown. `true`: not sampled, counted, done.
/// `false`: the countdown runs out within this block (or the thread has not drawn yet): call
/// [`decide`], which counts it.
#[inline(always)]
pub(crate) fn skip(size: usize) -> bool {
    COUNTDOWN.with(|countdown| {
        let left = countdown.get();
        if left > size {
            countdown.set(left - size);
            true
        } else {
            false
        }
    })
}

/// What a sampled block stands for: its weight in bytes and in blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Weight {
    pub(crate) bytes: u64,
    pub(crate) blocks: u32,
}

/// The slow half of [`skip`]: seeds the thread on its first call, then samples the block iff
/// the countdown runs out within it, drawing the next gap. `None`: not sampled.
#[cold]
pub(crate) fn decide(size: usize, interval: usize) -> Option<Weight> {
    // Shared flags: written once, not on every sample (no cache-line bouncing between threads).
    if INTERVAL.load(Ordering::Relaxed) != interval {
        INTERVAL.store(interval, Ordering::Relaxed);
    }
    let _ = crate::mode::record(crate::mode::Placement::Sampled);
    if COUNTDOWN.with(Cell::get) == 0 {
        COUNTDOWN.with(|c| c.set(gap(interval)));
        if skip(size) {
            return None;
        }
    }
    COUNTDOWN.with(|c| c.set(gap(interval)));
    Some(weight(size, interval))
}

/// The weight of a sampled block of `size` bytes: `s / p` bytes (rounded to the nearest byte:
/// a bias below 0.5 / T) and `1 / p` blocks (rounded stochastically, so unbiased too).
fn weight(size: usize, interval: usize) -> Weight {
    let s = size as f64;
    let p = sampling_probability(s / interval as f64);
    // Positive values: adding 0.5 (or a uniform draw) and truncating rounds without a libm
    // call (`round` and `floor` are calls on x86-64's baseline).
    Weight {
        bytes: (s / p + 0.5) as u64,
        blocks: (1.0 / p + uniform()) as u32,
    }
}

/// `1 − e^(−x)`: the chance that a block of `x` intervals holds a sample. Sampled blocks are
/// small against the interval, where seven terms of the series are exact to 1e-7 relative
/// (`x ≤ 0.5`) and cost a tenth of libm's `expm1`.
fn sampling_probability(x: f64) -> f64 {
    if x > 0.5 {
        return -(-x).exp_m1();
    }
    // x − x²/2! + x³/3! − …, in Horner form.
    x * (1.0
        - x / 2.0
            * (1.0
                - x / 3.0 * (1.0 - x / 4.0 * (1.0 - x / 5.0 * (1.0 - x / 6.0 * (1.0 - x / 7.0))))))
}

/// An exponential gap with mean `interval`, at least one byte.
fn gap(interval: usize) -> usize {
    let draw = -ln_unit(1.0 - uniform()) * interval as f64;
    (draw as usize).max(1)
}

/// `ln(u)` for `u` in `(0, 1]`, to about 1e-7: the exponent's share exactly, the mantissa's
/// `m ∈ [1, 2)` by `2·atanh((m − 1)/(m + 1))` to the 11th power (`t < 1/3`). A fifth of the
/// cost of libm's `ln`, which dominated the per-sample path.
fn ln_unit(u: f64) -> f64 {
    let bits = u.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mantissa = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    let t = (mantissa - 1.0) / (mantissa + 1.0);
    let t2 = t * t;
    let series = 2.0
        * t
        * (1.0
            + t2 * (1.0 / 3.0
                + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0 + t2 / 11.0)))));
    exponent as f64 * std::f64::consts::LN_2 + series
}

/// A uniform draw in `[0, 1)` from the thread's generator (53 random bits).
fn uniform() -> f64 {
    if RNG.with(Cell::get) == 0 {
        seed_thread();
    }
    RNG.with(|rng| {
        // xorshift64*: a few instructions, no allocation, good enough for sampling decisions.
        let mut x = rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        rng.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    })
}

fn seed_thread() {
    // Distinct per thread (the shared counter) and per run (the address of this thread's
    // state, randomised by ASLR), unless a test fixed the seed.
    let base = SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    let local = RNG.with(|rng| std::ptr::from_ref(rng) as u64);
    let seed = splitmix64(
        base ^ if FIXED_SEED.load(Ordering::Relaxed) {
            0
        } else {
            local
        },
    );
    RNG.with(|rng| rng.set(seed | 1));
}

static FIXED_SEED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The mean bytes between samples of the running [`crate::SampledAlloc`], or `None` when the
/// program tracks exactly ([`crate::TrackingAlloc`]) or tracks nothing.
pub fn sample_interval() -> Option<usize> {
    Some(INTERVAL.load(Ordering::Relaxed)).filter(|&t| t > 0)
}

/// Makes the sampling decisions of threads that start from now on depend only on `seed` (and
/// the order threads start in), for tests that compare seeds.
#[doc(hidden)]
pub fn __set_sampling_seed(seed: u64) {
    FIXED_SEED.store(true, Ordering::Relaxed);
    SEED.store(seed, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "arithmetic only, and needs 10^5 draws")]
    fn weights_are_unbiased_and_never_below_the_size() {
        for size in [1usize, 8, 100, 4096, 65536, 1 << 20] {
            let n = 20_000;
            let (mut bytes, mut blocks) = (0f64, 0f64);
            for _ in 0..n {
                let w = weight(size, 65536);
                assert!(w.bytes >= size as u64 - 1, "size {size}: {w:?}");
                bytes += w.bytes as f64;
                blocks += f64::from(w.blocks);
            }
            let p = -(-(size as f64) / 65536.0).exp_m1();
            let (mean_bytes, mean_blocks) = (bytes / n as f64, blocks / n as f64);
            assert!(
                (mean_bytes * p / size as f64 - 1.0).abs() < 0.001,
                "size {size}"
            );
            assert!(
                (mean_blocks * p - 1.0).abs() < 0.01,
                "size {size}: {mean_blocks}"
            );
        }
    }

    #[test]
    fn the_series_agree_with_libm() {
        // Every 97th point under Miri, which interprets each instruction.
        for i in (1..=10_000).step_by(if cfg!(miri) { 97 } else { 1 }) {
            let u = i as f64 / 10_000.0;
            assert!((ln_unit(u) - u.ln()).abs() < 1e-6, "ln({u})");
            let x = u * 2.0;
            let exact = -(-x).exp_m1();
            assert!(
                (sampling_probability(x) / exact - 1.0).abs() < 1e-6,
                "1-e^-{x}"
            );
        }
        assert!((ln_unit(f64::MIN_POSITIVE) - f64::MIN_POSITIVE.ln()).abs() < 1e-6);
    }

    #[test]
    #[cfg_attr(miri, ignore = "arithmetic only, and needs 10^5 draws")]
    fn gaps_average_the_interval() {
        let n = 200_000;
        let total: usize = (0..n).map(|_| gap(4096)).sum();
        let mean = total as f64 / n as f64;
        assert!((mean / 4096.0 - 1.0).abs() < 0.01, "mean gap {mean}");
    }
}
