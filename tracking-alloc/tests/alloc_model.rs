//! The allocator against a model (see `model/mod.rs`): replays the cargo-fuzz corpus
//! (`fuzz/corpus/alloc_model`, every input the fuzzer kept or crashed on) and a few hundred
//! pseudo-random operation sequences, on the stable toolchain.

mod model;

#[cfg(not(target_env = "musl"))]
#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<tikv_jemallocator::Jemalloc> =
    tracking_alloc::TrackingAlloc::new(tikv_jemallocator::Jemalloc);

#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: tracking_alloc::TrackingAlloc<std::alloc::System> =
    tracking_alloc::TrackingAlloc::new(std::alloc::System);

#[test]
fn the_fuzz_corpus_agrees_with_the_model() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/alloc_model");
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| model::run(&data));
        assert!(
            outcome.is_ok(),
            "{} disagrees with the model",
            path.display()
        );
        inputs += 1;
    }
    assert!(inputs >= 4, "the alloc_model corpus has {inputs} inputs");
}

#[test]
fn random_sequences_agree_with_the_model() {
    // xorshift64*: reproducible without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..200 {
        let data: Vec<u8> = (0..6 * 300).map(|_| next() as u8).collect();
        model::run(&data);
    }
}
