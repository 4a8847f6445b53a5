#!/usr/bin/env bash
# Tests the page's protocol client, src/web/rollingpaper-client.js, under Node
# (scripts/client/test.mjs) against the real server: one with Redis, restarted
# in the middle, one with auth on, and a scripted server for rare messages.
#
# Installs the `ws` package from the lock file when missing, builds the server,
# starts its own redis-server (in a temporary directory, on a free loopback
# port); test.mjs starts the servers. Everything started here is stopped on exit.
# RP_ALLOW_10=1 skips, rather than fails, the cases of PROTOCOL.md 1.1's
# `meta` and `patch` on a server without them (to test the client against an
# older server).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

die() { echo "client-test: $*" >&2; echo "client test: 0 passed, 1 failed"; exit 1; }

if [ ! -f scripts/client/node_modules/ws/package.json ] \
    || [ scripts/client/package-lock.json -nt scripts/client/node_modules/.package-lock.json ]; then
    echo "client-test: installing ws (npm ci)"
    npm ci --prefix scripts/client --no-audit --no-fund --silent || die "npm ci failed in scripts/client"
fi
cargo build --quiet --bin rollingpaper || die "cargo build failed"

work=$(mktemp -d "${TMPDIR:-/tmp}/rp-client.XXXXXX")
redis_pid=""
cleanup() {
    local status=$?
    for pid_file in "$work"/*.pid; do
        [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
    done
    if [ -n "$redis_pid" ]; then
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    if [ "$status" -ne 0 ]; then
        for log in "$work"/*.log; do
            [ -s "$log" ] && { echo "client-test: last lines of $(basename "$log"):" >&2; tail -n 20 "$log" >&2; }
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis_port=$(node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")
mkdir -p "$work/redis"
redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$work/redis" --appendonly yes --save '' \
    --daemonize no --logfile "$work/redis.log" &
redis_pid=$!
deadline=$((SECONDS + 10))
until redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null | grep -q PONG; do
    kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited at start"
    ((SECONDS < deadline)) || die "redis-server did not answer within 10 s"
    sleep 0.05 # poll interval of a condition with a deadline
done

RP_BIN="$root/target/debug/rollingpaper" RP_REDIS="redis://127.0.0.1:$redis_port" RP_WORK="$work" \
    timeout -k 5 150 node scripts/client/test.mjs </dev/null
