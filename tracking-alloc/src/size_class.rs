//! jemalloc's size classes, computed in Rust so the hot path never calls `nallocx`.
//!
//! jemalloc rounds every request up to a size class: 8, then multiples of 16 up to 128, then four
//! classes per doubling (160, 192, 224, 256, 320, …). The rounding is fixed at jemalloc's build time
//! by its quantum (16 bytes on x86_64 and aarch64) and does not depend on the page size for the
//! classes below 4 KiB that this module tabulates. `tests/jemalloc_layout.rs` checks the model
//! against jemalloc's own `nallocx` for every size and alignment the allocator uses it for.

/// Sizes up to this are looked up in a table; larger blocks never carry an inline tag.
pub(crate) const SMALL_MAX: usize = 4096;

/// The alignment every jemalloc size class of 16 bytes or more honours without extra padding.
pub(crate) const QUANTUM: usize = 16;

/// The size class jemalloc serves a request of `size` bytes (alignment ≤ [`QUANTUM`]) from.
pub(crate) const fn class_of(size: usize) -> usize {
    if size <= 8 {
        8
    } else if size <= 128 {
        (size + 15) & !15
    } else {
        // Four classes per doubling: the spacing is a quarter of the power of two below `size`.
        let lg = usize::BITS - 1 - (size - 1).leading_zeros();
        let delta = 1usize << (lg - 2);
        (size + delta - 1) & !(delta - 1)
    }
}

/// `CLASS_BY_8[(size + 7) / 8]` is `class_of(size)` for `size <= SMALL_MAX`: one load, no branches.
static CLASS_BY_8: [u16; SMALL_MAX / 8 + 1] = {
    let mut table = [0u16; SMALL_MAX / 8 + 1];
    let mut i = 0;
    while i < table.len() {
        // Every class is a multiple of 8, so sizes that round up to the same multiple of 8 share it.
        table[i] = class_of(if i == 0 { 1 } else { i * 8 }) as u16;
        i += 1;
    }
    table
};

/// The size class of a small request. `size` must be at most [`SMALL_MAX`]; a larger one yields
/// `SMALL_MAX + 1`, which callers treat as "not small" (this never panics).
#[inline(always)]
pub(crate) fn small_class(size: usize) -> usize {
    match CLASS_BY_8.get((size + 7) >> 3) {
        Some(&class) => class as usize,
        None => SMALL_MAX + 1,
    }
}

/// The size class of a small request with ordinary alignment (`size <= SMALL_MAX`,
/// `align <= QUANTUM`): jemalloc rounds `size` up to `align` first, and since every class of
/// 16 bytes or more is a multiple of 16, that is the class of the larger of the two.
#[inline(always)]
pub(crate) fn small_class_aligned(size: usize, align: usize) -> usize {
    small_class(size.max(align))
}

/// The size class of an aligned request, as jemalloc's `sz_sa2u` computes it, for requests whose
/// rounded size is at most [`SMALL_MAX`]; `None` for anything larger (page-sized or more).
#[inline]
pub(crate) fn aligned_class(size: usize, align: usize) -> Option<usize> {
    if align > SMALL_MAX {
        return None;
    }
    let rounded = size.checked_add(align - 1)? & !(align - 1);
    (rounded <= SMALL_MAX).then(|| small_class(rounded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_jemalloc_spacing() {
        let expected = [
            (1, 8),
            (8, 8),
            (9, 16),
            (17, 32),
            (33, 48),
            (128, 128),
            (129, 160),
            (256, 256),
            (257, 320),
            (1025, 1280),
            (4096, 4096),
            (4097, 5120),
            (16385, 20480),
        ];
        for (size, class) in expected {
            assert_eq!(class_of(size), class, "size {size}");
        }
    }

    #[test]
    fn table_matches_formula() {
        for size in 1..=SMALL_MAX {
            assert_eq!(small_class(size), class_of(size), "size {size}");
        }
        assert_eq!(small_class(SMALL_MAX + 1), SMALL_MAX + 1);
    }

    #[test]
    fn aligned_classes_are_multiples_of_the_alignment() {
        for align in [32, 64, 128, 256, 1024, 4096] {
            for size in 1..=SMALL_MAX {
                if let Some(class) = aligned_class(size, align) {
                    assert_eq!(class % align, 0, "size {size} align {align}");
                    assert!(class >= size);
                }
            }
        }
    }
}
