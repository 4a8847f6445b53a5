#!/usr/bin/env bash
# End-to-end test of the page served at / in a real browser: headless Chromium
# (Debian's package) driven by playwright-core (scripts/browser/test.mjs).
#
# Installs what it needs when missing (chromium, node and npm, redis-server,
# an emoji font and a CJK font, and poppler-utils for the keepsake's PDF, from
# Debian; playwright-core from the npm lock file, never a downloaded browser),
# builds the server, starts its own redis-server (append-only, in a temporary
# directory, on a free loopback port), and lets test.mjs start and restart the
# server on another free port. Everything started here is stopped on exit.
#
# Screenshots (every view at 1280x800 and 390x844), the keepsake's PDF and its
# pages go to target/browser-screenshots/ (or $RP_SCREENSHOTS).
# Non-interactive; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# Bounds the browser part; building and installing are bounded by their tools.
RUN_TIMEOUT_SECONDS=${RP_BROWSER_TEST_TIMEOUT:-480}
screenshots=${RP_SCREENSHOTS:-$root/target/browser-screenshots}
chromium_bin=${CHROMIUM:-/usr/bin/chromium}

work=""
say() { echo "browser-test: $*"; }
die() {
    echo "browser-test: $*" >&2
    if [ -n "$work" ] && [ -s "$work/server.log" ]; then
        echo "browser-test: last lines of the server's log:" >&2
        tail -n 30 "$work/server.log" >&2 || true
    fi
    echo "browser test: 0 passed, 1 failed"
    exit 1
}

install_system_packages() {
    local missing=()
    [ -x "$chromium_bin" ] || missing+=(chromium)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
    # The page names emoji fonts; without one installed, screenshots show boxes.
    [ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing+=(fonts-noto-color-emoji)
    # Korean, Japanese and Chinese notes: without a CJK font they show as boxes.
    [ -e /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ] || missing+=(fonts-noto-cjk)
    # The keepsake is printed to PDF; pdftoppm and pdftotext check its pages.
    { command -v pdftoppm && command -v pdftotext; } >/dev/null 2>&1 || missing+=(poppler-utils)
    install_packages "${missing[@]}"
    [ -x "$chromium_bin" ] || die "chromium is still missing at $chromium_bin"
}

install_node_packages() {
    local dir=$root/scripts/browser
    # npm ci is exact and quick when the lock file has not changed since the last install.
    if [ ! -f "$dir/node_modules/playwright-core/package.json" ] \
        || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
        say "installing node packages (npm ci)"
        (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) \
            || die "npm ci failed in scripts/browser"
    fi
}

free_port() {
    node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"
}

redis_pid=""
cleanup() {
    local status=$?
    # The servers are test.mjs's children; should test.mjs have died first, their pids are here.
    if [ -n "$work" ]; then
        for pid_file in "$work"/*.pid; do
            [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
        done
    fi
    if [ -n "$redis_pid" ]; then
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    [ -z "$work" ] || rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_redis() {
    local port=$1
    mkdir -p "$work/redis"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$work/redis" --appendonly yes --save '' \
        --daemonize no --logfile "$work/redis.log" &
    redis_pid=$!
    local deadline=$((SECONDS + 10))
    until redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; do
        kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited at start: $(tail -n 5 "$work/redis.log")"
        ((SECONDS < deadline)) || die "redis-server did not answer on port $port within 10 s"
        sleep 0.05 # poll interval of a condition with a deadline
    done
}

install_system_packages
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= 20)) || die "playwright-core needs Node.js 20 or later; this is $(node --version)"
install_node_packages
command -v cargo >/dev/null 2>&1 || die "cargo is missing; install Rust from https://rustup.rs"
say "building the server (cargo build)"
cargo build --quiet --bin rollingpaper || die "cargo build failed"

work=$(mktemp -d "${TMPDIR:-/tmp}/rp-browser.XXXXXX")
redis_port=$(free_port)
server_port=$(free_port)
auth_port=$(free_port)
start_redis "$redis_port"
say "redis on 127.0.0.1:$redis_port, server on 127.0.0.1:$server_port"

mkdir -p "$screenshots"
rm -f "$screenshots"/*.png "$screenshots"/*.pdf
status=0
RP_BIN="$root/target/debug/rollingpaper" \
    RP_REDIS="redis://127.0.0.1:$redis_port" \
    RP_PORT="$server_port" \
    RP_AUTH_PORT="$auth_port" \
    RP_WORK="$work" \
    RP_SCREENSHOTS="$screenshots" \
    CHROMIUM="$chromium_bin" \
    timeout -k 10 "$RUN_TIMEOUT_SECONDS" node "$root/scripts/browser/test.mjs" </dev/null || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    die "the browser test took over $RUN_TIMEOUT_SECONDS s and was stopped"
fi
exit "$status"
