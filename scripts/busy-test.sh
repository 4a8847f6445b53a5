#!/usr/bin/env bash
# The test suite on a busy machine: one CPU hog per core (a shell busy loop,
# started here and stopped on exit), then `cargo test --all-targets --features
# load` RUNS times in a row (default 3). Every run must pass: a test that
# depends on timing or on an order nobody promises shows here.
#   scripts/busy-test.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
[[ $runs =~ ^[0-9]+$ ]] && ((runs >= 1)) || { echo "busy-test.sh: RUNS must be a positive number, not '$runs'" >&2; exit 2; }
cargo build --all-targets --features load --quiet
hogs=()
stop_hogs() {
    ((${#hogs[@]})) && kill "${hogs[@]}" 2>/dev/null || true
}
trap stop_hogs EXIT
for _ in $(seq "$(nproc)"); do
    bash -c 'while :; do :; done' &
    hogs+=($!)
done
echo "busy-test.sh: ${#hogs[@]} CPU hogs running; $runs runs of the suite"
failed=0
for run in $(seq "$runs"); do
    started=$(date +%s)
    if cargo test --all-targets --features load >"${TMPDIR:-/tmp}/busy-test-$run.log" 2>&1; then
        echo "busy-test.sh: run $run passed in $(($(date +%s) - started)) s"
    else
        failed=$((failed + 1))
        echo "busy-test.sh: run $run FAILED in $(($(date +%s) - started)) s:" >&2
        grep -E '^test .* FAILED|panicked at' "${TMPDIR:-/tmp}/busy-test-$run.log" | head -20 >&2 || true
    fi
done
echo "busy-test.sh: $((runs - failed)) of $runs runs passed"
((failed == 0))
