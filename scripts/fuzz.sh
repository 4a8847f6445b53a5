#!/usr/bin/env bash
# Runs each fuzz target (tests/fuzz) for a bounded time: FUZZ_SECONDS each,
# default 60. Installs cargo-fuzz if missing. libFuzzer needs a nightly compiler
# feature; RUSTC_BOOTSTRAP lets the stable toolchain provide it for this build.
# A crash leaves its input under tests/fuzz/artifacts/<target>/: fix the bug and
# keep the input as a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in upgrade_request client_msg; do
    echo "fuzz.sh: $target for ${seconds}s"
    cargo fuzz run --fuzz-dir tests/fuzz "$target" -- -max_total_time="$seconds" -max_len=9000 -timeout=10
done
echo "fuzz.sh: every target ran clean for ${seconds}s"
