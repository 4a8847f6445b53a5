#!/usr/bin/env bash
# Runs rollingpaper on this machine: installs redis-server if it is missing,
# starts one with append-only persistence under ./data if none answers, builds in
# release mode and runs the server. Extra arguments go to the server
# (see `scripts/run.sh --help`); RP_* environment variables work too.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

redis_url="${RP_REDIS:-redis://127.0.0.1:6379}"
store="${RP_STORE:-redis}"
for arg in "$@"; do
    case "$arg" in
        --help|-h|--version|-V) exec cargo run --quiet --release --bin rollingpaper -- "$@" ;;
        --store=memory|memory) store=memory ;;
    esac
done

if [ "$store" = redis ]; then
    command -v redis-server >/dev/null 2>&1 || install_packages redis-server
    if redis-cli -u "$redis_url" ping >/dev/null 2>&1; then
        echo "run.sh: using the Redis at $redis_url"
    else
        hostport="${redis_url#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
        port="${hostport##*:}"; [ "$port" != "$hostport" ] || port=6379
        mkdir -p data
        echo "run.sh: starting redis-server on 127.0.0.1:$port, append-only, data in $(pwd)/data"
        redis-server --bind 127.0.0.1 --port "$port" --dir "$(pwd)/data" --appendonly yes \
            --daemonize yes --pidfile "$(pwd)/data/redis.pid" --logfile "$(pwd)/data/redis.log"
        for _ in $(seq 50); do
            redis-cli -u "$redis_url" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
        redis-cli -u "$redis_url" ping >/dev/null 2>&1 || { echo "run.sh: redis-server did not start; see data/redis.log" >&2; exit 1; }
        echo "run.sh: stop it later with: redis-cli -p $port shutdown"
    fi
fi

cargo build --release --quiet --bin rollingpaper
listen="${RP_LISTEN:-127.0.0.1:8080}"
prev=""
for arg in "$@"; do
    [ "$prev" = "--listen" ] && listen="$arg"
    case "$arg" in --listen=*) listen="${arg#--listen=}" ;; esac
    prev="$arg"
done
echo "run.sh: rollingpaper listens on http://$listen  (WebSocket: ws://$listen/ws/{paper}; health: http://$listen/healthz)"
RP_REDIS="$redis_url" exec ./target/release/rollingpaper "$@"
