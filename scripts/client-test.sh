#!/usr/bin/env bash
# Tests the page's protocol client, src/web/rollingpaper-client.js, under Node
# (scripts/client/test.mjs) against the real server: one with Redis, restarted
# in the middle, one with auth on, and a scripted server for rare messages;
# runs examples/node.mjs against the real server too. First, type-checks its
# declarations (rollingpaper-client.d.ts) with `tsc --noEmit --strict`: Node's
# side through examples/node.ts (the `ws` package's WebSocket), a page's
# through scripts/client/types.ts (the DOM's).
#
# Installs the `ws` package (scripts/client) and the examples' packages (`ws`,
# TypeScript and the types of `ws` and Node, in examples/) from their lock
# files when missing or when a lock file changed, builds the server, starts its
# own redis-server (in a temporary directory, on a free loopback port);
# test.mjs starts the servers. Everything started here is stopped on exit.
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
if [ ! -f examples/node_modules/ws/package.json ] || [ ! -f examples/node_modules/typescript/package.json ] \
    || [ examples/package-lock.json -nt examples/node_modules/.package-lock.json ]; then
    echo "client-test: installing the examples' packages (npm ci in examples)"
    npm ci --prefix examples --no-audit --no-fund --silent || die "npm ci failed in examples"
fi
tsc=examples/node_modules/.bin/tsc
"$tsc" -p examples --noEmit --strict || die "examples/node.ts does not type-check (tsc --strict)"
"$tsc" --noEmit --strict --target es2022 --module esnext --lib es2022,dom scripts/client/types.ts \
    || die "scripts/client/types.ts does not type-check (tsc --strict)"
echo "client-test: the client's types check under tsc --strict (examples/node.ts, scripts/client/types.ts)"
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
