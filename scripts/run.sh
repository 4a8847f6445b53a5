#!/usr/bin/env bash
# Runs rollingpaper on this machine. The Redis URL comes from --redis URL,
# --redis=URL or RP_REDIS (in that order; default redis://127.0.0.1:6379).
# When that URL is on this machine (127.0.0.1, localhost, ::1) and nothing
# answers there, installs redis-server if it is missing and starts one,
# append-only, with its data under ./data; a Redis elsewhere is used as it is.
# Builds in release mode and runs the server with every argument given
# (see `scripts/run.sh --help`); RP_* environment variables work too.
#
# RUN_BIN=path runs that binary instead of building one; RUN_DATA_DIR sets
# where a started redis-server keeps its data (default ./data).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

redis_url="${RP_REDIS:-redis://127.0.0.1:6379}"
store="${RP_STORE:-redis}"
listen="${RP_LISTEN:-127.0.0.1:8080}"
prev=""
for arg in "$@"; do
    case "$prev" in
        --redis) redis_url="$arg" ;;
        --store) store="$arg" ;;
        --listen) listen="$arg" ;;
    esac
    case "$arg" in
        --help|-h)
            cat <<'HELP'
scripts/run.sh: runs rollingpaper on this machine.

  scripts/run.sh [SERVER FLAGS...]

With a Redis URL on this machine (--redis, --redis=, or RP_REDIS; default
redis://127.0.0.1:6379) and nothing answering there, it installs redis-server
if missing and starts one, append-only, with its data under ./data (it stays
up after the server stops; the script says how to stop it). A Redis elsewhere
is used as it is. Then it builds the server in release mode and runs it with
every flag given; RP_* variables work too. It says the server listens only
once its own server process answers /healthz on the --listen port.

  RUN_BIN=PATH        run that binary instead of building one
  RUN_DATA_DIR=DIR    where a redis-server started here keeps its data (default ./data)

The server's own flags follow.

HELP
            if [ -n "${RUN_BIN:-}" ]; then exec "$RUN_BIN" "$@"; fi
            exec cargo run --quiet --release --bin rollingpaper -- "$@" ;;
        --version|-V)
            if [ -n "${RUN_BIN:-}" ]; then exec "$RUN_BIN" "$@"; fi
            exec cargo run --quiet --release --bin rollingpaper -- "$@" ;;
        --redis=*) redis_url="${arg#--redis=}" ;;
        --store=*) store="${arg#--store=}" ;;
        --listen=*) listen="${arg#--listen=}" ;;
    esac
    prev="$arg"
done

# host and port of a redis:// URL (user, password and database stripped).
hostport="${redis_url#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
redis_host="${hostport%:*}"; redis_port="${hostport##*:}"
[ "$redis_port" != "$hostport" ] || { redis_host="$hostport"; redis_port=6379; }
redis_host="${redis_host#[}"; redis_host="${redis_host%]}"

started_redis=""
server_pid=""
announced=""
cleanup() {
    # A Redis this script started stays only behind a server that came up (its
    # data is in use then); behind any failure to get there it is stopped.
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    if [ -n "$started_redis" ] && [ -z "$announced" ]; then
        echo "run.sh: stopping the redis-server it started on port $redis_port" >&2
        redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || kill "$started_redis" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis_answers() {
    command -v redis-cli >/dev/null 2>&1 && timeout 3 redis-cli -u "$redis_url" ping >/dev/null 2>&1
}

if [ "$store" = redis ]; then
    case "$redis_url" in
        redis://*) ;;
        *) echo "run.sh: using $redis_url as it is (only a plain redis:// URL on this machine is started here)" ;;
    esac
    case "$redis_url:$redis_host" in
        redis://*:127.0.0.1|redis://*:localhost|redis://*:::1)
            command -v redis-server >/dev/null 2>&1 || install_packages redis-server
            if redis_answers; then
                echo "run.sh: using the Redis at $redis_url"
            else
                data="${RUN_DATA_DIR:-$(pwd)/data}"
                mkdir -p "$data"
                echo "run.sh: starting redis-server on 127.0.0.1:$redis_port, append-only, data in $data"
                redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$data" --appendonly yes \
                    --daemonize yes --pidfile "$data/redis.pid" --logfile "$data/redis.log"
                for _ in $(seq 50); do
                    [ -s "$data/redis.pid" ] && break
                    sleep 0.1
                done
                started_redis="$(cat "$data/redis.pid" 2>/dev/null || true)"
                for _ in $(seq 50); do
                    redis_answers && break
                    sleep 0.1
                done
                redis_answers || { echo "run.sh: redis-server did not start; see $data/redis.log" >&2; exit 1; }
                echo "run.sh: stop it later with: redis-cli -p $redis_port shutdown"
            fi
            ;;
        redis://*)
            # Never start a local Redis for a remote URL: the server reports whether
            # that one answers (and waits for it if it does not yet).
            echo "run.sh: using the Redis at $redis_url (not on this machine: nothing started here)" ;;
    esac
fi

if [ -n "${RUN_BIN:-}" ]; then
    bin="$RUN_BIN"
else
    cargo build --release --quiet --bin rollingpaper
    bin=./target/release/rollingpaper
fi

# Where /healthz answers: ":8080" and "0.0.0.0:8080" are reached on 127.0.0.1.
health_host="${listen%:*}"; health_port="${listen##*:}"
case "$health_host" in ""|0.0.0.0|"[::]") health_host=127.0.0.1 ;; localhost) health_host=127.0.0.1 ;; esac
health_host="${health_host#[}"; health_host="${health_host%]}"
healthy() {
    local line
    { exec 3<>"/dev/tcp/$health_host/$health_port"; } 2>/dev/null || return 1
    printf 'GET /healthz HTTP/1.0\r\nHost: run\r\n\r\n' >&3
    IFS= read -r -t 2 line <&3 || line=""
    exec 3<&- 3>&-
    [[ "$line" == *" 200 "* ]]
}

# Whether the listening socket of the port is this script's server's (by pid,
# from /proc): a server already running there answers /healthz too, and this
# one is about to fail with "address in use".
listens_itself() {
    local port_hex inode
    port_hex=$(printf '%04X' "$health_port")
    for inode in $(awk -v port=":$port_hex" '$4 == "0A" && substr($2, length($2) - 4) == port { print $10 }'         /proc/net/tcp /proc/net/tcp6 2>/dev/null); do
        if find "/proc/$server_pid/fd" -lname "socket:\[$inode\]" 2>/dev/null | grep -q .; then
            return 0
        fi
    done
    return 1
}

# The server gets a process group of its own (set -m), so that a Ctrl-C or a
# signal to this script's group reaches it exactly once, forwarded below: a
# second signal would make it exit without writing its backlog.
set -m
RP_REDIS="$redis_url" "$bin" "$@" &
server_pid=$!
set +m
trap 'kill -TERM "$server_pid" 2>/dev/null || true' INT TERM
if [ "$health_port" = 0 ]; then
    announced=1
    echo "run.sh: rollingpaper picks its own port; the server's log says which"
fi
while [ -z "$announced" ] && kill -0 "$server_pid" 2>/dev/null; do
    if healthy && listens_itself; then
        announced=1
        echo "run.sh: rollingpaper listens on http://$listen  (WebSocket: ws://$listen/ws/{paper}; health: http://$listen/healthz)"
    else
        sleep 0.1
    fi
done
# `wait` also returns when a signal arrives; the server is then still stopping.
while :; do
    status=0
    wait "$server_pid" || status=$?
    kill -0 "$server_pid" 2>/dev/null || break
done
server_pid=""
exit "$status"
