#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for a bounded time on the nightly toolchain.
#
#   scripts/fuzz.sh            60 s per target; what the test command runs. New inputs go to a
#                              scratch directory; the committed corpus (fuzz/corpus/<target>) is
#                              read as seeds and left untouched.
#   scripts/fuzz.sh --grow 3600
#                              an hour per target, growing fuzz/corpus/<target> in place, then
#                              minimised (`cargo fuzz cmin`): commit what it adds, and the
#                              stable tests replay it from then on.
#
# A crash fails the run; libFuzzer prints the input, saved under fuzz/artifacts/<target>/, and
# `cargo +nightly fuzz run <target> <that file>` replays it. Installs cargo-fuzz and the
# nightly toolchain when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

grow=false
if [ "${1:-}" = "--grow" ]; then
    grow=true
    shift
fi
seconds=${1:-60}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O # every target, once
status=0
for target in $targets; do
    seeds=fuzz/corpus/$target
    mkdir -p "$seeds"
    if $grow; then
        corpus=("$seeds")
    else
        scratch=$(mktemp -d)
        corpus=("$scratch" "$seeds")
    fi
    started=$SECONDS
    if cargo +nightly fuzz run -O "$target" "${corpus[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>"fuzz/$target.log"; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "fuzz/$target.log")
        echo "$target: ${runs:-?} inputs in $((SECONDS - started)) s, no failure"
    else
        status=1
        echo "$target: FAILED after $((SECONDS - started)) s"
        grep -E 'panicked|ERROR|Test unit written' "fuzz/$target.log" | head -20
    fi
    if $grow; then
        cargo +nightly fuzz cmin -O "$target" >/dev/null 2>&1 || true
    else
        rm -rf "$scratch"
    fi
done
exit $status
