#!/usr/bin/env bash
# Runs every test of the workspace: formatting and lints, unit and integration tests,
# end-to-end tests against real Prometheus / promtool / go tool pprof / jeprof, valgrind
# memcheck on the allocator stress tests, and config validation (promtool, docker-compose).
# Installs the Debian packages the tests need when they are missing (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
failures=()

step() {
    local name=$1
    shift
    echo
    echo "=== $name"
    local started=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "--- ok: $name ($((SECONDS - started)) s)"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "--- FAILED: $name ($((SECONDS - started)) s)"
    fi
}

install_tools() {
    # command → Debian package
    local -A needs=(
        [prometheus]=prometheus [promtool]=prometheus [go]=golang-go
        [jeprof]=libjemalloc-dev [docker-compose]=docker-compose [valgrind]=valgrind
        [amtool]=prometheus-alertmanager [prometheus-alertmanager]=prometheus-alertmanager
        [chromium]=chromium [chromedriver]=chromium-driver
    )
    local missing=()
    for tool in "${!needs[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("${needs[$tool]}")
    done
    # Go's own pprof parser (what Parca and Alloy call), built GOPATH-style by the tests;
    # venv for deploy/'s validator (kubernetes-validate from PyPI); PyYAML for the generators.
    [ -d /usr/share/gocode/src/github.com/google/pprof/profile ] ||
        missing+=(golang-github-google-pprof-dev)
    python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
    python3 -c "import yaml" 2>/dev/null || missing+=(python3-yaml)
    # The console's browser test runs on Debian's python3 with its Selenium package.
    /usr/bin/python3 -c "import selenium" 2>/dev/null || missing+=(python3-selenium)
    [ ${#missing[@]} -eq 0 ] && return 0
    local packages
    packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
    echo "installing Debian packages: $packages"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null
}

test_executables() {
    # The test binaries of tracking-alloc's stress tests, as cargo built them; fails (and so
    # fails the step) when they do not build.
    local json
    json=$(cargo test -p tracking-alloc --all-features --test system --test jemalloc --no-run \
        --message-format=json 2>/dev/null) || return 1
    grep -o '"executable":"[^"]*"' <<<"$json" | sed 's/"executable":"\(.*\)"/\1/'
}

memcheck() {
    local ok=0 binaries
    binaries=$(test_executables) || { echo "the stress tests do not build"; return 1; }
    [ "$(wc -w <<<"$binaries")" -eq 2 ] || { echo "expected 2 test binaries, got: $binaries"; return 1; }
    for binary in $binaries; do
        echo "valgrind memcheck: $binary"
        valgrind --quiet --error-exitcode=99 --leak-check=no "$binary" --test-threads=2 || ok=1
    done
    return $ok
}

config_checks() {
    local ok=0
    if [ -f prometheus.yml ]; then
        promtool check config prometheus.yml || ok=1
    fi
    if compgen -G "alerts/*.rules.yml" >/dev/null; then
        python3 alerts/generate_rules.py --check || ok=1
        python3 alerts/generate_tests.py --check || ok=1
        python3 grafana/generate.py --check || ok=1
        promtool check rules alerts/*.rules.yml || ok=1
        promtool test rules alerts/*.test.yml || ok=1
    fi
    if [ -f alerts/alertmanager.yml ]; then
        amtool check-config alerts/alertmanager.yml || ok=1
    fi
    if [ -f docker-compose.yml ]; then
        docker-compose -f docker-compose.yml config --quiet || ok=1
    fi
    return $ok
}

export CI="${CI:-}"
install_tools
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets --all-features -- -D warnings
step "cargo doc -D warnings" env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features
step "cargo test (unit, integration, end-to-end)" cargo test --workspace --all-features
# Without the `jemalloc` feature the tracker appends its tag to every request (any allocator);
# the exporter's optional integrations (axum, metrics) must not be needed to build it.
no_default_features() {
    cargo clippy -p tracking-alloc --no-default-features --all-targets -- -D warnings &&
        cargo test -p tracking-alloc --no-default-features &&
        cargo clippy -p exporter --all-targets -- -D warnings
}
step "tracking-alloc without default features, exporter without optional ones" no_default_features
# The crates accept tikv-jemallocator >=0.6.1, <0.8 (one jemalloc per program): besides the
# workspace's 0.7, test them against 0.6 in a scratch copy whose lock file is moved there.
jemalloc_0_6() {
    local root=$PWD scratch status=0
    scratch=$(mktemp -d)
    git ls-files --cached --others --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$scratch"
    sed -i 's/version = ">=0.6.1, <0.8"/version = "~0.6.1"/' "$scratch/Cargo.toml"
    (
        cd "$scratch" &&
            cargo update -q -p tikv-jemallocator -p tikv-jemalloc-ctl -p tikv-jemalloc-sys &&
            grep -A1 '^name = "tikv-jemallocator"$' Cargo.lock | grep -q '^version = "0\.6\.' &&
            CARGO_TARGET_DIR="$root/target/jemalloc-0.6" cargo test -p tracking-alloc -p exporter \
                --all-features --lib --test scrape --test sampled --test jemalloc
    ) || status=$?
    rm -rf "$scratch"
    return $status
}
step "tracking-alloc and exporter on tikv-jemallocator 0.6" jemalloc_0_6
# The declared rust-versions, tested: tracking-alloc's (the workspace's) on glibc and on musl
# (System allocator, no C toolchain: std there once aborted on the tracker's thread-exit hook),
# and the exporter's, whose dependencies need a newer one.
msrv() {
    local core exporter
    core=$(sed -n 's/^rust-version = "\([0-9.]*\)".*/\1/p' Cargo.toml)
    exporter=$(sed -n 's/^rust-version = "\([0-9.]*\)".*/\1/p' exporter/Cargo.toml)
    echo "tracking-alloc: Rust $core (glibc, musl); exporter: Rust $exporter"
    rustup toolchain install "$core" --profile minimal --target x86_64-unknown-linux-musl &&
        rustup toolchain install "$exporter" --profile minimal &&
        cargo +"$core" test -p tracking-alloc --no-default-features --features tracing \
            --target x86_64-unknown-linux-musl --test system --test thread_spawn --test overflow \
            --test null_inner --test foreign_jemalloc --test fork --test alloc_model &&
        cargo +"$core" test -p tracking-alloc --all-features --test system --test thread_spawn \
            --test jemalloc --test sampled --test tracing_layer --test fork --test overhead &&
        cargo +"$exporter" check -p exporter --all-features --all-targets
}
step "MSRV and musl" msrv
step "valgrind memcheck on the allocator stress tests" memcheck
# Nightly-only checks of the allocator: Miri (Tree Borrows, strict provenance) over the tests
# that run on `System`; AddressSanitizer over the stress and model tests (System and
# jemalloc inners: with System, ASan sees every byte the tracker appends); libFuzzer on every
# fuzz target for a bounded time (`scripts/fuzz.sh --grow` for long runs). The fork test is
# left out of the ASan run for now (TESTING.md, "Open").
step "Miri on the allocator" scripts/miri.sh
asan() {
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=0 RUSTFLAGS="-Zsanitizer=address" \
        CARGO_TARGET_DIR=target/asan cargo +nightly test -p tracking-alloc \
        --target x86_64-unknown-linux-gnu --features tracing --test system --test jemalloc \
        --test sampled --test thread_spawn --test null_inner --test alloc_model
}
step "AddressSanitizer on the allocator tests" asan
step "bounded fuzzing (30 s per target)" scripts/fuzz.sh 30
step "promtool and docker-compose config checks" config_checks
# deploy/: Kubernetes manifests against the API schemas (kubernetes-validate, strict), the
# operator's objects and the Parca/Alloy configurations structurally, the demo run with the
# Deployment's arguments.
deploy_checks() {
    local venv=target/venv
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -c "import kubernetes_validate" 2>/dev/null ||
        "$venv/bin/pip" install --quiet "kubernetes-validate==1.37.0" "PyYAML>=6" || return 1
    cargo build --release -p exporter --example demo &&
        "$venv/bin/python" deploy/validate.py target/release/examples/demo
}
step "deploy/ manifests and configurations" deploy_checks
# Every dashboard query on a backfilled synthetic fleet (20 instances x 32 scopes x 7.5 h): fails
# if one reads more than 6 samples per series and step (BENCHMARKS.md has a larger fleet).
step "dashboard query cost on a synthetic fleet" python3 grafana/query_cost.py
# The memory console in headless Chromium (Selenium): every view against the demo, the token
# prompt, 1,024 scopes; fails on any JavaScript error; screenshots in target/console/.
console_test() {
    cargo build --release -p exporter --example demo &&
        /usr/bin/python3 exporter/tests/browser/console_test.py target/release/examples/demo target/console
}
step "memory console in headless Chromium" console_test
step "README snippets compile in a fresh edition-2024 crate" python3 scripts/readme_snippets.py
bench_smoke() {
    cargo bench -p alloc-bench --benches -- --test &&
        cargo build --release -p alloc-bench --bins &&
        target/release/compare --quick >/dev/null
}
step "benchmarks execute (smoke run, no timing)" bench_smoke

echo
if [ "$failed" -gt 0 ]; then
    printf 'failed step: %s\n' "${failures[@]}"
fi
echo "steps: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
