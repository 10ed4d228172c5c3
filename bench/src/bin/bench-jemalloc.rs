//! The workloads under bare `tikv_jemallocator::Jemalloc`: the baseline every ratio divides by.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    alloc_bench::main::<()>(alloc_bench::Variant {
        name: "jemalloc",
        enter: None,
        jemalloc_stats: true,
    });
}
