//! The size-class model behind inline tags and the side table, checked against jemalloc itself:
//! if a jemalloc upgrade changed its classes, the side table's slot indices could collide.
use tikv_jemalloc_sys::{nallocx, MALLOCX_ALIGN};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[test]
fn model_matches_nallocx() {
    let model = tracking_alloc::__size_class_model;
    for size in 1..=20_000usize {
        // SAFETY: nallocx only computes a size class.
        let real = unsafe { nallocx(size, 0) };
        assert_eq!(
            model(size, 1),
            Some(real).filter(|&c| c <= 4096),
            "size {size}"
        );
        for lg_align in 0..=12 {
            let align = 1usize << lg_align;
            // SAFETY: as above.
            let real = unsafe { nallocx(size, MALLOCX_ALIGN(align)) };
            if let Some(class) = model(size, align) {
                assert_eq!(class, real, "size {size} align {align}");
            } else {
                assert!(real >= 4096, "size {size} align {align}: {real}");
            }
        }
    }
}
