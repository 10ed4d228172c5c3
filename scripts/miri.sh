#!/usr/bin/env bash
# Runs tracking-alloc's tests that can run under Miri (nightly): the ones over `System` (Miri
# cannot execute jemalloc's C), scaled down (`under_miri` in tests/common), with Tree Borrows
# and strict provenance. Tree Borrows, not Stacked Borrows: the tracker reads its tag after
# the program's bytes and frees the padded request through the pointer the program returns,
# which Stacked Borrows forbids for any allocator that pads (see the crate's *Safety* docs).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
rustup +nightly component add miri rust-src >/dev/null 2>&1
export MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-strict-provenance"
run() { cargo +nightly miri test -q -p tracking-alloc --no-default-features --features tracing "$@"; }
run --lib
run --test null_inner
run --test system -- cross_thread nested realloc same_name one_spare_byte
run --test tracing_layer -- out_of_order local_set
