#!/usr/bin/env bash
# Soak run: churn against one node with Redis on loopback (sessions, papers
# opened and abandoned, note create/delete, never-reading and slow readers,
# /papers reads, ping floods), sampling the server's RSS, descriptors, papers in
# memory and Redis's used_memory every second. Fails if any still grows over the
# last half of the run (see `soak` in tests/bounds.rs for the slope allowed).
#   scripts/soak.sh [--duration SECONDS]   (default 180)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=180
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --duration=*) duration="${1#*=}"; shift ;;
    *) echo "soak.sh: unknown argument $1 (use --duration SECONDS)" >&2; exit 2 ;;
  esac
done
command -v redis-server >/dev/null 2>&1 || { echo "soak.sh: redis-server is missing (scripts/test.sh installs it)" >&2; exit 1; }
echo "soak.sh: ${duration} s of churn"
RP_SOAK_SECONDS="$duration" cargo test --features load --test main bounds::soak -- --ignored --exact --nocapture
