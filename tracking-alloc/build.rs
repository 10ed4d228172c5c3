//! Sets `cfg(jemalloc_layout)` when the `jemalloc` feature is on and the target is one whose
//! jemalloc size classes `size_class.rs` models (16-byte quantum: x86_64 and aarch64), so the
//! hot path names that condition once instead of repeating it; and `cfg(sampled_mode)` where,
//! in addition, the sampled mode's reserved address range can be mapped (unix).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(jemalloc_layout)");
    println!("cargo::rustc-check-cfg=cfg(sampled_mode)");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let feature = std::env::var_os("CARGO_FEATURE_JEMALLOC").is_some();
    if feature && matches!(arch.as_str(), "x86_64" | "aarch64") {
        println!("cargo::rustc-cfg=jemalloc_layout");
        let family = std::env::var("CARGO_CFG_TARGET_FAMILY").unwrap_or_default();
        if family.split(',').any(|f| f == "unix") {
            println!("cargo::rustc-cfg=sampled_mode");
        }
    }
}
