#!/usr/bin/env bash
# Runs every test of rollingpaper: formatting, lints, unit and integration tests.
# Installs what the tests need (redis-server, from Debian's packages) when it is
# missing. The tests start their own redis-server processes on free loopback
# ports with their own data directories; nothing else on the machine is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# redis-cli creates the Redis Cluster of tests/redis_cluster.rs; openssl makes its TLS certificates.
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
install_packages "${missing[@]}"
# The JavaScript steps need Node 20 or later; Debian 12's own nodejs is 18.
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
    echo "test.sh: node $(node --version 2>/dev/null) is older than 20: the JavaScript steps will fail; install Node 20 or later" >&2
fi
command -v cargo >/dev/null 2>&1 || { echo "test.sh: cargo is missing; install Rust from https://rustup.rs" >&2; exit 1; }

# Every step runs, even after one failed, so that one red step does not hide
# another; the failures are listed at the end and the script exits 1.
failed=()
step() {
    local name=$1
    shift
    echo "test.sh: $name"
    if ! "$@"; then
        echo "test.sh: FAILED: $name" >&2
        failed+=("$name")
    fi
}

# The backend API's OpenAPI document (served at /api/openapi.json): valid 3.1, and PROTOCOL.md 7's routes.
step "the OpenAPI document (openapi-spec-validator)" bash scripts/openapi-test.sh
step "cargo fmt --check" cargo fmt --all -- --check
step "the docs' links resolve, and docs/PROTOCOL.md is the shared contract" bash scripts/doc-check.sh
# `--features load` builds the load generator, which tests/load.rs and
# tests/operators.rs run; the server itself never links its dependencies.
step "cargo clippy" cargo clippy --all-targets --features load --quiet -- -D warnings
step "cargo test" cargo test --all-targets --features load
# cargo test ran 45 s of the chaos test on one Redis; the same checks on a Cluster with replicas.
step "30 s of the chaos test on a Redis Cluster of three masters with a replica each" \
    env RP_CHAOS_REDIS=cluster RP_CHAOS_SECONDS=30 cargo test --features load --test main chaos:: -- --nocapture
# The checker must be able to fail: a build that loses 1 in 100 saved writes on
# purpose (the fault-lose-writes feature, in a target directory of its own so
# that no other step runs that binary) has to be caught.
step "the chaos checker catches a server that loses 1 in 100 saved writes" \
    env CARGO_TARGET_DIR=target/fault-lose-writes \
    cargo test --features load,fault-lose-writes --test main chaos::the_checker_catches_lost_writes -- --nocapture
step "the systemd unit's hardening" bash scripts/unit-test.sh
step "a 30-second soak run (memory, descriptors, papers and Redis stay flat)" bash scripts/soak.sh --duration 30
step "third-party clients (Python websockets, Node ws)" bash scripts/interop.sh
step "the page's JavaScript client under Node" bash scripts/client-test.sh
step "wss:// through nginx to two nodes" bash scripts/tls-test.sh
step "the page in a real browser (Chromium)" bash scripts/browser-test.sh

if ((${#failed[@]})); then
    echo "test.sh: ${#failed[@]} step(s) failed:" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "test.sh: every step passed"
