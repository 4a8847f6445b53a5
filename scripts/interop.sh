#!/usr/bin/env bash
# Interoperability with clients nobody here wrote: drives the server through a
# whole session with Python's `websockets` (PyPI) and Node's `ws` (npm), installing
# them if missing (a venv under target/, node_modules beside the client). The
# server runs from target/debug on a free loopback port with the memory store.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/interop-venv
if ! "$venv/bin/python" -c 'import websockets' 2>/dev/null; then
    echo "interop.sh: installing websockets into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'websockets==17.*'
fi
if [ ! -d scripts/interop/node_modules/ws ]; then
    echo "interop.sh: installing ws"
    npm ci --prefix scripts/interop --no-audit --no-fund --silent
fi

cargo build --quiet --bin rollingpaper
log=$(mktemp)
./target/debug/rollingpaper --store memory --listen 127.0.0.1:0 --threads 2 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$log"' EXIT
addr=""
for _ in $(seq 200); do
    addr=$(sed -n 's|.*listening on http://\([0-9.:]*\).*|\1|p' "$log")
    [ -n "$addr" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { echo "interop.sh: the server did not start" >&2; cat "$log" >&2; exit 1; }

passed=0
failed=0
run() {
    if timeout 60 "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}
run "$venv/bin/python" scripts/interop/client.py "ws://$addr"
run node scripts/interop/client.mjs "ws://$addr"
echo "interop: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
