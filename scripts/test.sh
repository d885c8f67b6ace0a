#!/usr/bin/env bash
# The whole test suite, as the README gives it and CI runs it: installs the system packages
# (fuse3, fuse-overlayfs, attr, kmod), runs `cargo test --release` (release so that the mounted
# tests are fast), then a smoke run of the benchmark when benches/run.sh exists.
#
# Needs root (mounting kernel overlayfs and FUSE for other users) and /dev/fuse.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() {
    printf '\n==== %s ====\n' "$*"
}

section "System packages"
bash scripts/install-deps.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: error: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: warning: not root; mounted tests need root and will fail or be skipped" >&2
fi

section "Tests: cargo test --release"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One total over all test binaries (cargo prints one `test result:` line per binary, the last of
# them often the doc-tests' "0 passed"), printed again as the script's last line so that the
# closing line of a CI log counts every test.
summary=$(awk '/^test result:/ {
        for (i = 2; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/)  p += $(i - 1)
            if ($(i) ~ /^failed;?$/)  f += $(i - 1)
            if ($(i) ~ /^ignored;?$/) s += $(i - 1)
        }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log")
printf '\n%s\n' "$summary"

if [ "$status" -ne 0 ]; then
    echo "test.sh: cargo test failed (exit $status)" >&2
    exit "$status"
fi

if [ -x benches/run.sh ]; then
    section "Benchmark smoke run: benches/run.sh --smoke"
    benches/run.sh --smoke
    printf '\n%s\n' "$summary"
fi
