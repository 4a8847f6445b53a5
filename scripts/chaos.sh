#!/usr/bin/env bash
# Runs the chaos test (tests/chaos.rs) for longer than `cargo test` does: two
# clustered nodes under random faults (nodes and Redis killed, Redis paused, its
# connections dropped, a paper's key broken, corrupt values, a hostile client;
# on one Redis, a node cut from Redis, a slow or half-open link through a fault
# proxy; on a Redis Cluster with replicas, masters failed over), with backend
# API writes and erases (PROTOCOL.md 7) among the clients, then checks that
# every edit confirmed as saved, and every API write answered 200, is in Redis
# (read back at once and at the end), that no bystander paper was refused
# `unavailable`, that an erased paper stays erased (no key but its marker, its
# sessions closed with 4410, its joins answered 410), and that nodes, clients,
# stream entries and Redis agree. A failure prints its seed: run again
# with --seed to replay the same choices (timing still varies).
#
#   scripts/chaos.sh [--seed N] [--duration SECONDS] [--faults 0,2,5] [--redis single|cluster]
#
# --duration defaults to 600 seconds of faults; --faults limits the fault kinds
# to those numbered (see FAULTS in tests/chaos.rs). --redis cluster runs it on a
# Redis Cluster of three masters with a replica each (RP_CHAOS_REDIS=cluster):
# each Redis fault hits one shard. Needs redis-server (and redis-cli for a Cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

duration=600
seed=""
faults=""
redis="${RP_CHAOS_REDIS:-single}"
while (($#)); do
    case "$1" in
        --seed) seed="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --faults) faults="$2"; shift 2 ;;
        --redis) redis="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "chaos.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$redis" in
    single|cluster) ;;
    *) echo "chaos.sh: --redis is single or cluster, not $redis" >&2; exit 2 ;;
esac

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# redis-cli creates the Redis Cluster.
[ "$redis" != cluster ] || command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
install_packages "${missing[@]}"
command -v cargo >/dev/null 2>&1 || { echo "chaos.sh: cargo is missing; install Rust from https://rustup.rs" >&2; exit 1; }

export RP_CHAOS_SECONDS="$duration"
export RP_CHAOS_REDIS="$redis"
[ -z "$seed" ] || export RP_CHAOS_SEED="$seed"
[ -z "$faults" ] || export RP_CHAOS_FAULTS="$faults"
echo "chaos.sh: ${duration}s of faults on Redis ${redis}${seed:+, seed $seed}${faults:+, faults $faults}"
cargo test --release --test main chaos:: -- --nocapture
