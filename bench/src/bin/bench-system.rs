//! The workloads under `std::alloc::System` (glibc malloc).
#[global_allocator]
static GLOBAL: std::alloc::System = std::alloc::System;

fn main() {
    alloc_bench::main::<()>(alloc_bench::Variant {
        name: "system",
        enter: None,
        jemalloc_stats: false,
    });
}
